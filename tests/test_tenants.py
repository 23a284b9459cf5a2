"""Many tenants (`sona_jax.tenants`): stacked states under vmap, and a hard partition between them.

Every test name contains "tenant" (`pytest -k tenant`). One small config for the whole file (and
`test_sharding.py`), so each jitted function compiles once per test process.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sona_jax as sona
from sona_jax import native, tenants

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
N_TENANTS = 8
BATCH = 32
ROUNDS = 8  # at most 8 interactions of one tenant per batch: every call below shares one compile


def _bits(tree) -> list[bytes]:
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _interactions(rng, n, *, ids=True):
  out = []
  for i in range(n):
    idx = rng.choice(CFG.graph_capacity, 5, replace=False)
    out.append(
      sona.make_interaction(
        CFG,
        query=rng.normal(size=CFG.dim).astype(np.float32),
        quality=float(rng.uniform()),
        anchor=int(idx[0]) if ids else -1,
        used=idx[1:3].tolist() if ids else (),
        unused=idx[3:5].tolist() if ids else (),
        tier=int(rng.integers(CFG.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        context_tokens=int(rng.integers(0, 4000)),
        time=i,
      )
    )
  return out


@pytest.fixture(scope="module")
def fresh():
  """8 tenants, each with the same 32 memories in its graph (ids 0..31)."""
  states = tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS)
  emb = np.random.default_rng(0).normal(size=(CFG.graph_capacity, CFG.dim)).astype(np.float32)
  graph = jax.jit(jax.vmap(lambda g: sona.graph.add_nodes(g, emb, quality=0.5)[0]))(states.graph)
  return states._replace(graph=graph)


def _floats(tree, floats=True):
  """The float leaves of `tree` (`floats=False`: the others), the rest `None` (no leaf)."""
  return jax.tree.map(lambda x: x if (np.asarray(x).dtype.kind == "f") == floats else None, tree)


def test_init_tenants_stacks_independent_learners():
  states = tenants.init_tenants(CFG, jax.random.key(0), N_TENANTS)
  assert tenants.n_tenants(states) == N_TENANTS and states.graph.emb.shape == (N_TENANTS, 32, 16)
  keys = jax.random.split(jax.random.key(0), N_TENANTS)
  one = jax.jit(sona.init_state, static_argnums=0)(CFG, keys[1])
  assert _bits(tenants.tenant(states, 1)) == _bits(one)  # tenant i is init_state(key_i)
  assert not np.array_equal(states.micro.a[0], states.micro.a[1])  # different keys
  with pytest.raises(ValueError, match="n must be a positive int"):
    tenants.init_tenants(CFG, jax.random.key(0), 0)


@pytest.fixture(params=[False, True], ids=["jax_rule", "native"])
def rule(request):
  """Loop A's rule for the test: the JAX rule (every platform) or the native CPU kernel."""
  previous = native.set_enabled(request.param)
  yield request.param
  native.set_enabled(previous)


def test_tenant_step_equals_each_tenant_alone_and_leaves_the_others_bit_identical(
  fresh, compiles, rule
):
  rng = np.random.default_rng(1)
  its = _interactions(rng, BATCH)
  its[5] = its[5]._replace(quality=np.float32(np.nan))  # one bad interaction: rejected, counted
  # Tenants 0, 2, 3 and 6 get 8 interactions each, interleaved; 1, 4, 5 and 7 get none.
  tids = rng.permutation(np.repeat([0, 2, 3, 6], 8))
  before = _copy(fresh)
  states, report = tenants.instant_step_tenants(
    _copy(fresh), sona.stack_interactions(its), tids, CFG
  )
  assert np.asarray(report.values).shape == (BATCH, 5)
  assert not bool(report.accepted[5]) and int(np.asarray(report.accepted).sum()) == BATCH - 1
  for t in range(N_TENANTS):
    mine = np.flatnonzero(tids == t)
    got = tenants.tenant(states, t)
    if len(mine) == 0:  # untouched: every leaf bit-identical
      assert _bits(got) == _bits(tenants.tenant(before, t)), t
      continue
    # Touched: exactly what instant_step does on this tenant alone, one by one in batch order,
    # under the same rule, bit for bit (the two rules agree to float rounding:
    # tests/test_native.py).
    alone = _copy(tenants.tenant(before, t))
    for j in mine:
      alone, rep = sona.instant_step(alone, its[j], CFG)
      np.testing.assert_array_equal(
        np.asarray(report.values)[j].view(np.int32), np.asarray(rep.values).view(np.int32)
      )
    assert _bits(got) == _bits(alone), t
  assert int(states.metrics.rejected.sum()) == 1  # the padding rows are not counted
  assert int(states.step.sum()) == BATCH - 1
  # The same shapes again (other tenants, other order): nothing compiles.
  with compiles() as log:
    for _ in range(2):
      its = sona.stack_interactions(_interactions(rng, BATCH))
      states, _ = tenants.instant_step_tenants(states, its, rng.permutation(tids) + 1, CFG)
  assert log.names == []


