"""Loop B: skip below min_samples, signals consumed once, consolidation, router, Fisher, bank."""

import jax
import jax.numpy as jnp
import numpy as np

import sona_jax as sona
from sona_jax import buffer, lora
from sona_jax.loops import background

CFG = sona.SonaConfig(
  dim=16,
  base_rank=4,
  graph_capacity=64,
  graph_degree=4,
  signal_capacity=256,
  trajectory_capacity=64,
  min_samples=50,
  pattern_clusters=4,
  bank_capacity=8,
  router_steps=30,
  router_batch=32,
  fisher_samples=32,
)


# Loop A runs in scans of this many interactions: every `_served(n)` below has n a multiple of it,
# so `instant_scan` compiles once for the file (each batch size is a compile of its own).
SCAN = 10


def _served(n, seed=0):
  """A state with memories and `n` accepted interactions in its signal buffer (Loop A over them
  in order, in consecutive scans of `SCAN`: the same as one scan of all)."""
  assert n % SCAN == 0, n
  state = sona.init_state(CFG, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  g, ids, _ = sona.graph.add_nodes(
    state.graph, jnp.asarray(rng.normal(size=(32, CFG.dim)), jnp.float32), quality=0.5
  )
  state = state._replace(graph=g)
  ids = np.asarray(ids)
  its = []
  for i in range(n):
    pick = rng.choice(32, 3, replace=False)
    its.append(
      sona.make_interaction(
        CFG,
        query=rng.normal(size=CFG.dim).astype(np.float32),
        quality=float(rng.uniform()),
        used=[int(ids[pick[0]])],
        unused=[int(ids[pick[1]])],
        tier=int(rng.integers(CFG.n_tiers)),
        latency_ms=float(rng.uniform(10, 400)),
        context_tokens=int(rng.integers(0, 4000)),
        time=i,
      )
    )
  for i in range(0, n, SCAN):
    state, _ = sona.instant_scan(state, sona.stack_interactions(its[i : i + SCAN]), CFG)
  return state


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
    np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True)
  )


def test_skips_below_min_samples_with_a_reason_and_changes_nothing():
  state = _served(10)
  new, rep = sona.background_step(state, CFG, 100)
  assert not rep.ran and "10 signals waiting, 50 needed" in rep.reason
  assert new is state
  # Forced, it runs with fewer signals; with none at all it still refuses.
  new, rep = sona.background_step(state, CFG, 100, force=True)
  assert rep.ran and rep.n_signals == 10
  _, rep2 = sona.background_step(new, CFG, 200, force=True)
  assert not rep2.ran and rep2.n_signals == 0


def test_cycle_updates_every_part_and_consumes_each_signal_once():
  state = _served(120)
  # A non-trivial micro-LoRA to consolidate, and a base of rank 0 so the sum fits the base rank.
  assert float(jnp.abs(state.micro.b).max()) > 0
  x = jax.random.normal(jax.random.key(3), (20, CFG.dim), jnp.float32)
  before = np.asarray(sona.adapt(state, x, CFG))
  router0 = jax.tree.map(np.asarray, state.router.params)
  new, rep = sona.background_step(state, CFG, 1000)
  assert rep.ran and rep.n_signals == 120 and rep.missed == 0
  assert set(rep.seconds) == {
    "drain",
    "consolidate",
    "router",
    "fisher",
    "patterns",
    "metrics",
    "total",
  }
  # Each signal consumed exactly once.
  assert int(buffer.unread(new.signals)) == 0
  # Consolidation (DESIGN 4.1): micro reset; the adapted output is preserved up to the rate.
  assert float(jnp.abs(new.micro.b).max()) == 0.0
  after = np.asarray(sona.adapt(new, x, CFG))
  rate = rep.consolidation_rate
  delta_micro = before - np.asarray(
    x + lora.delta(state.base, x, scale=CFG.base_scale)
  )  # what the micro-LoRA added before the cycle
  np.testing.assert_allclose(after, before - (1 - rate) * delta_micro, rtol=1e-4, atol=1e-5)
  # Router trained (loss went down on its own data), Fisher and anchor updated.
  assert not _leaves_equal(router0, new.router.params)
  assert rep.router_loss_after < rep.router_loss_before
  assert int(new.ewc.count) == 1
  assert any(float(jnp.max(f)) > 0 for f in jax.tree.leaves(new.ewc.fisher))
  assert _leaves_equal(new.ewc.anchor, new.router.params)
  # Patterns in the bank, within capacity, and reported.
  alive = int(jnp.sum(new.bank.alive))
  assert 1 <= alive <= CFG.bank_capacity
  assert rep.patterns_inserted + rep.patterns_merged >= 1
  assert float(jnp.sum(jnp.where(new.bank.alive, new.bank.size, 0.0))) == 120.0
  for leaf in jax.tree.leaves((new.router, new.ewc, new.bank, new.base, new.micro)):
    arr = np.asarray(leaf)
    if arr.dtype.kind == "f":
      assert np.all(np.isfinite(arr))
  # The old state was not consumed (Loop B does not donate).
  assert int(buffer.unread(state.signals)) == 120


def test_a_second_cycle_does_not_recompile(compiles):
  state = _served(60)
  state, rep = sona.background_step(state, CFG, 10)
  assert rep.ran
  more = _served(60, seed=1)
  state = state._replace(signals=more.signals, micro=more.micro)
  with compiles() as second:
    state, rep = sona.background_step(state, CFG, 20)
  assert rep.ran
  assert second.names == []
  with compiles() as probe:  # the log does see a compile
    jax.jit(lambda v: v * 3)(jnp.ones(3))
  assert probe.names
  assert int(state.ewc.count) == 2


def test_the_one_sequencer_runs_phases_through_a_placement_hook():
  # A hook that only records what it is given: the cycle must route rows, router mini-batches
  # and its results through it, and come out bit-identical to background_step.
  seen = {"rows": 0, "batches": 0, "whole": 0}

  def record(kind):
    def hook(tree):
      seen[kind] += len(jax.tree.leaves(tree))
      return tree

    return hook

  place = background.Placement(record("rows"), record("batches"), record("whole"))
  state = _served(60)
  want, rep = sona.background_step(state, CFG, 10)
  got, result, seconds = background.run_cycle(
    state, background.cycle_phases(CFG, place), jnp.int32(10)
  )
  assert seen["rows"] >= 5 and seen["batches"] == 4 and seen["whole"] > 0, seen
  assert _leaves_equal(got, want)
  mine = background.make_report(result, seconds)._replace(seconds=None)
  assert repr(mine) == repr(rep._replace(seconds=None))  # repr: NaN retention reads equal
  assert set(seconds) == set(rep.seconds)
