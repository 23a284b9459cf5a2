"""Quickstart of the pure API: memories, per-request Loop A learning, batched requests.

Run: `python examples/quickstart.py [--requests N]`. Uses scikit-learn's load_digits (no download).
"""

import argparse

import jax
import numpy as np

import sona_jax as sona
from sona_jax import datasets


def main(requests: int = 500) -> dict:
  task = datasets.digits_drift(seed=0, dim=32, drift=2.0)
  cfg = sona.SonaConfig(dim=32, graph_capacity=1024, signal_capacity=4096, trajectory_capacity=4096)
  state = sona.init_state(cfg, jax.random.key(0))
  graph, ids, _ = sona.graph.add_nodes(state.graph, task.memories, quality=0.5)
  state = state._replace(graph=graph)
  ids = np.asarray(ids)

  def request(state, i):
    """Serve one request: adapt the query, retrieve 5 memories, judge them; the feedback."""
    x = task.queries[i % len(task.queries)]
    y = np.asarray(sona.adapt(state, x, cfg))
    top = datasets.top_k_cosine(y, task.memories, 5)[0]
    useful = task.memory_labels[top] == task.query_labels[i % len(task.queries)]
    return datasets.retrieval_interaction(cfg, x, ids[top], useful, time=i), float(useful.mean())

  precisions = []
  for i in range(requests):
    it, p = request(state, i)
    state, report = sona.instant_step(state, it, cfg)  # Loop A: use the returned state
    precisions.append(p)

  # A batch of interactions in one call has the same result as one by one.
  batch = [request(state, requests + i)[0] for i in range(64)]
  state, reports = sona.instant_scan(state, sona.stack_interactions(batch), cfg)

  w = max(1, min(100, requests // 4))
  out = {
    "first": float(np.mean(precisions[:w])),
    "last": float(np.mean(precisions[-w:])),
    "processed": int(state.step),
    "rejected": int(state.metrics.rejected),
    "batch_accepted": int(np.sum(np.asarray(reports.accepted))),
  }
  print(
    f"precision@5 over the first {w} requests {out['first']:.3f}, last {w} {out['last']:.3f}; "
    f"{out['processed']} interactions learnt from, {out['rejected']} rejected"
  )
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=500)
  main(parser.parse_args().requests)
