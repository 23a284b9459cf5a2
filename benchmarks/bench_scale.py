"""Scale-out: Loop A for many tenants batched, and Loop B over several devices, in one run.

**Loop A, tenants** (this process, `configure_cpu_low_latency()`, the default backend): 1,000
tenants at dim 256 (each with a 256-node graph, 4 used + 4 unused ids per request), as
interactions per second, side by side with the single-tenant path on the same machine:

- `instant_step`, one learner, one request per call (what a server without tenants pays);
- `instant_step` over 1,000 separate single-tenant states, round-robin (tenants without stacking);
- `instant_scan`, one learner, batches of 1,000;
- `instant_step_tenants`, 1,000 stacked tenants: batches of 1,000 with one request per tenant,
  of 4,000 with four per tenant, and of 4,000 with random tenants (uneven: the busiest tenant
  sets the number of rounds, see `instant_step_tenants`).

**Loop B, devices** (one subprocess per device count, `XLA_FLAGS=
--xla_force_host_platform_device_count=N`, CPU): `background_step_sharded` for one learner with
5,200 signals at dim 768 and 50 clusters (data-parallel: signals split over the devices), and
`background_step_tenants` for 64 tenants with 300 signals each at dim 128 (tenants split over the
devices), timed after compilation, as ratios to one device. Forced CPU devices share the
machine's cores (2 here), so these ratios show the cost of partitioning, not a speed-up: report
them, do not over-read them.

Usage: `python benchmarks/bench_scale.py [--tenants 1000] [--dim 256] [--devices 1 2 4 8]
[--quick]`. Writes `benchmarks/results/scale.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _interactions(cfg, n, rng, *, nodes):
  import numpy as np

  import sona_jax as sona

  q = rng.normal(size=(n, cfg.dim)).astype(np.float32)
  out = []
  for i in range(n):
    ids = rng.choice(nodes, 9, replace=False) if nodes else np.full(9, -1)
    out.append(
      sona.make_interaction(
        cfg,
        query=q[i],
        quality=float(rng.uniform()),
        anchor=int(ids[0]),
        used=[int(v) for v in ids[1:5] if v >= 0],
        unused=[int(v) for v in ids[5:9] if v >= 0],
        tier=int(rng.integers(cfg.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        context_tokens=int(rng.integers(0, 4000)),
        time=i,
      )
    )
  return out


def loop_a(n_tenants: int, dim: int, reps: int) -> dict:
  """Loop A interactions/s: stacked tenants vs the single-tenant path (this process)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import sona_jax as sona
  from sona_jax import tenants

  nodes = 256
  cfg = sona.SonaConfig(
    dim=dim,
    graph_capacity=nodes,
    graph_degree=8,
    signal_capacity=128,
    trajectory_capacity=128,
    bank_capacity=16,
    probe_capacity=8,
    pattern_clusters=8,
  )
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(nodes, dim)), jnp.float32)
  add = jax.jit(jax.vmap(lambda g: sona.graph.add_nodes(g, emb, quality=0.5)[0]))
  states = tenants.init_tenants(cfg, jax.random.key(0), n_tenants)
  states = states._replace(graph=add(states.graph))
  pool = _interactions(cfg, 4 * n_tenants, rng, nodes=nodes)
  loop_a_leaves = lambda s: (s.micro, s.graph.edges, s.graph.node, s.signals, s.metrics.counters)
  out = {}

  def rate(name, fn, per_call, calls):
    fn(0)  # compile
    jax.block_until_ready(loop_a_leaves(state[0]))
    t = time.perf_counter()
    for i in range(calls):
      fn(i)
    jax.block_until_ready(loop_a_leaves(state[0]))
    out[name] = per_call * calls / (time.perf_counter() - t)
    print(f"  {name:<40} {out[name]:>12,.0f} interactions/s", flush=True)

  # Single-tenant path: one learner.
  state = [jax.tree.map(jnp.copy, tenants.tenant(states, 0))]

  def step(i):
    state[0], _ = sona.instant_step(state[0], pool[i % len(pool)], cfg)

  rate("instant_step, 1 learner", step, 1, 200 * reps)

  batch = sona.stack_interactions(pool[:n_tenants])

  def scan(i):
    state[0], _ = sona.instant_scan(state[0], batch, cfg)

  rate(f"instant_scan, 1 learner, batch {n_tenants}", scan, n_tenants, reps)

  # Tenants without stacking: a list of single-tenant states, round-robin.
  many = [jax.tree.map(jnp.copy, tenants.tenant(states, t)) for t in range(n_tenants)]
  first = state[0]

  def round_robin(i):
    t = i % n_tenants
    many[t], _ = sona.instant_step(many[t], pool[i % len(pool)], cfg)
    state[0] = many[t]

  rate(f"instant_step, {n_tenants} separate states", round_robin, 1, 2 * n_tenants)
  many.clear()
  state[0] = first

  # Stacked tenants.
  big = sona.stack_interactions(pool[: 4 * n_tenants])
  one_each = [rng.permutation(n_tenants) for _ in range(reps + 1)]
  four_each = [rng.permutation(np.repeat(np.arange(n_tenants), 4)) for _ in range(reps + 1)]
  uneven = [rng.integers(0, n_tenants, 4 * n_tenants) for _ in range(reps + 1)]
  bound = max(int(np.bincount(u, minlength=n_tenants).max()) for u in uneven)
  rounds = 1 << (bound - 1).bit_length()
  state[0] = states

  def stacked(b, ids, max_per_tenant=None):
    def go(i):
      state[0], _ = tenants.instant_step_tenants(
        state[0], b, ids[i], cfg, max_per_tenant=max_per_tenant
      )

    return go

  n4 = 4 * n_tenants
  rate(
    f"tenants x{n_tenants}, 1 each (batch {n_tenants})", stacked(batch, one_each), n_tenants, reps
  )
  rate(f"tenants x{n_tenants}, 4 each (batch {n4})", stacked(big, four_each), n4, reps)
  rate(
    f"tenants x{n_tenants}, random (batch {n4}, {rounds} rounds)",
    stacked(big, uneven, rounds),
    n4,
    reps,
  )
  rejected = int(np.asarray(state[0].metrics.rejected).sum())
  return dict(
    config=dict(tenants=n_tenants, dim=dim, graph_capacity=nodes, used=4, unused=4),
    backend=jax.default_backend(),
    rates=out,
    rejected=rejected,
  )


