"""Soak: a long run of Loop A, Loop B and Loop C through the driver, checking that nothing leaks.

1,000,000 interactions (a few percent of them deliberately bad) go through `Sona.observe_many`
(Loop A, `instant_scan`) in batches of 1,000. The injected clock advances so that `Sona.tick`
finds Loop B due every 10,000 interactions and the weekly Loop C slot every 200,000. The run checks:

- **retraces**: a `jax.monitoring` listener counts every XLA backend compilation
  (`/jax/core/compile/backend_compile_duration`, with the function's name) and attributes it to
  the phase running at the time (Loop A, Loop B, Loop C, adding memories, checkpointing). A
  phase's first call is its warm-up; every compilation after it is a retrace. This sees every
  jitted function, including ones called inside a loop's host code, which a per-function
  `_cache_size()` would miss;
- **memory**: the resident set size (`VmRSS` from `/proc/self/status`) after every Loop B; the
  growth after warm-up (from the end of the first Loop C) and its slope per 100,000 interactions;
- **finiteness and invariants** (`check_invariants`) after every Loop B and Loop C: no non-finite
  learned value, edge weights in [0, 1], no dangling edges, ring buffer counters consistent, the
  bank within its capacity;
- **counters balanced**: `received = rejected + processed` (every interaction accounted for, and
  the rejected ones are exactly the injected bad ones), and
  `processed = consumed by Loop B + buffered + dropped` (the signal ring buffer overwrites its
  oldest record when full and counts it; its capacity here, 8,192, is below the 10,000 signals of
  a cycle, so the dropping path is exercised).

Usage: `python benchmarks/soak.py [--quick] [--n N] [--batch B] [--dim D] [--checkpoints]`.
`--quick` runs 20,000 interactions (Loop B every 1,000, Loop C every 10,000), as the test suite
does. Writes `benchmarks/results/soak.json` (`soak_quick.json` with `--quick`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

import sona_jax as sona
from sona_jax import buffer, metrics, types
from sona_jax import graph as graph_lib
from sona_jax.driver import due, last_deep_slot
from sona_jax.state import MICRO_UPDATES, PROCESSED, REJECTED

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WEEK = 7 * 86_400
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

# The kinds of bad interaction the stream injects; every one must be rejected by Loop A.
BAD_KINDS = (
  "nan_query",
  "inf_query",
  "nan_quality",
  "quality_above_1",
  "negative_quality",
  "feedback_above_1",
  "negative_latency",
  "zero_target",
  "tier_out_of_range",
  "negative_tier",
  "negative_context",
  "negative_time",
  "id_out_of_range",
  "id_below_minus_1",
  "duplicated_id",
  "anchor_out_of_range",
  "nan_grad",
)


# ------------------------------------------------------------------------------------ invariants


def _finite(name: str, x, problems: list[str]) -> None:
  x = np.asarray(x)
  if x.size and not np.all(np.isfinite(x)):
    problems.append(f"{name}: {int(np.sum(~np.isfinite(x)))} non-finite values")


def _check_ring(name: str, buf: buffer.RingBuffer, problems: list[str]) -> None:
  cap = buffer.capacity(buf)
  head, size, written, read, dropped = (int(v) for v in np.asarray(buf.meta))
  unread = written - read
  if not 0 <= head < cap:
    problems.append(f"{name}: head {head} outside [0, {cap})")
  if not 0 <= size <= cap:
    problems.append(f"{name}: size {size} outside [0, {cap}]")
  if not 0 <= unread <= cap:
    problems.append(f"{name}: unread {unread} outside [0, {cap}]")
  if not 0 <= dropped <= written:
    problems.append(f"{name}: dropped {dropped} outside [0, written={written}]")
  if written >= 0 and size != min(written, cap):  # exact until the int32 counters wrap
    problems.append(f"{name}: size {size} != min(written={written}, capacity={cap})")
  if written >= 0 and head != written % cap:
    problems.append(f"{name}: head {head} != written {written} % capacity {cap}")


def check_invariants(state: sona.SonaState, cfg: sona.SonaConfig) -> list[str]:
  """Every violated invariant of `state`, in words (an empty list when all hold).

  Host-side NumPy only (no jitted code, so calling it never compiles anything). Checks:

  - every learned floating value is finite: adapters, router and its optimiser, EWC++, bank,
    graph embeddings, weights, qualities and strengths, and the float fields of the packed signal,
    trajectory and probe rows (a signal's `feedback` may be NaN: "none"; the daily bins' `phi`
    and `retention` columns are NaN on days without a measurement);
  - graph: neighbour ids in [-1, N), no self-loops, no repeated neighbour in a row, no edge from
    or to a dead node (no dangling edges), weights in [0, 1] and 0 in empty slots, kinds known,
    live embeddings unit-norm, node qualities in [0, 1], strengths >= 0, access counts >= 0;
  - ring buffers (signals, trajectories, probes): head, size, unread and dropped consistent;
  - counters: processed, rejected, micro-updates >= 0, micro-updates <= processed, and every
    processed interaction wrote one signal and one trajectory;
  - bank: sizes >= 0, live centroids unit-norm, qualities in [0, 1], per-tier successes within
    [0, trials], parents in [-1, P) and alive.
  """
  s = jax.device_get(state)
  problems: list[str] = []
  packed = {".signals.data", ".trajectories.data", ".metrics.probe.data", ".metrics.daily.bins"}
  for path, leaf in jax.tree_util.tree_flatten_with_path(s)[0]:
    name = jax.tree_util.keystr(path)
    leaf = np.asarray(leaf)
    if name not in packed and leaf.dtype.kind == "f":
      _finite(name, leaf, problems)

  sig = types.unpack_signals(np.asarray(s.signals.data), cfg)
  for f in ("query", "quality", "estimated_quality", "latency_ratio"):
    _finite(f"signals.{f}", getattr(sig, f), problems)
  fb = np.asarray(sig.feedback)
  if np.any(np.isinf(fb)):
    problems.append("signals.feedback: infinite values")
  traj = types.unpack_trajectories(np.asarray(s.trajectories.data), cfg)
  for f in ("query", "precision", "quality"):
    _finite(f"trajectories.{f}", getattr(traj, f), problems)
  probe = np.asarray(s.metrics.probe.data)
  _finite("probe.features", probe[:, :-4], problems)
  _finite("probe.success/correct_then", probe[:, -3:-1], problems)
  bins = np.asarray(s.metrics.daily.bins)
  sums = np.delete(bins, [metrics.PHI, metrics.RETENTION], axis=1)
  _finite("metrics.daily.bins", sums, problems)
  if np.any(np.isinf(bins[:, [metrics.PHI, metrics.RETENTION]])):
    problems.append("metrics.daily.bins: infinite phi or retention")

  # Graph.
  g = s.graph
  n = g.emb.shape[0]
  nbr, w, kind = np.asarray(g.nbr), np.asarray(g.w), np.asarray(g.kind)
  alive = np.asarray(g.alive)
  has = nbr >= 0
  if np.any((nbr < -1) | (nbr >= n)):
    problems.append("graph: neighbour ids outside [-1, N)")
  _finite("graph.w", w, problems)
  if np.any((w < 0) | (w > 1)):
    problems.append(f"graph: edge weights outside [0, 1] (min {w.min()}, max {w.max()})")
  if np.any(w[~has] != 0):
    problems.append("graph: empty edge slots with a non-zero weight")
  if np.any(has & ((kind < 0) | (kind >= len(graph_lib.EDGE_KINDS)))):
    problems.append("graph: unknown edge kinds")
  rows, slots = np.nonzero(has)
  dst = nbr[rows, slots]
  if np.any(dst == rows):
    problems.append("graph: self-loops")
  if np.any(~alive[rows]):
    problems.append("graph: edges out of dead nodes")
  if np.any(~alive[np.clip(dst, 0, n - 1)]):
    problems.append("graph: edges pointing at dead nodes (dangling)")
  pairs = rows.astype(np.int64) * n + dst
  if np.unique(pairs).size != pairs.size:
    problems.append("graph: a neighbour repeated within a row")
  emb = np.asarray(g.emb)
  _finite("graph.emb", emb, problems)
  norms = np.linalg.norm(emb[alive], axis=1)
  if norms.size and np.max(np.abs(norms - 1.0)) > 1e-3:
    problems.append("graph: live embeddings not unit-norm")
  q, strength = np.asarray(g.quality), np.asarray(g.strength)
  _finite("graph.quality", q, problems)
  _finite("graph.strength", strength, problems)
  if np.any((q[alive] < 0) | (q[alive] > 1)):
    problems.append("graph: node qualities outside [0, 1]")
  if np.any(strength[alive] < 0):
    problems.append("graph: negative strengths")
  if np.any(np.asarray(g.access_count) < 0):
    problems.append("graph: negative access counts")
  if not np.all(np.isin(np.asarray(g.node)[:, graph_lib.ALIVE], (0, 1))):
    problems.append("graph: alive flags other than 0/1")

  # Ring buffers and counters.
  _check_ring("signals", s.signals, problems)
  _check_ring("trajectories", s.trajectories, problems)
  _check_ring("probe", s.metrics.probe, problems)
  c = np.asarray(s.metrics.counters)
  processed, rejected, updates = int(c[PROCESSED]), int(c[REJECTED]), int(c[MICRO_UPDATES])
  if min(processed, rejected, updates) < 0 or updates > processed:
    problems.append(f"counters: processed {processed}, rejected {rejected}, updates {updates}")
  for name, buf in (("signals", s.signals), ("trajectories", s.trajectories)):
    written = int(np.asarray(buf.meta)[buffer.WRITTEN])
    if written != processed:
      problems.append(f"counters: {name} written {written} != processed {processed}")

  # Bank.
  b = s.bank
  cap = b.centroid.shape[0]
  balive = np.asarray(b.alive)
  if int(balive.sum()) > cap:
    problems.append("bank: more live patterns than slots")
  size = np.asarray(b.size)
  if np.any(size < 0) or np.any(size[balive] <= 0):
    problems.append("bank: a live pattern with size <= 0, or a negative size")
  cn = np.linalg.norm(np.asarray(b.centroid)[balive], axis=1)
  if cn.size and np.max(np.abs(cn - 1.0)) > 1e-3:
    problems.append("bank: live centroids not unit-norm")
  aq = np.asarray(b.avg_quality)[balive]
  if np.any((aq < 0) | (aq > 1 + 1e-6)):
    problems.append("bank: average qualities outside [0, 1]")
  succ, cnt = np.asarray(b.tier_success), np.asarray(b.tier_count)
  if np.any(succ < 0) or np.any(succ > cnt * (1 + 1e-5) + 1e-5):
    problems.append("bank: tier successes outside [0, trials]")
  parent = np.asarray(b.parent)
  if np.any((parent < -1) | (parent >= cap)):
    problems.append("bank: parents outside [-1, P)")
  live_parent = parent[balive]
  if np.any(~balive[live_parent[live_parent >= 0]]):
    problems.append("bank: a live pattern's parent is dead")
  return problems


# ------------------------------------------------------------------------------------ stream


def _live_ids(state) -> np.ndarray:
  """The ids of the live memories (`graph.memory_ids`): a recycled slot's id carries its
  generation, so slot numbers alone would name evicted memories (rejected as stale)."""
  ids = np.asarray(sona.graph.memory_ids(state.graph))
  return ids[ids >= 0]


class Stream:
  """Batches of interactions over the live memories, with a fraction of deliberately bad ones.

  Good interactions are valid by construction (ids of live memories, distinct, values in range),
  so Loop A must accept exactly the good ones: `batch()` returns the mask of injected bad rows.
  """

  def __init__(self, cfg: sona.SonaConfig, seed: int, bad_fraction: float):
    self.cfg = cfg
    self.rng = np.random.default_rng(seed)
    self.bad_fraction = bad_fraction
    self.bad_kinds: Counter = Counter()

  def batch(self, b: int, alive_ids: np.ndarray, t0: int, dt: float):
    """`(Interaction with a leading batch axis, bad: bool[b])` with times from `t0` by `dt` s."""
    cfg, rng = self.cfg, self.rng
    d, k, n_alive = cfg.dim, cfg.max_ids, alive_ids.size
    if n_alive < 2 * k + 1:
      raise ValueError("Stream: need at least 2 * max_ids + 1 live memories")
    # 2k + 1 distinct live ids per row: an arithmetic progression modulo the number of them.
    start = rng.integers(0, n_alive, size=(b, 1))
    stride = rng.integers(1, n_alive // (2 * k + 1) + 1, size=(b, 1))
    picks = alive_ids[(start + stride * np.arange(2 * k + 1)) % n_alive]
    n_used = rng.integers(0, k + 1, size=b)
    n_unused = rng.integers(0, k + 1, size=b)
    slot = np.arange(k)
    used = np.where(slot < n_used[:, None], picks[:, 1 : 1 + k], -1).astype(np.int32)
    unused = np.where(slot < n_unused[:, None], picks[:, 1 + k :], -1).astype(np.int32)
    anchor = np.where(rng.random(b) < 0.8, picks[:, 0], -1).astype(np.int32)
    has_grad = rng.random(b) < 0.05
    it = types.Interaction(
      query=rng.standard_normal((b, d), dtype=np.float32),
      anchor=anchor,
      used=used,
      unused=unused,
      quality=rng.random(b, dtype=np.float32),
      latency_ms=rng.lognormal(5.0, 0.5, size=b).astype(np.float32),
      target_latency_ms=np.full(b, cfg.target_latency_ms, np.float32),
      tier=rng.integers(0, cfg.n_tiers, size=b).astype(np.int32),
      context_tokens=rng.integers(0, 8_000, size=b).astype(np.int32),
      feedback=np.where(rng.random(b) < 0.2, rng.random(b), np.nan).astype(np.float32),
      grad=np.where(has_grad[:, None], rng.standard_normal((b, d)) * 0.1, 0).astype(np.float32),
      has_grad=has_grad,
      time=(t0 + np.floor(np.arange(b) * dt)).astype(np.int32),
    )
    bad = rng.random(b) < self.bad_fraction
    for i in np.flatnonzero(bad):
      kind = BAD_KINDS[rng.integers(len(BAD_KINDS))]
      self.bad_kinds[kind] += 1
      _spoil(it, int(i), kind, cfg)
    return it, bad


def _spoil(it: types.Interaction, i: int, kind: str, cfg: sona.SonaConfig) -> None:
  """Makes row `i` of a batched interaction bad in the way `kind` names (in place)."""
  if kind == "nan_query":
    it.query[i] = np.nan
  elif kind == "inf_query":
    it.query[i, 0] = np.inf
  elif kind == "nan_quality":
    it.quality[i] = np.nan
  elif kind == "quality_above_1":
    it.quality[i] = 1.5
  elif kind == "negative_quality":
    it.quality[i] = -0.25
  elif kind == "feedback_above_1":
    it.feedback[i] = 3.0
  elif kind == "negative_latency":
    it.latency_ms[i] = -1.0
  elif kind == "zero_target":
    it.target_latency_ms[i] = 0.0
  elif kind == "tier_out_of_range":
    it.tier[i] = cfg.n_tiers
  elif kind == "negative_tier":
    it.tier[i] = -1
  elif kind == "negative_context":
    it.context_tokens[i] = -7
  elif kind == "negative_time":
    it.time[i] = -1
  elif kind == "id_out_of_range":
    it.used[i, 0] = cfg.graph_capacity + 5
  elif kind == "id_below_minus_1":
    it.unused[i, 0] = -2
  elif kind == "duplicated_id":
    it.used[i, :2] = it.used[i, 0] if it.used[i, 0] >= 0 else 0
  elif kind == "anchor_out_of_range":
    it.anchor[i] = 2**31 - 1
  elif kind == "nan_grad":
    it.has_grad[i] = True
    it.grad[i] = np.nan
  else:  # pragma: no cover
    raise ValueError(kind)


# ------------------------------------------------------------------------------------ probes


def rss_mb() -> float:
  """Resident set size of this process in MiB (`VmRSS`; peak RSS where /proc is missing)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


