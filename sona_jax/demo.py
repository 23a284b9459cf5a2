"""`sona-jax demo`: a simulated week of serving on real data, every loop on its real schedule.

The served system is a small retrieval-augmented classifier over scikit-learn's `load_digits`:

- **Retrieval.** A memory of 600 real images (PCA-32 embeddings) is searched by cosine for each
  query. The upstream encoder has drifted (a fixed shift of every query embedding), so retrieval
  starts poor. The adapter (`Sona.adapt`: base + micro LoRA) is what Loop A and Loop B learn.
- **Three model tiers** of rising cost answer the query: nearest centroid (cost 1, 40 ms), logistic
  regression (3, 120 ms) and an RBF SVM (10, 400 ms), all trained on the memory's images. The
  learned router (`Sona.route`) picks one; only its outcome is observed.
- **Feedback.** A retrieved memory is useful when it has the query's label; the answer is right
  when the tier predicts the label. Learning quality = `0.6 + 0.4 precision` for a right answer,
  `0.4 precision` for a wrong one, so "success" (quality >= 0.5) means a right answer.
- **Knowledge growth.** A pool of images never queried is added to the memory during the week.

The clock is simulated (`Sona(clock=...)`) from Monday 00:00 UTC: Loop A runs per request, Loop B
hourly via `Sona.tick`, Loop C at its weekly slot (Sunday 03:00 UTC). At the end, queries the
stream never showed measure the learned adapter and router; a table compares the first and the last
day; `report.json`, PNG plots and an orbax checkpoint go under `--out`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

__all__ = ["run_week", "WEEK_START"]

# Monday 2026-11-23 00:00 UTC: a week from here contains one Sunday 03:00 UTC (Loop C's slot).
WEEK_START = dt.datetime(2026, 11, 23, tzinfo=dt.UTC).timestamp()
TIER_NAMES = ("nearest centroid", "logistic regression", "RBF SVM")  # datasets.digits_tiers
TIER_COSTS = (1.0, 3.0, 10.0)
TIER_LATENCY_MS = (40.0, 120.0, 400.0)


def _tiers(task):
  """The three tiers trained on the memory images; `bool[n_queries, 3]` correctness."""
  from sona_jax import datasets

  return datasets.digits_tiers(task.memory_index)[task.query_index]


def _plots(out_dir: str, hourly: dict, deep_hours: list[float], refs: dict) -> list[str]:
  """Writes quality.png, tiers.png and cost.png; returns the paths (empty without matplotlib)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  h = np.asarray(hourly["hour"], float) / 24.0
  paths = []

  def finish(ax, name, ylabel):
    for d in deep_hours:
      ax.axvline(d / 24.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("day")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path = os.path.join(out_dir, name)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    plt.close(ax.figure)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(8, 3.6))
  ax.plot(h, hourly["precision"], label="retrieval precision@5")
  ax.plot(h, hourly["success"], label="answer success")
  ax.plot(h, hourly["quality"], label="learning quality")
  ax.set_ylim(0, 1.02)
  ax.set_title("Quality per hour (dotted: Loop C)")
  finish(ax, "quality.png", "mean per request")

  fig, ax = plt.subplots(figsize=(8, 3.6))
  shares = np.asarray(hourly["tier_share"], float).T
  ax.stackplot(
    h, shares, labels=[f"{n} (cost {c:g})" for n, c in zip(TIER_NAMES, TIER_COSTS, strict=True)]
  )
  ax.set_ylim(0, 1)
  ax.set_title("Tier mix chosen by the router")
  finish(ax, "tiers.png", "share of requests")

  fig, ax = plt.subplots(figsize=(8, 3.6))
  ax.plot(h, hourly["cost"], label="routed")
  ax.axhline(refs["always_best_cost"], color="C3", ls="--", lw=1, label="always RBF SVM")
  ax.axhline(refs["always_cheapest_cost"], color="C2", ls="--", lw=1, label="always cheapest")
  ax.set_title("Cost per request")
  finish(ax, "cost.png", "mean tier cost")
  return paths


