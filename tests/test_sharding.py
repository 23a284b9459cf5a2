"""Devices (`sona_jax.sharding`): sharded tenants, data-parallel Loop B, sharded checkpoints.

JAX fixes its device count when it starts, so the multi-device parts run in subprocesses with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` (and 4): one 8-device child does the sharded
work and writes its results; this process computes the single-device references meanwhile (the
machine's other core) and compares. Every test name contains "shard", "mesh" or "device".
"""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import sharding, tenants

# The config and data of test_tenants.py (one compile per function for both files: conftest.py's
# SAME_WORKER runs them on one pytest-xdist worker).
CFG = sona.SonaConfig(
  dim=16,
  graph_capacity=32,
  graph_degree=4,
  signal_capacity=64,
  trajectory_capacity=64,
  bank_capacity=16,
  pattern_clusters=4,
  probe_capacity=8,
  router_steps=5,
  router_batch=16,
  fisher_samples=16,
  min_samples=10,
)
N_TENANTS, BATCH, ROUNDS = 8, 32, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The inputs, built from seeds the same way here and in the children (their source is sent).
def interactions(seed, n):
  rng = np.random.default_rng(seed)
  return sona.stack_interactions(
    [
      sona.make_interaction(
        CFG,
        query=rng.normal(size=CFG.dim).astype(np.float32),
        quality=float(rng.uniform()),
        tier=int(rng.integers(CFG.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        context_tokens=int(rng.integers(0, 4000)),
        time=i,
      )
      for i in range(n)
    ]
  )


def tenant_ids(seed):
  """15 interactions for each of tenants 0..3 over two batches, 4 for tenant 4, none for 5..7."""
  rng = np.random.default_rng(seed)
  return [
    rng.permutation(np.repeat(np.arange(4), 8)),
    rng.permutation(np.concatenate([np.repeat(np.arange(4), 7), [4] * 4])),
  ]


CHILD = textwrap.dedent(
  """
  import json, re, sys
  out = sys.argv[1]
  from jax.sharding import PartitionSpec as P
  from sona_jax import sharding

  def save(name, tree):
    np.savez(f"{out}/{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(tree)])

  info = {"devices": jax.device_count()}
  mesh = sharding.make_mesh()
  # Tenants sharded over 8 devices: Loop A twice, then Loop B.
  states = tenants.init_tenants(CFG, jax.random.key(0), 8, sharding=sharding.tenant_sharding(mesh))
  try:  # 12 tenants do not split over 8 devices (these 8 and 4 again, stacked on the host)
    sharding.shard_tenants(jax.tree.map(lambda x: np.asarray(x)[np.r_[:8, :4]], states), mesh)
  except ValueError as e:
    info["indivisible"] = str(e)
  for b, tids in enumerate(tenant_ids(5)):
    states, _ = tenants.instant_step_tenants(states, interactions(20 + b, 32), tids, CFG,
                                             max_per_tenant=8)
  info["loop_a_spec"] = list(states.signals.data.sharding.spec)
  save("tenants_a", states)
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[0]), states)  # tenant 0, via the host
  states, rep = tenants.background_step_tenants(states, CFG, now=3600)
  info["loop_b_ran"] = rep.ran.tolist()
  info["loop_b_spec"] = list(states.router.params["head"]["kernel"].sharding.spec)
  info["loop_b_shard_shape"] = list(states.graph.emb.addressable_shards[0].data.shape)
  save("tenants_b", states)
  with sharding.TenantCheckpointer(f"{out}/ckpt") as ck:
    ck.save(3, states, CFG, time_origin=1.7e9, extra={"note": "8 devices"})

  # One learner (tenant 0 after Loop A: 15 signals waiting), data-parallel Loop B on 8 devices.
  save("single_before", state)
  new, r = sharding.background_step_sharded(state, CFG, 3600, mesh)
  save("single_dp", new)
  info["dp_report"] = [r.ran, r.n_signals, r.patterns_inserted, r.router_loss_after]
  info["dp_spec"] = list(new.bank.centroid.sharding.spec)
  ph = sharding.cycle_phases(CFG, mesh, sharding.AXIS)
  st = sharding.replicate(state, mesh)
  _, rows, mask, _ = ph.drain(st.signals)
  info["rows_shard_shape"] = list(rows.addressable_shards[0].data.shape)
  feats = ph.features(rows, st.bank, st.router_proj)
  k = jax.random.split(jax.random.wrap_key_data(st.key), 5)[1]  # as in the cycle: no recompile
  for name, args in [("router", (st.router, st.ewc, feats, rows, mask, k)),
                     ("fisher", (st.ewc, st.router.params, feats, rows, mask, k)),
                     ("patterns", (st.bank, rows, mask, k, jnp.int32(0)))]:
    hlo = getattr(ph, name).lower(*args).compile().as_text()
    info[name + "_all_reduce"] = len(re.findall(r"all-reduce(?:-start)?\\(", hlo))
  with open(f"{out}/info.json", "w") as f:
    json.dump(info, f)
  """
)

RESTORE = textwrap.dedent(
  """
  import json, sys
  out = sys.argv[1]
  from sona_jax import sharding
  mesh = sharding.make_mesh()
  with sharding.TenantCheckpointer(f"{out}/ckpt") as ck:
    states, cfg, meta = ck.restore(CFG, sharding=sharding.tenant_sharding(mesh))
  np.savez(f"{out}/restored_{jax.device_count()}.npz",
           *[np.asarray(x) for x in jax.tree.leaves(states)])
  with open(f"{out}/restored_{jax.device_count()}.json", "w") as f:
    json.dump({"devices": jax.device_count(), "step": meta["step"], "extra": meta["extra"],
               "shard_shape": list(states.graph.emb.addressable_shards[0].data.shape),
               "n_shards": len(states.graph.emb.addressable_shards)}, f)
  """
)


def _spawn(code: str, out, n_devices: int) -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # The child imports the sona_jax beside these tests (a checkout that is not the installed one).
  env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  prelude = (
    "import jax, jax.numpy as jnp, numpy as np\n"
    "jax.config.update('jax_numpy_dtype_promotion', 'strict')\n"
    "jax.config.update('jax_numpy_rank_promotion', 'raise')\n"
    "import sona_jax as sona\n"
    "from sona_jax import tenants\n"
    f"CFG = sona.SonaConfig.from_dict({CFG.to_dict()!r})\n"
  )
  helpers = "\n".join(inspect.getsource(f) for f in (interactions, tenant_ids))
  script = out / f"child_{n_devices}.py"
  script.write_text(prelude + helpers + code)
  return subprocess.Popen(
    [sys.executable, "-W", "error", str(script), str(out)],
    env=env,
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait(proc: subprocess.Popen) -> None:
  log, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, log[-4000:]


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  """The 8-device child, started at once; `child()` waits for it and returns its info."""
  out = tmp_path_factory.mktemp("shard8")
  proc = _spawn(CHILD, out, 8)
  state = {}

  def result():
    if "info" not in state:
      _wait(proc)
      state["info"] = json.loads((out / "info.json").read_text())
    return out, state["info"]

  yield result
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


def _load(path, like):
  """Leaves saved by a child, as a pytree shaped like `like`."""
  with np.load(path) as z:
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _assert_bits_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _floats(tree, floats=True):
  """The float leaves of `tree` (`floats=False`: the others), the rest `None` (no leaf)."""
  return jax.tree.map(lambda x: x if (np.asarray(x).dtype.kind == "f") == floats else None, tree)


def _unsharded_tenants():
  states = tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS)
  for b, tids in enumerate(tenant_ids(5)):
    states, _ = tenants.instant_step_tenants(
      states, interactions(20 + b, BATCH), tids, CFG, max_per_tenant=ROUNDS
    )
  return states


def test_mesh_over_forced_devices_and_shard_tenants_checks_divisibility(child):
  # (`child` starts the 8-device subprocess now, to run beside this process.) This process has
  # whatever devices the host gives it (1 on a plain CPU run, 8 under XLA_FLAGS' forced count).
  n = jax.device_count()
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.AXIS,) and mesh.devices.size == n
  with pytest.raises(ValueError, match=f"only {n} devices"):
    sharding.make_mesh(n + 1)
  k = max(d for d in range(1, n + 1) if N_TENANTS % d == 0)  # the largest mesh the tenants fill
  states = tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS)
  sharded = sharding.shard_tenants(states, sharding.make_mesh(k))
  assert sharded.graph.emb.sharding.spec == jax.sharding.PartitionSpec(sharding.AXIS)
  assert len(sharded.graph.emb.sharding.device_set) == k
  _, info = child()  # 8 devices there: 12 tenants do not split evenly, and the error says so
  assert "12 tenants do not split evenly over 8 devices" in info["indivisible"]