class CompileCounter:
  """Counts XLA backend compilations per phase, via `jax.monitoring` (a context manager).

  `phase(name)` marks what runs; the first time a phase finishes, its compilations so far are its
  warm-up. `retraces()` gives the compilations of each phase after its warm-up, with the names
  of the functions compiled.
  """

  def __init__(self):
    self.current = "other"
    self.compiles: dict[str, list[str]] = {}
    self.warm: dict[str, int] = {}

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
      self.compiles.setdefault(self.current, []).append(str(kwargs.get("fun_name", "?")))

  def __enter__(self) -> CompileCounter:
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_duration_listener(self._listener)

  @contextlib.contextmanager
  def phase(self, name: str):
    previous, self.current = self.current, name
    try:
      yield
    finally:
      self.current = previous
      self.warm.setdefault(name, len(self.compiles.get(name, [])))

  def retraces(self) -> dict[str, list[str]]:
    return {p: c[self.warm.get(p, len(c)) :] for p, c in self.compiles.items()}

  def totals(self) -> dict[str, int]:
    return {p: len(c) for p, c in self.compiles.items()}


# ------------------------------------------------------------------------------------ the soak


def soak_config(dim: int, **overrides) -> sona.SonaConfig:
  """The soak's config: a 2,048-node graph, an 8,192-signal ring (below a cycle's 10,000)."""
  kw = dict(
    dim=dim,
    base_rank=8,
    graph_capacity=2_048,
    graph_degree=16,
    signal_capacity=8_192,
    trajectory_capacity=10_000,
    pattern_clusters=50,
    bank_capacity=256,
    n_dreams=128,
  )
  kw.update(overrides)
  return sona.SonaConfig(**kw)