@dataclasses.dataclass
class _Week:
  """What `_setup` builds: the task, its splits, the engine and its simulated clock."""

  task: Any
  correct: np.ndarray  # bool[n_queries, 3]: whether each tier answers each query right
  cfg: Any
  engine: Any
  clock: list  # [now]: the engine's clock reads it
  rng: np.random.Generator
  held: np.ndarray  # queries the stream never shows (held-out evaluation)
  pool: np.ndarray  # queries added as new memories during the week
  stream: np.ndarray  # queries the stream draws from
  requests: int
  days: int


@dataclasses.dataclass
class _Served:
  """What `_serve` observed: per-request records, the Loop C reports and the final memory."""

  rec: dict
  deep_hours: list
  deep_reports: list
  bg_runs: int
  memories: np.ndarray  # the retrieval memory at the end (after Loop C's merges and growth)
  labels: np.ndarray
  ids: np.ndarray


def run_week(
  out_dir: str = "sona-demo",
  *,
  requests: int = 10_080,
  days: int = 7,
  seed: int = 0,
  drift: float = 2.0,
  progress: bool = True,
  checkpoint: bool = True,
  plots: bool = True,
  log=print,
) -> dict:
  """Runs the simulated week (see the module docstring) and returns the report.

  Three steps: `_setup` (data, tiers, engine), `_serve` (the week of requests, every loop on its
  schedule), `_report` (held-out evaluation, summaries, checkpoint, plots, `report.json`); then
  the table is printed (`_print_table`).

  Args:
    out_dir: where `report.json`, the PNG plots and the checkpoint go (created).
    requests: requests over the whole run, spread evenly in time.
    days: simulated days (7: one weekly Loop C).
    seed: data split, drift direction and engine seed.
    drift: length of the query drift (unit-norm embeddings).
    progress: show a progress bar on stderr (rich).
    checkpoint: write an orbax checkpoint of the final state under `out_dir/checkpoint`.
    plots: write quality.png, tiers.png, cost.png (needs matplotlib).
    log: where the table goes: plain text lines. With the default `print` and a terminal on
      stdout, the same rows are shown as rich tables instead.

  Returns:
    The report (also written to `out_dir/report.json`).
  """
  if requests < days:
    raise ValueError(f"run_week: requests={requests} must be >= days={days}")
  t_wall = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  week = _setup(requests=requests, days=days, seed=seed, drift=drift)
  served = _serve(week, progress=progress)
  report = _report(
    week, served, out_dir, t_wall, seed=seed, drift=drift, checkpoint=checkpoint, plots=plots
  )
  _print_table(report, out_dir, plots=plots, log=log)
  return report


def _setup(*, requests: int, days: int, seed: int, drift: float) -> _Week:
  """The task (drifted digits), the tiers, the splits and an engine on a simulated clock."""
  import jax

  import sona_jax as sona
  from sona_jax import datasets

  task = datasets.digits_drift(seed=seed, dim=32, drift=drift)
  correct = _tiers(task)
  n_q = len(task.queries)
  rng = np.random.default_rng(seed)
  order = rng.permutation(n_q)
  held, pool, stream = order[:300], order[300:500], order[500:]
  cfg = sona.SonaConfig(
    dim=32,
    graph_capacity=1024,
    graph_degree=16,
    signal_capacity=8192,
    trajectory_capacity=4096,
    min_samples=50,
    bank_capacity=400,
    tier_costs=TIER_COSTS,
    phi_max_nodes=128,
  )
  clock = [WEEK_START]
  engine = sona.Sona(cfg, key=jax.random.key(seed), clock=lambda: clock[0])
  return _Week(task, correct, cfg, engine, clock, rng, held, pool, stream, requests, days)


