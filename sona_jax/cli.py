"""`sona-jax` command line.

`sona-jax demo` runs a real short Loop A run: a retrieval memory of `load_digits` images (PCA
embeddings), a stream of queries drifted along a fixed direction, feedback-mode micro-LoRA learning
per request, and precision@5 before and after on queries the stream never showed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
  from sona_jax.runtime import configure_cpu_low_latency

  if not args.no_low_latency:
    configure_cpu_low_latency()

  import jax
  import numpy as np

  import sona_jax as sona
  from sona_jax import datasets

  t0 = time.perf_counter()
  task = datasets.digits_drift(seed=args.seed, dim=args.dim, drift=args.drift)
  cfg = sona.SonaConfig(
    dim=args.dim, graph_capacity=1024, signal_capacity=4096, trajectory_capacity=4096
  )
  engine = sona.Sona(cfg, key=jax.random.key(args.seed))
  ids = engine.add_memories(task.memories, quality=0.5)
  print(
    f"sona-jax demo: {len(task.memories)} memories and {len(task.queries)} queries from "
    f"scikit-learn's load_digits (PCA-{args.dim}), queries drifted by {args.drift}; "
    f"{args.requests} requests of feedback-mode Loop A learning (micro-LoRA rank "
    f"{cfg.micro_rank}, lr {cfg.micro_lr})."
  )
  result = datasets.run_drift_stream(engine, task, ids, n_requests=args.requests, seed=args.seed)
  elapsed = time.perf_counter() - t0

  # Per-request Loop A latency on this machine, measured on the same engine.
  it = datasets.retrieval_interaction(
    cfg, task.queries[0], ids[:5], np.array([True, False, True, False, False]), time=0
  )
  times = []
  for _ in range(300):
    s = time.perf_counter()
    engine.observe(it)
    jax.block_until_ready(engine.state.micro)
    times.append(time.perf_counter() - s)
  p50 = float(np.percentile(times[50:], 50) * 1e6)

  n = len(result.prequential)
  w = max(1, min(200, n // 4))
  rows = [
    ("held-out precision@5, before the drift (ceiling)", f"{result.clean:.3f}"),
    ("held-out precision@5, drifted, frozen model", f"{result.frozen:.3f}"),
    ("held-out precision@5, drifted, after learning", f"{result.adapted:.3f}"),
    (f"stream precision@5, first {w} requests", f"{result.prequential[:w].mean():.3f}"),
    (f"stream precision@5, last {w} requests", f"{result.prequential[-w:].mean():.3f}"),
    ("requests accepted by Loop A", f"{result.accepted} / {n}"),
    ("micro-LoRA updates", f"{int(engine.state.metrics.micro_updates)}"),
    ("Loop A p50 per request (observe)", f"{p50:.1f} us"),
    ("wall time", f"{elapsed:.1f} s"),
  ]
  width = max(len(r[0]) for r in rows)
  print()
  for name, value in rows:
    print(f"  {name:<{width}}  {value}")
  gap = result.clean - result.frozen
  if gap > 0:
    print(
      f"\n  recovered {100 * (result.adapted - result.frozen) / gap:.0f}% of the precision lost to "
      "the drift"
    )
  if args.json:
    out = dict(result._asdict())
    out["prequential"] = [float(v) for v in result.prequential]
    out["loop_a_p50_us"] = p50
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `sona-jax` console script."""
  parser = argparse.ArgumentParser(prog="sona-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="Loop A learning on load_digits with drifted queries")
  demo.add_argument("--requests", type=int, default=2000, help="stream length (default 2000)")
  demo.add_argument("--drift", type=float, default=2.0, help="drift length (default 2.0)")
  demo.add_argument("--dim", type=int, default=32, help="PCA embedding width (default 32)")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--json", help="also write the measurements to this JSON file")
  demo.add_argument(
    "--no-low-latency", action="store_true", help="keep JAX's default CPU dispatch settings"
  )
  sub.add_parser("version", help="print the library version")
  args = parser.parse_args(argv)
  if args.command == "demo":
    if args.requests < 1:
      parser.error("--requests must be >= 1")
    return _demo(args)
  if args.command == "version":
    from sona_jax import __version__

    print(__version__)
    return 0
  return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
  sys.exit(main())