def schedule_config(
  cfg: sona.SonaConfig, background_every: int, deep_every: int
) -> sona.SonaConfig:
  """`cfg` with the Loop B interval of the soak's clock: one week per `deep_every` interactions,
  so Loop B is due every `background_every` interactions (idempotent)."""
  return cfg.replace(
    background_interval_s=background_every * WEEK // deep_every,
    min_samples=min(100, background_every),
  )


def run_soak(
  n: int = 1_000_000,
  *,
  batch: int = 1_000,
  background_every: int = 10_000,
  deep_every: int = 200_000,
  dim: int = 64,
  bad_fraction: float = 0.02,
  add_per_cycle: int = 64,
  seed: int = 0,
  checkpoint_dir: str | None = None,
  cfg: sona.SonaConfig | None = None,
  log=print,
) -> dict:
  """Runs the soak (see the module docstring) and returns its measurements.

  Args:
    n: interactions in all; a multiple of `batch`.
    batch: interactions per `observe_many` call (one `instant_scan`).
    background_every: interactions between Loop B cycles (a multiple of `batch`).
    deep_every: interactions between Loop C cycles (a multiple of `background_every`); the clock
      advances one week per `deep_every` interactions.
    dim: embedding width (ignored when `cfg` is given).
    bad_fraction: fraction of deliberately bad interactions.
    add_per_cycle: new memories added after every Loop B (the graph fills up and evicts).
    seed: seed of the stream and the state.
    checkpoint_dir: when given, the driver checkpoints after every cycle there.
    cfg: the config (`soak_config(dim)` when None), passed through `schedule_config`.
    log: where progress lines go (None for silence).

  Returns:
    A JSON-serialisable dict: counts, counter balance, retraces per phase, RSS series and growth,
    invariant violations, timings, and `ok` (every check passed).
  """
  if n % batch or background_every % batch or deep_every % background_every:
    raise ValueError("run_soak: n, background_every and deep_every must be multiples of batch")
  if (background_every * WEEK) % deep_every:
    raise ValueError("run_soak: background_every * one week must be a multiple of deep_every")
  log = log or (lambda *a: None)
  cfg = schedule_config(cfg or soak_config(dim), background_every, deep_every)
  dt = WEEK / deep_every  # simulated seconds per interaction
  origin = float(last_deep_slot(1_700_000_000.0, cfg))  # a Loop C slot: the first is one week on
  clock = {"now": origin}
  engine = sona.Sona(
    cfg, key=jax.random.key(seed), clock=lambda: clock["now"], checkpoint_dir=checkpoint_dir
  )
  rng = np.random.default_rng(seed + 1)
  mem = rng.standard_normal((int(cfg.graph_capacity * 0.75), cfg.dim)).astype(np.float32)
  engine.add_memories(mem, quality=rng.uniform(0.2, 0.9, size=mem.shape[0]), time=0)
  alive_ids = _live_ids(engine.state)
  stream = Stream(cfg, seed + 2, bad_fraction)

  received = rejected_seen = bad_sent = mismatched = 0
  consumed = missed = 0
  cycles = Counter()
  violations: list[dict] = []
  rss: list[tuple[int, float]] = []
  rss_warm = None
  seconds = Counter()
  t_start = time.perf_counter()
  with CompileCounter() as cc:
    for done in range(0, n, batch):
      t_rel = int(np.floor(done * dt))
      it, bad = stream.batch(batch, alive_ids, t_rel, dt)
      t0 = time.perf_counter()
      with cc.phase("loop_a"):
        report = engine.observe_many(it)
        accepted = np.asarray(report.accepted)
      seconds["loop_a"] += time.perf_counter() - t0
      received += batch
      bad_sent += int(bad.sum())
      rejected_seen += int((~accepted).sum())
      mismatched += int(np.sum(accepted == bad))  # a good one rejected or a bad one accepted
      if (done + batch) % background_every:
        continue
      clock["now"] = origin + (done + batch) * WEEK // deep_every
      t0 = time.perf_counter()
      d = due(clock["now"], engine.last_background, engine.last_deep, cfg)
      with cc.phase("loop_b"):
        # Loop B and Loop C are timed and traced apart: tick would run both in one call.
        out = {"background": engine.run_background(force=False) if d.background else None}
      seconds["loop_b"] += time.perf_counter() - t0
      if d.deep:
        t0 = time.perf_counter()
        with cc.phase("loop_c"):
          out["deep"] = engine.run_deep()
        seconds["loop_c"] += time.perf_counter() - t0
        cycles["deep"] += 1
      rep = out["background"]
      if rep is not None and rep.ran:
        cycles["background"] += 1
        consumed += rep.n_signals
        missed += rep.missed
      with cc.phase("add_memories"):
        new = rng.standard_normal((add_per_cycle, cfg.dim)).astype(np.float32)
        engine.add_memories(new, quality=0.5)
      if checkpoint_dir is not None:
        with cc.phase("checkpoint"):
          engine.wait_checkpoints()
      state = engine.state
      alive_ids = _live_ids(state)
      t0 = time.perf_counter()
      problems = check_invariants(state, cfg)
      seconds["checks"] += time.perf_counter() - t0
      if problems:
        violations.append({"interactions": done + batch, "problems": problems})
      rss.append((done + batch, rss_mb()))
      if d.deep and rss_warm is None:
        rss_warm = rss[-1]
      if (done + batch) % max(n // 20, background_every) == 0:
        log(
          f"{done + batch:>10,} interactions  rss {rss[-1][1]:7.1f} MiB  "
          f"loop B {cycles['background']:>3}  loop C {cycles['deep']}  "
          f"{time.perf_counter() - t_start:6.1f} s"
        )
    retraces = cc.retraces()
    compiles = cc.totals()
  engine.wait_checkpoints()
  state = engine.state
  c = np.asarray(state.metrics.counters)
  meta = np.asarray(state.signals.meta)
  processed, rejected = int(c[PROCESSED]), int(c[REJECTED])
  buffered = int(meta[buffer.WRITTEN] - meta[buffer.READ])
  dropped = int(meta[buffer.DROPPED])
  # Loop B's consume advances the read cursor over what it takes; a push over an unread record
  # advances it too and counts a drop. So the cursor is exactly consumed + dropped.
  read = int(meta[buffer.READ])
  balance = {
    "received": received,
    "processed": processed,
    "rejected": rejected,
    "rejected_in_reports": rejected_seen,
    "bad_sent": bad_sent,
    "misclassified": mismatched,
    "consumed_by_loop_b": consumed,
    "buffered": buffered,
    "dropped": dropped,
    "missed_in_reports": missed,
    "read_cursor": read,
    "received_eq_rejected_plus_processed": received == rejected + processed,
    "processed_eq_consumed_plus_buffered_plus_dropped": processed == consumed + buffered + dropped,
    "rejected_eq_bad_sent": rejected == bad_sent and mismatched == 0,
  }
  post = [(i, r) for i, r in rss if rss_warm is None or i >= rss_warm[0]]
  if len(post) >= 2:
    x = np.array([i for i, _ in post], np.float64)
    y = np.array([r for _, r in post], np.float64)
    slope = float(np.polyfit(x, y, 1)[0] * 100_000)
    growth = float(y[-1] - y[0])
  else:
    slope = growth = float("nan")
  after_warmup = {p: r for p, r in retraces.items() if r}
  expected_cycles = {"background": n // background_every, "deep": n // deep_every}
  result = {
    "n": n,
    "batch": batch,
    "dim": cfg.dim,
    "background_every": background_every,
    "deep_every": deep_every,
    "bad_fraction": bad_fraction,
    "bad_kinds": dict(stream.bad_kinds),
    "cycles": dict(cycles),
    "expected_cycles": expected_cycles,
    "balance": balance,
    "compiles": compiles,
    "retraces_after_warmup": after_warmup,
    "rss_mb": {
      "start_of_warm": rss_warm[1] if rss_warm else None,
      "end": rss[-1][1] if rss else None,
      "growth_after_warmup": growth,
      "slope_per_100k": slope,
      "series": rss,
    },
    "violations": violations,
    "seconds": {k: round(v, 3) for k, v in seconds.items()}
    | {"total": round(time.perf_counter() - t_start, 3)},
    "interactions_per_s_loop_a": received / max(seconds["loop_a"], 1e-9),
  }
  result["ok"] = bool(
    balance["received_eq_rejected_plus_processed"]
    and balance["processed_eq_consumed_plus_buffered_plus_dropped"]
    and balance["rejected_eq_bad_sent"]
    and not violations
    and dict(cycles) == expected_cycles
    and not {p for p in after_warmup if p != "loop_c"}
  )
  return result


def _table(r: dict) -> str:
  b, m = r["balance"], r["rss_mb"]
  rows = [
    ("interactions", f"{r['n']:,} (batches of {r['batch']}, dim {r['dim']})"),
    ("Loop B / Loop C cycles", f"{r['cycles']} (expected {r['expected_cycles']})"),
    (
      "received = rejected + processed",
      f"{b['received']:,} = {b['rejected']:,} + "
      f"{b['processed']:,}: {b['received_eq_rejected_plus_processed']}",
    ),
    (
      "rejected = injected bad",
      f"{b['rejected']:,} vs {b['bad_sent']:,}, misclassified "
      f"{b['misclassified']}: {b['rejected_eq_bad_sent']}",
    ),
    (
      "processed = consumed + buffered + dropped",
      f"{b['processed']:,} = {b['consumed_by_loop_b']:,}"
      f" + {b['buffered']:,} + {b['dropped']:,}: "
      f"{b['processed_eq_consumed_plus_buffered_plus_dropped']}",
    ),
    ("compilations (all)", str(r["compiles"])),
    ("retraces after warm-up", str(r["retraces_after_warmup"] or "none")),
    (
      "RSS after warm-up -> end",
      f"{m['start_of_warm'] or float('nan'):.1f} -> {m['end']:.1f} MiB "
      f"(growth {m['growth_after_warmup']:.1f} MiB, slope {m['slope_per_100k']:.2f} MiB/100k)",
    ),
    ("invariant violations", str(len(r["violations"]))),
    ("time", f"{r['seconds']}; Loop A {r['interactions_per_s_loop_a']:,.0f} interactions/s"),
    ("ok", str(r["ok"])),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--quick", action="store_true", help="20,000 interactions, B every 1,000, C 10,000"
  )
  p.add_argument("--n", type=int, default=None, help="interactions (default 1,000,000)")
  p.add_argument("--batch", type=int, default=1_000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--bad-fraction", type=float, default=0.02)
  p.add_argument("--checkpoints", action="store_true", help="checkpoint after every cycle")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.quick:
    kw = dict(n=args.n or 20_000, background_every=1_000, deep_every=10_000)
  else:
    kw = dict(n=args.n or 1_000_000, background_every=10_000, deep_every=200_000)
  with tempfile.TemporaryDirectory() as tmp:
    result = run_soak(
      batch=args.batch,
      dim=args.dim,
      bad_fraction=args.bad_fraction,
      seed=args.seed,
      checkpoint_dir=os.path.join(tmp, "ckpt") if args.checkpoints else None,
      **kw,
    )
  result["checkpoints"] = args.checkpoints
  result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
  print(_table(result))
  RESULTS.mkdir(exist_ok=True)
  out = RESULTS / ("soak_quick.json" if args.quick else "soak.json")
  out.write_text(json.dumps(result, indent=2, default=float))
  print(f"wrote {out}")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