def _serve(week: _Week, *, progress: bool) -> _Served:
  """Serves the week: each request retrieves, routes, answers and is observed; `Sona.tick` runs
  Loop B hourly and Loop C at its slot; new memories arrive from the pool."""
  import sona_jax as sona
  from sona_jax import datasets

  task, engine, cfg, rng, now = week.task, week.engine, week.cfg, week.rng, week.clock
  requests, days, stream = week.requests, week.days, week.stream
  ids = engine.add_memories(task.memories, quality=0.5, time=0)
  pool_left = list(week.pool)
  span = days * 86_400.0
  per_growth = max(1, requests // max(len(week.pool), 1))

  rec = {k: np.zeros(requests) for k in ("t", "precision", "success", "quality", "cost")}
  rec["tier"] = np.zeros(requests, np.int32)
  deep_hours, deep_reports, bg_runs = [], [], 0
  memories = np.asarray(task.memories)
  labels = np.asarray(task.memory_labels)
  with _progress_bar(requests, progress) as update:
    for i in range(requests):
      now[0] = WEEK_START + span * (i + 0.5) / requests
      t = int(now[0] - engine.time_origin)
      j = stream[rng.integers(len(stream))]
      x = task.queries[j]
      y = np.asarray(engine.adapt(x))
      top = datasets.top_k_cosine(y, memories, 5)[0]
      useful = labels[top] == task.query_labels[j]
      precision = float(useful.mean())
      tier = engine.route(x)
      ok = bool(week.correct[j, tier])
      quality = 0.6 + 0.4 * precision if ok else 0.4 * precision
      latency = TIER_LATENCY_MS[tier] * float(rng.lognormal(0.0, 0.2))
      used, unused = ids[top[useful]], ids[top[~useful]]
      engine.observe(
        sona.make_interaction(
          cfg,
          query=x,
          quality=quality,
          anchor=int(ids[top[0]]),
          used=used[: cfg.max_ids],
          unused=unused[: cfg.max_ids],
          tier=tier,
          latency_ms=latency,
          time=t,
        )
      )
      out = engine.tick()
      if out["background"] is not None and out["background"].ran:
        bg_runs += 1
      if out["deep"] is not None:
        deep_hours.append(t / 3600.0)
        deep_reports.append(out["deep"])
        # Loop C merged near-duplicate memories: retrieve from the graph's surviving nodes (with
        # their merged embeddings) from now on, as a serving system keyed on node ids would.
        g = engine.state.graph
        keep = np.asarray(g.alive)[ids]
        ids, labels = ids[keep], labels[keep]
        memories = np.asarray(g.emb)[ids]
      if pool_left and i % per_growth == per_growth - 1:  # new knowledge arrives
        p = pool_left.pop()
        emb = task.clean_queries[p] / np.linalg.norm(task.clean_queries[p])
        nid = engine.add_memory(emb, quality=0.5, time=t)
        memories = np.concatenate([memories, emb[None]])
        labels = np.append(labels, task.query_labels[p])
        ids = np.append(ids, nid)
      rec["t"][i], rec["precision"][i], rec["success"][i] = t, precision, float(ok)
      rec["quality"][i], rec["cost"][i], rec["tier"][i] = quality, TIER_COSTS[tier], tier
      update(f"day {t // 86_400 + 1}/{days}  Loop B x{bg_runs}  Loop C x{len(deep_hours)}")
  engine.run_background()  # learn from the last hour's signals too
  return _Served(rec, deep_hours, deep_reports, bg_runs, memories, labels, ids)


def _report(
  week: _Week,
  served: _Served,
  out_dir: str,
  t_wall: float,
  *,
  seed: int,
  drift: float,
  checkpoint: bool,
  plots: bool,
) -> dict:
  """Held-out evaluation, per-day and per-hour summaries, checkpoint, plots and `report.json`."""
  import jax

  import sona_jax as sona
  from sona_jax import datasets

  task, engine, cfg, correct, held = week.task, week.engine, week.cfg, week.correct, week.held
  days, stream, rec = week.days, week.stream, served.rec
  memories, labels = served.memories, served.labels
  # Held-out queries the stream never showed: the learned adapter and greedy router.
  frozen = datasets.precision_at_k(task.queries[held], task.query_labels[held], memories, labels, 5)
  adapted_q = np.asarray(engine.adapt(task.queries[held]))
  adapted = datasets.precision_at_k(adapted_q, task.query_labels[held], memories, labels, 5)
  clean = datasets.precision_at_k(
    task.clean_queries[held], task.query_labels[held], memories, labels, 5
  )
  key = jax.random.key(seed + 1)
  choice = np.array(
    [int(sona.route(engine.state, task.queries[j], cfg, key, explore=False)[0]) for j in held]
  )
  held_success = float(correct[held, choice].mean())
  held_cost = float(np.asarray(TIER_COSTS)[choice].mean())

  # Per-day and per-hour summaries, from the run's own records.
  day = (rec["t"] // 86_400).astype(int)
  hour = (rec["t"] // 3_600).astype(int)

  def summary(mask):
    n = int(mask.sum())
    share = np.bincount(rec["tier"][mask], minlength=3) / max(n, 1)
    return {
      "requests": n,
      "precision": float(rec["precision"][mask].mean()),
      "success": float(rec["success"][mask].mean()),
      "quality": float(rec["quality"][mask].mean()),
      "cost": float(rec["cost"][mask].mean()),
      "tier_share": share.tolist(),
    }

  per_day = [dict(day=d + 1, **summary(day == d)) for d in range(days) if np.any(day == d)]
  hours = sorted(set(hour.tolist()))
  hourly = {"hour": [], "precision": [], "success": [], "quality": [], "cost": [], "tier_share": []}
  for h_ in hours:
    s = summary(hour == h_)
    hourly["hour"].append(h_ + 0.5)
    for k in ("precision", "success", "quality", "cost", "tier_share"):
      hourly[k].append(s[k])
  refs = {
    "always_best_cost": TIER_COSTS[2],
    "always_best_success": float(correct[stream, 2].mean()),
    "always_cheapest_cost": TIER_COSTS[0],
    "always_cheapest_success": float(correct[stream, 0].mean()),
  }
  stats = engine.stats()
  improvement = engine.metrics()
  deep = [_deep_summary(r) for r in served.deep_reports]
  wall = time.perf_counter() - t_wall

  ckpt_dir = None
  if checkpoint:
    ckpt_dir = os.path.abspath(os.path.join(out_dir, "checkpoint"))
    import shutil

    shutil.rmtree(ckpt_dir, ignore_errors=True)
    from sona_jax.checkpoint import Checkpointer

    with Checkpointer(ckpt_dir) as ck:
      ck.save(0, engine.state, cfg, time_origin=engine.time_origin, extra=_extra(engine))
      ck.wait()
  plot_paths = _plots(out_dir, hourly, served.deep_hours, refs) if plots else []

  report = {
    "config": cfg.to_dict(),
    "requests": week.requests,
    "days": days,
    "seed": seed,
    "drift": drift,
    "wall_seconds": wall,
    "per_day": per_day,
    "hourly": hourly,
    "held_out": {
      "precision_clean": clean,
      "precision_frozen": frozen,
      "precision_adapted": adapted,
      "router_success": held_success,
      "router_cost": held_cost,
      "always_best_success": float(correct[held, 2].mean()),
      "always_cheapest_success": float(correct[held, 0].mean()),
    },
    "references": refs,
    "loop_b_cycles": served.bg_runs + 1,
    "loop_c": deep,
    "deep_hours": served.deep_hours,
    "improvement": improvement.to_dict(),
    "stats": stats,
    "checkpoint": ckpt_dir,
    "plots": plot_paths,
  }
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=_json_default)
  return report


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "n/a"
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_table(report: dict, out_dir: str, *, plots: bool, log=print) -> None:
  """Prints the first and last day side by side, the held-out results and where files went.

  Plain text through `log`; with the default `print` and a terminal on stdout, rich tables.
  """
  first, last = report["per_day"][0], report["per_day"][-1]
  held, stats, improvement = report["held_out"], report["stats"], report["improvement"]
  days, requests, drift = report["days"], report["requests"], report["drift"]
  mix = lambda s: "/".join(f"{100 * x:.0f}" for x in s["tier_share"])  # noqa: E731
  rows = [
    ("retrieval precision@5", _fmt(first["precision"]), _fmt(last["precision"])),
    ("answer success", _fmt(first["success"]), _fmt(last["success"])),
    ("learning quality", _fmt(first["quality"]), _fmt(last["quality"])),
    ("cost per request", _fmt(first["cost"]), _fmt(last["cost"])),
    ("tier mix % (NC/LR/SVM)", mix(first), mix(last)),
  ]
  saving = 1.0 - held["router_cost"] / TIER_COSTS[2]
  g = stats["graph"]
  extra_rows = [
    (
      "held-out precision@5: frozen / adapted / clean",
      f"{held['precision_frozen']:.3f} / {held['precision_adapted']:.3f} / "
      f"{held['precision_clean']:.3f}",
    ),
    (
      "held-out routing: success / always-SVM success",
      f"{held['router_success']:.3f} / {held['always_best_success']:.3f}",
    ),
    ("router savings vs always-SVM (held-out)", f"{100 * saving:.0f}% of the cost"),
    ("patterns in the ReasoningBank", str(stats["bank"]["patterns"])),
    ("memory graph: nodes / edges", f"{g['nodes']} / {sum(g['edges'].values())}"),
    ("integration proxy (Phi_AR)", _fmt(improvement["phi_current"])),
    ("router retention (1.0 = no forgetting)", _fmt(improvement["retention_rate_7d"])),
    ("overall improvement score (seed)", f"{improvement['overall_score']:.3f}"),
  ]
  title = (
    f"sona-jax demo: {days} simulated days, {requests} requests on load_digits "
    f"(drift {drift}, 3 tiers), {report['loop_b_cycles']} Loop B cycles, "
    f"{len(report['loop_c'])} Loop C, {report['wall_seconds']:.1f} s wall"
  )
  files = [f"  report: {os.path.join(out_dir, 'report.json')}"]
  if plots and not report["plots"]:
    files.append("  plots skipped: matplotlib is not installed (pip install 'sona-jax[demo]')")
  elif report["plots"]:
    files.append(f"  plots: {', '.join(report['plots'])}")
  if report["checkpoint"]:
    files.append(f"  checkpoint: {report['checkpoint']}  (sona-jax inspect {report['checkpoint']})")
  if log is print and sys.stdout.isatty():
    _print_rich(title, rows, extra_rows, last["day"], files)
    return
  log(f"\n{title}\n")
  w = max(len(r[0]) for r in rows)
  log(f"  {'':<{w}}  {'day 1':>10}  {'day ' + str(last['day']):>10}")
  for name, a, b in rows:
    log(f"  {name:<{w}}  {a:>10}  {b:>10}")
  w2 = max(len(r[0]) for r in extra_rows)
  log("")
  for name, value in extra_rows:
    log(f"  {name:<{w2}}  {value}")
  log("")
  for line in files:
    log(line)


def _print_rich(title, rows, extra_rows, last_day, files) -> None:
  """The same rows as `_print_table`'s plain text, as rich tables on a terminal."""
  from rich import box
  from rich.console import Console
  from rich.table import Table

  console = Console()
  days = Table(box=box.SIMPLE_HEAD)
  days.add_column("")
  days.add_column("day 1", justify="right")
  days.add_column(f"day {last_day}", justify="right")
  for row in rows:
    days.add_row(*row)
  held = Table(box=box.SIMPLE, show_header=False)
  held.add_column("")
  held.add_column("", justify="right")
  for row in extra_rows:
    held.add_row(*row)
  console.print()
  console.print(title, style="bold", highlight=False, markup=False, soft_wrap=True)
  console.print(days)
  console.print(held)
  for line in files:
    console.print(line, highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
  """Yields `update(text)`, one call per request: a rich progress bar on stderr when enabled."""
  if not enabled:
    yield lambda text: None
    return
  from rich.console import Console
  from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

  columns = (
    BarColumn(),
    TaskProgressColumn(),
    TimeRemainingColumn(),
    TextColumn("{task.description}"),
  )
  with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
    task = bar.add_task("", total=total)
    yield lambda text: bar.update(task, advance=1, description=text)


def _extra(engine) -> dict:
  return engine.schedule_extra()


def _deep_summary(report) -> dict:
  """A JSON-able summary of a Loop C report (a dict, or a `DeepReport`)."""
  if isinstance(report, dict):
    return {k: _json_default(v) for k, v in report.items()}
  out = {}
  for name, value in report._asdict().items():
    out[name] = _json_default(value)
  return out


def _json_default(v):
  if hasattr(v, "_asdict"):
    return {k: _json_default(x) for k, x in v._asdict().items()}
  if isinstance(v, dict):
    return {str(k): _json_default(x) for k, x in v.items()}
  if isinstance(v, np.ndarray):
    return v.tolist() if v.size <= 64 else {"shape": list(v.shape), "size": int(v.size)}
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, (np.floating,)):
    return float(v)
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, (list, tuple)):
    return [_json_default(x) for x in v] if len(v) <= 64 else {"size": len(v)}
  return v