@settings(
  max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tids=st.lists(st.integers(0, N_TENANTS - 1), min_size=BATCH, max_size=BATCH))
def test_tenant_isolation_holds_for_any_assignment(fresh, tids):
  rng = np.random.default_rng(sum(tids))
  before = _bits(fresh)
  flat = jax.tree.leaves(fresh)
  its = sona.stack_interactions(_interactions(rng, BATCH))
  states, report = tenants.instant_step_tenants(_copy(fresh), its, tids, CFG, max_per_tenant=ROUNDS)
  after = jax.tree.leaves(states)
  for t in set(range(N_TENANTS)) - set(tids):
    for x0, x1 in zip(flat, after, strict=True):
      assert np.asarray(x0)[t].tobytes() == np.asarray(x1)[t].tobytes()
  assert _bits(fresh) == before  # the caller's copy was donated, not the fixture
  # The 9th and later interactions of a tenant are beyond max_per_tenant: reported, not applied.
  seen = np.zeros(N_TENANTS, int)
  over = []
  for t in tids:
    over.append(seen[t] >= ROUNDS)
    seen[t] += 1
  flagged = (np.asarray(report.reasons) & tenants.TENANT_OVERFLOW) != 0
  np.testing.assert_array_equal(flagged, over)
  np.testing.assert_array_equal(states.step, np.minimum(seen, ROUNDS))


def test_tenant_ids_and_states_are_checked_at_the_boundary(fresh):
  its = sona.stack_interactions(_interactions(np.random.default_rng(3), 4))
  with pytest.raises(ValueError, match=r"tenant_ids must be in \[0, 8\)"):
    tenants.instant_step_tenants(fresh, its, [0, 1, 8, 2], CFG)
  with pytest.raises(ValueError, match="tenant_ids has shape"):
    tenants.instant_step_tenants(fresh, its, [0, 1], CFG)
  with pytest.raises(ValueError, match="stacked tenants"):
    tenants.instant_step_tenants(tenants.tenant(fresh, 0), its, [0, 0, 0, 0], CFG)
  with pytest.raises(ValueError, match="max_per_tenant"):
    tenants.instant_step_tenants(fresh, its, [0, 0, 0, 0], CFG, max_per_tenant=0)


def test_adapt_tenants_uses_each_rows_own_tenant(fresh):
  rng = np.random.default_rng(4)
  its = sona.stack_interactions(_interactions(rng, BATCH))
  tids = np.arange(BATCH) % N_TENANTS
  states, _ = tenants.instant_step_tenants(_copy(fresh), its, tids, CFG, max_per_tenant=ROUNDS)
  x = rng.normal(size=(5, CFG.dim)).astype(np.float32)
  tids = np.array([3, 0, 3, 7, 1])
  got = tenants.adapt_tenants(states, x, tids, CFG)
  want = np.stack([sona.adapt(tenants.tenant(states, t), x[i], CFG) for i, t in enumerate(tids)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(got[0], got[2])  # same tenant 3 for rows 0 and 2, different inputs


def test_tenant_background_runs_only_due_tenants_each_as_background_step(fresh):
  rng = np.random.default_rng(5)
  # Two batches: 15 signals to each of tenants 0..3 (>= min_samples=10), 4 to tenant 4 (< 10),
  # none to 5..7.
  states = _copy(fresh)
  for tids in (np.repeat(np.arange(4), 8), np.concatenate([np.repeat(np.arange(4), 7), [4] * 4])):
    its = sona.stack_interactions(_interactions(rng, BATCH, ids=False))
    states, _ = tenants.instant_step_tenants(
      states, its, rng.permutation(tids), CFG, max_per_tenant=ROUNDS
    )
  before = _copy(states)
  new, report = tenants.background_step_tenants(states, CFG, now=3600)
  np.testing.assert_array_equal(report.ran, [True] * 4 + [False] * 4)
  np.testing.assert_array_equal(report.n_signals, [15, 15, 15, 15, 4, 0, 0, 0])
  assert "min_samples" in report.reason and report.tenant(4).n_signals == 4
  for t in range(4, N_TENANTS):  # not due: bit-identical
    assert _bits(tenants.tenant(new, t)) == _bits(tenants.tenant(before, t)), t
  for t in range(2):  # due: background_step on the tenant alone, up to float rounding
    alone, rep = sona.background_step(_copy(tenants.tenant(before, t)), CFG, 3600)
    got = tenants.tenant(new, t)
    # Measured: at most 6e-8 apart (batched vs unbatched kernels); integers exactly equal.
    chex.assert_trees_all_close(_floats(got), _floats(alone), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(_floats(got, False), _floats(alone, False))
    mine = report.tenant(t)
    assert mine.patterns_inserted == rep.patterns_inserted and mine.n_signals == rep.n_signals
    assert mine.router_loss_after == pytest.approx(rep.router_loss_after, rel=1e-5)
  # A forced cycle also runs tenant 4; tenants 5..7 (no signal) still do not.
  _, forced = tenants.background_step_tenants(new, CFG, now=7200, force=True)
  np.testing.assert_array_equal(forced.ran, [False] * 4 + [True] + [False] * 3)
