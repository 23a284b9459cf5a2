"""Loop A latency and throughput, side by side with the peer `@ruvector/sona`, in one run.

Measures, at dims 256, 768 and 4096 (micro rank 2, the default `max_ids` with the feedback of a
top-10 retrieval: 5 used + 5 unused ids, a graph of 10,000 nodes x 16 slots):

- the number of kernels (thunks) XLA:CPU runs per `instant_step`, counted in the optimised HLO
  (each costs ~1 us on XLA:CPU whatever it computes);
- `instant_step` p50/p99 per call on a prebuilt interaction, blocked until every array it wrote
  is ready (the Loop A part of the state; blocking on all ~80 leaves of the state, most of them
  untouched Loop B arrays, would add ~14 us of traversal that says nothing about Loop A);
- `make_interaction` + `instant_step` (what a serving loop pays per request), and
  `types.pack_interaction` + `step_packed` (the path of `Sona.observe(query=..., ...)`: the fields
  packed straight into the vector Loop A reads);
- `instant_scan` throughput with batches of 256;
- in low-latency mode at dim 768, each in its own process, the cost of wider id lists: `max_ids` 4
  with 4 + 4 ids against 10 with 5 + 5 and 10 + 10;

in JAX's default CPU mode, in `configure_cpu_low_latency()` mode, and in that mode pinned to one
CPU (`pin_cpu=`), all three with Loop A's native CPU kernel (`sona_jax.native`, the default where
a C++ compiler is found), and in low-latency mode with the pure-JAX rule that GPU and TPU run
(`jax_rule`), each mode in its own subprocess (the XLA flag must be set before JAX starts). Beside
each step time, the dispatch floor: a jitted call with the step's arguments, donation and outputs
that does next to nothing, what no kernel work can remove.
In the same run, the peer's per-request learning (`beginTrajectory`, `addTrajectoryStep`,
`endTrajectory`, `flush`) at the same dims, with full-length attention arrays, and the ratio
ours / peer. The peer column is skipped with a note when Node.js or the npm package is missing
(`--no-install` forbids installing it).

Usage: `python benchmarks/bench_instant.py [--quick] [--dims 256 768 4096] [--no-install]`.
Writes `benchmarks/results/instant.json`.
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
# Instructions of an optimised HLO entry computation that run no kernel.
_NOT_KERNELS = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def count_kernels(compiled_text: str) -> int:
  """Kernels (thunks) of a compiled XLA:CPU program: the instructions of its entry computation
  other than parameters, constants, tuples and bitcasts (fusions, copies, sorts, custom calls,
  dynamic-update-slices...). On XLA:CPU each costs ~1 us whatever it computes."""
  import re

  entry = compiled_text[compiled_text.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  # `%name = TYPE op(...)`, TYPE a shape or a tuple of shapes (multi-output fusions, custom calls).
  pattern = re.compile(r"=\s*(?:\([^()]*\)|\S+)\s+([\w-]+)\(")
  ops = [pattern.search(line) for line in entry.splitlines()[1:]]
  return sum(1 for m in ops if m and m.group(1) not in _NOT_KERNELS)


def _dispatch_floor(state, packed, cfg, n: int) -> float:
  """p50 (us) of a jitted call with exactly `instant_step`'s arguments, donation and outputs that
  does next to nothing (one counter add): the dispatch cost no kernel work can remove."""
  import jax
  import numpy as np

  from sona_jax.loops import instant

  def nothing(sub, base, emb, p, cfg):
    return sub._replace(counters=sub.counters.at[0].add(1)), p[:5]

  f = jax.jit(
    nothing, static_argnums=4, donate_argnums=0, compiler_options=instant.COMPILER_OPTIONS
  )
  sub = jax.tree.map(lambda x: x.copy(), instant.split_state(state))
  for _ in range(100):
    sub, r = f(sub, state.base, state.graph.emb, packed, cfg)
  times = []
  for _ in range(n):
    t = time.perf_counter()
    sub, r = f(sub, state.base, state.graph.emb, packed, cfg)
    jax.block_until_ready((sub, r))
    times.append(time.perf_counter() - t)
  return float(np.percentile(times, 50) * 1e6)


RESULTS = HERE / "results"
DEFAULT_DIMS = (256, 768, 4096)


def _worker(mode: str, dims: list[int], n: int, batches: int) -> dict:
  """Runs in a subprocess: measures one CPU mode (`jax_rule`: low latency without the native
  kernels, for the side-by-side)."""
  if mode in ("low_latency", "pinned", "jax_rule") or mode.startswith("ids:"):
    import os as _os

    from sona_jax.runtime import configure_cpu_low_latency

    pin = sorted(_os.sched_getaffinity(0))[0] if mode == "pinned" else None
    applied = configure_cpu_low_latency(pin_cpu=pin)
  else:
    applied = {}
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  import sona_jax as sona
  from sona_jax import native
  from sona_jax.loops import instant
  from sona_jax.runtime import count_compiles

  native.set_enabled(mode != "jax_rule")
  use_native = native.enabled()
  out = {
    "mode": mode,
    "applied": applied,
    "jax": jax.__version__,
    "native": use_native,
    "results": [],
  }

  def written(state):  # what instant_step wrote
    return (
      state.micro,
      state.graph.edges,
      state.graph.node,
      state.signals,
      state.trajectories,
      state.metrics,
    )

  def measure(dim: int, max_ids: int, per_side: int, full: bool = True) -> dict:
    """One configuration: `per_side` used and `per_side` unused ids per interaction."""
    cfg = sona.SonaConfig(
      dim=dim,
      micro_rank=2,
      graph_capacity=10_000,
      graph_degree=16,
      max_ids=max_ids,
      signal_capacity=10_000,
      trajectory_capacity=10_000,
    )
    rng = np.random.default_rng(0)
    state = sona.init_state(cfg, jax.random.key(0))
    g, _, _ = sona.graph.add_nodes(
      state.graph, jnp.asarray(rng.normal(size=(10_000, dim)), jnp.float32), quality=0.5
    )
    state = state._replace(graph=g)
    pool = 512
    queries = rng.normal(size=(pool, dim)).astype(np.float32)
    ids = np.stack([rng.choice(10_000, 2 * per_side + 1, replace=False) for _ in range(pool)])
    quality = rng.uniform(size=pool)
    args = [
      dict(
        query=queries[i],
        quality=float(quality[i]),
        anchor=int(ids[i, 0]),
        used=ids[i, 1 : 1 + per_side].tolist(),
        unused=ids[i, 1 + per_side :].tolist(),
        tier=int(i % 3),
        latency_ms=float(50 + i % 200),
        context_tokens=512,
        time=i,
      )
      for i in range(pool)
    ]
    its = [sona.make_interaction(cfg, **a) for a in args]
    packed = sona.types.pack(its[0], cfg)
    step = jax.jit(
      functools.partial(instant.transition, use_native=use_native),
      static_argnums=4,
      donate_argnums=0,  # as instant_step: without donation XLA adds copies of the tables
      compiler_options=instant.COMPILER_OPTIONS,
    )
    lowered = step.lower(instant.split_state(state), state.base, state.graph.emb, packed, cfg)
    kernels = count_kernels(lowered.compile().as_text())
    floor = _dispatch_floor(state, packed, cfg, n)
    for i in range(200):  # warm-up (compiles once)
      state, _ = sona.instant_step(state, its[i % pool], cfg)
    jax.block_until_ready(state)
    step_t, full_t = [], []
    with count_compiles() as compiles:
      for i in range(n):
        t = time.perf_counter()
        state, _ = sona.instant_step(state, its[i % pool], cfg)
        jax.block_until_ready(written(state))
        step_t.append(time.perf_counter() - t)
    res = dict(
      dim=dim,
      max_ids=max_ids,
      ids_per_side=per_side,
      kernels=kernels,
      step_p50_us=float(np.percentile(step_t, 50) * 1e6),
      step_p99_us=float(np.percentile(step_t, 99) * 1e6),
      step_mean_us=float(np.mean(step_t) * 1e6),
      floor_p50_us=floor,
      compiles_while_timed=compiles.compiles,
    )
    if not full:
      return res
    for i in range(n):
      t = time.perf_counter()
      it = sona.make_interaction(cfg, **args[i % pool])
      state, _ = sona.instant_step(state, it, cfg)
      jax.block_until_ready(written(state))
      full_t.append(time.perf_counter() - t)
    pack_t = []  # the request path without an Interaction (what Sona.observe(query=...) does)
    for i in range(n):
      t = time.perf_counter()
      packed = sona.types.pack_interaction(cfg, **args[i % pool])
      state, _ = instant.step_packed(state, packed, cfg)
      jax.block_until_ready(written(state))
      pack_t.append(time.perf_counter() - t)
    # Batched: 256 interactions per call, sequential semantics.
    batch = sona.stack_interactions(its[:256])
    state, _ = sona.instant_scan(state, batch, cfg)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(batches):
      state, _ = sona.instant_scan(state, batch, cfg)
    jax.block_until_ready(state)
    scan_s = time.perf_counter() - t
    return dict(
      res,
      full_p50_us=float(np.percentile(full_t, 50) * 1e6),
      full_p99_us=float(np.percentile(full_t, 99) * 1e6),
      pack_p50_us=float(np.percentile(pack_t, 50) * 1e6),
      scan_per_s=float(batches * 256 / scan_s),
      rejected=int(state.metrics.rejected),
    )

  # The default max_ids with the feedback of a top-10 retrieval (5 used, 5 unused).
  if mode.startswith("ids:"):  # the cost of wider id lists, at dim 768, one process per list
    _, k, per = mode.split(":")
    out["ids_cost"] = [measure(768, int(k), int(per), full=False)]
    return out
  default_k = sona.SonaConfig(dim=8).max_ids
  for dim in dims:
    out["results"].append(measure(dim, default_k, 5))
  return out


def _run_mode(mode: str, dims: list[int], n: int, batches: int) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # each mode sets what it needs; nothing inherited
  cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--batches", str(batches)]
  cmd += ["--dims", *map(str, dims)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dims", type=int, nargs="+", default=list(DEFAULT_DIMS))
  p.add_argument("--n", type=int, default=3000, help="timed calls per dim and mode")
  p.add_argument("--batches", type=int, default=40, help="timed instant_scan batches of 256")
  p.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
  p.add_argument("--no-install", action="store_true", help="never npm-install the peer")
  p.add_argument("--worker", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.quick:
    a.n, a.batches = 500, 5
  if a.worker:
    print(json.dumps(_worker(a.worker, a.dims, a.n, a.batches)))
    return 0

  sys.path.insert(0, str(HERE))
  import _peer

  names = ("default", "low_latency", "pinned", "jax_rule")
  modes = {m: _run_mode(m, a.dims, a.n, a.batches) for m in names}
  ok, why = _peer.ensure_peer(install=not a.no_install)
  peer, note = (None, why)
  if ok:
    peer, note = _peer.run_peer_instant(a.dims, n=a.n, warmup=200)
  peer_by_dim = {r["dim"]: r for r in (peer or {}).get("results", [])}

  header = (
    f"{'dim':>5} {'mode':<12} {'kernels':>7} {'floor':>7} {'step p50':>9} {'step p99':>9} "
    f"{'make+step':>10} {'pack+step':>10} "
    f"{'scan/s':>10} {'peer p50':>9} {'ratio':>6} {'ratio(m+s)':>10}"
  )
  lines = [header, "-" * len(header)]
  rows = []
  for dim in a.dims:
    for mode, res in modes.items():
      r = next(x for x in res["results"] if x["dim"] == dim)
      pr = peer_by_dim.get(dim)
      ratio = r["step_p50_us"] / pr["p50_us"] if pr else None
      ratio_full = r["full_p50_us"] / pr["p50_us"] if pr else None
      rows.append(
        dict(r, mode=mode, peer_p50_us=pr and pr["p50_us"], ratio=ratio, ratio_make_step=ratio_full)
      )
      lines.append(
        f"{dim:>5} {mode:<12} {r['kernels']:>7} {r['floor_p50_us']:>5.1f}us "
        f"{r['step_p50_us']:>7.1f}us {r['step_p99_us']:>7.1f}us "
        f"{r['full_p50_us']:>8.1f}us {r['pack_p50_us']:>8.1f}us {r['scan_per_s']:>10,.0f} "
        + (
          f"{pr['p50_us']:>7.1f}us {ratio:>6.2f} {ratio_full:>10.2f}"
          if pr
          else f"{'-':>9} {'-':>6} {'-':>10}"
        )
      )
  table = "\n".join(lines)
  print(table)
  # Each id-list width in its own process: measured one after another in one process, the later
  # configurations ran 30-40% slower than the same configuration measured first.
  ids_cost = [
    _run_mode(f"ids:{k}:{per}", [768], a.n, a.batches)["ids_cost"][0]
    for k, per in ((4, 4), (10, 5), (10, 10))
  ]
  cost_lines = [
    "cost of wider id lists (dim 768, low_latency mode, a process each):",
    f"{'max_ids':>7} {'used+unused':>11} {'kernels':>7} {'step p50':>9} {'step p99':>9}",
  ]
  for r in ids_cost:
    cost_lines.append(
      f"{r['max_ids']:>7} {r['ids_per_side']:>5}+{r['ids_per_side']:<5} {r['kernels']:>7} "
      f"{r['step_p50_us']:>7.1f}us {r['step_p99_us']:>7.1f}us"
    )
  ids_table = "\n".join(cost_lines)
  print("\n" + ids_table)
  print(
    "\nmodes: default, low_latency and pinned run Loop A's native CPU kernel"
    f" (sona_jax.native: {'used' if modes['low_latency']['native'] else 'NOT available'});"
    " jax_rule is low_latency with the pure-JAX rule (what GPU/TPU run). floor: a jitted call"
    " with instant_step's arguments, donation and outputs that does next to nothing."
  )
  timed_compiles = sum(r["compiles_while_timed"] for m in modes.values() for r in m["results"])
  print(f"compiles while timing: {timed_compiles} (no retrace)")
  if not peer:
    print(f"\npeer column skipped: {note}")
  else:
    print(
      f"\npeer: @ruvector/sona {peer.get('version')} on Node {peer.get('node')} "
      "(beginTrajectory + addTrajectoryStep + endTrajectory + flush, attention of length dim)"
    )
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = dict(
    benchmark="instant",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    machine=dict(
      platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()
    ),
    config=dict(
      micro_rank=2,
      graph_capacity=10_000,
      graph_degree=16,
      max_ids="SonaConfig default",
      used=5,
      unused=5,
      n=a.n,
      scan_batch=256,
    ),
    rows=rows,
    ids_cost=ids_cost,
    ids_table=ids_table,
    peer=peer,
    peer_note=note,
    table=table,
  )
  path = RESULTS / "instant.json"
  path.write_text(json.dumps(out, indent=2))
  print(f"\nwrote {path.relative_to(HERE.parent)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
