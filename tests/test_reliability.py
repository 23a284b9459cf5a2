"""Reliability under bad input, faults and load: nothing lost, nothing corrupted.

- Property tests (hypothesis) over `make_interaction`, `instant_step` and `instant_scan`: any
  interaction is either refused before jit with a `ValueError`/`TypeError` (shapes, dtypes) or
  masked and counted with exactly the documented reason bits (a NumPy oracle of the rules); the
  state stays finite and its invariants hold (`check_invariants` of `benchmarks/soak.py`), through
  Loop B and Loop C too.
- A short soak (`benchmarks/soak.py`): no retrace after warm-up, counters balanced, bounded RSS.
- Faults: a failing disk write under the checkpointer (`RLIMIT_FSIZE`: the kernel refuses to grow
  a file past the limit, as on a full disk) and under the driver (an injected `OSError`); an
  exception inside a Loop B or Loop C on a worker thread, mid-cycle.

Retraces are counted with `jax.monitoring` (every XLA backend compilation, per phase, see
`soak.CompileCounter`, and the conftest's `compiles` log).

All tests share one small config (`CFG`), so Loop A, B and C compile once for the whole file.
"""

import contextlib
import errno
import gc
import importlib.util
import logging
import math
import pathlib
import resource
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sona_jax as sona
import sona_jax.loops.background as background_module
import sona_jax.loops.deep.dreams as dreams_module
from sona_jax import buffer
from sona_jax.loops import instant
from sona_jax.state import PROCESSED, REJECTED


def _load_soak():
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
  spec = importlib.util.spec_from_file_location("sona_soak", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


soak = _load_soak()
check_invariants = soak.check_invariants

# Signal capacity below the ~950 accepted interactions between two Loop B cycles of the short
# soak, so the ring buffer's drop path is exercised and counted.
BASE = sona.SonaConfig(
  dim=8,
  base_rank=4,
  graph_capacity=64,
  graph_degree=4,
  signal_capacity=700,
  trajectory_capacity=256,
  pattern_clusters=4,
  bank_capacity=16,
  router_steps=10,
  router_batch=16,
  fisher_samples=8,
  n_dreams=16,
  probe_capacity=16,
)
CFG = soak.schedule_config(BASE, background_every=1_000, deep_every=2_000)
N = CFG.graph_capacity
K = CFG.max_ids
DEAD = (5, 17)  # removed memories; ids 40..63 were never used
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FIXTURE_CHECK = HealthCheck.function_scoped_fixture


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_bit_identical(a, b, *, skip=()):
  la, ta = jax.tree_util.tree_flatten_with_path(_host(a))
  lb, tb = jax.tree_util.tree_flatten_with_path(_host(b))
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb, strict=True):
    name = jax.tree_util.keystr(path)
    if name not in skip:
      assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


_BASE_STATE = None


def _base_state():
  """40 memories (ids 0..39), two of them removed again; a fresh copy on every call."""
  global _BASE_STATE
  if _BASE_STATE is None:
    state = sona.init_state(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(40, CFG.dim)), jnp.float32)
    g, _, _ = sona.graph.add_nodes(state.graph, emb, quality=0.5)
    for i in DEAD:
      g = sona.graph.remove_node(g, i)
    _BASE_STATE = _host(state._replace(graph=g))
  return jax.tree.map(jnp.asarray, _BASE_STATE)


# ------------------------------------------------------------------------- interaction strategies

NAN, INF = math.nan, math.inf
_IDS = st.one_of(
  st.integers(-1, 39),
  st.integers(-3, N + 3),
  st.sampled_from([-(2**31), 2**31 - 1, *DEAD, 50]),
)


@st.composite
def _vectors(draw):
  """f32[dim]: moderate, tiny or large entries, sometimes with NaN, inf or overflowing ones."""
  v = draw(hnp.arrays(np.float32, CFG.dim, elements=st.floats(-4, 4, width=32)))
  v = v * np.float32(draw(st.sampled_from([1.0, 1e-30, 1e3, 1e15])))
  for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
    v[draw(st.integers(0, CFG.dim - 1))] = draw(st.sampled_from([NAN, INF, -INF, 3.4e38, -1e25]))
  return v


