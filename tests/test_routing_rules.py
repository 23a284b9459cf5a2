"""Routing decisions (issue 13): per-tier success estimates from the ReasoningBank shrunk toward
the router head, the threshold and cost rules, Thompson sampling with logged propensities, the
budget controller of `Sona.route`, and the evaluation helpers they are scored with.

Every expected value is computed by hand (or in NumPy, line by line from the formula) here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import evaluation, patterns
from sona_jax import router as rt
from sona_jax.runtime import count_compiles

CFG = sona.SonaConfig(
  dim=8, graph_capacity=8, signal_capacity=64, trajectory_capacity=8, bank_capacity=8
)


def _tiny_bank():
  """Three unit patterns in 2-d with per-tier records over 2 tiers; slot 3 empty."""
  b = patterns.init_bank(4, 2, 2)
  s = math.sqrt(0.5)
  return b._replace(
    centroid=jnp.array([[1.0, 0.0], [s, s], [0.0, 1.0], [0.0, 0.0]], jnp.float32),
    alive=jnp.array([True, True, True, False]),
    tier_success=jnp.array([[6.0, 1.0], [2.0, 0.0], [0.0, 5.0], [9.0, 9.0]], jnp.float32),
    tier_count=jnp.array([[8.0, 1.0], [4.0, 0.0], [2.0, 5.0], [9.0, 9.0]], jnp.float32),
  )


def test_tier_estimates_equal_the_beta_shrunk_weighted_records_computed_by_hand():
  bank = _tiny_bank()
  query = jnp.array([1.0, 0.0])  # cosine 1 to pattern 0, 0.7071 to 1, 0 to 2; slot 3 is dead
  prior = jnp.array([0.5, 0.8])
  est = patterns.tier_estimates(bank, query, prior, k=2, temperature=0.5, strength=4.0)
  # By hand: the 2 nearest are patterns 0 (w = 1) and 1 (w = exp((0.70711 - 1) / 0.5) = 0.55681).
  w1 = math.exp((math.sqrt(0.5) - 1.0) / 0.5)
  s = [6.0 + w1 * 2.0, 1.0 + w1 * 0.0]
  n = [8.0 + w1 * 4.0, 1.0 + w1 * 0.0]
  alpha = [s[0] + 4 * 0.5, s[1] + 4 * 0.8]
  beta = [n[0] - s[0] + 4 * 0.5, n[1] - s[1] + 4 * 0.2]
  np.testing.assert_allclose(est.alpha, alpha, rtol=1e-6)
  np.testing.assert_allclose(est.beta, beta, rtol=1e-6)
  np.testing.assert_allclose(est.mean, [alpha[0] / (n[0] + 4), alpha[1] / (n[1] + 4)], rtol=1e-6)
  np.testing.assert_allclose(est.evidence, n, rtol=1e-6)
  # Tier 0: (6 + 0.55681 * 2 + 2) / (8 + 0.55681 * 4 + 4) = 9.1136 / 14.2272 = 0.64058;
  # tier 1: (1 + 3.2) / (1 + 4) = 0.84.
  assert float(est.mean[0]) == pytest.approx(0.64058, abs=1e-4)
  assert float(est.mean[1]) == pytest.approx(0.84, abs=1e-6)


def test_tier_estimates_keep_the_prior_with_no_records_and_follow_many_records():
  bank = _tiny_bank()
  empty = patterns.init_bank(4, 2, 2)  # no pattern alive: the prior alone
  prior = jnp.array([0.3, 0.9])
  est = patterns.tier_estimates(empty, jnp.array([1.0, 0.0]), prior, k=3, temperature=0.1,
                                strength=2.0)  # fmt: skip
  np.testing.assert_allclose(est.mean, prior, rtol=1e-6)
  assert np.all(np.asarray(est.evidence) == 0)
  many = bank._replace(tier_success=bank.tier_success * 1000, tier_count=bank.tier_count * 1000)
  est = patterns.tier_estimates(many, jnp.array([1.0, 0.0]), prior, k=1, temperature=0.1,
                                strength=2.0)  # fmt: skip
  np.testing.assert_allclose(est.mean, [6 / 8, 1.0], atol=1e-3)  # pattern 0's own rates


def test_tier_estimates_leave_out_loop_c_abstractions_whose_records_sum_their_members():
  bank = _tiny_bank()
  # Slot 3 becomes an abstraction of patterns 0 and 1 at the query's own direction (cosine 1):
  # its record sums theirs. Counted beside them it would count the same requests twice.
  meta = bank._replace(
    centroid=bank.centroid.at[3].set(jnp.array([1.0, 0.0])),
    alive=bank.alive.at[3].set(True),
    level=bank.level.at[3].set(1),
    tier_success=bank.tier_success.at[3].set(bank.tier_success[0] + bank.tier_success[1]),
    tier_count=bank.tier_count.at[3].set(bank.tier_count[0] + bank.tier_count[1]),
  )
  args = (jnp.array([1.0, 0.0]), jnp.array([0.5, 0.8]))
  kw = dict(k=2, temperature=0.5, strength=4.0)
  with_meta = patterns.tier_estimates(meta, *args, **kw)
  without = patterns.tier_estimates(bank, *args, **kw)
  np.testing.assert_array_equal(with_meta.alpha, without.alpha)
  np.testing.assert_array_equal(with_meta.evidence, without.evidence)


def test_neighbour_estimates_equal_the_per_tier_weighted_records_computed_by_hand():
  s = math.sqrt(0.5)
  keys = jnp.array([[2.0, 0.0], [s, s], [0.0, 3.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
  tiers = jnp.array([0, 0, 0, 1, 1, 0], jnp.int32)
  succ = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  valid = jnp.array([True, True, True, True, True, False])  # the last record does not exist
  prior = jnp.array([0.5, 0.8])
  est = patterns.neighbour_estimates(
    keys, tiers, succ, valid, jnp.array([3.0, 0.0]), prior, k=2, temperature=0.5, strength=4.0
  )
  # Tier 0: its 2 nearest valid records are 0 (cosine 1, w = 1, success) and 1 (cosine 0.70711,
  # w = exp((0.70711 - 1) / 0.5) = 0.55681, failure); record 2 (cosine 0) is third, record 5 is
  # not valid. Tier 1: records 3 and 4 (both cosine 1, w = 1), one success.
  w1 = math.exp((s - 1.0) / 0.5)
  alpha = [1.0 + 4 * 0.5, 1.0 + 4 * 0.8]
  beta = [w1 + 4 * 0.5, 1.0 + 4 * 0.2]
  np.testing.assert_allclose(est.alpha, alpha, rtol=1e-6)
  np.testing.assert_allclose(est.beta, beta, rtol=1e-5)
  np.testing.assert_allclose(est.evidence, [1.0 + w1, 2.0], rtol=1e-6)
  # Tier 0: 3 / (1.55681 + 4) = 0.53988; tier 1: 4.2 / 6 = 0.7.
  assert float(est.mean[0]) == pytest.approx(0.53988, abs=1e-4)
  assert float(est.mean[1]) == pytest.approx(0.7, abs=1e-6)
  # A tier with no valid record keeps the prior; one with many follows its records.
  none = patterns.neighbour_estimates(
    keys, tiers, succ, jnp.zeros(6, bool), jnp.array([1.0, 0.0]), prior, k=3, temperature=0.1,
    strength=2.0,
  )  # fmt: skip
  np.testing.assert_allclose(none.mean, [0.5, 0.8], rtol=1e-6)
  many = patterns.neighbour_estimates(
    jnp.ones((500, 2)), jnp.zeros(500, jnp.int32), jnp.ones(500), jnp.ones(500, bool),
    jnp.array([1.0, 1.0]), prior, k=400, temperature=0.1, strength=2.0,
  )  # fmt: skip
  assert float(many.mean[0]) == pytest.approx((400 + 1.0) / 402, rel=1e-5)


def test_buffer_recent_window_holds_the_newest_records_and_marks_the_valid_slots():
  from sona_jax import buffer

  buf = buffer.init_buffer(jnp.zeros((), jnp.float32), capacity=5)
  rows, valid = buffer.recent(buf, 3)
  assert rows.shape == (3,) and not bool(valid.any())
  for v in range(1, 4):  # slots 0-2 hold 1, 2, 3; head 3
    buf = buffer.push(buf, jnp.float32(v))
  rows, valid = buffer.recent(buf, 2)  # the window ends at the newest: slots 1-2
  assert rows.tolist() == [2.0, 3.0] and valid.tolist() == [True, True]
  rows, valid = buffer.recent(buf, 4)  # slots 0-3: slot 3 never written
  assert rows.tolist()[:3] == [1.0, 2.0, 3.0] and valid.tolist() == [True, True, True, False]
  for v in range(4, 8):  # 7 records in 5 slots: slots hold 6, 7, 3, 4, 5; head 2
    buf = buffer.push(buf, jnp.float32(v))
  rows, valid = buffer.recent(buf, 3)  # wrapped: slots 0-2, the 2 newest and the oldest
  assert rows.tolist() == [6.0, 7.0, 3.0] and bool(valid.all())
  rows, valid = buffer.recent(buf, 99)  # at least the capacity: every slot
  assert sorted(rows.tolist()) == [3.0, 4.0, 5.0, 6.0, 7.0] and bool(valid.all())


def test_route_estimates_follow_the_outcomes_just_observed_and_memory_0_is_the_head():
  cfg = CFG.replace(
    n_tiers=2, tier_costs=(1.0, 10.0), router_neighbours=4, router_prior_strength=1.0
  )
  engine = sona.Sona(cfg, key=jax.random.key(0))
  q = np.eye(8, dtype=np.float32)[0]
  head = sona.tier_success(engine.state, q, cfg.replace(router_memory=0))
  before = engine.tier_success(q)
  np.testing.assert_allclose(before, head, rtol=1e-6)  # no signal yet: the head's prediction
  for quality in (0.0, 0.0, 0.0, 0.0):  # tier 0 failed 4 times on this query
    engine.observe(sona.make_interaction(cfg, query=q, quality=quality, tier=0))
  for quality in (1.0, 1.0, 1.0, 1.0):  # tier 1 succeeded 4 times
    engine.observe(sona.make_interaction(cfg, query=q, quality=quality, tier=1))
  after = engine.tier_success(q)
  # 4 neighbours at cosine 1 (weight 1 each) and the head's prior with strength 1, no Loop B run:
  # p_0 = (0 + h_0) / 5, p_1 = (4 + h_1) / 5.
  np.testing.assert_allclose(after, [head[0] / 5, (4 + head[1]) / 5], rtol=1e-5)
  greedy = sona.route(engine.state, q, cfg, jax.random.key(1), explore=False)
  assert int(greedy.tier) == 1  # neither reaches the threshold: the most likely tier
  assert cfg.replace(router_memory=0).router_memory_rows == 0
  with pytest.raises(ValueError, match="router_memory"):
    cfg.replace(router_memory=-1)


def test_decide_threshold_and_cost_rules_on_constructed_probabilities():
  costs = jnp.array([1.0, 3.0, 10.0])
  p = jnp.array([0.70, 0.95, 0.99])
  assert int(rt.decide(p, costs, 0.9, jnp.nan)) == 1  # cheapest with p >= 0.9
  assert int(rt.decide(p, costs, 0.999, jnp.nan)) == 2  # none reaches it: the most likely
  assert int(rt.decide(p, costs, 0.5, jnp.nan)) == 0
  # Cost rule: p - w c = (0.70 - w, 0.95 - 3w, 0.99 - 10w). w = 0: the most likely tier.
  assert int(rt.decide(p, costs, 0.9, 0.0)) == 2
  # 0.95 - 3w > 0.99 - 10w iff w > 0.04/7 = 0.00571; 0.70 - w > 0.95 - 3w iff w > 0.125.
  assert int(rt.decide(p, costs, 0.9, 0.005)) == 2
  assert int(rt.decide(p, costs, 0.9, 0.006)) == 1
  assert int(rt.decide(p, costs, 0.9, 0.124)) == 1
  assert int(rt.decide(p, costs, 0.9, 0.126)) == 0
  batch = jnp.array([[0.70, 0.95, 0.99], [0.1, 0.2, 0.9]])
  assert rt.decide(batch, costs, 0.9, jnp.nan).tolist() == [1, 2]


def test_choose_propensities_are_in_the_unit_interval_and_exact_without_sampling():
  alpha, beta = jnp.array([2.0, 8.0, 9.0]), jnp.array([2.0, 2.0, 1.0])  # means 0.5, 0.8, 0.9
  costs = jnp.array([1.0, 3.0, 10.0])
  keys = jax.random.split(jax.random.key(0), 200)
  choose = jax.jit(jax.vmap(rt.choose, in_axes=(None, None, None, None, None, 0, None, None)))
  # No sampling, no epsilon: the threshold rule on the means, picked with probability 1.
  tiers, props = choose(alpha, beta, costs, 0.85, jnp.nan, keys, 0.0, False)
  assert set(np.asarray(tiers).tolist()) == {2} and np.all(np.asarray(props) == 1.0)
  # Always exploring uniformly: every tier, each with propensity exactly 1/3.
  tiers, props = choose(alpha, beta, costs, 0.85, jnp.nan, keys, 1.0, False)
  assert set(np.asarray(tiers).tolist()) == {0, 1, 2}
  np.testing.assert_allclose(props, 1 / 3, rtol=1e-6)
  # Thompson sampling: several tiers, each propensity in (0, 1]; the rarely picked tier has a
  # small one, and the mean inverse propensity of the picks estimates the number of tiers the
  # policy can pick (E[1/pi] = #support), here 3 (tier 0 is picked when both others miss 0.85).
  tiers, props = choose(alpha, beta, costs, 0.85, jnp.nan, keys, 0.05, True)
  props = np.asarray(props)
  assert len(set(np.asarray(tiers).tolist())) >= 2
  assert np.all((props > 0) & (props <= 1))
  assert 1.5 < np.mean(1 / props) < 4.5


def test_sona_route_cost_weight_knob_and_propensity_log_never_recompile():
  engine = sona.Sona(CFG, key=jax.random.key(0))
  x = np.ones(CFG.dim, np.float32)
  engine.route(x)
  engine.route(x, return_info=True)
  engine.route(x, cost_weight=0.01)
  with count_compiles() as counter:
    info = engine.route(x, return_info=True)
    engine.set_knobs(router_cost_weight=0.5)
    engine.route(x)
    engine.set_knobs(router_cost_weight=None)
    engine.route(x, cost_weight=0.0)
    engine.route(x, budget=3.0)
  assert counter.compiles == 0
  assert 0 <= info["tier"] < CFG.n_tiers and 0 < info["propensity"] <= 1
  assert info["probs"].shape == (CFG.n_tiers,)
  np.testing.assert_allclose(info["probs"], engine.tier_success(x), rtol=1e-6)
  routing = engine.stats()["routing"]
  assert routing["routed"] == 7 and routing["mean_inverse_propensity"] >= 1.0
  with pytest.raises(ValueError, match="not both"):
    engine.route(x, cost_weight=0.1, budget=2.0)
  with pytest.raises(ValueError, match="budget"):
    engine.route(x, budget=-1.0)
  with pytest.raises(ValueError, match="cost_weight"):
    engine.set_knobs(router_cost_weight=-0.1)


@pytest.mark.parametrize("budget", [2.0, 4.0])
def test_budget_controller_meets_the_target_mean_cost_on_a_stationary_stream(budget):
  # An untrained learner: the estimates are the head's, different per query. The controller adapts
  # the cost weight until the mean cost of the routed requests is the budget.
  engine = sona.Sona(CFG, key=jax.random.key(1))
  queries = np.random.default_rng(0).normal(size=(64, CFG.dim)).astype(np.float32)
  costs = [engine.route(queries[i % 64], budget=budget) for i in range(3000)]
  spent = np.asarray(CFG.tier_costs)[costs]
  assert abs(spent[1000:].mean() - budget) <= 0.05 * budget, spent[1000:].mean()
  assert engine.stats()["routing"]["budget_cost_weight"] > 0


def test_evaluation_helpers_match_hand_computed_values():
  # APGR: q(c) through (1, .5), (2, .8), (3, 1) at c = 1, 1.5, 2, 2.5, 3 -> PGR 0, .3, .6, .8, 1.
  assert evaluation.apgr([(2.0, 0.8)], 0.5, 1.0, 1.0, 3.0, n=5) == pytest.approx(0.54)
  # ECE, two bins: [0.1] vs outcome 0 -> gap 0.1, weight 1/3; [0.9, 0.9] vs (1, 0) -> 0.4, 2/3.
  ece = evaluation.calibration_error(np.array([0.1, 0.9, 0.9]), np.array([0, 1, 0]), n_bins=2)
  assert ece == pytest.approx(0.1 / 3 + 0.4 * 2 / 3)
  probs = np.array([[0.6, 0.9], [0.95, 0.99]])
  correct = np.array([[False, True], [True, True]])
  pts = evaluation.cost_weight_sweep(probs, correct, (1.0, 4.0), weights=[0.0, 0.05, 1.0])
  # w 0: tier 1 for both (cost 4, success 1); w 0.05: row 0 keeps tier 1 (0.9 - 0.2 > 0.6 - 0.05),
  # row 1 takes tier 0 (0.95 - 0.05 > 0.99 - 0.2): cost 2.5, success 1; w 1: tier 0, success 0.5.
  assert pts == [(4.0, 1.0), (2.5, 1.0), (1.0, 0.5)]
  base = evaluation.routing_baselines(correct, (1.0, 4.0))
  assert base["oracle"] == (2.5, 1.0) and base["always tier 0"] == (1.0, 0.5)
  acc = np.array([[0.9, 0.2, 0.1], [0.6, 0.8, 0.1], [0.4, 0.6, 0.7]])
  assert evaluation.average_accuracy(acc) == pytest.approx((0.4 + 0.6 + 0.7) / 3)
  assert evaluation.forgetting(acc) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
