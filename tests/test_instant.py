"""Loop A: validation and masking, compile-once, determinism, batched semantics, learning."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import buffer, lora, native, types
from sona_jax.loops import instant
from sona_jax.runtime import count_compiles
from sona_jax.state import MICRO_UPDATES, PROCESSED, REJECTED

CFG = sona.SonaConfig(
  dim=16, graph_capacity=32, graph_degree=4, signal_capacity=8, trajectory_capacity=8, max_ids=3
)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_bit_identical(a, b, *, skip=()):
  la, ta = jax.tree_util.tree_flatten_with_path(a)
  lb, tb = jax.tree_util.tree_flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb, strict=True):
    name = jax.tree_util.keystr(path)
    if name in skip:
      continue
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, name
    assert x.tobytes() == y.tobytes(), f"{name} changed"


def _state_with_memories(cfg=CFG, n=8, seed=0):
  state = sona.init_state(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  g, ids, _ = sona.graph.add_nodes(
    state.graph, jnp.asarray(rng.normal(size=(n, cfg.dim)), jnp.float32), quality=0.5
  )
  # A non-zero base so the adapted query differs from the raw one.
  base = state.base._replace(b=jnp.asarray(rng.normal(size=state.base.b.shape) * 0.1, jnp.float32))
  return state._replace(graph=g, base=base), np.asarray(ids)


def _good(cfg=CFG, **kw):
  rng = np.random.default_rng(kw.pop("seed", 1))
  args = dict(
    query=rng.normal(size=cfg.dim).astype(np.float32),
    quality=0.1,
    anchor=0,
    used=[1, 2],
    unused=[3],
    tier=1,
    latency_ms=50.0,
    context_tokens=100,
    time=7,
  )
  args.update(kw)
  return sona.make_interaction(cfg, **args)


def test_accepted_step_updates_everything_it_should():
  state, _ = _state_with_memories()
  before = _host(state)
  state, report = sona.instant_step(state, _good(), CFG)
  assert bool(report.accepted) and bool(report.micro_updated) and report.reason_names() == []
  c = np.asarray(state.metrics.counters)
  assert (c[PROCESSED], c[REJECTED], c[MICRO_UPDATES]) == (1, 0, 1)
  assert not np.array_equal(np.asarray(state.micro.b), before.micro.b)
  assert int(buffer.unread(state.signals)) == 1 and int(buffer.unread(state.trajectories)) == 1
  sig = types.unpack_signals(np.stack(buffer.to_list(state.signals)), CFG)
  assert int(sig.tier[0]) == 1 and int(sig.time[0]) == 7 and int(sig.context_tokens[0]) == 100
  np.testing.assert_allclose(sig.quality[0], 0.1)
  np.testing.assert_allclose(sig.latency_ratio[0], 50.0 / CFG.target_latency_ms, rtol=1e-6)
  traj = types.unpack_trajectories(np.stack(buffer.to_list(state.trajectories)), CFG)
  assert traj.used[0].tolist() == [1, 2, -1] and traj.unused[0].tolist() == [3, -1, -1]
  np.testing.assert_allclose(traj.precision[0], 2 / 3, rtol=1e-6)
  # Hebbian: anchor 0 now links to 1 and 2.
  assert sorted(np.asarray(state.graph.nbr[0])[:2].tolist()) == [1, 2]
  assert int(report.edges_changed) == 2
  # Node statistics of used memories.
  acc = np.asarray(state.graph.access_count)
  assert acc[1] == acc[2] == 1 and acc[3] == 0
  assert int(state.graph.last_access[1]) == 7
  np.testing.assert_allclose(float(state.graph.quality[1]), 0.9 * 0.5 + 0.1 * 0.1, rtol=1e-6)


def test_feedback_step_matches_design_formula():
  """The micro step equals micro_update with g = -(1 - q) t / |t| (docs/design.md), where t is
  mean(used) - mean(unused) taken in the tangent space of the adapted query (the correction this
  library makes to the original design, see loops/instant.py), checked against NumPy float64."""
  state, _ = _state_with_memories()
  it = _good(quality=0.2)
  emb = np.asarray(state.graph.emb, np.float64)
  x = np.asarray(it.query, np.float64)
  a_b, b_b = (np.asarray(v, np.float64) for v in state.base)
  a_m, b_m = (np.asarray(v, np.float64) for v in state.micro)
  y = x + CFG.base_scale * (x @ a_b) @ b_b + CFG.micro_scale * (x @ a_m) @ b_m
  u = y / np.linalg.norm(y)
  diff = emb[[1, 2]].mean(0) - emb[[3]].mean(0)
  t = diff - (diff @ u) * u
  g = -(1 - 0.2) * t / np.linalg.norm(t)
  expected, _ = lora.micro_update_with_norm(
    state.micro,
    jnp.asarray(it.query),
    jnp.asarray(g, jnp.float32),
    CFG.micro_lr,
    scale=CFG.micro_scale,
    clip=CFG.micro_clip,
  )
  micro0 = _copy(state.micro)
  state, _ = sona.instant_step(state, it, CFG)
  np.testing.assert_allclose(np.asarray(state.micro.a), np.asarray(expected.a), atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.micro.b), np.asarray(expected.b), atol=1e-6)
  assert not np.allclose(np.asarray(micro0.b), np.asarray(state.micro.b))


def test_feedback_only_used_moves_toward_used_memories():
  """With nothing unused, t = mean(used) - y_hat: the adapted query moves toward the used memory."""
  state, _ = _state_with_memories()
  it = _good(quality=0.0, used=[1], unused=[])
  x = jnp.asarray(it.query)
  target = np.asarray(state.graph.emb[1])

  def dist(s):
    y = np.asarray(sona.driver.adapt(s, x, CFG))
    return np.linalg.norm(y - target)

  d0 = dist(state)
  for _ in range(5):
    state, rep = sona.instant_step(state, it, CFG)
    assert bool(rep.micro_updated)
  assert dist(state) < d0


def test_gate_skips_uninformative_feedback_but_records_it():
  state, _ = _state_with_memories()
  micro0 = _host(state.micro)
  state, rep = sona.instant_step(state, _good(quality=0.55, latency_ms=10.0), CFG)
  assert bool(rep.accepted) and not bool(rep.micro_updated)
  np.testing.assert_array_equal(np.asarray(state.micro.b), micro0.b)
  assert int(buffer.unread(state.signals)) == 1
  # A slow request opens the gate even at quality 0.5.
  state, rep = sona.instant_step(state, _good(quality=0.5, latency_ms=1000.0), CFG)
  assert bool(rep.micro_updated)


def test_explicit_feedback_replaces_estimated_quality():
  state, _ = _state_with_memories()
  state, _ = sona.instant_step(state, _good(quality=0.9, feedback=0.0), CFG)
  sig = types.unpack_signals(np.stack(buffer.to_list(state.signals)), CFG)
  assert float(sig.quality[0]) == 0.0 and abs(float(sig.estimated_quality[0]) - 0.9) < 1e-6


BAD_CASES = [
  ("nan query", dict(query=np.full(CFG.dim, np.nan, np.float32)), instant.BAD_QUERY),
  ("inf in query", dict(query=np.r_[np.inf, np.zeros(CFG.dim - 1)]), instant.BAD_QUERY),
  ("nan quality", dict(quality=math.nan), instant.BAD_QUALITY),
  ("quality > 1", dict(quality=1.5), instant.BAD_QUALITY),
  ("quality < 0", dict(quality=-0.1), instant.BAD_QUALITY),
  ("inf feedback", dict(feedback=math.inf), instant.BAD_FEEDBACK),
  ("feedback > 1", dict(feedback=2.0), instant.BAD_FEEDBACK),
  ("nan latency", dict(latency_ms=math.nan), instant.BAD_LATENCY),
  ("negative latency", dict(latency_ms=-1.0), instant.BAD_LATENCY),
  ("zero target", dict(target_latency_ms=0.0), instant.BAD_LATENCY),
  ("inf target", dict(target_latency_ms=math.inf), instant.BAD_LATENCY),
  ("tier too big", dict(tier=CFG.n_tiers), instant.BAD_TIER),
  ("negative tier", dict(tier=-1), instant.BAD_TIER),
  ("negative context", dict(context_tokens=-5), instant.BAD_CONTEXT),
  ("negative time", dict(time=-1), instant.BAD_TIME),
  # An id past the slots is a later generation of a slot: it names no live memory (stale).
  ("id never issued", dict(used=[CFG.graph_capacity]), instant.BAD_STALE),
  ("negative id", dict(used=[-2]), instant.BAD_IDS),
  ("duplicated used", dict(used=[1, 1]), instant.BAD_IDS),
  ("used also unused", dict(used=[1], unused=[1]), instant.BAD_IDS),
  ("dead node id", dict(used=[20]), instant.BAD_STALE),
  ("anchor never issued", dict(anchor=10**6), instant.BAD_STALE),
  ("anchor below -1", dict(anchor=-3), instant.BAD_ANCHOR),
  ("dead anchor", dict(anchor=25), instant.BAD_STALE),
  ("nan grad", dict(grad=np.full(CFG.dim, np.nan, np.float32)), instant.BAD_GRAD),
  ("huge query", dict(query=np.full(CFG.dim, 1e38, np.float32)), None),
]


@pytest.mark.parametrize("name,kw,reason", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_values_leave_state_bit_identical_except_rejection_counter(name, kw, reason):
  state, _ = _state_with_memories()
  # Some history first, so the buffers and graph are not trivially empty.
  state, _ = sona.instant_step(state, _good(seed=5), CFG)
  before = _host(state)
  state, rep = sona.instant_step(state, _good(**kw), CFG)
  assert not bool(rep.accepted), name
  bits = int(rep.reasons)
  if reason is not None:
    assert bits & reason, (name, rep.reason_names())
  else:
    assert bits != 0
  after = _host(state)
  _assert_bit_identical(before, after, skip={".metrics.counters"})
  c0, c1 = before.metrics.counters, after.metrics.counters
  assert c1[REJECTED] == c0[REJECTED] + 1
  np.testing.assert_array_equal(np.delete(c1, REJECTED), np.delete(c0, REJECTED))


def test_huge_but_finite_values_never_make_the_state_non_finite():
  state, _ = _state_with_memories()
  for scale in (1e10, 1e19, 1e30, 3e38):
    for q in (0.0, 0.5, 1.0):
      it = _good(query=np.full(CFG.dim, scale, np.float32), quality=q, latency_ms=scale)
      state, _ = sona.instant_step(state, it, CFG)
  for leaf in jax.tree.leaves(state.micro):
    assert np.all(np.isfinite(np.asarray(leaf)))
  assert np.all(np.isfinite(np.asarray(state.graph.w)))


@pytest.mark.parametrize("quality", [0.0, 0.05, 0.3, 0.5, 0.61, 0.9, 1.0])
def test_step_is_finite_for_any_quality(quality):
  state, _ = _state_with_memories()
  for _ in range(3):
    state, rep = sona.instant_step(state, _good(quality=quality), CFG)
    assert bool(rep.accepted)
    assert np.isfinite(float(rep.step_norm))
  assert np.all(np.isfinite(np.asarray(state.micro.a))) and np.all(
    np.isfinite(np.asarray(state.micro.b))
  )


def test_wrong_shapes_and_dtypes_raise_before_jit():
  state, _ = _state_with_memories()
  good = _good()
  with pytest.raises(ValueError, match="query"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim + 1), quality=0.5)
  with pytest.raises(ValueError, match="used"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim), quality=0.5, used=[1, 2, 3, 4])
  with pytest.raises(ValueError, match="used"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim), quality=0.5, used=[1.5])
  with pytest.raises(ValueError, match="quality"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim), quality="high")
  with pytest.raises(ValueError, match="tier"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim), quality=0.5, tier=1.5)
  with pytest.raises(ValueError, match="grad"):
    sona.make_interaction(CFG, query=np.zeros(CFG.dim), quality=0.5, grad=np.zeros(3))
  with pytest.raises(ValueError, match="query"):
    sona.instant_step(state, good._replace(query=np.zeros((CFG.dim, 2), np.float32)), CFG)
  with pytest.raises(ValueError, match="used"):
    sona.instant_step(state, good._replace(used=np.zeros(5, np.int32)), CFG)
  with pytest.raises(ValueError, match="anchor"):
    sona.instant_step(state, good._replace(anchor=np.float32(1.0)), CFG)
  with pytest.raises(TypeError):
    sona.instant_step(state, dict(good._asdict()), CFG)
  other = CFG.replace(dim=8)
  with pytest.raises(ValueError, match="does not match"):
    sona.instant_step(state, sona.make_interaction(other, query=np.zeros(8), quality=0.5), other)
  # Nothing was consumed by the failed calls: the state is still usable.
  state, rep = sona.instant_step(state, good, CFG)
  assert bool(rep.accepted)


def test_replaced_fields_are_used_not_a_stale_packed_copy():
  state, _ = _state_with_memories()
  it = _good(quality=0.1)._replace(quality=np.float32(math.nan))
  state, rep = sona.instant_step(state, it, CFG)
  assert int(rep.reasons) & instant.BAD_QUALITY


def test_ten_thousand_steps_compile_once_and_are_deterministic():
  cfg = CFG.replace(signal_capacity=64, trajectory_capacity=64)
  state, _ = _state_with_memories(cfg)
  state2 = _copy(state)
  rng = np.random.default_rng(0)
  its = []
  for i in range(10_000):
    ids = rng.choice(8, size=4, replace=False)
    its.append(
      sona.make_interaction(
        cfg,
        query=rng.normal(size=cfg.dim).astype(np.float32),
        quality=float(rng.uniform()),
        anchor=int(ids[0]),
        used=ids[1 : 1 + rng.integers(0, 3)].tolist(),
        unused=ids[3:].tolist(),
        tier=int(rng.integers(cfg.n_tiers)),
        latency_ms=float(rng.uniform(0, 400)),
        feedback=float(rng.uniform()) if i % 7 == 0 else math.nan,
        time=i,
      )
    )
  instant._jitted(native.enabled())[0].clear_cache()
  with count_compiles() as counter:
    for it in its:
      state, _ = sona.instant_step(state, it, cfg)
  # One compile of the step for the whole stream (a retrace per interaction would add more).
  assert counter.compiles == 1, f"instant_step compiled {counter.compiles} times"
  for it in its:
    state2, _ = sona.instant_step(state2, it, cfg)
  _assert_bit_identical(_host(state), _host(state2))
  assert int(state.step) == 10_000 and int(state.metrics.rejected) == 0


def test_donation_consumes_the_loop_a_part_only():
  state, _ = _state_with_memories()
  old = state
  state, _ = sona.instant_step(state, _good(), CFG)
  assert old.micro.a.is_deleted() and old.signals.data.is_deleted()
  assert not old.graph.emb.is_deleted() and not old.base.a.is_deleted()


def test_instant_scan_equals_sequential_steps():
  state, _ = _state_with_memories()
  rng = np.random.default_rng(3)
  its = [
    _good(seed=int(s), quality=float(q), time=i)
    for i, (s, q) in enumerate(zip(rng.integers(0, 100, 12), rng.uniform(size=12), strict=True))
  ]
  its[4] = its[4]._replace(quality=np.float32(2.0))  # one bad one in the middle
  seq = _copy(state)
  reports = []
  for it in its:
    seq, r = sona.instant_step(seq, it, CFG)
    reports.append(np.asarray(r.values))
  batched, rep = sona.instant_scan(state, sona.stack_interactions(its), CFG)
  np.testing.assert_allclose(np.asarray(rep.values), np.stack(reports), rtol=1e-6, atol=1e-7)
  hs, hb = _host(seq), _host(batched)
  for x, y in zip(jax.tree.leaves(hs), jax.tree.leaves(hb), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert int(batched.metrics.rejected) == 1 and not bool(rep.accepted[4])


def test_instant_step_works_inside_user_jit():
  state, _ = _state_with_memories()
  it = _good()

  @jax.jit
  def user_step(s, i):
    return sona.instant_step(s, i, CFG)

  ref, ref_rep = sona.instant_step(_copy(state), it, CFG)
  jax_it = jax.tree.map(jnp.asarray, types.Interaction(*it))
  out, rep = user_step(state, jax_it)
  np.testing.assert_allclose(np.asarray(rep.values), np.asarray(ref_rep.values), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.micro.b), np.asarray(ref.micro.b), rtol=1e-6)


def test_sona_observe_with_fields_equals_observe_with_an_interaction():
  class Clock:
    t = 1_700_000_000.0

    def __call__(self):
      return self.t

  rng = np.random.default_rng(5)
  mem = rng.normal(size=(6, CFG.dim)).astype(np.float32)
  engines = []
  for _ in range(2):
    clock = Clock()
    e = sona.Sona(CFG, key=jax.random.key(0), clock=clock, batching=False)
    ids = [e.add_memory(m, quality=0.5) for m in mem]
    clock.t += 40
    e.set_knobs(micro_lr=0.3)
    engines.append((e, ids))
  reports = []
  for i in range(4):
    q = rng.normal(size=CFG.dim).astype(np.float32)
    kw = dict(query=q, quality=0.2 + 0.2 * i, used=[i, i + 1], unused=[5], anchor=2)
    (a, ids), (b, _) = engines
    reports.append((a.observe(sona.make_interaction(CFG, **kw)), b.observe(**kw)))
  for ra, rb in reports:
    assert np.asarray(ra.values).tobytes() == np.asarray(rb.values).tobytes()
  assert int(engines[0][0].state.metrics.processed) == 4
  _assert_bit_identical(_host(engines[0][0].state), _host(engines[1][0].state))
  with pytest.raises(TypeError, match="not both"):
    engines[0][0].observe(sona.make_interaction(CFG, query=q, quality=0.5), quality=0.5)
  with pytest.raises(TypeError, match="give an Interaction"):
    engines[0][0].observe()
