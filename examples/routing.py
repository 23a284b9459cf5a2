"""Routing over three real model tiers, learned from partial feedback (Loop A + Loop B).

Three scikit-learn classifiers of rising cost serve `load_digits`: nearest centroid (cost 1),
logistic regression (3) and an RBF SVM (10). Each request is routed by the learned FastGRNN router,
served by the chosen tier, and only that tier's outcome is observed. Loop B runs hourly on a
simulated clock (one request every 12 s) and trains the router with EWC++. At the end the greedy
router is compared on held-out images with always using one tier.

Run: `python examples/routing.py [--requests N]`. Uses scikit-learn's load_digits.
"""

import argparse

import jax
import numpy as np

import sona_jax as sona
from sona_jax import datasets


def tiers_on_digits(seed: int = 0):
  """Returns `(emb, correct, stream, held, costs)`: unit PCA-32 embeddings, per-tier correctness
  `bool[n, 3]`, the stream and held-out indices, and the tier costs (`datasets.routing_task`)."""
  task = datasets.routing_task("digits", seed)
  return task.emb, task.correct, task.stream, task.held, task.costs


def main(requests: int = 2700) -> dict:
  emb, correct, stream, held, costs = tiers_on_digits()
  cfg = sona.SonaConfig(
    dim=32,
    graph_capacity=64,
    signal_capacity=4096,
    trajectory_capacity=256,
    min_samples=50,
    tier_costs=costs,
    router_epsilon=0.1,
    pattern_clusters=20,
    bank_capacity=200,
  )
  now = [1_700_000_000.0]
  engine = sona.Sona(cfg, key=jax.random.key(0), clock=lambda: now[0])
  for i in range(requests):
    now[0] += 12.0  # 300 requests an hour
    j = stream[i % len(stream)]
    tier = engine.route(emb[j])
    ok = bool(correct[j, tier])
    t = int(now[0] - engine.time_origin)
    engine.observe(sona.make_interaction(cfg, query=emb[j], quality=float(ok), tier=tier, time=t))
    engine.tick()  # Loop B when an hour has passed and enough signals wait
  key = jax.random.key(1)
  choice = np.array(
    [int(sona.route(engine.state, emb[j], cfg, key, explore=False)[0]) for j in held]
  )
  rows = {
    "learned router": (correct[held, choice].mean(), np.asarray(costs)[choice].mean()),
  }
  for t, name in enumerate(("always nearest centroid", "always logistic", "always SVM")):
    rows[name] = (correct[held, t].mean(), costs[t])
  print(f"{'policy':<26}{'success':>9}{'cost':>7}")
  for name, (s, c) in rows.items():
    print(f"{name:<26}{s:>9.3f}{c:>7.2f}")
  shares = np.bincount(choice, minlength=3) / len(choice)
  print(f"tier mix of the learned router: {np.round(shares, 3).tolist()}")
  cycles = sum(1 for loop, _ in engine.history if loop == "background")
  print(f"{requests} requests, {cycles} Loop B cycles")
  return {
    "success": float(rows["learned router"][0]),
    "cost": float(rows["learned router"][1]),
    "best_success": float(rows["always SVM"][0]),
    "cheapest_success": float(rows["always nearest centroid"][0]),
    "tier_share": shares.tolist(),
    "cycles": cycles,
  }


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=2700)
  main(parser.parse_args().requests)
