"""The minimal Sona driver: memories, observations, adaptation, clock."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona

CFG = sona.SonaConfig(
  dim=8, base_rank=4, graph_capacity=4, graph_degree=2, signal_capacity=16, trajectory_capacity=16
)
# The config of every test that runs Loop B (one compile of Loops A and B for all of them).
LOOP_B_CFG = CFG.replace(
  graph_capacity=16,
  min_samples=5,
  pattern_clusters=2,
  bank_capacity=8,
  router_steps=5,
  router_batch=8,
  fisher_samples=4,
  probe_capacity=8,
)


class FakeClock:
  def __init__(self, t=1_700_000_000.0):
    self.t = t

  def __call__(self):
    return self.t


def test_add_memory_returns_ids_and_uses_the_clock():
  clock = FakeClock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock)
  clock.t += 30
  m = engine.add_memory(np.ones(8), quality=0.7)
  assert m == 0 and engine.now() == 30
  g = engine.state.graph
  assert bool(g.alive[0]) and int(g.created[0]) == 30
  np.testing.assert_allclose(float(g.quality[0]), 0.7, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(g.emb[0])), 1.0, rtol=1e-6)


def test_full_graph_evicts_lowest_value_and_logs(caplog):
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=FakeClock())
  ids = engine.add_memories(np.eye(8)[:4] + 0.1, quality=[0.9, 0.1, 0.8, 0.7])
  assert ids.tolist() == [0, 1, 2, 3]
  with caplog.at_level(logging.INFO, logger="sona_jax"):
    new = engine.add_memory(np.eye(8)[5], quality=0.5)
  # Slot 1 (the lowest quality) is reused; the new memory's id carries the slot's generation.
  assert sona.graph.slot_of(new, CFG.graph_capacity) == 1 and new != 1
  slots, live = sona.graph.resolve_ids(engine.state.graph, [1, new])
  assert np.asarray(live).tolist() == [False, True]
  assert "evicted" in caplog.text


def test_full_graph_keeps_every_new_memory_of_a_burst():
  # The reported bug: once full, each new memory evicted the previous one (same id every time).
  clock = FakeClock()
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock)
  engine.add_memories(np.eye(8)[:4] + 0.1, quality=[0.9, 0.1, 0.8, 0.7])
  clock.t += 2 * 86_400  # past the admission window: the old memories are established
  new = [engine.add_memory(np.eye(8)[4 + j] + 0.1, quality=0.5) for j in range(3)]
  # Three distinct ids, all three newcomers alive, and only the highest-value old memory (quality
  # 0.9, slot 0) left: the established ones went by value, the newcomers never.
  assert len(set(new)) == 3
  g = engine.state.graph
  assert np.all(np.asarray(g.alive))
  assert np.asarray(g.created).tolist() == [0] + [2 * 86_400] * 3
  np.testing.assert_allclose(float(g.quality[0]), 0.9, rtol=1e-6)


@pytest.mark.parametrize(
  "emb,quality,match",
  [
    (np.ones(7), 0.5, "shape"),
    (np.zeros(8), 0.5, "non-zero"),
    (np.full(8, np.nan), 0.5, "finite"),
    (np.ones(8), 1.5, "quality"),
  ],
)
def test_add_memory_rejects_bad_input(emb, quality, match):
  engine = sona.Sona(CFG, key=jax.random.key(0))
  with pytest.raises(ValueError, match=match):
    engine.add_memory(emb, quality=quality)


def test_observe_and_observe_many_update_the_state():
  engine = sona.Sona(CFG, key=jax.random.key(0))
  ids = engine.add_memories(np.eye(8)[:3] + 0.05)
  it = sona.make_interaction(CFG, query=np.ones(8), quality=0.1, used=[ids[0]], unused=[ids[1]])
  rep = engine.observe(it)
  assert bool(rep.accepted) and int(engine.state.step) == 1
  reps = engine.observe_many([it, it._replace(quality=np.float32(-1)), it])
  assert reps.values.shape == (3, 5)
  assert np.asarray(reps.accepted).tolist() == [True, False, True]
  assert int(engine.state.step) == 3 and int(engine.state.metrics.rejected) == 1


def test_adapt_is_identity_at_start_and_changes_after_learning():
  engine = sona.Sona(CFG, key=jax.random.key(0))
  x = jnp.arange(8, dtype=jnp.float32) / 8
  np.testing.assert_array_equal(np.asarray(engine.adapt(x)), np.asarray(x))
  ids = engine.add_memories(np.eye(8)[:2] + 0.05)
  for _ in range(3):
    engine.observe(sona.make_interaction(CFG, query=x, quality=0.0, used=[ids[0]]))
  assert not np.allclose(np.asarray(engine.adapt(x)), np.asarray(x))
  assert engine.adapt(jnp.ones((5, 8))).shape == (5, 8)
  with pytest.raises(ValueError, match="expected"):
    engine.adapt(jnp.ones(3))


def test_state_setter_checks_type():
  engine = sona.Sona(CFG, key=jax.random.key(0))
  with pytest.raises(TypeError):
    engine.state = {"micro": 1}
  with pytest.raises(TypeError):
    sona.Sona({"dim": 8}, key=jax.random.key(0))


def test_route_find_patterns_and_run_background():
  cfg = LOOP_B_CFG
  engine = sona.Sona(cfg, key=jax.random.key(0), clock=FakeClock())
  assert engine.find_patterns(np.ones(8), k=3) == []  # empty bank
  tier = engine.route(np.ones(8), context_tokens=100)
  assert 0 <= tier < cfg.n_tiers
  rep = engine.run_background()
  assert not rep.ran and "0 signals" in rep.reason
  ids = engine.add_memories(np.eye(8)[:6] + 0.05)
  rng = np.random.default_rng(0)
  for i in range(12):
    engine.observe(
      sona.make_interaction(
        cfg, query=rng.normal(size=8), quality=float(i % 2), used=[ids[i % 6]], tier=i % 3
      )
    )
  rep = engine.run_background()
  assert rep.ran and rep.n_signals == 12
  hits = engine.find_patterns(rng.normal(size=8), k=2)
  assert 1 <= len(hits) <= 2 and hits[0]["score"] >= hits[-1]["score"]
  assert int(engine.state.bank.access_count[hits[0]["id"]]) == 1
  assert 0 <= engine.route(rng.normal(size=8)) < cfg.n_tiers
  with pytest.raises(ValueError, match="shape"):
    engine.route(np.ones(3))
  with pytest.raises(ValueError, match="k must be"):
    engine.find_patterns(np.ones(8), k=0)


def test_checkpoints_after_loop_b_and_restore(tmp_path):
  cfg = LOOP_B_CFG
  clock = FakeClock()
  engine = sona.Sona(cfg, key=jax.random.key(0), checkpoint_dir=str(tmp_path / "ck"), clock=clock)
  ids = engine.add_memories(np.eye(8)[:4] + 0.05)
  for i in range(6):
    engine.observe(sona.make_interaction(cfg, query=np.ones(8) * i, quality=0.1, used=[ids[0]]))
  clock.t += 3600
  assert engine.tick()["background"].ran  # Loop B ran, so a checkpoint was written
  engine.wait_checkpoints()
  restored = sona.Sona.restore(str(tmp_path / "ck"), clock=clock)
  assert restored.cfg == cfg and restored.time_origin == engine.time_origin
  assert restored.last_background == engine.last_background
  for a, b in zip(jax.tree.leaves(engine.state), jax.tree.leaves(restored.state), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # The restored learner keeps serving and learning.
  rep = restored.observe(sona.make_interaction(cfg, query=np.ones(8), quality=0.0, used=[ids[1]]))
  assert bool(rep.accepted)
  with pytest.raises(ValueError, match="no checkpoint_dir"):
    sona.Sona(cfg, key=jax.random.key(0)).save()


def _serve(engine, cfg, ids, rng, n, clock):
  """n requests with routing, Loop A and the schedule, on the fake clock."""
  for _ in range(n):
    clock.t += 90
    q = rng.normal(size=cfg.dim).astype(np.float32)
    tier = engine.route(q)
    used = rng.choice(ids, 2, replace=False)
    engine.observe(
      sona.make_interaction(
        cfg,
        query=q,
        quality=float(rng.uniform()),
        used=used[:1],
        unused=used[1:],
        anchor=int(ids[0]),
        tier=tier,
        time=int(clock.t - engine.time_origin),
      )
    )
    engine.tick()


def test_restore_then_continue_equals_continue(tmp_path):
  cfg = LOOP_B_CFG
  clock = FakeClock()
  engine = sona.Sona(cfg, key=jax.random.key(3), checkpoint_dir=str(tmp_path / "ck"), clock=clock)
  ids = engine.add_memories(np.random.default_rng(0).normal(size=(8, cfg.dim)))
  _serve(engine, cfg, ids, np.random.default_rng(1), 60, clock)  # Loop B ran and checkpointed
  engine.wait_checkpoints()
  assert engine.history
  step = engine.save()
  engine.wait_checkpoints()
  restored = sona.Sona.restore(str(tmp_path / "ck"), clock=clock)
  t0 = clock.t
  _serve(engine, cfg, ids, np.random.default_rng(2), 80, clock)
  a = engine.state
  clock.t = t0
  _serve(restored, cfg, ids, np.random.default_rng(2), 80, clock)
  b = restored.state
  assert len(engine.history) > 1 and restored.history  # Loop B ran again on both
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert step >= 1
  for e in (engine, restored):  # the last cycles' async saves finish here, not at exit
    e.wait_checkpoints()
