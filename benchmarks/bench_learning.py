"""Measured learning on real data (scikit-learn's digits): forgetting, drift repair, routing,
a memory past its capacity.

Four scenarios, each against baselines and, where its API allows, the peer `@ruvector/sona`:

1. **Continual learning** (`continual_benchmark`): Split Digits (5 tasks of 2 classes) and Permuted
   Digits (5 pixel permutations), a flax MLP trained task after task with optax, in task-, domain-
   and class-incremental settings: naive fine-tuning, L2 to the anchor, offline EWC (one Fisher per
   task), online EWC and this library's EWC++ (`sona_jax.ewc`); 5 seeds, lambda picked on a
   validation split; average accuracy and forgetting (Chaudhry et al. 2018).
2. **Drift repair** (`run_drift`): retrieval over a memory of real images whose queries drift;
   feedback-mode micro-LoRA (Loop A) with hourly Loop B consolidation against the frozen model;
   prequential and held-out precision@5, recovery after the drift, retention on clean queries;
   against re-centering and oracle rank-r / full-rank refits, on a shift and on harder drifts
   (subspace rotations, a new encoder, a moving shift).
3. **Routing** (`run_routing`): three real classifiers of rising cost, the router learned online
   from partial feedback; quality vs cost against fixed tiers, random, the oracle; APGR (RouteLLM).
4. **Memory past capacity** (`run_capacity`): a graph of capacity N receiving 4N memories over a
   simulated week, queries about recent ones; with and without the admission window, FIFO, and
   an unbounded graph.

The peer is driven by `peer/learning.js` on the same streams (skipped with a note when Node.js or
the package is missing). Each scenario lives in its own module of `benchmarks/learning/` (shared
helpers in `learning/common.py`); this file is the entry point and re-exports the scenarios'
functions, which the tests (`tests/test_learning_scenarios.py`) call at a small size.

Usage: `python benchmarks/bench_learning.py [--quick] [--only continual drift routing capacity]
[--no-peer]`.
Writes `benchmarks/results/learning.json`, `learning.md` (a README section) and
`learning_{continual,drift,drift_harder,routing}.png` (`learning_quick.*` with `--quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

# The scenarios live in `benchmarks/learning/`; this file is loaded as a script or by path (tests).
if str(Path(__file__).resolve().parent) not in sys.path:
  sys.path.insert(0, str(Path(__file__).resolve().parent))

# The scenarios' functions, re-exported for the tests and users (`bench.run_drift`, ...).
from learning.capacity import (
  capacity_benchmark,
  capacity_markdown,
  capacity_table,
  capacity_task,
  early_evictions,
  run_capacity,
)
from learning.common import RESULTS, _clean, _json_default, _md_table, _peer_module, pyplot
from learning.continual import (
  EWCPP,
  METHOD_NAMES,
  NAIVE,
  continual_benchmark,
  continual_markdown,
  continual_table,
  continual_targets,
  digits_splits,
  make_setting,
  plot_continual,
  run_continual,
)
from learning.drift import (
  baselines,
  drift_benchmark,
  drift_config,
  drift_markdown,
  drift_stream,
  drift_table,
  drift_targets,
  peer_drift,
  plot_drift,
  plot_drift_harder,
  recovery,
  run_drift,
)
from learning.routing import (
  _routing_markdown,
  _routing_targets,
  evaluate_router,
  peer_routing,
  plot_routing,
  routing_benchmark,
  routing_config,
  routing_table,
  routing_tiers,
  run_routing,
)

from sona_jax.evaluation import (  # shared with the tests and users (`sona_jax.evaluation`)
  apgr,
  average_accuracy,
  forgetting,
  threshold_sweep,
)

__all__ = [
  "EWCPP",
  "METHOD_NAMES",
  "NAIVE",
  "apgr",
  "average_accuracy",
  "capacity_benchmark",
  "capacity_task",
  "early_evictions",
  "run_capacity",
  "baselines",
  "continual_benchmark",
  "digits_splits",
  "drift_benchmark",
  "drift_config",
  "drift_stream",
  "evaluate_router",
  "forgetting",
  "main",
  "make_setting",
  "markdown",
  "peer_drift",
  "peer_routing",
  "plots",
  "recovery",
  "routing_benchmark",
  "routing_config",
  "routing_tiers",
  "run_continual",
  "run_drift",
  "run_routing",
  "targets",
  "threshold_sweep",
]


def targets(cl: dict | None, drift: dict | None, routing: list[dict] | None) -> list[dict]:
  """The issue's acceptance targets with the measured numbers."""
  out = []
  if cl is not None:
    out += continual_targets(cl)
  if drift is not None:
    out += drift_targets(drift)
  for r in routing or ():
    out += _routing_targets(r)
  return out


def plots(cl, drift, routing, out_dir: Path, suffix: str = "") -> list[str]:
  """Writes learning_continual.png, learning_drift.png, learning_drift_harder.png and
  learning_routing.png.

  Returns:
    The paths written (none without matplotlib).
  """
  plt = pyplot()
  if plt is None:
    return []
  paths = []
  if cl is not None:
    paths.append(plot_continual(cl, out_dir, suffix, plt))
  if drift is not None:
    paths.append(plot_drift(drift, out_dir, suffix, plt))
    if drift.get("harder"):
      paths.append(plot_drift_harder(drift, out_dir, suffix, plt))
  if routing is not None:
    paths.append(plot_routing(routing, out_dir, suffix, plt))
  return paths