def _fill_single(state, cfg, n, rng):
  import sona_jax as sona

  for start in range(0, n, 1040):
    its = _interactions(cfg, min(1040, n - start), rng, nodes=0)
    state, _ = sona.instant_scan(state, sona.stack_interactions(its), cfg)
  return state


def loop_b_worker(devices: int, reps: int) -> dict:
  """Runs in a subprocess with `devices` forced CPU devices: Loop B, timed after compilation."""
  from sona_jax.runtime import configure_cpu_low_latency

  configure_cpu_low_latency()
  import jax
  import numpy as np

  import sona_jax as sona
  from sona_jax import sharding, tenants

  assert jax.device_count() == devices, jax.devices()
  mesh = sharding.make_mesh()
  out = dict(devices=devices)
  rng = np.random.default_rng(0)

  # One learner, data-parallel Loop B: 5,200 signals at dim 768 (bench_background's middle row).
  n = 5200
  cfg = sona.SonaConfig(
    dim=768, graph_capacity=64, signal_capacity=n, trajectory_capacity=64, pattern_clusters=50
  )
  state = jax.jit(sona.init_state, static_argnums=0)(cfg, jax.random.key(0))
  state = jax.device_put(state, jax.devices()[0])  # committed, as after every cycle below
  times, ref = [], []
  for r in range(reps + 1):
    state = _fill_single(state, cfg, n, rng)
    if devices == 1:  # the unsharded path on the same signals, for reference
      t = time.perf_counter()
      _, rep0 = sona.background_step(state, cfg, 3600 * (r + 1))
      ref.append(time.perf_counter() - t)
    t = time.perf_counter()
    state, rep = sharding.background_step_sharded(state, cfg, 3600 * (r + 1), mesh)
    times.append(time.perf_counter() - t)
    assert rep.ran and rep.n_signals == n, rep
    state = jax.device_put(state, jax.devices()[0])  # Loop A serves from one device
  out["dp_first_s"] = times[0]
  out["dp_s"] = float(np.median(times[1:]))
  out["dp_phases"] = rep.seconds
  if ref:
    out["single_device_background_step_s"] = float(np.median(ref[1:]))

  # Tenants: 64 learners x 300 signals at dim 128, the tenant axis split over the devices.
  n_t, per = 64, 300
  tcfg = sona.SonaConfig(
    dim=128,
    graph_capacity=64,
    signal_capacity=320,
    trajectory_capacity=64,
    bank_capacity=64,
    pattern_clusters=16,
  )
  states = tenants.init_tenants(
    tcfg, jax.random.key(1), n_t, sharding=sharding.tenant_sharding(mesh)
  )
  its = sona.stack_interactions(_interactions(tcfg, n_t * 20, rng, nodes=0))
  times = []
  for r in range(reps + 1):
    for _ in range(per // 20):  # 20 per tenant per batch
      ids = rng.permutation(np.repeat(np.arange(n_t), 20))
      states, _ = tenants.instant_step_tenants(states, its, ids, tcfg)
    t = time.perf_counter()
    states, trep = tenants.background_step_tenants(states, tcfg, 3600 * (r + 1))
    times.append(time.perf_counter() - t)
    assert trep.ran.all() and (trep.n_signals == per).all(), trep.n_signals
  out["tenants_first_s"] = times[0]
  out["tenants_s"] = float(np.median(times[1:]))
  return out


def _run_devices(devices: int, reps: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"  # forced devices are CPU devices, also on a GPU machine
  cmd = [sys.executable, __file__, "--worker", str(devices), "--reps", str(reps)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
  if proc.returncode != 0:
    raise RuntimeError(f"worker with {devices} devices failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tenants", type=int, default=1000)
  p.add_argument("--dim", type=int, default=256)
  p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  p.add_argument("--reps", type=int, default=5, help="timed repetitions")
  p.add_argument("--quick", action="store_true", help="100 tenants, 2 repetitions (smoke run)")
  p.add_argument(
    "--skip-devices",
    action="store_true",
    help="Loop A part only (the JSON keeps the last full run's Loop B part, with its date)",
  )
  p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.quick:
    a.tenants, a.reps = 100, 2
  if a.worker:
    print(json.dumps(loop_b_worker(a.worker, a.reps)))
    return 0

  from sona_jax.runtime import configure_cpu_low_latency

  configure_cpu_low_latency()
  print(f"Loop A, {a.tenants} tenants, dim {a.dim}:", flush=True)
  la = loop_a(a.tenants, a.dim, a.reps)
  r = la["rates"]
  step = r["instant_step, 1 learner"]
  scan = r[f"instant_scan, 1 learner, batch {a.tenants}"]
  head = f"{'Loop A path':<52} {'interactions/s':>15} {'vs step':>8} {'vs scan':>8}"
  lines = [head, "-" * len(head)]
  for name, v in r.items():
    lines.append(f"{name:<52} {v:>15,.0f} {v / step:>8.2f} {v / scan:>8.2f}")
  table_a = "\n".join(lines)
  print("\n" + table_a)

  table_b, rows_b = "", []
  if not a.skip_devices:
    print("\nLoop B on forced CPU devices:", flush=True)
    for d in a.devices:
      rows_b.append(_run_devices(d, a.reps))
      print(f"  {d} devices done", flush=True)
    base = next((x for x in rows_b if x["devices"] == min(a.devices)), rows_b[0])
    head = (
      f"{'devices':>7} {'DP Loop B (1 learner)':>22} {'ratio':>6} "
      f"{'Loop B, 64 tenants':>19} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for x in rows_b:
      lines.append(
        f"{x['devices']:>7} {x['dp_s']:>21.3f}s {x['dp_s'] / base['dp_s']:>6.2f} "
        f"{x['tenants_s']:>18.3f}s {x['tenants_s'] / base['tenants_s']:>6.2f}"
      )
    table_b = "\n".join(lines)
    print("\n" + table_b)
    one = next((x for x in rows_b if "single_device_background_step_s" in x), None)
    if one:
      print(
        f"\n1 device: background_step {one['single_device_background_step_s']:.3f}s, "
        f"background_step_sharded {one['dp_s']:.3f}s (same signals)"
      )
  RESULTS.mkdir(parents=True, exist_ok=True)
  now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  path = RESULTS / "scale.json"
  loop_b_time = now
  if a.skip_devices and path.exists():  # keep the Loop B part of the last full run, dated
    old = json.loads(path.read_text())
    rows_b, table_b = old.get("loop_b", []), old.get("table_loop_b", "")
    loop_b_time = old.get("loop_b_time", old.get("time"))
  out = dict(
    benchmark="scale",
    time=now,
    loop_b_time=loop_b_time,
    machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
    loop_a=la,
    loop_b=rows_b,
    table_loop_a=table_a,
    table_loop_b=table_b,
  )
  path.write_text(json.dumps(out, indent=2))
  print(f"\nwrote {path.relative_to(HERE.parent)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
