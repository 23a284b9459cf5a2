"""Routing from partial feedback through Loop A and Loop B, on three real tiers (load_digits)."""

import jax
import numpy as np

import sona_jax as sona
from sona_jax import datasets


def test_learned_routing_keeps_quality_at_a_fraction_of_the_cost():
  # Three real tiers of rising cost: nearest centroid (1), logistic regression (3), RBF SVM (10).
  task = datasets.routing_task("digits", seed=0)
  emb, correct, stream, held = task.emb, task.correct, task.stream, task.held
  cfg = sona.SonaConfig(
    dim=32,
    graph_capacity=64,
    signal_capacity=4096,
    trajectory_capacity=256,
    min_samples=50,
    tier_costs=(1.0, 3.0, 10.0),
    router_epsilon=0.1,
    pattern_clusters=20,
    bank_capacity=200,
  )
  engine = sona.Sona(cfg, key=jax.random.key(0))
  # The stream: route, serve, observe only the served tier's outcome; Loop B every 300 requests.
  for i in range(2700):
    j = stream[i % len(stream)]
    tier = engine.route(emb[j])
    ok = bool(correct[j, tier])
    engine.observe(
      sona.make_interaction(cfg, query=emb[j], quality=1.0 if ok else 0.0, tier=tier, time=i)
    )
    if (i + 1) % 300 == 0:
      assert engine.run_background().ran
  # Held-out images, greedy routing (no exploration).
  key = jax.random.key(1)
  choice = np.array(
    [int(sona.route(engine.state, emb[j], cfg, key, explore=False)[0]) for j in held]
  )
  success = correct[held, choice].mean()
  cost = np.asarray(cfg.tier_costs)[choice].mean()
  best = correct[held, 2].mean()
  # Measured: 96.9% of the always-SVM success at 20% of its cost (seeds 1, 2 of the split:
  # 97.4% at 24%, 97.7% at 28%). Always-cheapest: 91.5% of the success (89.8%, 88.3%).
  assert success >= 0.95 * best, (success, best, np.bincount(choice, minlength=3))
  assert cost <= 0.40 * 10.0, (cost, np.bincount(choice, minlength=3))
  assert len(set(choice.tolist())) >= 2  # it really routes, not a constant tier