def markdown(report: dict) -> str:
  """The README-ready "Results: learning" section."""
  cl, drift, routing = report.get("continual"), report.get("drift"), report.get("routing")
  sfx = "_quick" if report["quick"] else ""
  cmd = "python benchmarks/bench_learning.py" + (" --quick" if report["quick"] else "")
  md = [
    "## Results: learning",
    "",
    f"Reproduce with `{cmd}` (fixed seeds; writes `benchmarks/results/learning{sfx}.json`, "
    f"this section as `learning{sfx}.md`, and the plots). Measured on "
    f"{report['host']['cpus']} CPUs in {report['wall_seconds'] / 60:.1f} min"
    + (", shared with other jobs" if report["host"]["load_start"] > report["host"]["cpus"] else "")
    + f"; peer `@ruvector/sona` {report.get('peer_version') or 'not run: ' + report['peer_note']}.",
    "",
    "**Targets**",
    "",
    _md_table(
      ["target", "measured", "met"],
      [[t["name"], t["measured"], "yes" if t["met"] else "**no**"] for t in report["targets"]],
    ),
    "",
  ]
  if cl is not None:
    md += continual_markdown(cl, sfx)
  if drift is not None:
    md += drift_markdown(drift, sfx)
  for task_result in (routing, report.get("routing_breast_cancer")):
    if task_result is not None:
      md += _routing_markdown(task_result, sfx)
  if report.get("capacity") is not None:
    md += capacity_markdown(report["capacity"])
  return "\n".join(md)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small sizes, 2 seeds (about 2 minutes)")
  p.add_argument(
    "--only",
    nargs="+",
    choices=("continual", "drift", "routing", "capacity"),
    help="run only these parts",
  )
  p.add_argument("--no-peer", action="store_true", help="skip @ruvector/sona")
  p.add_argument("--no-install", action="store_true", help="never npm-install the peer")
  p.add_argument("--out", default=str(RESULTS), help="output folder")
  a = p.parse_args(argv)
  parts = set(a.only or ("continual", "drift", "routing", "capacity"))
  out_dir = Path(a.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  load_start = os.getloadavg()[0]

  _peer = _peer_module()

  peer_ok, peer_note = (False, "skipped (--no-peer)")
  if not a.no_peer:
    peer_ok, peer_note = _peer.ensure_peer(install=not a.no_install)
  print(f"peer: {'@ruvector/sona ' + peer_note if peer_ok else 'not run: ' + peer_note}")
  seeds = [0] if a.quick else [0, 1, 2]
  cl = continual_benchmark(quick=a.quick) if "continual" in parts else None
  drift = drift_benchmark(quick=a.quick, seeds=seeds, peer_ok=peer_ok) if "drift" in parts else None
  routing, routing_other = None, None
  if "routing" in parts:
    routing = routing_benchmark(quick=a.quick, seeds=seeds, peer_ok=peer_ok, task="digits")
    routing_other = routing_benchmark(
      quick=a.quick, seeds=seeds, peer_ok=peer_ok, task="breast_cancer"
    )
  capacity = capacity_benchmark(quick=a.quick, seeds=seeds) if "capacity" in parts else None
  report = dict(
    quick=a.quick,
    peer_version=peer_note if peer_ok else None,
    peer_note=peer_note,
    host=dict(
      platform=platform.platform(),
      python=platform.python_version(),
      cpus=os.cpu_count(),
      load_start=load_start,
      load_end=os.getloadavg()[0],
    ),
    continual=cl,
    drift=drift,
    routing=routing,
    routing_breast_cancer=routing_other,
    capacity=capacity,
  )
  report["targets"] = targets(cl, drift, [r for r in (routing, routing_other) if r is not None])
  report["wall_seconds"] = time.perf_counter() - t0
  suffix = "_quick" if a.quick else ""
  report["plots"] = plots(cl, drift, routing, out_dir, suffix)
  if cl is not None:
    print("\n1. Continual learning: ACC / forgetting (points, test, mean±std over seeds)")
    print(continual_table(cl))
  if drift is not None:
    print(f"\n2. Drift repair: held-out precision@5 (means over seeds {drift['seeds']})")
    print(drift_table(drift))
  for r in (routing, routing_other):
    if r is not None:
      print(f"\n3. Routing, {r['task']}: held-out (means over seeds {r['seeds']})")
      print(routing_table(r))
  if capacity is not None:
    print(
      f"\n4. Memory past capacity (N = {capacity['capacity']}, {capacity['memories']} memories "
      f"in a simulated week; means over seeds {capacity['seeds']}): precision@5 on recent queries"
    )
    print(capacity_table(capacity))
  print("\nTargets:")
  for t in report["targets"]:
    print(f"  [{'met' if t['met'] else 'MISSED'}] {t['name']}: {t['measured']}")
  path = out_dir / f"learning{suffix}.json"
  path.write_text(json.dumps(_clean(report), indent=1, default=_json_default))
  (out_dir / f"learning{suffix}.md").write_text(markdown(report) + "\n")
  print(f"\nwrote {path}, {out_dir / f'learning{suffix}.md'}, plots: {', '.join(report['plots'])}")
  print(f"wall time {report['wall_seconds']:.0f} s (load average at start {load_start:.1f})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