# Latencies stay <= 1e30 and positive targets >= 1e-3, so a ratio never overflows here (see
# `test_latency_ratio_that_overflows_is_rejected`).
_INTERACTION = st.fixed_dictionaries(
  dict(
    query=_vectors(),
    quality=st.one_of(
      st.floats(0, 1, width=32),
      st.sampled_from([NAN, INF, -INF, -1e-3, 1.001, 2.0, 1e38, -1e38, -0.0]),
    ),
    anchor=_IDS,
    used=st.lists(_IDS, max_size=K),
    unused=st.lists(_IDS, max_size=K),
    tier=st.one_of(st.integers(-2, CFG.n_tiers + 1), st.sampled_from([-(2**31), 2**31 - 1])),
    latency_ms=st.one_of(
      st.floats(0, 1e4, width=32), st.sampled_from([1e6, 1e30, -1.0, NAN, INF, -INF])
    ),
    target_latency_ms=st.sampled_from([200.0, 1.0, 1e-3, 1e30, 0.0, -5.0, NAN, INF]),
    context_tokens=st.one_of(st.integers(-3, 10**7), st.sampled_from([2**31 - 1, -(2**31)])),
    feedback=st.one_of(
      st.just(NAN), st.floats(0, 1, width=32), st.sampled_from([INF, -INF, -0.5, 1.5, 3e38])
    ),
    grad=st.one_of(st.none(), _vectors()),
    time=st.one_of(st.integers(-3, 10**7), st.sampled_from([2**31 - 1, -(2**31)])),
  )
)


def _alive(state) -> np.ndarray:
  return np.asarray(state.graph.alive)


def _finite_square(v) -> bool:
  v = np.asarray(v, np.float32)
  with np.errstate(over="ignore", invalid="ignore"):
    return bool(np.isfinite(np.dot(v, v)))


def expected_reasons(it: sona.Interaction, alive: np.ndarray) -> int:
  """The `BAD_*` bits Loop A must set for `it` (all but `NONFINITE_STEP`), from the documented
  rules, in NumPy."""
  f = lambda x: float(np.float32(x))  # noqa: E731
  q, fb, lat, tgt = f(it.quality), f(it.feedback), f(it.latency_ms), f(it.target_latency_ms)
  ids = np.concatenate([it.used, it.unused]).astype(np.int64)
  present = ids >= 0
  n = alive.shape[0]
  # No slot was ever reused here (generation <= 1), so the live ids are exactly the live slots;
  # any other id >= 0 names no live memory (stale).
  live = lambda i: 0 <= i < n and bool(alive[i])  # noqa: E731
  stale = any(not live(i) for i in ids[present])
  dup = np.unique(ids[present]).size != int(present.sum())
  anchor = int(it.anchor)
  bits = 0
  bits |= instant.BAD_QUERY * (not _finite_square(it.query))
  bits |= instant.BAD_QUALITY * (not (math.isfinite(q) and 0.0 <= q <= 1.0))
  bits |= instant.BAD_FEEDBACK * (not (math.isnan(fb) or 0.0 <= fb <= 1.0))
  ok_lat = math.isfinite(lat) and lat >= 0 and math.isfinite(tgt) and tgt > 0
  bits |= instant.BAD_LATENCY * (not ok_lat)
  bits |= instant.BAD_TIER * (not 0 <= int(it.tier) < CFG.n_tiers)
  bits |= instant.BAD_CONTEXT * (int(it.context_tokens) < 0)
  # -2**31 is `types.TIME_UNSET`: "no time given", stamped with the newest time seen.
  bits |= instant.BAD_TIME * (int(it.time) < 0 and int(it.time) != sona.types.TIME_UNSET)
  bits |= instant.BAD_GRAD * (bool(it.has_grad) and not _finite_square(it.grad))
  bits |= instant.BAD_IDS * bool((ids < -1).any() or dup)
  bits |= instant.BAD_ANCHOR * (anchor < -1)
  bits |= instant.BAD_STALE * bool(stale or (anchor >= 0 and not live(anchor)))
  return bits


def _check_report_against_oracle(reasons: int, accepted: bool, expected: int, what):
  assert reasons & ~instant.NONFINITE_STEP == expected, (what, bin(reasons), bin(expected))
  assert accepted == (reasons == 0), what


