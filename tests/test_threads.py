"""Loop B on a worker thread while Loop A serves: nothing lost, equal to the sequential order."""

import threading
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import buffer

CFG = sona.SonaConfig(
  dim=8,
  base_rank=4,
  graph_capacity=32,
  graph_degree=4,
  signal_capacity=512,
  trajectory_capacity=64,
  min_samples=5,
  pattern_clusters=3,
  bank_capacity=8,
  router_steps=20,
  router_batch=16,
  fisher_samples=8,
)


class Clock:
  def __init__(self, t=1_700_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


def _interactions(n, ids, seed):
  rng = np.random.default_rng(seed)
  return [
    sona.make_interaction(
      CFG,
      query=rng.normal(size=8),
      quality=float(rng.uniform()),
      used=[int(ids[rng.integers(len(ids))])],
      tier=int(rng.integers(3)),
      time=i,
    )
    for i in range(n)
  ]


def test_observations_during_a_threaded_cycle_equal_the_sequential_reference():
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=Clock())
  ids = engine.add_memories(np.eye(8)[:6] + 0.05)
  before, during = _interactions(40, ids, 0), _interactions(60, ids, 1)
  for it in before:
    engine.observe(it)
  snapshot = jax.tree.map(jnp.copy, engine.state)
  future = engine.begin_background()
  for i, it in enumerate(during):  # serving goes on while Loop B runs on the snapshot
    assert bool(engine.observe(it).accepted)
    if i == 30:
      engine.add_memory(np.ones(8), quality=0.7)
  report = future.result(timeout=120)
  assert report.ran and report.n_signals == 40
  # Sequential reference: Loop B at the snapshot, then the same requests in order.
  ref, ref_report = sona.background_step(snapshot, CFG, 0, force=True)
  for i, it in enumerate(during):
    ref, _ = sona.instant_step(ref, it, CFG)
    if i == 30:
      g, _, _ = sona.graph.add_node(
        ref.graph,
        jnp.ones(8, jnp.float32),
        quality=jnp.float32(0.7),
        time=jnp.int32(0),
        domain=jnp.int32(0),
        half_life_s=CFG.recency_half_life_s,
        admission_window_s=CFG.admission_window_s,
      )
      ref = ref._replace(graph=g)
  assert ref_report.n_signals == report.n_signals
  got = engine.state
  chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-7)
  # Every observation is accounted for: 40 consumed by Loop B, 60 waiting for the next cycle.
  assert int(got.step) == 100 and int(got.metrics.rejected) == 0
  assert int(buffer.unread(got.signals)) == 60
  # Their micro-LoRA updates are present (Loop B reset it; the later requests moved it again).
  assert float(jnp.abs(got.micro.b).max()) > 0


def test_a_failing_cycle_leaves_the_live_state_serving(monkeypatch):
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=Clock())
  ids = engine.add_memories(np.eye(8)[:6] + 0.05)
  for it in _interactions(10, ids, 0):
    engine.observe(it)

  def boom(*a, **k):
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(sona.driver, "background_step", boom)
  future = engine.begin_background()
  with pytest.raises(RuntimeError, match="disk on fire"):
    future.result(timeout=60)
  for it in _interactions(5, ids, 1):
    assert bool(engine.observe(it).accepted)
  assert int(engine.state.step) == 15 and int(buffer.unread(engine.state.signals)) == 15
  monkeypatch.undo()
  assert engine.run_background().ran  # retried later, it works


def test_start_stop_runs_the_schedule_on_a_thread():
  clock = Clock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock)
  ids = engine.add_memories(np.eye(8)[:6] + 0.05)
  for it in _interactions(20, ids, 0):
    engine.observe(it)
  engine.start(poll_s=0.01)
  try:
    clock.t += 3600  # an hour later Loop B is due
    deadline = time.time() + 60
    while not engine.history and time.time() < deadline:
      engine.observe(_interactions(1, ids, 2)[0])
      time.sleep(0.01)
  finally:
    engine.stop()
  assert [loop for loop, _ in engine.history] == ["background"]
  assert threading.active_count() >= 1 and engine._worker is None
