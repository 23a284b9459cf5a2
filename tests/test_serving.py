"""Serving for real: concurrent callers, dynamic batching, memory at capacity, stable ids, live
knobs and time stamps, through the driver (`Sona`) and the pure Loop A."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import graph as graph_lib
from sona_jax.loops import instant
from sona_jax.runtime import count_compiles
from sona_jax.state import LAST_TIME, PROCESSED, REJECTED

CFG = sona.SonaConfig(
  dim=8,
  base_rank=4,
  graph_capacity=32,
  graph_degree=4,
  signal_capacity=1024,
  trajectory_capacity=64,
  min_samples=8,
  pattern_clusters=3,
  bank_capacity=8,
  router_steps=10,
  router_batch=16,
  fisher_samples=8,
  admission_window_s=100,
)


class Clock:
  def __init__(self, t=1_700_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


class FastClock:
  """Real time sped up: one wall second is `speedup` seconds of schedule."""

  def __init__(self, speedup: float, t0=1_700_000_000.0):
    self.speedup, self.t0, self.m0 = speedup, t0, time.monotonic()

  def __call__(self):
    return self.t0 + (time.monotonic() - self.m0) * self.speedup


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype == np.dtype("V") or jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = np.asarray(jax.random.key_data(x)), np.asarray(jax.random.key_data(y))
    np.testing.assert_array_equal(x, y)


def _it(rng, ids, cfg=CFG, **kw):
  pick = rng.choice(ids, size=min(2, len(ids)), replace=False) if len(ids) else []
  return sona.make_interaction(
    cfg,
    query=rng.normal(size=cfg.dim),
    quality=float(rng.uniform()),
    used=[int(pick[0])] if len(pick) else [],
    unused=[int(pick[1])] if len(pick) > 1 else [],
    anchor=int(pick[0]) if len(pick) else -1,
    tier=int(rng.integers(cfg.n_tiers)),
    **kw,
  )


# --------------------------------------------------------------------------- thread safety


def test_eight_threads_mixing_every_method_while_loop_b_runs_equal_the_logged_order(tmp_path):
  clock = FastClock(speedup=7_200.0)  # Loop B (hourly) about every half second
  # Coalesced batches of up to 8 rows (larger ones go in chunks of 8): the batch sizes that
  # test_batch_sizes_compile_once_after_warmup compiles too, not one more compile per size.
  engine = sona.Sona(
    CFG,
    key=jax.random.key(0),
    clock=clock,
    checkpoint_dir=str(tmp_path),
    transcript=True,
    max_batch=8,
  )
  initial = engine.snapshot()
  ids = list(engine.add_memories(np.random.default_rng(0).normal(size=(12, CFG.dim))))
  ids_lock = threading.Lock()
  observed, errors = [0], []
  count_lock = threading.Lock()
  engine.start(poll_s=0.02)

  def worker(w):
    rng = np.random.default_rng(100 + w)
    try:
      for i in range(40):
        op = (w + i) % 9
        with ids_lock:
          known = np.asarray(ids)
        if op in (0, 1):
          engine.observe(_it(rng, known))
          with count_lock:
            observed[0] += 1
        elif op == 2:
          batch = [_it(rng, known) for _ in range(int(rng.integers(1, 5)))]
          engine.observe_many(batch)
          with count_lock:
            observed[0] += len(batch)
        elif op == 3:
          y = np.asarray(engine.adapt(rng.normal(size=CFG.dim)))
          assert y.shape == (CFG.dim,) and np.all(np.isfinite(y))
        elif op == 4:
          assert 0 <= engine.route(rng.normal(size=CFG.dim)) < CFG.n_tiers
        elif op == 5:
          engine.find_patterns(rng.normal(size=CFG.dim), k=2)
        elif op == 6:
          new = engine.add_memory(rng.normal(size=CFG.dim), quality=0.6)
          with ids_lock:
            ids.append(new)
        elif op == 7:
          s = engine.stats()
          assert s["requests"]["processed"] + s["requests"]["rejected"] >= 0
          engine.metrics()
        else:
          if i % 18 == w % 18:
            engine.save()
          else:
            engine.stats()
    except Exception as e:  # collected: the test asserts there were none
      errors.append(repr(e))

  threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  time.sleep(0.6)  # let the schedule start one more cycle while nothing else runs
  engine.stop()
  assert errors == []
  c = np.asarray(engine.state.metrics.counters)
  assert int(c[PROCESSED]) + int(c[REJECTED]) == observed[0]
  assert sum(loop == "background" for loop, _ in engine.history) >= 1
  # The final state is the sequential replay of every transition in the order the driver
  # serialised them, Loop B cycles included (at their snapshot points), bit for bit.
  _leaves_equal(engine.replay(initial), engine.state)


def test_readers_never_see_a_donated_buffer_under_a_hot_observe_loop():
  engine = sona.Sona(CFG, key=jax.random.key(1), clock=Clock())
  ids = engine.add_memories(np.random.default_rng(1).normal(size=(8, CFG.dim)))
  stop, errors, reads = threading.Event(), [], [0]

  def writer():
    rng = np.random.default_rng(2)
    for _ in range(600):
      engine.observe(_it(rng, ids))
    stop.set()

  def reader(kind):
    rng = np.random.default_rng(3)
    while not stop.is_set():
      try:
        if kind == 0:
          np.asarray(engine.adapt(rng.normal(size=CFG.dim)))
        elif kind == 1:
          engine.stats()
        else:
          engine.route(rng.normal(size=CFG.dim))
        reads[0] += 1
      except Exception as e:
        errors.append(repr(e))
        return

  threads = [threading.Thread(target=writer)] + [
    threading.Thread(target=reader, args=(k,)) for k in range(3)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == [] and reads[0] > 0
  assert engine.stats()["requests"]["processed"] + engine.stats()["requests"]["rejected"] == 600


# --------------------------------------------------------------------------- dynamic batching


def _close(a: sona.SonaState, b: sona.SonaState):
  """Equal up to the float rounding of batched kernels (scan vs steps), integers exactly."""
  tol = dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(a.micro.a), np.asarray(b.micro.a), **tol)
  np.testing.assert_allclose(np.asarray(a.micro.b), np.asarray(b.micro.b), **tol)
  ga, gb = a.graph, b.graph
  np.testing.assert_array_equal(np.asarray(ga.nbr), np.asarray(gb.nbr))
  np.testing.assert_allclose(np.asarray(ga.w), np.asarray(gb.w), **tol)
  np.testing.assert_array_equal(np.asarray(ga.access_count), np.asarray(gb.access_count))
  np.testing.assert_array_equal(np.asarray(ga.last_access), np.asarray(gb.last_access))
  np.testing.assert_allclose(np.asarray(ga.quality), np.asarray(gb.quality), **tol)
  np.testing.assert_array_equal(np.asarray(a.metrics.counters), np.asarray(b.metrics.counters))
  np.testing.assert_allclose(np.asarray(a.signals.data), np.asarray(b.signals.data), **tol)


def test_concurrent_observes_are_coalesced_in_arrival_order_with_sequential_semantics():
  rng = np.random.default_rng(4)
  mem = rng.normal(size=(10, CFG.dim))
  its = [_it(rng, np.arange(10), time=i + 1) for i in range(64)]  # a distinct time each
  engine = sona.Sona(CFG, key=jax.random.key(2), clock=Clock())
  engine.add_memories(mem, time=0)
  barrier = threading.Barrier(8)

  def worker(w):
    barrier.wait()
    for j in range(w, 64, 8):
      engine.observe(its[j])

  threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  stats = engine.stats()
  assert stats["requests"]["processed"] + stats["requests"]["rejected"] == 64
  batches = stats["serving"]["batches"]
  assert sum(int(k) * v for k, v in batches.items()) == 64
  # The order the driver applied them is the order of the trajectory records (times are
  # distinct); applying them one by one in that order gives the same state.
  applied = np.asarray(sona.types.unpack_trajectories(engine.state.trajectories.data, CFG).time)
  order = [int(t) - 1 for t in applied[: stats["requests"]["processed"]]]
  ref = sona.Sona(CFG, key=jax.random.key(2), clock=Clock(), batching=False)
  ref.add_memories(mem, time=0)
  for j in order + [j for j in range(64) if j not in set(order)]:  # rejected ones last: no-ops
    ref.observe(its[j])
  _close(engine.state, ref.state)


def test_batched_padding_rows_change_nothing_and_count_nothing():
  state = sona.init_state(CFG, jax.random.key(3))
  graph, ids, _ = graph_lib.add_nodes(state.graph, np.eye(CFG.dim), quality=0.5)
  state = state._replace(graph=graph)
  rng = np.random.default_rng(5)
  # 4 interactions and 4 rows of padding (batch sizes the driver compiles in this file anyway).
  its = [_it(rng, np.asarray(ids), time=i + 1) for i in range(4)]
  packed = np.stack([sona.types.pack(it, CFG) for it in its])
  ref = jax.tree.map(jnp.copy, state)
  ref, rep_ref = sona.instant_scan(ref, sona.stack_interactions(its), CFG)
  padded = np.concatenate([packed, np.zeros((4, packed.shape[1]), np.float32)])
  out, rep = instant.scan_packed(state, padded, CFG, n_valid=4)
  _leaves_equal(out, ref)
  np.testing.assert_array_equal(np.asarray(rep.values)[:4], np.asarray(rep_ref.values))


def test_batch_sizes_compile_once_after_warmup():
  engine = sona.Sona(CFG, key=jax.random.key(4), clock=Clock(), max_batch=8)
  ids = engine.add_memories(np.random.default_rng(6).normal(size=(8, CFG.dim)))
  engine.warmup()
  before = engine.stats()["requests"]
  assert before["processed"] == 0 and before["rejected"] == 0  # warm-up changes nothing
  rng = np.random.default_rng(7)
  with count_compiles() as counter:
    for n in (1, 2, 3, 5, 7, 8, 13, 1):
      engine.observe_many([_it(rng, ids) for _ in range(n)])
      engine.observe(_it(rng, ids))
  assert counter.compiles == 0


# --------------------------------------------------------------------------- capacity and ids


def _full_engine(clock, **kw):
  """An engine whose memory is full: CFG's capacity in memories added at time 0 (CFG, so these
  tests run the programs the file compiles anyway)."""
  cfg = CFG
  engine = sona.Sona(cfg, key=jax.random.key(5), clock=clock, **kw)
  rng = np.random.default_rng(8)
  old = engine.add_memories(rng.normal(size=(cfg.graph_capacity, cfg.dim)), time=0)
  return cfg, engine, old, rng


def test_a_full_memory_admits_a_batch_on_distinct_slots_and_reports_evictions():
  clock = Clock()
  events = []
  cfg, engine, old, rng = _full_engine(clock, on_memory_event=events.append)
  clock.t += 1_000  # the first memories are established now
  new, evicted = engine.add_memories(rng.normal(size=(4, cfg.dim)), return_evicted=True)
  assert len(set(new.tolist())) == 4
  slots, live = graph_lib.resolve_ids(engine.state.graph, new)
  assert bool(np.all(live)) and len(set(np.asarray(slots).tolist())) == 4
  assert sorted(evicted.tolist()) == sorted(set(old.tolist()) & set(evicted.tolist()))
  assert [e.id for e in events] == evicted.tolist() and all(e.kind == "evicted" for e in events)
  assert [e.id for e in engine.memory_events()] == evicted.tolist()
  assert engine.memory_events() == []  # taken
  # Four more right away: the four young ones are protected while established ones remain.
  newer = engine.add_memories(rng.normal(size=(4, cfg.dim)))
  _, live = graph_lib.resolve_ids(engine.state.graph, np.concatenate([new, newer]))
  assert bool(np.all(live))


def test_stale_ids_are_rejected_with_their_own_reason_in_the_driver_and_in_instant_step():
  clock = Clock()
  cfg, engine, old, rng = _full_engine(clock)
  clock.t += 1_000
  new, evicted = engine.add_memories(rng.normal(size=(2, cfg.dim)), return_evicted=True)
  gone = int(evicted[0])
  assert gone >= 0 and int(new[0]) % cfg.graph_capacity == gone % cfg.graph_capacity
  # The slot was reused: the old id names no live memory, the new id does.
  q = rng.normal(size=cfg.dim)
  rep = engine.observe(sona.make_interaction(cfg, query=q, quality=0.1, used=[gone]))
  assert not bool(rep.accepted) and rep.reason_names() == ["BAD_STALE"]
  rep = engine.observe(sona.make_interaction(cfg, query=q, quality=0.1, anchor=gone))
  assert rep.reason_names() == ["BAD_STALE"]
  rep = engine.observe(sona.make_interaction(cfg, query=q, quality=0.1, used=[int(new[0])]))
  assert bool(rep.accepted)
  # The same through the pure Loop A.
  state = engine.snapshot()
  it = sona.make_interaction(cfg, query=q, quality=0.1, used=[gone], time=5)
  state, rep = sona.instant_step(state, it, cfg)
  assert int(rep.reasons) == instant.BAD_STALE
  batch = sona.stack_interactions(
    [it, sona.make_interaction(cfg, query=q, quality=0.1, used=[int(new[1])], time=6)]
  )
  state, rep = sona.instant_scan(state, batch, cfg)
  assert np.asarray(rep.reasons).tolist() == [instant.BAD_STALE, 0]


def test_a_memory_removed_without_reuse_is_stale_too():
  state = sona.init_state(CFG, jax.random.key(6))
  graph, ids, _ = graph_lib.add_nodes(state.graph, np.eye(CFG.dim), quality=0.5)
  graph = graph_lib.remove_node(graph, ids[2])
  state = state._replace(graph=graph)
  it = sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.1, used=[int(ids[2])])
  _, rep = sona.instant_step(state, it, CFG)
  assert rep.reason_names() == ["BAD_STALE"]


def test_merges_from_loop_c_reach_the_callback_under_start():
  clock = Clock()
  events = []
  cfg = CFG
  engine = sona.Sona(cfg, key=jax.random.key(7), clock=clock, on_memory_event=events.append)
  base = np.eye(cfg.dim)[:4]
  ids = engine.add_memories(np.concatenate([base, base + 1e-4]), time=0)  # 4 near-duplicates
  for j in range(4):  # make the first copies the survivors (most accessed)
    engine.observe(sona.make_interaction(cfg, query=base[j], quality=0.9, used=[int(ids[j])]))
  report = engine.begin_deep().result()
  merged = np.asarray(report.compression.merged)
  assert merged.shape[0] == 4
  got = {(e.id, e.into) for e in events if e.kind == "merged"}
  assert got == {(int(ids[4 + j]), int(ids[j])) for j in range(4)}
  rep = engine.observe(sona.make_interaction(cfg, query=base[0], quality=0.1, used=[int(ids[4])]))
  assert rep.reason_names() == ["BAD_STALE"]


def test_an_addition_during_a_cycle_keeps_its_id_after_the_journal_replay():
  clock = Clock()
  cfg, engine, old, rng = _full_engine(clock)
  clock.t += 1_000
  for _ in range(8):
    engine.observe(_it(rng, old))
  future_started = threading.Event()
  import sona_jax.driver as driver_mod

  real_cycle = driver_mod.Sona._cycle

  def slow_cycle(self, loop, state, now, *, force=False):
    future_started.set()
    time.sleep(0.3)
    return real_cycle(self, loop, state, now, force=force)

  engine._cycle = slow_cycle.__get__(engine)
  future = engine.begin_background()
  future_started.wait()
  new = engine.add_memory(rng.normal(size=cfg.dim))
  future.result()
  slots, live = graph_lib.resolve_ids(engine.state.graph, [new])
  assert bool(live[0])
  rep = engine.observe(
    sona.make_interaction(cfg, query=rng.normal(size=cfg.dim), quality=0.1, used=[new])
  )
  assert bool(rep.accepted)


# --------------------------------------------------------------------------- time and knobs


def test_the_driver_stamps_interactions_without_a_time_with_its_clock():
  clock = Clock()
  engine = sona.Sona(CFG, key=jax.random.key(8), clock=clock)
  clock.t += 3 * 86_400 + 7
  engine.observe(sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.9))
  assert int(engine.state.metrics.counters[LAST_TIME]) == 3 * 86_400 + 7
  engine.observe(sona.make_interaction(CFG, query=np.ones(CFG.dim), quality=0.9, time=5))
  assert int(engine.state.metrics.counters[LAST_TIME]) == 3 * 86_400 + 7  # newest kept
  traj = sona.types.unpack_trajectories(engine.state.trajectories.data[:2], CFG)
  assert np.asarray(traj.time).tolist() == [3 * 86_400 + 7, 5]


def test_pure_loop_a_stamps_an_unset_time_with_the_newest_time_it_has_seen():
  state = sona.init_state(CFG, jax.random.key(9))
  q = np.ones(CFG.dim)
  its = [
    sona.make_interaction(CFG, query=q, quality=0.9, time=50),
    sona.make_interaction(CFG, query=q, quality=0.9),
    sona.make_interaction(CFG, query=q, quality=float("nan"), time=90),  # rejected
    sona.make_interaction(CFG, query=q, quality=0.9),
  ]
  ref = jax.tree.map(jnp.copy, state)
  for it in its:
    ref, _ = sona.instant_step(ref, it, CFG)
  out, _ = sona.instant_scan(state, sona.stack_interactions(its), CFG)
  _leaves_equal(out, ref)
  traj = sona.types.unpack_trajectories(ref.trajectories.data[:3], CFG)
  assert np.asarray(traj.time).tolist() == [50, 50, 50]


def test_live_knobs_change_behaviour_without_compiling():
  engine = sona.Sona(CFG, key=jax.random.key(10), clock=Clock(), batching=False)
  ids = engine.add_memories(np.random.default_rng(9).normal(size=(8, CFG.dim)))
  rng = np.random.default_rng(10)
  x = rng.normal(size=CFG.dim)
  engine.observe(_it(rng, ids, time=1))  # compiles Loop A
  engine.route(x)  # compiles routing
  with count_compiles() as counter:
    engine.set_knobs(micro_lr=0.0)
    before = np.asarray(engine.state.micro.b).copy()
    for t in range(2, 6):
      engine.observe(sona.make_interaction(CFG, query=x, quality=0.0, used=[int(ids[0])], time=t))
    assert np.array_equal(np.asarray(engine.state.micro.b), before)  # lr 0: nothing learnt
    engine.set_knobs(micro_lr=0.5)
    engine.observe(sona.make_interaction(CFG, query=x, quality=0.0, used=[int(ids[0])], time=9))
    assert not np.array_equal(np.asarray(engine.state.micro.b), before)
    engine.set_knobs(router_epsilon=1.0, router_threshold=0.0)
    tiers = {engine.route(x) for _ in range(40)}
    engine.set_knobs(router_epsilon=0.0, router_threshold=0.0)
    greedy = {engine.route(x) for _ in range(10)}
  assert counter.compiles == 0
  assert len(tiers) == CFG.n_tiers  # always exploring: every tier comes up
  assert greedy == {int(np.argmin(CFG.tier_costs))}  # threshold 0: the cheapest tier
  with pytest.raises(ValueError, match="router_epsilon"):
    engine.set_knobs(router_epsilon=1.5)
  with pytest.raises(ValueError, match="unknown"):
    engine.set_knobs(learning_rate=0.1)
  assert engine.knobs.router_epsilon == 0.0  # a refused change changes nothing