def test_sharded_tenants_loop_a_and_loop_b_equal_one_device_and_stay_sharded(child):
  a = _unsharded_tenants()  # this process: one device
  b, rep = tenants.background_step_tenants(a, CFG, now=3600)
  out, info = child()
  assert info["devices"] == 8
  assert info["loop_a_spec"] == info["loop_b_spec"] == [sharding.AXIS]
  assert info["loop_b_shard_shape"] == [1, CFG.graph_capacity, CFG.dim]  # one tenant per device
  assert info["loop_b_ran"] == rep.ran.tolist() == [True] * 4 + [False] * 4
  # Loop A: bit-identical on 8 devices and on 1.
  _assert_bits_equal(_load(out / "tenants_a.npz", a), a)
  # Loop B: per-tenant programs with no communication; equal up to float rounding.
  chex.assert_trees_all_close(_load(out / "tenants_b.npz", b), b, rtol=1e-5, atol=1e-6)


def test_data_parallel_loop_b_on_8_devices_equals_single_device(child):
  like = jax.eval_shape(lambda: sona.init_state(CFG, jax.random.key(0)))
  out, info = child()
  before = _load(out / "single_before.npz", like)
  want, rep = sona.background_step(before, CFG, 3600)
  got = _load(out / "single_dp.npz", like)
  assert rep.n_signals == 15
  assert info["dp_report"][:3] == [True, rep.n_signals, rep.patterns_inserted]
  assert info["dp_report"][3] == pytest.approx(rep.router_loss_after, rel=1e-5)
  # The batch really is split (the 64 drained ring rows: 8 per device), and router gradients,
  # Fisher sums and k-means centroid sums cross devices through all-reduces (compiled programs).
  assert info["rows_shard_shape"] == [CFG.signal_capacity // 8, sona.types.signal_width(CFG)]
  assert min(info["router_all_reduce"], info["fisher_all_reduce"], info["patterns_all_reduce"]) > 0
  assert info["dp_spec"] == []  # the learner comes back replicated
  # Measured: 3e-8 on parameters, 6e-8 on centroids, 1e-6 on metric sums of order 10.
  chex.assert_trees_all_close(_floats(got), _floats(want), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(_floats(got, False), _floats(want, False))  # integers: exactly


def test_sharded_checkpoint_from_8_devices_restores_onto_4_and_1_device(child):
  out, _ = child()
  four = _spawn(RESTORE, out, 4)  # 4 devices, in a subprocess, while this process restores on 1
  try:
    like = jax.eval_shape(lambda: tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS))
    saved = _load(out / "tenants_b.npz", like)
    with sharding.TenantCheckpointer(out / "ckpt") as ck:
      one, cfg, meta = ck.restore()
    assert cfg == CFG and meta["extra"] == {"note": "8 devices"} and meta["time_origin"] == 1.7e9
    assert len(one.graph.emb.devices()) == 1
    _assert_bits_equal(one, saved)
  finally:  # a failure above must not leave the child running into a later test
    _wait(four)
  info4 = json.loads((out / "restored_4.json").read_text())
  assert info4["devices"] == 4 and info4["step"] == 3
  assert info4["n_shards"] == 4 and info4["shard_shape"] == [2, CFG.graph_capacity, CFG.dim]
  _assert_bits_equal(_load(out / "restored_4.npz", like), saved)


def test_sharded_checkpoint_rejects_an_incompatible_config_on_any_device_count(tmp_path):
  states = tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS)
  with sharding.TenantCheckpointer(tmp_path, async_save=False) as ck:
    ck.save(0, states, CFG)
    with pytest.raises(ValueError, match="graph_capacity"):
      ck.restore(dataclasses.replace(CFG, graph_capacity=64))
    with pytest.raises(ValueError, match="states do not match cfg"):
      ck.save(1, states, dataclasses.replace(CFG, dim=8, base_rank=4))


@pytest.mark.skipif(
  not os.environ.get("SONA_MULTIHOST_TEST"),
  reason="two JAX processes x 4 devices take ~80 s on 2 cores; set SONA_MULTIHOST_TEST=1",
)
def test_multihost_example_two_processes_share_one_device_mesh():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "examples", "multihost.py")],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = sorted(x for x in proc.stdout.splitlines() if x.startswith("process "))
  assert len(lines) == 2, proc.stdout
  assert "4 local of 8 devices, holds tenants [0, 1, 2, 3]" in lines[0]
  assert "holds tenants [4, 5, 6, 7]" in lines[1]
  # Both processes computed the same global results.
  assert lines[0].split("; ", 1)[1] == lines[1].split("; ", 1)[1]