def _assert_counters(state, *, sent: int, accepted: int):
  c = np.asarray(state.metrics.counters)
  assert int(c[PROCESSED]) + int(c[REJECTED]) == sent
  assert int(c[PROCESSED]) == accepted


# --------------------------------------------------------------------------- properties: Loop A


@settings(max_examples=60, **SETTINGS)
@given(st.lists(_INTERACTION, min_size=1, max_size=5))
def test_any_interaction_is_accepted_safely_or_masked_and_counted(kwargs_list):
  state = _base_state()
  alive = _alive(state)
  n_ok = 0
  for kw in kwargs_list:
    it = sona.make_interaction(CFG, **kw)
    expected = expected_reasons(it, alive)
    before = _host(state)
    state, rep = sona.instant_step(state, it, CFG)
    reasons, accepted = int(rep.reasons), bool(rep.accepted)
    _check_report_against_oracle(reasons, accepted, expected, kw)
    if not accepted:  # nothing but the rejection counter moved
      _assert_bit_identical(before, state, skip={".metrics.counters"})
      assert int(state.metrics.rejected) == int(before.metrics.counters[REJECTED]) + 1
    n_ok += accepted
  _assert_counters(state, sent=len(kwargs_list), accepted=n_ok)
  assert check_invariants(state, CFG) == []


