"""Scenario 4 of the learning benchmark (issue 16): a memory past its capacity.

A graph of capacity N receives 4N new memories over a simulated week while queries ask about the
recent ones. The application keeps its own store keyed on memory ids and follows the driver's
`MemoryEvent`s (evictions, Loop C merges), as docs/design.md's serving section describes; it
retrieves the top-5 by cosine among the memories the graph still holds and reports used / unused
ids. Arms: `Sona` at capacity N with the default admission window (W-TinyLFU: a memory younger
than `admission_window_s` is kept while an older one exists), the same without the window (pure
value-based eviction), a plain FIFO of the last N memories (no library), and an unbounded graph
(capacity 4N, the reference).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .common import CLOCK_START, _md_table

WEEK_S = 7 * 86_400
RECENT_S = 86_400  # a query asks about a class whose memories arrived in the last day
N_CLASSES = 10


class CapacityTask(NamedTuple):
  """A week of memories and queries (NumPy arrays).

  Attributes:
    mem: f32[4N, 32] memory embeddings in arrival order (unit norm, PCA-32 of `load_digits`).
    mem_y: i32[4N] their classes: 10 blocks of 0.4 N memories, one class a block ("topics").
    mem_t: i32[4N] arrival times, seconds since the start (evenly over the week).
    q: f32[4N, 32] one query after each arrival (another image of a recent class).
    q_y: i32[4N] the query's class: that of a memory drawn from those of the last day.
    q_t: i32[4N] query times (half-way to the next arrival).
    capacity: N.
  """

  mem: np.ndarray
  mem_y: np.ndarray
  mem_t: np.ndarray
  q: np.ndarray
  q_y: np.ndarray
  q_t: np.ndarray
  capacity: int


def capacity_task(*, seed: int, capacity: int) -> CapacityTask:
  """Builds the week for a graph of `capacity` N (4N must be a multiple of 10)."""
  from sona_jax import datasets

  n_mem = 4 * capacity
  if n_mem % N_CLASSES or n_mem // N_CLASSES > 150:
    raise ValueError(f"capacity_task: capacity={capacity}: 4N must be a multiple of 10, <= 1500")
  task = datasets.digits_drift(seed=seed, dim=32, n_memories=600)
  emb = np.concatenate([task.memories, task.clean_queries])
  y = np.concatenate([task.memory_labels, task.query_labels])
  rng = np.random.default_rng(seed)
  block = n_mem // N_CLASSES
  mem_idx, pools = [], {}
  for c in rng.permutation(N_CLASSES):
    idx = rng.permutation(np.flatnonzero(y == c))
    mem_idx.append(idx[:block])
    pools[int(c)] = idx[block:]
  mem_idx = np.concatenate(mem_idx)
  mem_t = (np.arange(n_mem) * WEEK_S // n_mem).astype(np.int32)
  q_t = mem_t + WEEK_S // (2 * n_mem)
  q_y = np.zeros(n_mem, np.int32)
  q_idx = np.zeros(n_mem, np.int64)
  for i in range(n_mem):
    recent = np.flatnonzero((mem_t <= q_t[i]) & (mem_t > q_t[i] - RECENT_S))
    q_y[i] = y[mem_idx[rng.choice(recent)]]
    q_idx[i] = rng.choice(pools[int(q_y[i])])
  return CapacityTask(
    mem=emb[mem_idx],
    mem_y=y[mem_idx].astype(np.int32),
    mem_t=mem_t,
    q=emb[q_idx],
    q_y=q_y,
    q_t=q_t.astype(np.int32),
    capacity=capacity,
  )


def _top5(q: np.ndarray, mem: np.ndarray, live: np.ndarray, k: int = 5) -> np.ndarray:
  """Indices (into `mem`) of the top-`k` live memories by cosine (fewer if fewer are live)."""
  from sona_jax import datasets

  if len(live) == 0:
    return live
  return live[datasets.top_k_cosine(q[None], mem[live], min(k, len(live)))[0]]


def run_capacity(task: CapacityTask, arm: str, *, seed: int = 0, **cfg_overrides) -> dict:
  """Serves the week through one arm: `"window"` (Sona at capacity N, default admission window),
  `"no window"` (Sona at capacity N, `admission_window_s=0`), `"fifo"` (the last N memories, no
  library) or `"unbounded"` (Sona at capacity 4N). `cfg_overrides` go to `SonaConfig` (library
  defaults otherwise, sizes aside). One query after each arrival; the scheduler (`Sona.tick`)
  polls once a simulated hour, so Loop B runs hourly and Loop C at its weekly slot.

  Returns:
    A dict: `precision` (f32[4N] precision@5 of each query), `useful` (list per query of the
    memory indices retrieved and relevant), `evicted_at` (i32[4N], the time each memory left the
    store, -1 if never), `recent_held` (f32[4N], share of the last day's memories still held at
    each query), `merges`, `rejected` (interactions Loop A refused, e.g. naming a stale id),
    `loop_b_runs`, `loop_c_runs`, `seconds`.
  """
  import jax

  import sona_jax as sona
  from sona_jax import datasets

  n_mem, cap = len(task.mem), task.capacity
  evicted_at = np.full(n_mem, -1, np.int64)
  prec = np.zeros(n_mem, np.float32)
  held = np.zeros(n_mem, np.float32)
  useful: list[np.ndarray] = []
  live: dict[int, int] = {}  # memory id (or index, for FIFO) -> memory index
  merges = runs_b = runs_c = rejected = 0
  hour = 0
  t0 = time.perf_counter()
  engine = None
  if arm != "fifo":
    cfg = sona.SonaConfig(
      dim=task.mem.shape[1],
      graph_capacity=n_mem if arm == "unbounded" else cap,
      signal_capacity=4096,
      trajectory_capacity=4096,
      **({"admission_window_s": 0} if arm == "no window" else {}),
      **cfg_overrides,
    )
    now = [CLOCK_START]
    engine = sona.Sona(cfg, key=jax.random.key(seed), clock=lambda: now[0])

  def follow(t):
    nonlocal merges
    for ev in engine.memory_events():
      m = live.pop(ev.id, None)
      if m is not None:
        evicted_at[m] = t
        merges += ev.kind == "merged"

  for i in range(n_mem):
    if engine is None:
      live[i] = i
      if len(live) > cap:
        evicted_at[live.pop(i - cap)] = task.mem_t[i]
    else:
      now[0] = CLOCK_START + float(task.mem_t[i])
      mid = engine.add_memory(task.mem[i], quality=0.5, time=int(task.mem_t[i]))
      follow(task.mem_t[i])
      live[int(mid)] = i
    ids = np.fromiter(live.keys(), np.int64, len(live))
    idx = np.fromiter(live.values(), np.int64, len(live))
    top = _top5(task.q[i], task.mem, idx)
    relevant = task.mem_y[top] == task.q_y[i]
    prec[i] = relevant.mean() if len(top) == 5 else relevant.sum() / 5
    useful.append(top[relevant])
    recent = (task.mem_t[: i + 1] > task.q_t[i] - RECENT_S).nonzero()[0]
    held[i] = np.isin(recent, idx).mean()
    if engine is not None:
      now[0] = CLOCK_START + float(task.q_t[i])
      id_of = dict(zip(idx.tolist(), ids.tolist(), strict=True))
      it = datasets.retrieval_interaction(
        engine.cfg, task.q[i], np.array([id_of[m] for m in top]), relevant, time=int(task.q_t[i])
      )
      rejected += int(not bool(engine.observe(it).accepted))
      if task.q_t[i] // 3600 != hour:  # the scheduler polls once a simulated hour
        hour = task.q_t[i] // 3600
        rep = engine.tick()
        runs_b += int(rep["background"] is not None and rep["background"].ran)
        runs_c += int(rep["deep"] is not None)
        follow(task.q_t[i])
  return dict(
    arm=arm,
    precision=prec,
    useful=useful,
    evicted_at=evicted_at,
    recent_held=held,
    merges=merges,
    rejected=rejected,
    loop_b_runs=runs_b,
    loop_c_runs=runs_c,
    seconds=time.perf_counter() - t0,
  )


ARMS = {
  "window": "sona_jax, capacity N (admission window 1 day, the default)",
  "no window": "sona_jax, capacity N, admission_window_s=0",
  "fifo": "FIFO of the last N memories (no library)",
  "unbounded": "sona_jax, capacity 4N (never full: the reference)",
}


def early_evictions(run: dict, reference: dict, task: CapacityTask) -> tuple[int, int]:
  """`(evicted early, useful)`: memories the reference (unbounded) arm retrieved as useful for
  a query after this arm had evicted them, and memories the reference ever found useful."""
  last_useful = np.full(len(task.mem), -1, np.int64)
  for i, u in enumerate(reference["useful"]):
    last_useful[u] = task.q_t[i]
  ev = run["evicted_at"]
  early = (ev >= 0) & (last_useful > ev)
  return int(early.sum()), int((last_useful >= 0).sum())


def _daily(x: np.ndarray, task: CapacityTask) -> np.ndarray:
  """Per-day means of a per-query series."""
  day = task.q_t // 86_400
  return np.bincount(day, x, minlength=7)[:7] / np.maximum(np.bincount(day, minlength=7)[:7], 1)


def capacity_benchmark(*, quick: bool, seeds, log=print, capacity: int | None = None) -> dict:
  """Section 4: the four arms on the same weeks; means over `seeds`."""
  capacity = capacity or (50 if quick else 100)
  per_arm: dict[str, list] = {a: [] for a in ARMS}
  tasks = []
  for seed in seeds:
    task = capacity_task(seed=seed, capacity=capacity)
    tasks.append(task)
    for arm in ARMS:
      r = run_capacity(task, arm, seed=seed)
      per_arm[arm].append(r)
      log(f"  capacity {capacity} {arm} seed {seed}: {r['seconds']:.1f} s")
  full_from = capacity  # the graph is full from the N-th arrival on
  last3 = int(len(tasks[0].mem) * 4 / 7)  # the last 3 days
  rows = []
  for arm, name in ARMS.items():
    rs = per_arm[arm]
    early = [
      early_evictions(r, ref, t) for r, ref, t in zip(rs, per_arm["unbounded"], tasks, strict=True)
    ]
    rows.append(
      dict(
        arm=arm,
        name=name,
        precision=float(np.mean([r["precision"].mean() for r in rs])),
        precision_full=float(np.mean([r["precision"][full_from:].mean() for r in rs])),
        precision_last3=float(np.mean([r["precision"][last3:].mean() for r in rs])),
        recent_held=float(np.mean([r["recent_held"][full_from:].mean() for r in rs])),
        evicted=float(np.mean([(r["evicted_at"] >= 0).sum() for r in rs])),
        merges=float(np.mean([r["merges"] for r in rs])),
        rejected=float(np.mean([r["rejected"] for r in rs])),
        evicted_early=float(np.mean([e for e, _ in early])),
        useful=float(np.mean([u for _, u in early])),
        loop_b_runs=float(np.mean([r["loop_b_runs"] for r in rs])),
        loop_c_runs=float(np.mean([r["loop_c_runs"] for r in rs])),
        seconds=float(sum(r["seconds"] for r in rs)),
        precision_days=[
          float(v)
          for v in np.mean([_daily(r["precision"], t) for r, t in zip(rs, tasks, strict=True)], 0)
        ],
      )
    )
  return dict(
    capacity=capacity,
    memories=4 * capacity,
    queries=4 * capacity,
    seeds=list(seeds),
    rows=rows,
    seconds=float(sum(r["seconds"] for r in rows)),
  )


def capacity_table(cap: dict) -> str:
  """Precision@5 on recent knowledge and evictions per arm."""
  head = (
    f"{'arm':<58}{'p@5 week':>9}{'p@5 full':>9}{'last 3 d':>9}{'recent held':>12}"
    f"{'left':>8}{'early':>7}{'merged':>7}"
  )
  lines = [head, "-" * len(head)]
  for r in cap["rows"]:
    lines.append(
      f"{ARMS[r['arm']]:<58}{r['precision']:>9.3f}{r['precision_full']:>9.3f}"
      f"{r['precision_last3']:>9.3f}{r['recent_held']:>12.1%}{r['evicted']:>8.0f}"
      f"{r['evicted_early']:>7.0f}{r['merges']:>7.0f}"
    )
  return "\n".join(lines)


def capacity_markdown(cap: dict) -> list[str]:
  """Section 4 of the README's "Results: learning"."""
  rows = [
    [
      ARMS[r["arm"]],
      f"{r['precision']:.3f}",
      f"{r['precision_full']:.3f}",
      f"{r['precision_last3']:.3f}",
      f"{100 * r['recent_held']:.1f}%",
      f"{r['evicted']:.0f}",
      f"{r['evicted_early']:.0f} of {r['useful']:.0f}",
      f"{r['merges']:.0f}",
    ]
    for r in cap["rows"]
  ]
  by = {r["arm"]: r for r in cap["rows"]}
  win, now, fifo, unb = by["window"], by["no window"], by["fifo"], by["unbounded"]
  n = cap["capacity"]
  md = [
    "### 4. A memory past its capacity",
    "",
    f"A graph of capacity N = {n} receives {4 * n} new memories (digit images, PCA-32) over a "
    "simulated week, one every "
    f"{7 * 24 * 60 / (4 * n):.0f} minutes, in ten topics of {4 * n // 10} memories (one digit "
    "class each, one after the other); after each arrival a query asks about a recent topic "
    "(the class of a memory that arrived in the last day; the query is another image of it). "
    "The application keeps its own store keyed on memory ids and follows the driver's "
    "`MemoryEvent`s (evictions, Loop C merges); it retrieves the top-5 by cosine among the "
    "memories still held and reports used / unused ids (`Sona.observe`); `Sona.tick` polls "
    "once a simulated hour (Loop B hourly, Loop C at its weekly slot). Library defaults except "
    'sizes. Precision@5: share of the top 5 of the query\'s class; "full": from the N-th '
    'arrival on (the graph is full); "recent held": share of the last day\'s memories still '
    'in the store; "evicted early": memories the unbounded graph later retrieved as useful '
    "that this arm had already evicted, of all memories the unbounded graph ever found "
    f"useful. Means over seeds {cap['seeds']}.",
    "",
    _md_table(
      [
        "arm",
        "p@5, week",
        "p@5, graph full",
        "p@5, last 3 days",
        "recent held",
        "left the store (evicted or merged)",
        "evicted early (of useful)",
        "merged (Loop C)",
      ],
      rows,
    ),
    "",
    f"With its admission window the bounded graph keeps {100 * win['recent_held']:.0f}% of the "
    f"last day's memories and answers recent queries at {win['precision_full']:.3f} once "
    f"full, against {unb['precision_full']:.3f} for the unbounded graph and "
    f"{fifo['precision_full']:.3f} for a plain FIFO"
    + (
      " (the unbounded graph is not an upper bound here: it keeps old topics whose images "
      "resemble the queried ones and crowd the top 5)"
      if unb["precision_full"] < win["precision_full"]
      else ""
    )
    + f". It evicted {win['evicted_early']:.0f} memories that the unbounded graph later used "
    f"(FIFO: {fifo['evicted_early']:.0f}). Without the window (`admission_window_s=0`) "
    "eviction by value alone takes the newest memory, which has had no time to earn accesses: "
    f"the store keeps {100 * now['recent_held']:.0f}% of the last day's memories and recent "
    f"precision falls to {now['precision_full']:.3f}, with {now['evicted_early']:.0f} useful "
    "memories evicted early."
    + (
      " Where the library does not help: on this recency-driven workload a FIFO does as well "
      f"as the value-based policy ({fifo['precision_full']:.3f} vs "
      f"{win['precision_full']:.3f}) and evicts fewer useful memories early."
      if fifo["precision_full"] >= win["precision_full"] - 0.01
      or fifo["evicted_early"] < win["evicted_early"]
      else ""
    ),
    "",
  ]
  return md
