"""The native Loop A kernel (`sona_jax.native`) against the pure-JAX rule it replaces on CPU.

Loop A on CPU runs its whole transition as one custom call; the JAX rule stays the reference that
other platforms run. On a mixed stream (good
interactions, supervised gradients, explicit feedback, rejected ones of every kind, a graph small
enough that new edges replace the weakest) the two paths must make the same decisions exactly
(reports' accept/reject bits, edge neighbours and kinds, access counts, records, counters) and
the same float values to rounding: the sums over `dim` are added in a different order, and XLA
contracts multiply-adds where the native build does not.
"""

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import graph, native, types
from sona_jax.loops import instant

pytestmark = pytest.mark.skipif(
  shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)

CFG = sona.SonaConfig(
  dim=24, graph_capacity=32, graph_degree=4, signal_capacity=64, trajectory_capacity=64, max_ids=3
)
RTOL, ATOL = 2e-5, 1e-6


@pytest.fixture(autouse=True)
def _restore_override():
  previous = native.set_enabled(None)
  yield
  native.set_enabled(previous)


def _state(cfg=CFG, n=20, seed=0):
  state = sona.init_state(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  g, _, _ = graph.add_nodes(
    state.graph, jnp.asarray(rng.normal(size=(n, cfg.dim)), jnp.float32), quality=0.5
  )
  base = state.base._replace(b=jnp.asarray(rng.normal(size=state.base.b.shape) * 0.1, jnp.float32))
  return state._replace(graph=g, base=base)


def _stream(n=120, seed=1, cfg=CFG):
  """Good interactions with every kind of learning signal, and bad ones of every kind."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    ids = rng.choice(20, size=2 * cfg.max_ids + 1, replace=False)
    n_used, n_unused = int(rng.integers(0, cfg.max_ids + 1)), int(rng.integers(0, cfg.max_ids + 1))
    kw = dict(
      query=rng.normal(size=cfg.dim).astype(np.float32),
      quality=float(rng.uniform()),
      anchor=int(ids[0]) if i % 6 else -1,
      used=ids[1 : 1 + n_used].tolist(),
      unused=ids[1 + cfg.max_ids : 1 + cfg.max_ids + n_unused].tolist(),
      tier=int(rng.integers(cfg.n_tiers)),
      latency_ms=float(rng.uniform(0, 400)),
      time=i,
    )
    if i % 5 == 0:
      kw["grad"] = rng.normal(size=cfg.dim).astype(np.float32)
    if i % 7 == 0:
      kw["feedback"] = float(rng.uniform())
    if i % 11 == 3:
      kw["time"] = None  # unset: the newest time seen
    bad = i % 13
    if bad == 4:
      kw["quality"] = math.nan
    elif bad == 8:
      kw["query"] = np.full(cfg.dim, 1e30, np.float32)  # |x|^2 overflows
    elif bad == 9 and kw["used"]:
      kw["unused"] = [kw["used"][0]]  # duplicated id
    elif bad == 11:
      kw["used"] = [int(ids[1]) + cfg.graph_capacity]  # a stale id: wrong generation
    if kw["time"] is None:
      del kw["time"]
    out.append(sona.make_interaction(cfg, **kw))
  return out


def _float_view(x):
  return np.asarray(x).view(np.float32)


def assert_same_learning(a: sona.SonaState, b: sona.SonaState, cfg=CFG):
  """Decisions and integer state exactly; float values to rounding."""
  k = cfg.graph_degree
  ea, eb = np.asarray(a.graph.edges), np.asarray(b.graph.edges)
  np.testing.assert_array_equal(ea[:, :k], eb[:, :k], err_msg="edge neighbours")
  np.testing.assert_array_equal(ea[:, 2 * k :], eb[:, 2 * k :], err_msg="edge kinds")
  np.testing.assert_allclose(
    _float_view(ea[:, k : 2 * k]), _float_view(eb[:, k : 2 * k]), rtol=RTOL, atol=ATOL
  )
  na, nb = np.asarray(a.graph.node), np.asarray(b.graph.node)
  ints = [c for c in range(na.shape[1]) if c != graph.QUALITY]
  np.testing.assert_array_equal(na[:, ints], nb[:, ints], err_msg="node statistics")
  np.testing.assert_allclose(
    _float_view(na[:, graph.QUALITY]), _float_view(nb[:, graph.QUALITY]), rtol=RTOL, atol=ATOL
  )
  np.testing.assert_allclose(a.micro.a, b.micro.a, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(a.micro.b, b.micro.b, rtol=RTOL, atol=ATOL)
  for name in ("signals", "trajectories"):
    ra, rb = getattr(a, name), getattr(b, name)
    np.testing.assert_array_equal(ra.meta, rb.meta, err_msg=name)
    assert np.asarray(ra.data).tobytes() == np.asarray(rb.data).tobytes(), name
  np.testing.assert_array_equal(a.metrics.counters, b.metrics.counters)


def assert_same_reports(ra, rb):
  va, vb = np.asarray(ra.values), np.asarray(rb.values)
  np.testing.assert_array_equal(ra.reasons, rb.reasons)
  np.testing.assert_array_equal(va[..., instant.R_ACCEPTED], vb[..., instant.R_ACCEPTED])
  np.testing.assert_array_equal(va[..., instant.R_MICRO_UPDATED], vb[..., instant.R_MICRO_UPDATED])
  np.testing.assert_array_equal(va[..., instant.R_EDGES_CHANGED], vb[..., instant.R_EDGES_CHANGED])
  np.testing.assert_allclose(
    va[..., instant.R_STEP_NORM], vb[..., instant.R_STEP_NORM], rtol=RTOL, atol=ATOL
  )


def _steps(use_native: bool, its, state=None):
  native.set_enabled(use_native)
  state = jax.tree.map(jnp.copy, _state()) if state is None else state
  reports = []
  for it in its:
    state, rep = sona.instant_step(state, it, CFG)
    reports.append(np.asarray(rep.values))
  return state, instant.InstantReport(np.stack(reports))


def _scan(use_native: bool, its):
  native.set_enabled(use_native)
  state = jax.tree.map(jnp.copy, _state())
  return sona.instant_scan(state, sona.stack_interactions(its), CFG)


def test_the_native_library_builds_and_is_used_by_default():
  assert native.build().exists()
  assert native.enabled(), "a machine with a C++ compiler runs Loop A's native kernels"
  packed = types.pack(_stream(1)[0], CFG)
  state = _state()
  step = jax.jit(lambda sub, base, emb, p: instant.transition(sub, base, emb, p, CFG, True))
  args = (instant.split_state(state), state.base, state.graph.emb, packed)
  text = step.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
  assert text.count(native.TARGET) == 1, "one custom call per step"


def test_native_steps_equal_the_jax_rule_on_a_mixed_stream():
  its = _stream()
  ref, rep_ref = _steps(False, its)
  nat, rep_nat = _steps(True, its)
  # The stream exercises what it should: accepted, rejected for several reasons, edges replaced.
  assert 0 < int(np.sum(rep_ref.accepted)) < len(its)
  names = {n for r in np.asarray(rep_ref.values) for n in instant.InstantReport(r).reason_names()}
  assert {"BAD_QUALITY", "BAD_QUERY", "BAD_IDS", "BAD_STALE"} <= names, names
  assert int(np.sum(rep_ref.micro_updated)) > 50
  assert_same_reports(rep_ref, rep_nat)
  assert_same_learning(ref, nat)


def test_native_scan_equals_the_jax_scan_and_the_native_steps():
  its = _stream(seed=2)
  ref, rep_ref = _scan(False, its)
  nat, rep_nat = _scan(True, its)
  assert_same_reports(rep_ref, rep_nat)
  assert_same_learning(ref, nat)
  steps, rep_steps = _steps(True, its)
  assert_same_reports(rep_steps, rep_nat)
  assert_same_learning(steps, nat)


def test_a_rejected_interaction_leaves_the_state_bit_identical_on_the_native_path():
  native.set_enabled(True)
  state = _state()
  state, _ = sona.instant_step(state, _stream(1)[0], CFG)
  before = jax.tree.map(np.asarray, state)
  bad = sona.make_interaction(CFG, query=np.full(CFG.dim, 1e30, np.float32), quality=0.1, used=[1])
  state, rep = sona.instant_step(state, bad, CFG)
  assert not bool(rep.accepted)
  after = jax.tree.map(np.asarray, state)
  changed = [
    jax.tree_util.keystr(p)
    for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True
    )
    if x.tobytes() != y.tobytes()
  ]
  assert changed == [".metrics.counters"], changed  # only the REJECTED count


def test_native_step_inside_a_user_jit_and_under_vmap():
  native.set_enabled(True)
  its = _stream(3, seed=3)
  ref, _ = _steps(True, its)

  @jax.jit
  def run(state, packed):
    step = lambda i, s: instant.step_packed(s, packed[i], CFG)[0]
    return jax.lax.fori_loop(0, packed.shape[0], step, state)

  packed = jnp.stack([types.pack(it, CFG) for it in its])
  out = run(_state(), packed)
  assert_same_learning(ref, out)
  # vmap over two independent learners: each equals its own sequential run.
  states = jax.tree.map(lambda x: jnp.stack([x, x]), _state())
  step = jax.vmap(lambda s, p: instant.step_packed(s, p, CFG)[0])
  for i in range(len(its)):
    states = step(states, jnp.stack([packed[i], packed[i]]))
  for t in range(2):
    assert_same_learning(ref, jax.tree.map(lambda x, t=t: x[t], states))


def test_switching_paths_never_retraces_a_path_already_compiled(compiles):
  its = _stream(6, seed=4)
  state = _state()
  for flag in (True, False):
    state, _ = _steps(flag, its[:2], state)
  with compiles() as log:
    for flag in (True, False, True):
      state, _ = _steps(flag, its[2:4], state)
  assert log.names == [], log.names


def test_environment_switch_and_bad_value(monkeypatch):
  monkeypatch.setenv("SONA_JAX_NATIVE", "0")
  assert not native.enabled()
  monkeypatch.setenv("SONA_JAX_NATIVE", "maybe")
  with pytest.raises(ValueError, match="SONA_JAX_NATIVE"):
    native.enabled()
  monkeypatch.setenv("SONA_JAX_NATIVE", "1")
  assert native.enabled()
  native.set_enabled(False)  # the in-process override wins over the environment
  assert not native.enabled()


def test_hebbian_writes_on_full_rows_equal_the_jax_rule():
  """Full edge rows: new edges replace the weakest slot (or none when every edge is stronger)."""
  rng = np.random.default_rng(5)
  n, deg, k = 40, 4, CFG.max_ids
  cfg = CFG.replace(graph_capacity=n, graph_degree=deg)
  state = _state(cfg, n=n)
  nbr = jnp.asarray(np.stack([rng.choice(np.arange(1, n), deg, replace=False) for _ in range(n)]))
  w = jnp.asarray(rng.uniform(0, 0.2, size=(n, deg)), jnp.float32)
  edges = jax.vmap(graph.make_edges)(nbr.astype(jnp.int32), w, jnp.zeros((n, deg), jnp.int32))
  state = state._replace(graph=state.graph._replace(edges=edges))
  its = []
  for i in range(60):
    pick = rng.choice(n, size=2 * k + 1, replace=False)
    its.append(
      sona.make_interaction(
        cfg,
        query=rng.normal(size=cfg.dim),
        quality=0.8,
        anchor=int(pick[-1]),
        used=pick[:k].tolist(),
        unused=pick[k : 2 * k].tolist(),
        time=i,
      )
    )
  runs = []
  for flag in (False, True):
    native.set_enabled(flag)
    s, reports = jax.tree.map(jnp.copy, state), []
    for it in its:
      s, rep = sona.instant_step(s, it, cfg)
      reports.append(np.asarray(rep.values))
    runs.append((s, instant.InstantReport(np.stack(reports))))
  (ref, rep_ref), (nat, rep_nat) = runs
  assert bool(np.all(rep_ref.accepted))
  assert_same_reports(rep_ref, rep_nat)
  assert_same_learning(ref, nat, cfg)
  assert (np.asarray(nat.graph.edges)[:, :deg] != np.asarray(nbr)).any()  # edges were replaced


def test_padded_batches_equal_the_jax_rule():
  """`scan_packed` with padding rows: they are never applied or counted, on either path."""
  its = _stream(24, seed=6)
  packed = jnp.stack([types.pack(it, CFG) for it in its])
  runs = []
  for flag in (False, True):
    native.set_enabled(flag)
    state = jax.tree.map(jnp.copy, _state())
    runs.append(instant.scan_packed(state, packed, CFG, n_valid=17))
  (ref, rep_ref), (nat, rep_nat) = runs
  assert_same_reports(rep_ref, rep_nat)
  assert_same_learning(ref, nat)
  assert not np.asarray(rep_nat.accepted)[17:].any()
  counted = int(nat.metrics.counters[0] + nat.metrics.counters[1])  # processed + rejected
  assert counted == 17


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_other_platforms_lower_the_jax_rule_without_the_custom_calls(platform):
  """GPU and TPU never see the CPU custom calls: lowered for them (no device needed), Loop A is
  the JAX rule."""
  native.set_enabled(True)
  state = _state()
  packed = types.pack(_stream(1)[0], CFG)
  step = jax.jit(lambda sub, base, emb, p: instant.transition(sub, base, emb, p, CFG, True))
  args = (instant.split_state(state), state.base, state.graph.emb, packed)
  lower = lambda p: step.trace(*args).lower(lowering_platforms=(p,)).as_text()
  text = lower(platform)
  assert native.TARGET not in text
  assert "dynamic_update_slice" in text  # a real program: the ring writes are there
  assert native.TARGET in lower("cpu")