@settings(max_examples=25, **SETTINGS)
@given(st.lists(_INTERACTION, min_size=8, max_size=8))
def test_instant_scan_masks_exactly_like_instant_step(kwargs_list):
  state = _base_state()
  alive = _alive(state)
  its = [sona.make_interaction(CFG, **kw) for kw in kwargs_list]
  seq = _copy(state)
  seq_reports = []
  for it in its:
    seq, r = sona.instant_step(seq, it, CFG)
    seq_reports.append(np.asarray(r.values))
  state, rep = sona.instant_scan(state, sona.stack_interactions(its), CFG)
  reasons, accepted = np.asarray(rep.reasons), np.asarray(rep.accepted)
  for i, it in enumerate(its):
    _check_report_against_oracle(int(reasons[i]), bool(accepted[i]), expected_reasons(it, alive), i)
  seq_reasons = np.stack(seq_reports)[:, instant.R_REASONS].view(np.int32)
  np.testing.assert_array_equal(reasons, seq_reasons)
  _assert_counters(state, sent=8, accepted=int(accepted.sum()))
  assert check_invariants(state, CFG) == []
  for x, y in zip(jax.tree.leaves(_host(state)), jax.tree.leaves(_host(seq)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# Corruptions of one field of an otherwise good interaction: wrong shapes, wrong dtypes, values
# that do not fit int32, and things that are not arrays at all.
_FIELDS = list(sona.Interaction._fields)
_VECTOR_FIELDS = ("query", "grad", "used", "unused")


def _corruptions(field: str):
  shape = (CFG.dim,) if field in ("query", "grad") else (K,) if field in ("used", "unused") else ()
  is_vector = field in _VECTOR_FIELDS
  wrong_shapes = (
    [(shape[0] + 1,), (shape[0] - 1,), (1, shape[0]), (), (0,)] if is_vector else [(1,), (2,)]
  )
  out = [np.zeros(s, np.float32 if field in ("query", "grad") else np.int32) for s in wrong_shapes]
  out += [
    np.zeros(shape, np.complex64),
    np.full(shape, "x"),
    np.zeros(shape, object),
    np.zeros(shape, jnp.bfloat16),
  ]
  if field == "has_grad":
    out += [np.int32(1), np.float32(1.0)]
  elif field in ("query", "grad", "quality", "latency_ms", "target_latency_ms", "feedback"):
    out += [np.zeros(shape, np.int32), np.zeros(shape, bool)]
  else:  # id and count fields
    out += [
      np.zeros(shape, np.float32),
      np.zeros(shape, bool),
      np.full(shape, 2**40, np.int64),
      np.full(shape, 2**32 - 1, np.uint32),
      np.full(shape, -(2**40), np.int64),
    ]
  return out


_CORRUPTED = st.sampled_from(_FIELDS).flatmap(
  lambda f: st.tuples(st.just(f), st.sampled_from(_corruptions(f)))
)


# `compiles` is a function-scoped fixture, but stateless (a class): safe across examples.
@settings(
  max_examples=80,
  **{
    **SETTINGS,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
  },
)
@given(_CORRUPTED, st.booleans())
def test_wrong_shapes_and_dtypes_raise_before_jit_and_consume_nothing(compiles, corrupted, batched):
  field, bad = corrupted
  state = _base_state()
  good = sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.9, used=[1], anchor=0)
  if batched:
    batch = sona.stack_interactions([good, good])
    value = np.stack([np.asarray(bad)] * 2) if np.ndim(bad) else np.asarray([bad] * 2)
  with compiles() as log, pytest.raises((ValueError, TypeError)):
    if batched:
      sona.instant_scan(state, batch._replace(**{field: value}), CFG)
    else:
      sona.instant_step(state, good._replace(**{field: bad}), CFG)
  # Refused before jit: nothing compiled, nothing donated, the state still serves.
  assert log.names == []
  assert not state.micro.a.is_deleted() and not state.signals.data.is_deleted()
  state, rep = sona.instant_step(state, good, CFG)
  assert bool(rep.accepted)
  _assert_counters(state, sent=1, accepted=1)


@pytest.mark.parametrize(
  "field", ["quality", "latency_ms", "target_latency_ms", "feedback", "query", "grad"]
)
@pytest.mark.parametrize("value", [1e39, -1e39])
def test_floats_beyond_float32_range_are_masked_and_counted(field, value):
  state = _base_state()
  vector = field in ("query", "grad")
  bad = np.full(CFG.dim, value) if vector else value
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    kw = dict(query=np.ones(CFG.dim), quality=0.9, used=[1], anchor=0)
    state, rep = sona.instant_step(state, sona.make_interaction(CFG, **(kw | {field: bad})), CFG)
    assert not bool(rep.accepted) and int(rep.reasons) != 0
    # The same through the field-by-field path (float64 values replaced into an interaction).
    good = sona.make_interaction(CFG, **kw)
    extra = {"has_grad": np.True_} if field == "grad" else {}
    bad64 = bad if vector else np.float64(value)
    state, rep = sona.instant_step(state, good._replace(**{field: bad64}, **extra), CFG)
    assert not bool(rep.accepted)
  _assert_counters(state, sent=2, accepted=0)


@pytest.mark.parametrize(
  ("field", "value"),
  [("quality", "x"), ("quality", "float32"), ("tier", "int32"), ("used", [1, 2, 3, 4])],
)
def test_errors_for_non_array_values_name_the_field(field, value):
  state = _base_state()
  good = sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.9, used=[1], anchor=0)
  try:
    state, rep = sona.instant_step(state, good._replace(**{field: value}), CFG)
  except (ValueError, TypeError) as e:
    assert field in str(e), str(e)
  else:  # accepted as a value: then it must have been converted faithfully
    assert field == "used" and bool(rep.accepted)


def test_latency_ratio_that_overflows_is_rejected():
  state = _base_state()
  it = sona.make_interaction(
    CFG, query=np.ones(CFG.dim), quality=0.9, latency_ms=1e38, target_latency_ms=1e-30
  )
  state, rep = sona.instant_step(state, it, CFG)
  assert check_invariants(state, CFG) == [] and not bool(rep.accepted)


# ------------------------------------------------------------------- invariants through B and C


def _extreme_but_valid(stream: "soak.Stream", alive_ids, t0, rng, b=200):
  """A batch of the soak stream (some rows bad) with valid rows pushed to the edges of the
  allowed ranges: huge queries, qualities and feedback of exactly 0 or 1, huge latencies and
  context lengths, the largest int32 times."""
  it, bad = stream.batch(b, alive_ids, t0, 1.0)
  good = np.flatnonzero(~bad)
  pick = lambda p: good[rng.random(good.size) < p]  # noqa: E731
  it.query[pick(0.2)] *= np.float32(1e15)
  it.quality[pick(0.3)] = rng.choice([0.0, 1.0])
  it.feedback[pick(0.2)] = rng.choice([0.0, 1.0])
  it.latency_ms[pick(0.1)] = 1e30
  it.context_tokens[pick(0.1)] = 2**31 - 1
  it.time[pick(0.05)] = 2**31 - 1
  return it, bad


