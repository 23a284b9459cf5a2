"""`sona-jax` command line.

- `sona-jax demo [--out DIR] [--requests N]`: a simulated week of serving on `load_digits` with
  every loop on its schedule (`sona_jax.demo`): a table, `report.json`, PNG plots, a checkpoint.
- `sona-jax drift`: Loop A alone on the drifted retrieval task (precision@5 before and after).
- `sona-jax inspect DIR`: summarises a checkpoint directory.
- `sona-jax bench [NAME ...] [--quick]`: runs the benchmarks of a source checkout.
- `sona-jax version`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

__all__ = ["main"]


def _week(args: argparse.Namespace) -> int:
  from sona_jax.runtime import configure_cpu_low_latency

  if not args.no_low_latency:
    configure_cpu_low_latency()
  from sona_jax import demo

  demo.run_week(
    args.out,
    requests=args.requests,
    days=args.days,
    seed=args.seed,
    drift=args.drift,
    progress=sys.stderr.isatty(),
    plots=not args.no_plots,
  )
  return 0


def _inspect(args: argparse.Namespace) -> int:
  import os

  from sona_jax.checkpoint import Checkpointer
  from sona_jax.driver import Sona

  if not os.path.isdir(args.dir):
    print(f"sona-jax inspect: {args.dir} is not a directory", file=sys.stderr)
    return 2
  with Checkpointer(args.dir) as ck:
    steps = ck.all_steps()
  if not steps:
    print(f"sona-jax inspect: no checkpoint in {args.dir}", file=sys.stderr)
    return 2
  engine = Sona.restore(args.dir)
  now = max(engine.last_background, engine.last_deep, engine.time_origin)
  info = {
    "directory": os.path.abspath(args.dir),
    "steps": steps,
    "config": engine.cfg.to_dict(),
    "stats": engine.stats(now=now),
  }
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  st = info["stats"]
  cfg = engine.cfg
  fmt_t = lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))  # noqa: E731
  rows = [
    ("checkpoint steps", ", ".join(map(str, steps))),
    (
      "config",
      f"dim {cfg.dim}, micro rank {cfg.micro_rank}, base rank {cfg.base_rank}, "
      f"{cfg.n_tiers} tiers, graph {cfg.graph_capacity} x {cfg.graph_degree}",
    ),
    ("time origin", fmt_t(engine.time_origin)),
    ("last Loop B / Loop C", f"{fmt_t(engine.last_background)} / {fmt_t(engine.last_deep)}"),
    (
      "requests processed / rejected",
      f"{st['requests']['processed']} / {st['requests']['rejected']}",
    ),
    ("signals waiting / dropped", f"{st['signals']['waiting']} / {st['signals']['dropped']}"),
    ("memory nodes", f"{st['graph']['nodes']} / {st['graph']['capacity']}"),
    ("edges by kind", ", ".join(f"{k} {v}" for k, v in st["graph"]["edges"].items())),
    ("patterns (by level)", f"{st['bank']['patterns']} {st['bank']['by_level']}"),
  ]
  imp = st["improvement"]
  for k in ("quality_delta_7d", "retention_rate_7d", "phi_current", "overall_score"):
    v = imp[k]
    rows.append((k, "n/a" if v is None else f"{v:.4g}"))
  w = max(len(r[0]) for r in rows)
  print(f"sona-jax checkpoint {info['directory']}")
  for name, value in rows:
    print(f"  {name:<{w}}  {value}")
  return 0


_BENCHES = {
  "instant": ("bench_instant.py", ["--quick"]),
  "background": ("bench_background.py", ["--sizes", "1000"]),
  "deep": ("bench_deep.py", ["--quick"]),
}


def _bench(args: argparse.Namespace) -> int:
  import os
  import subprocess

  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
  if not os.path.isdir(root):
    print(
      "sona-jax bench: the benchmarks live in the source checkout (benchmarks/), which this "
      "installation does not have; clone the repository and `pip install -e .`",
      file=sys.stderr,
    )
    return 2
  names = args.names or list(_BENCHES)
  unknown = [n for n in names if n not in _BENCHES]
  if unknown:
    print(f"sona-jax bench: unknown {unknown}; choose from {list(_BENCHES)}", file=sys.stderr)
    return 2
  worst = 0
  for name in names:
    script, quick = _BENCHES[name]
    cmd = [sys.executable, os.path.join(root, script), *(quick if args.quick else [])]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    worst = max(worst, subprocess.run(cmd, check=False).returncode)
  return worst


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
  week = sub.add_parser("demo", help="a simulated week of serving with all three loops")
  week.add_argument("--out", default="sona-demo", help="output directory (default ./sona-demo)")
  week.add_argument("--requests", type=int, default=10_080, help="requests in the week (10080)")
  week.add_argument("--days", type=int, default=7, help="simulated days (default 7)")
  week.add_argument("--drift", type=float, default=2.0, help="query drift (default 2.0)")
  week.add_argument("--seed", type=int, default=0)
  week.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
  week.add_argument(
    "--no-low-latency", action="store_true", help="keep JAX's default CPU dispatch settings"
  )
  ins = sub.add_parser("inspect", help="summarise a checkpoint directory")
  ins.add_argument("dir")
  ins.add_argument("--json", action="store_true", help="print JSON")
  bench = sub.add_parser("bench", help="run the benchmarks (source checkout)")
  bench.add_argument("names", nargs="*", help=f"any of {list(_BENCHES)} (default all)")
  bench.add_argument("--quick", action="store_true", help="small sizes")
  demo = sub.add_parser("drift", help="Loop A alone on load_digits with drifted queries")
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
  if args.command in ("demo", "drift"):
    if args.requests < 1:
      parser.error("--requests must be >= 1")
  if args.command == "demo":
    if args.days < 1 or args.requests < args.days:
      parser.error("--days must be >= 1 and --requests >= --days")
    return _week(args)
  if args.command == "drift":
    return _demo(args)
  if args.command == "inspect":
    return _inspect(args)
  if args.command == "bench":
    return _bench(args)
  if args.command == "version":
    from sona_jax import __version__

    print(__version__)
    return 0
  return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
  sys.exit(main())