@settings(max_examples=2, **SETTINGS)
@given(st.integers(0, 2**16), st.sampled_from([0.05, 0.3]))
def test_invariants_hold_through_loop_b_and_loop_c_under_adversarial_serving(seed, bad_fraction):
  clock = {"now": 1_700_000_000.0}
  engine = sona.Sona(CFG, key=jax.random.key(seed), clock=lambda: clock["now"])
  rng = np.random.default_rng(seed)
  engine.add_memories(rng.normal(size=(48, CFG.dim)), quality=0.5)
  stream = soak.Stream(CFG, seed, bad_fraction)
  sent = accepted = 0
  for cycle in range(3):
    alive_ids = np.flatnonzero(np.asarray(engine.state.graph.alive))
    for _ in range(2):
      it, bad = _extreme_but_valid(stream, alive_ids, engine.now(), rng)
      rep = engine.observe_many(it)
      ok = np.asarray(rep.accepted)
      # Huge-but-finite values may still be refused by the micro-LoRA step's own check.
      assert not np.any(ok & bad)
      assert np.all(np.asarray(rep.reasons)[~ok & ~bad] == instant.NONFINITE_STEP)
      sent, accepted = sent + bad.size, accepted + int(ok.sum())
    assert engine.run_background().ran
    assert check_invariants(engine.state, CFG) == []
    if cycle == 1:
      engine.run_deep()
      assert check_invariants(engine.state, CFG) == []
    clock["now"] += 3_600
  _assert_counters(engine.state, sent=sent, accepted=accepted)


# ---------------------------------------------------------------------------------- short soak


def test_short_soak_no_retrace_counters_balanced_memory_bounded():
  result = soak.run_soak(
    4_000,
    batch=500,
    background_every=1_000,
    deep_every=2_000,
    cfg=CFG,
    bad_fraction=0.05,
    add_per_cycle=8,
    log=None,
  )
  b = result["balance"]
  assert result["cycles"] == {"background": 4, "deep": 2}
  assert b["received"] == 4_000 == b["rejected"] + b["processed"]
  assert b["rejected"] == b["bad_sent"] > 0 and b["misclassified"] == 0
  assert b["processed"] == b["consumed_by_loop_b"] + b["buffered"] + b["dropped"]
  assert b["dropped"] > 0  # the ring overflowed between cycles: drops happened and were counted
  assert result["violations"] == []
  # Warm-up is each phase's first call; every later compilation anywhere is a retrace.
  assert result["retraces_after_warmup"] == {}
  assert result["compiles"].get("loop_a", 0) >= 1  # the counter does see compilations
  assert result["rss_mb"]["growth_after_warmup"] < 100.0
  assert result["ok"]


# --------------------------------------------------------------------------- faults: disk writes


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
  """Files cannot grow past `nbytes` (writes fail with EFBIG, as on a full disk)."""
  old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # default action kills the process
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


def _shifted(state, by):
  return jax.tree.map(lambda x: x if x.dtype == jnp.bool_ else x + jnp.asarray(by, x.dtype), state)


# orbax-checkpoint 0.12.8 abandons the sibling writes of a failed save on a closed event loop; they
# would report in a later test (issue 17). The fixture makes them finish within the save.
@pytest.mark.usefixtures("orbax_failures_finish")
def test_a_failing_disk_write_keeps_the_last_good_checkpoint_and_serving(tmp_path):
  from sona_jax.checkpoint import Checkpointer

  # A signal buffer of 256 KiB: its data cannot be written under a 64 KiB file size limit.
  cfg = CFG.replace(signal_capacity=4_096)
  good = sona.init_state(cfg, jax.random.key(1))
  noise = jax.random.normal(jax.random.key(2), good.signals.data.shape)  # incompressible
  good = good._replace(signals=good.signals._replace(data=noise))
  newer, newest = _shifted(good, 1), _shifted(good, 2)
  live = _base_state()
  ok_it = sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.9, used=[1], anchor=0)
  live, _ = sona.instant_step(live, ok_it, CFG)  # compiled before the disk fills up
  with Checkpointer(tmp_path, async_save=True) as ck:
    ck.save(0, good, cfg, time_origin=0.0)
    ck.wait()
    with _file_size_limit(64 * 1024):
      # A metadata write fails with OSError, an array write with tensorstore's ValueError.
      with pytest.raises((OSError, ValueError), match="File too large"):
        ck.save(1, newer, cfg, time_origin=0.0)  # asynchronous: the error comes at wait()
        live, rep = sona.instant_step(live, ok_it, CFG)  # serving goes on meanwhile
        assert bool(rep.accepted)
        ck.wait()
    assert ck.all_steps() == [0]  # the half-written step is not a checkpoint
    restored, _, meta = ck.restore()
    assert meta["step"] == 0
    _assert_bit_identical(restored, good)
    # The disk has room again: the next save works.
    ck.save(2, newest, cfg, time_origin=0.0)
    ck.wait()
  live, rep = sona.instant_step(live, ok_it, CFG)
  assert bool(rep.accepted) and int(live.step) == 3
  with Checkpointer(tmp_path) as ck:  # after a restart
    assert ck.all_steps() == [0, 2]
    restored, _, meta = ck.restore()
  assert meta["step"] == 2
  _assert_bit_identical(restored, newest)
  gc.collect()  # a leftover of the failed save would report now, in this test, as an error


class _Clock:
  def __init__(self, t=1_700_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


class _FailingSaves:
  """Wraps a `Checkpointer`: its next `fail` saves raise ENOSPC (nothing is written)."""

  def __init__(self, inner, fail: int):
    self.inner, self.fail, self.calls = inner, fail, 0

  def save(self, *args, **kwargs):
    self.calls += 1
    if self.fail > 0:
      self.fail -= 1
      raise OSError(errno.ENOSPC, "No space left on device")
    return self.inner.save(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def _serve(engine, n, rng, ids):
  for _ in range(n):
    it = sona.make_interaction(
      CFG,
      query=rng.normal(size=CFG.dim),
      quality=float(rng.uniform()),
      used=[int(rng.choice(ids))],
      tier=int(rng.integers(CFG.n_tiers)),
      time=engine.now(),
    )
    assert bool(engine.observe(it).accepted)


def test_driver_failing_checkpoint_write_applies_the_whole_cycle_and_keeps_serving(tmp_path):
  clock = _Clock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock, checkpoint_dir=str(tmp_path))
  rng = np.random.default_rng(0)
  ids = engine.add_memories(rng.normal(size=(16, CFG.dim)))
  _serve(engine, 30, rng, ids)
  reference, _ = sona.background_step(_copy(engine.state), CFG, engine.now(), force=True)
  engine._checkpointer = _FailingSaves(engine._checkpointer, fail=1)
  try:
    report = engine.run_background()
  except OSError as e:  # the driver may report the failed write to the caller ...
    assert e.errno == errno.ENOSPC
  else:  # ... or log it and carry on
    assert report.ran
  # Either way the cycle is applied whole (never half) and recorded, and serving goes on.
  _assert_bit_identical(engine.state, reference)
  assert [loop for loop, _ in engine.history] == ["background"]
  assert engine.wait_checkpoints() is None
  _serve(engine, 10, rng, ids)
  clock.t += 3_600
  assert engine.run_background().ran  # the disk has room again: this cycle is saved
  engine.wait_checkpoints()
  restored = sona.Sona.restore(str(tmp_path), clock=clock)
  _assert_bit_identical(restored.state, engine.state)
  assert int(restored.state.step) == 40


def _wait_until(predicate, timeout_s: float) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.02)
  return predicate()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_worker_schedule_survives_a_failing_checkpoint_write(tmp_path, caplog):
  clock = _Clock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock, checkpoint_dir=str(tmp_path))
  rng = np.random.default_rng(1)
  ids = engine.add_memories(rng.normal(size=(16, CFG.dim)))
  _serve(engine, CFG.min_samples, rng, ids)
  engine._checkpointer = _FailingSaves(engine._checkpointer, fail=1)
  with caplog.at_level(logging.INFO, logger="sona_jax"):
    engine.start(poll_s=0.02)
    try:
      clock.t += CFG.background_interval_s
      assert _wait_until(lambda: len(engine.history) == 1, 60)
      _serve(engine, CFG.min_samples, rng, ids)  # serving goes on after the failed write
      clock.t += CFG.background_interval_s
      second = _wait_until(lambda: len(engine.history) == 2, 5)
    finally:
      engine.stop()
  assert second, "the schedule stopped after the failed checkpoint write"
  assert any(r.levelno >= logging.ERROR for r in caplog.records)
  assert int(engine.state.step) == 2 * CFG.min_samples


# ------------------------------------------------------------------ faults: worker-thread cycles


def _fail_midway(monkeypatch, loop: str):
  """Makes the next Loop B (or Loop C) fail after some of its phases ran; returns call counts."""
  calls = {"n": 0}

  def flaky_of(original, name):
    def flaky(*args, **kwargs):
      calls["n"] += 1
      if calls["n"] == 1:
        raise RuntimeError(f"injected failure in {name}")
      return original(*args, **kwargs)

    return flaky

  if loop == "background":  # the patterns phase: after consolidation and router training
    phases = background_module.cycle_phases

    def with_flaky_patterns(*args, **kwargs):
      ph = phases(*args, **kwargs)
      return ph._replace(patterns=flaky_of(ph.patterns, "patterns"))

    monkeypatch.setattr(background_module, "cycle_phases", with_flaky_patterns)
  else:  # after consolidation and abstraction
    monkeypatch.setattr(dreams_module, "dream", flaky_of(dreams_module.dream, "dream"))
  return calls


@pytest.mark.parametrize("loop", ["background", "deep"])
def test_a_cycle_failing_midway_on_the_worker_leaves_no_half_update(monkeypatch, caplog, loop):
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=_Clock())
  rng = np.random.default_rng(2)
  ids = engine.add_memories(rng.normal(size=(16, CFG.dim)))
  _serve(engine, 30, rng, ids)
  reference = _copy(engine.state)
  calls = _fail_midway(monkeypatch, loop)
  its = [
    sona.make_interaction(CFG, query=rng.normal(size=CFG.dim), quality=0.9, used=[int(ids[1])])
    for _ in range(15)
  ]
  with caplog.at_level(logging.ERROR, logger="sona_jax"):
    future = engine.begin_background() if loop == "background" else engine.begin_deep()
    for it in its:  # serving goes on while the cycle runs (and after it failed)
      assert bool(engine.observe(it).accepted)
      reference, _ = sona.instant_step(reference, it, CFG)
    with pytest.raises(RuntimeError, match="injected failure"):
      future.result(timeout=120)
  assert calls["n"] == 1
  assert any(r.exc_info and "failed" in r.getMessage() for r in caplog.records)
  # The live state is exactly Loop A's work: nothing of the failed cycle, nothing lost.
  _assert_bit_identical(engine.state, reference)
  assert engine.history == [] and engine._journal is None
  assert int(buffer.unread(engine.state.signals)) == 45


def test_worker_loop_b_failure_is_logged_and_retried_while_loop_a_serves(monkeypatch, caplog):
  clock = _Clock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock)
  rng = np.random.default_rng(3)
  ids = engine.add_memories(rng.normal(size=(16, CFG.dim)))
  _serve(engine, 20, rng, ids)
  calls = _fail_midway(monkeypatch, "background")
  served = 20
  with caplog.at_level(logging.INFO, logger="sona_jax"):
    engine.start(poll_s=0.02)
    try:
      clock.t += CFG.background_interval_s  # the slot: the first attempt fails, the next runs
      deadline = time.monotonic() + 60
      while not engine.history and time.monotonic() < deadline:
        _serve(engine, 1, rng, ids)
        served += 1
        time.sleep(0.001)
    finally:
      engine.stop(timeout=30)
  assert [loop for loop, _ in engine.history] == ["background"]
  assert calls["n"] == 2  # failed once, retried at the next poll
  failures = [r for r in caplog.records if r.levelno == logging.ERROR]
  assert len(failures) == 1 and failures[0].exc_info
  assert "Loop B failed" in failures[0].getMessage()
  assert engine._worker is None  # stop() joined the schedule thread
  _assert_counters(engine.state, sent=served, accepted=served)  # every request served
  assert check_invariants(engine.state, CFG) == []
