"""`Sona`: the small stateful driver around the pure state transitions (DESIGN.md section 6).

It holds the config, the current state and a clock, and calls the jitted pure functions. It is the
only stateful code of the library; everything it does can be done with the pure API directly.
This version covers Loop A (memories, observations, adaptation); the scheduled Loop B/C, routing,
patterns and checkpoints arrive with their loops.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import threading
import time as _time
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import buffer, lora, patterns, router, types
from sona_jax import graph as graph_lib
from sona_jax import metrics as metrics_lib
from sona_jax.config import SonaConfig
from sona_jax.loops.background import BackgroundReport, background_step, signal_features
from sona_jax.loops.instant import InstantReport, instant_scan, instant_step
from sona_jax.state import MICRO_UPDATES, PROCESSED, REJECTED, SonaState, init_state, router_apply

__all__ = ["Sona", "Due", "adapt", "route", "due", "last_deep_slot"]

_WEEK = 7 * 86_400


class Due(NamedTuple):
  """Which scheduled loops are due (`due`)."""

  background: bool
  deep: bool


def last_deep_slot(now: float, cfg: SonaConfig) -> float:
  """The most recent weekly Loop C time (`cfg.deep_weekday`, `cfg.deep_hour_utc`, UTC) <= now."""
  # 1970-01-01 was a Thursday (weekday 3); Unix time has no leap seconds, so weeks are exact.
  offset = ((cfg.deep_weekday - 3) % 7) * 86_400 + cfg.deep_hour_utc * 3_600
  return now - ((now - offset) % _WEEK)


def due(now: float, last_background: float, last_deep: float, cfg: SonaConfig) -> Due:
  """Pure schedule (DESIGN.md section 6): which loops are due at Unix time `now`.

  Loop B is due `cfg.background_interval_s` after the last cycle that ran (it still skips itself
  below `cfg.min_samples`, and is then due again at the next tick); Loop C is due when a weekly slot
  (`cfg.deep_weekday` at `cfg.deep_hour_utc`, UTC) has passed since the last one ran.

  Args:
    now: Unix seconds.
    last_background: Unix seconds of the last Loop B that ran (or the start).
    last_deep: Unix seconds of the last Loop C that ran (or the start).
    cfg: the config.
  """
  return Due(
    background=now - last_background >= cfg.background_interval_s,
    deep=last_deep < last_deep_slot(now, cfg) <= now,
  )


_log = logging.getLogger("sona_jax")


@jax.jit
def _adapt(micro: lora.LoRA, base: lora.LoRA, x: jax.Array, base_scale, micro_scale) -> jax.Array:
  y = lora.apply(base, x, x, scale=base_scale)
  return lora.apply(micro, x, y, scale=micro_scale)


def adapt(state: SonaState, x, cfg: SonaConfig) -> jax.Array:
  """The adapted embedding `x + delta_base(x) + delta_micro(x)` (identity base weight).

  Args:
    state: the learner's state.
    x: f32[..., dim] embeddings.
    cfg: the config.
  """
  x = jnp.asarray(x, jnp.float32)
  if x.shape[-1:] != (cfg.dim,):
    raise ValueError(f"adapt: x has shape {x.shape}; expected [..., {cfg.dim}]")
  return _adapt(
    state.micro, state.base, x, jnp.float32(cfg.base_scale), jnp.float32(cfg.micro_scale)
  )


@functools.partial(jax.jit, static_argnums=5)
def _route(state: SonaState, x, context_tokens, latency_ratio, key, cfg: SonaConfig):
  sig = types.Signal(
    query=x[None],
    quality=jnp.zeros((1,), jnp.float32),
    estimated_quality=jnp.zeros((1,), jnp.float32),
    latency_ratio=latency_ratio[None],
    tier=jnp.zeros((1,), jnp.int32),
    context_tokens=context_tokens[None],
    feedback=jnp.full((1,), jnp.nan, jnp.float32),
    time=jnp.zeros((1,), jnp.int32),
    anchor=jnp.full((1,), -1, jnp.int32),
  )
  feats = signal_features(sig, state.bank, state.router_proj, cfg)[0]  # [1, F]
  probs = router.predict(state.router.params, router_apply(cfg), feats)
  costs = jnp.asarray(cfg.tier_costs, jnp.float32)
  tier = router.route(probs, costs, cfg.router_threshold, key, cfg.router_epsilon)
  return tier, probs


def route(state: SonaState, query, cfg: SonaConfig, key, *, context_tokens=0, latency_ratio=1.0):
  """The tier to serve a request with: the cheapest predicted to succeed (DESIGN.md 4.3).

  Args:
    state: the learner's state.
    query: f32[dim] query embedding.
    cfg: the config (`tier_costs`, `router_threshold`, `router_epsilon`).
    key: PRNG key for epsilon-greedy exploration.
    context_tokens: context length of the request.
    latency_ratio: expected latency over target (1.0 when unknown).

  Returns:
    `(tier, probs)`: i32[] tier and f32[n_tiers] predicted success probabilities.
  """
  x = jnp.asarray(query, jnp.float32)
  if x.shape != (cfg.dim,):
    raise ValueError(f"route: query has shape {x.shape}; expected ({cfg.dim},)")
  return _route(
    state, x, jnp.asarray(context_tokens, jnp.int32), jnp.float32(latency_ratio), key, cfg
  )


_NAMES = {"background": "B", "deep": "C"}
_STARTED: weakref.WeakSet = weakref.WeakSet()  # drivers whose schedule thread may be running


@atexit.register
def _stop_at_exit() -> None:
  """Lets running cycles finish before the interpreter exits: a daemon thread killed inside XLA
  aborts the process, and a half-written checkpoint would be left behind."""
  for engine in list(_STARTED):
    try:
      engine.stop(timeout=120)
    except Exception:  # exiting anyway
      _log.exception("sona_jax: stopping a driver at exit failed")


def _finite_time(extra: dict, name: str, default: float) -> float:
  """A schedule time from checkpoint metadata, checked (a NaN would stop the schedule for good)."""
  v = extra.get(name, default)
  if (
    isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e12
  ):
    raise ValueError(f"Sona.restore: metadata {name}={v!r}; expected a finite Unix time")
  return float(v)


def _log_report(loop: str, report) -> None:
  """Logs what a cycle did (the seed's tracing)."""
  if loop == "background":
    if report.ran:
      _log.info(
        "sona_jax: Loop B ran on %d signals in %.3f s (missed %d, patterns +%d merged %d "
        "evicted %d, retention %.3f)",
        report.n_signals,
        report.seconds["total"],
        report.missed,
        report.patterns_inserted,
        report.patterns_merged,
        report.patterns_evicted,
        report.retention,
      )
    else:
      _log.info("sona_jax: Loop B skipped: %s", report.reason)
    return
  _log.info("sona_jax: Loop C %s", deep_summary(report))


def deep_summary(report) -> str:
  """One line on what a Loop C cycle did (every count is backed by ids in the report)."""
  parts = []
  for name in ("consolidation", "abstraction", "dreams", "transfer", "compression", "phi"):
    sub = getattr(report, name, None)
    if sub is None:
      continue
    fields = sub._asdict() if hasattr(sub, "_asdict") else {}
    counts = []
    for k, v in fields.items():
      if k == "seconds":
        continue
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        counts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
      elif hasattr(v, "shape") and getattr(v, "ndim", 0) >= 1:
        counts.append(f"{k}={v.shape[0]}")
      elif isinstance(v, tuple) and k.endswith("ids"):
        counts.append(f"{k}={len(v)}")
    parts.append(f"{name}({', '.join(counts[:6])})")
  total = (getattr(report, "seconds", None) or {}).get("total", float("nan"))
  return f"ran in {total:.2f} s: " + "; ".join(parts)


class Sona:
  """A SONA learner: config, current state, clock.

  Args:
    cfg: the config.
    key: PRNG key for the initial state.
    checkpoint_dir: when given, an orbax checkpoint is written there after every Loop B and
      Loop C cycle that runs, and by `save()` (`Sona.restore(checkpoint_dir)` reads it back).
    clock: a function returning Unix seconds (`time.time` by default); tests and simulations inject
      their own. Interaction times are int32 seconds since the clock's value at construction.

  Examples:
    >>> import jax, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
    ...                       trajectory_capacity=8)
    >>> engine = sona.Sona(cfg, key=jax.random.key(0))
    >>> m = engine.add_memory([1.0, 0.0, 0.0, 0.0], quality=0.8)
    >>> it = sona.make_interaction(cfg, query=[0.5, 0.5, 0.0, 0.0], quality=0.1, used=[m])
    >>> report = engine.observe(it)
    >>> bool(report.accepted)
    True
  """

  def __init__(
    self,
    cfg: SonaConfig,
    *,
    key: jax.Array,
    checkpoint_dir: str | None = None,
    clock: Callable[[], float] | None = None,
  ):
    if not isinstance(cfg, SonaConfig):
      raise TypeError(f"Sona: cfg must be a SonaConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.checkpoint_dir = checkpoint_dir
    self.clock = clock or _time.time
    self.time_origin = float(self.clock())
    self._state = init_state(cfg, key)
    self._lock = threading.RLock()
    self._journal: list | None = None  # transitions made while a background cycle runs
    self._worker: threading.Thread | None = None
    self._cycle_threads: list[threading.Thread] = []  # begin_background / begin_deep threads
    self._stop = threading.Event()
    self._route_key = jax.random.fold_in(key, 1)
    self._route_count = 0
    self.last_background = self.time_origin
    self.last_deep = self.time_origin
    self._checkpointer = None
    if checkpoint_dir is not None:
      from sona_jax.checkpoint import Checkpointer

      self._checkpointer = Checkpointer(checkpoint_dir)
    self.history: list[tuple[str, float]] = []  # (loop, Unix time) of every cycle that ran

  def _apply(self, op):
    """Applies a state transition `op(state) -> (state, result)`; returns `result`.

    While a background cycle runs on a snapshot, every transition is also journalled, and replayed
    on the cycle's result when it finishes (`begin_background`): serving never waits for Loop B,
    and the outcome equals running Loop B at the snapshot, then every later request in order.
    Call with the lock held.
    """
    self._state, result = op(self._state)
    if self._journal is not None:
      self._journal.append(op)
    return result

  @property
  def state(self) -> SonaState:
    """The current state (a pytree of arrays; the next `observe` donates part of it)."""
    return self._state

  @state.setter
  def state(self, value: SonaState):
    if not isinstance(value, SonaState):
      raise TypeError(f"state must be a SonaState, got {type(value).__name__}")
    with self._lock:
      self._state = value

  def now(self) -> int:
    """Seconds since the time origin, as stored in interactions and the state."""
    return int(self.clock() - self.time_origin)

  def add_memory(
    self, embedding, *, quality: float = 0.5, time: int | None = None, domain: int = 0
  ):
    """Adds a memory node; returns its id. Evicts the lowest-value node when the graph is full."""
    e = np.asarray(embedding, np.float32)
    if e.shape != (self.cfg.dim,):
      raise ValueError(f"add_memory: embedding has shape {e.shape}; expected ({self.cfg.dim},)")
    if not np.all(np.isfinite(e)) or not np.any(e):
      raise ValueError("add_memory: embedding must be finite and non-zero")
    if not 0.0 <= float(quality) <= 1.0:
      raise ValueError(f"add_memory: quality={quality!r}; expected [0, 1]")
    t = self.now() if time is None else int(time)
    with self._lock:

      def op(state):
        g, node_id, evicted = graph_lib.add_node(
          state.graph,
          e,
          quality=jnp.float32(quality),
          time=jnp.int32(t),
          domain=jnp.int32(domain),
          half_life_s=self.cfg.recency_half_life_s,
        )
        return state._replace(graph=g), (node_id, evicted)

      node_id, evicted = self._apply(op)
    evicted = int(evicted)
    if evicted >= 0:
      _log.info("sona_jax: memory %d evicted to make room", evicted)
    return int(node_id)

  def add_memories(self, embeddings, *, quality=0.5, time: int | None = None, domain=0):
    """Adds a batch of memories in one call; returns their ids as a NumPy array."""
    e = np.asarray(embeddings, np.float32)
    if e.ndim != 2 or e.shape[1] != self.cfg.dim:
      raise ValueError(f"add_memories: embeddings {e.shape}; expected [n, {self.cfg.dim}]")
    if not np.all(np.isfinite(e)) or not np.all(np.any(e, axis=1)):
      raise ValueError("add_memories: embeddings must be finite and non-zero")
    q = np.broadcast_to(np.asarray(quality, np.float32), (e.shape[0],))
    if np.any((q < 0) | (q > 1)):
      raise ValueError("add_memories: quality must be in [0, 1]")
    t = self.now() if time is None else int(time)
    with self._lock:

      def op(state):
        g, ids, evicted = graph_lib.add_nodes(
          state.graph,
          e,
          quality=q,
          time=jnp.int32(t),
          domain=jnp.asarray(domain, jnp.int32),
          half_life_s=self.cfg.recency_half_life_s,
        )
        return state._replace(graph=g), (ids, evicted)

      ids, evicted = self._apply(op)
    evicted = np.asarray(evicted)
    if np.any(evicted >= 0):
      _log.info("sona_jax: %d memories evicted to make room", int(np.sum(evicted >= 0)))
    return np.asarray(ids)

  def observe(self, interaction: types.Interaction) -> InstantReport:
    """Loop A on one interaction (one fused jitted transition)."""
    with self._lock:
      return self._apply(lambda s: instant_step(s, interaction, self.cfg))

  def observe_many(self, interactions: types.Interaction | Sequence[types.Interaction]):
    """Loop A on a batch (a stacked `Interaction` or a list), sequential semantics."""
    if not isinstance(interactions, types.Interaction):
      interactions = types.stack_interactions(list(interactions))
    with self._lock:
      return self._apply(lambda s: instant_scan(s, interactions, self.cfg))

  def adapt(self, x) -> jax.Array:
    """The adapted embedding `x + delta_base(x) + delta_micro(x)`."""
    return adapt(self._state, x, self.cfg)

  def route(self, query, *, context_tokens: int = 0) -> int:
    """The model tier for a request: the cheapest predicted to succeed, with exploration."""
    with self._lock:
      key = jax.random.fold_in(self._route_key, self._route_count)
      self._route_count += 1
      tier, _ = route(self._state, query, self.cfg, key, context_tokens=context_tokens)
    return int(tier)

  def find_patterns(self, query, k: int = 5):
    """The `k` ReasoningBank patterns nearest to `query` (cosine), recorded as accessed.

    Returns:
      A list of dicts (`id`, `score`, `centroid`, `size`, `avg_quality`, per-tier success rates),
      best first; shorter than `k` when the bank holds fewer patterns.
    """
    x = jnp.asarray(query, jnp.float32)
    if x.shape != (self.cfg.dim,):
      raise ValueError(f"find_patterns: query has shape {x.shape}; expected ({self.cfg.dim},)")
    if not isinstance(k, int) or k < 1:
      raise ValueError(f"find_patterns: k must be a positive int, got {k!r}")
    with self._lock:
      bank = self._state.bank
      k = min(k, bank.capacity)
      ids, scores = patterns.find_patterns(bank, x, k)
      now = jnp.int32(self.now())
      self._apply(lambda s: (s._replace(bank=patterns.record_access(s.bank, ids, now)), None))
    ids, scores = np.asarray(ids), np.asarray(scores)
    cen, size, q = np.asarray(bank.centroid), np.asarray(bank.size), np.asarray(bank.avg_quality)
    succ, cnt = np.asarray(bank.tier_success), np.asarray(bank.tier_count)
    out = []
    for i, sc in zip(ids, scores, strict=True):
      if i < 0:
        continue
      rates = np.where(cnt[i] > 0, succ[i] / np.maximum(cnt[i], 1e-9), np.nan)
      out.append(
        dict(
          id=int(i),
          score=float(sc),
          centroid=cen[i],
          size=float(size[i]),
          avg_quality=float(q[i]),
          tier_success_rate=rates.tolist(),
        )
      )
    return out

  def run_background(self, *, force: bool = True, now: float | None = None) -> BackgroundReport:
    """Loop B now; forced by default, so it runs below `min_samples` (with at least one signal).

    `now` is Unix seconds (the clock when None)."""
    return self._run_cycle("background", now, force=force)

  def run_deep(self, *, now: float | None = None):
    """Loop C now (`deep_step`): consolidation, abstraction, dreams, transfer, compression and
    the integration proxy, then a checkpoint when the driver has a directory.

    `now` is Unix seconds (the clock when None). Returns the `loops.deep.DeepReport`."""
    return self._run_cycle("deep", now)

  def _run_cycle(self, loop: str, now: float | None, *, force: bool = False):
    with self._lock:
      if self._journal is not None:
        raise RuntimeError(f"run_{loop}: a background cycle is running (begin_{loop})")
      now = self.clock() if now is None else now
      self._state, report, ran = self._cycle(loop, self._state, now, force=force)
      if ran:
        self._finish_cycle(loop, now, report)
    _log_report(loop, report)
    return report

  def metrics(self, now: float | None = None) -> metrics_lib.ImprovementMetrics:
    """The seed's `ImprovementMetrics` at Unix time `now` (the clock when None)."""
    now = self.clock() if now is None else now
    with self._lock:
      state = self._state
    return metrics_lib.improvement_metrics(state, self.cfg, int(now - self.time_origin))

  def stats(self, now: float | None = None) -> dict:
    """A JSON-serialisable summary: counters, buffers, graph, bank, schedule and metrics."""
    now = self.clock() if now is None else now
    with self._lock:
      state = self._state
      history = list(self.history)
    c = np.asarray(state.metrics.counters)
    sig_meta = np.asarray(state.signals.meta)
    traj_meta = np.asarray(state.trajectories.meta)
    g = state.graph
    alive = np.asarray(g.alive)
    nbr = np.asarray(g.nbr)
    kind = np.asarray(g.kind)
    has = (nbr >= 0) & alive[:, None]
    bank_alive = np.asarray(state.bank.alive)
    level = np.asarray(state.bank.level)
    d = due(now, self.last_background, self.last_deep, self.cfg)
    return {
      "time": {
        "origin": self.time_origin,
        "now": float(now),
        "elapsed_s": float(now - self.time_origin),
      },
      "requests": {
        "processed": int(c[PROCESSED]),
        "rejected": int(c[REJECTED]),
        "micro_updates": int(c[MICRO_UPDATES]),
      },
      "signals": {
        "waiting": int(buffer.unread(state.signals)),
        "written": int(sig_meta[buffer.WRITTEN]),
        "dropped": int(sig_meta[buffer.DROPPED]),
        "capacity": self.cfg.signal_capacity,
      },
      "trajectories": {
        "held": int(traj_meta[buffer.SIZE]),
        "written": int(traj_meta[buffer.WRITTEN]),
        "dropped": int(traj_meta[buffer.DROPPED]),
      },
      "graph": {
        "nodes": int(alive.sum()),
        "capacity": self.cfg.graph_capacity,
        "edges": {
          name.lower(): int(np.sum(has & (kind == i)))
          for i, name in enumerate(graph_lib.EDGE_KINDS)
        },
      },
      "bank": {
        "patterns": int(bank_alive.sum()),
        "capacity": self.cfg.bank_capacity,
        "by_level": {
          str(int(lv)): int(np.sum(bank_alive & (level == lv)))
          for lv in np.unique(level[bank_alive])
        },
      },
      "schedule": {
        "last_background": self.last_background,
        "last_deep": self.last_deep,
        "background_due": bool(d.background),
        "deep_due": bool(d.deep),
        "cycles": {
          "background": sum(1 for loop, _ in history if loop == "background"),
          "deep": sum(1 for loop, _ in history if loop == "deep"),
        },
      },
      "improvement": self.metrics(now).to_dict(),
    }

  def tick(self, now: float | None = None) -> dict:
    """Runs whichever loops are due (`due`) at Unix time `now` (the clock when None).

    Returns:
      `{"background": BackgroundReport | None, "deep": dict | None}` for the loops that were due.
    """
    if now is None:
      now = self.clock()
    d = due(now, self.last_background, self.last_deep, self.cfg)
    out = {"background": None, "deep": None}
    if d.background:
      out["background"] = self.run_background(force=False, now=now)
    if d.deep:
      out["deep"] = self.run_deep(now=now)
    return out

  def save(self) -> int:
    """Writes a checkpoint of the current state (async; `wait_checkpoints()` blocks on it).

    Returns:
      The checkpoint step.

    Raises:
      ValueError: the driver was built without a `checkpoint_dir`.
    """
    if self._checkpointer is None:
      raise ValueError("Sona.save: this driver has no checkpoint_dir")
    with self._lock:
      last = self._checkpointer.latest_step()
      step = 0 if last is None else last + 1
      self._checkpointer.save(
        step,
        self._state,
        self.cfg,
        time_origin=self.time_origin,
        extra=self._schedule_extra(),
      )
    _log.info("sona_jax: checkpoint step %d saved to %s", step, self.checkpoint_dir)
    return step

  def _schedule_extra(self) -> dict:
    """Driver state outside the pytree that a restore needs to continue exactly."""
    return {
      "last_background": self.last_background,
      "last_deep": self.last_deep,
      "route_key": [int(v) for v in np.asarray(jax.random.key_data(self._route_key))],
      "route_count": self._route_count,
    }

  def wait_checkpoints(self) -> None:
    """Blocks until pending asynchronous checkpoint writes are on disk."""
    if self._checkpointer is not None:
      self._checkpointer.wait()

  @classmethod
  def restore(cls, checkpoint_dir, *, cfg: SonaConfig | None = None, clock=None) -> Sona:
    """A driver from the newest good checkpoint in `checkpoint_dir` (see `checkpoint.Checkpointer`).

    Args:
      checkpoint_dir: the directory a `Sona(..., checkpoint_dir=...)` wrote.
      cfg: optional config; must agree with the saved one on every field that shapes the state.
      clock: the clock (Unix seconds), `time.time` by default.
    """
    from sona_jax.checkpoint import Checkpointer

    with Checkpointer(checkpoint_dir) as ck:
      state, cfg, meta = ck.restore(cfg)
    engine = cls(cfg, key=jax.random.key(0), checkpoint_dir=checkpoint_dir, clock=clock)
    engine._state = state
    engine.time_origin = float(meta["time_origin"])
    extra = meta.get("extra") or {}
    engine.last_background = _finite_time(extra, "last_background", engine.time_origin)
    engine.last_deep = _finite_time(extra, "last_deep", engine.time_origin)
    if "route_key" in extra:
      key = extra["route_key"]
      if not (
        isinstance(key, list)
        and len(key) == 2
        and all(type(v) is int and 0 <= v < 2**32 for v in key)
      ):
        raise ValueError(f"Sona.restore: metadata route_key={key!r}; expected 2 uint32 ints")
      count = extra.get("route_count", 0)
      if type(count) is not int or count < 0:
        raise ValueError(f"Sona.restore: metadata route_count={count!r}; expected an int >= 0")
      engine._route_key = jax.random.wrap_key_data(np.asarray(key, np.uint32))
      engine._route_count = count
    return engine

  def begin_background(self, *, force: bool = True, now: float | None = None):
    """Starts Loop B on a snapshot of the state in a thread, while serving goes on.

    Loop A keeps serving on the live state. When the cycle finishes, its result becomes the state
    and every transition made meanwhile (observations, memories added, pattern accesses) is
    replayed on it in order, so nothing is lost and the outcome equals the sequential order:
    Loop B at the snapshot, then the later requests. If the cycle fails, the live state is kept
    untouched and the error is logged (and raised by `future.result()`).

    Returns:
      A `concurrent.futures.Future` of the `BackgroundReport`.
    """
    return self._begin_cycle("background", now, force=force)

  def begin_deep(self, *, now: float | None = None):
    """Starts Loop C on a snapshot in a thread, like `begin_background` (see there).

    Transitions made meanwhile are replayed on the restructured state; an observation naming a
    memory that compression merged away is then rejected by Loop A's validation and counted
    (`REJECTED`), never applied to a recycled id.

    Returns:
      A `concurrent.futures.Future` of the `DeepReport`.
    """
    return self._begin_cycle("deep", now)

  def _cycle(self, loop: str, state: SonaState, now: float, *, force: bool = False):
    """Runs one Loop B or Loop C cycle on `state` (pure); returns `(state, report, ran)`."""
    t = int(now - self.time_origin)
    if loop == "background":
      state, report = background_step(state, self.cfg, t, force=force)
      return state, report, report.ran
    from sona_jax.loops.deep import deep_step  # Loop C pulls in scikit-learn and networkx

    state, report = deep_step(state, self.cfg, t)
    return state, report, True

  def _finish_cycle(self, loop: str, now: float, report) -> None:
    """Bookkeeping after a cycle ran (lock held): schedule, history, checkpoint."""
    if loop == "background":
      self.last_background = now
    else:
      self.last_deep = now
    self.history.append((loop, now))
    if self._checkpointer is not None:
      try:
        self.save()
      except Exception:  # the cycle stays applied; the next cycle's checkpoint retries
        _log.exception("sona_jax: checkpoint after Loop %s failed; serving goes on", _NAMES[loop])

  def _begin_cycle(self, loop: str, now: float | None, *, force: bool = False):
    import concurrent.futures

    future: concurrent.futures.Future = concurrent.futures.Future()
    with self._lock:
      if self._journal is not None:
        raise RuntimeError(f"begin_{loop}: a background cycle is already running")
      now = self.clock() if now is None else now
      snapshot = jax.tree.map(jnp.copy, self._state)  # Loop A donates the live arrays
      self._journal = []

    def work():
      try:
        new_state, report, ran = self._cycle(loop, snapshot, now, force=force)
      except BaseException as e:  # keep serving on the live state; nothing half-applied
        with self._lock:
          self._journal = None
        _log.exception("sona_jax: Loop %s failed; the live state is unchanged", _NAMES[loop])
        future.set_exception(e)
        return
      try:
        with self._lock:
          if ran:
            state = new_state
            for op in self._journal:
              state, _ = op(state)
            self._state = state
          self._journal = None
          if ran:
            self._finish_cycle(loop, now, report)
        _log_report(loop, report)
      except BaseException as e:  # never leave the schedule waiting on an unresolved future
        with self._lock:
          self._journal = None
        _log.exception("sona_jax: Loop %s bookkeeping failed", _NAMES[loop])
        future.set_exception(e)
        return
      future.set_result(report)

    thread = threading.Thread(target=work, name=f"sona-loop-{_NAMES[loop]}", daemon=True)
    self._cycle_threads = [t for t in self._cycle_threads if t.is_alive()] + [thread]
    _STARTED.add(self)
    thread.start()
    return future

  def start(self, *, poll_s: float = 1.0) -> None:
    """Runs the schedule (`due`) on a worker thread: Loop B via `begin_background`, Loop C via
    `begin_deep`, each on a snapshot while Loop A keeps serving."""
    if self._worker is not None and self._worker.is_alive():
      raise RuntimeError("Sona.start: already started")
    self._stop.clear()

    def loop():
      while not self._stop.is_set():
        now = self.clock()
        d = due(now, self.last_background, self.last_deep, self.cfg)
        if d.background:
          try:
            self.begin_background(force=False, now=now).result()
          except Exception:  # logged by begin_background; retried at the next slot
            pass
        if d.deep:
          try:
            self.begin_deep(now=now).result()
          except Exception:  # logged by begin_deep; retried at the next poll
            pass
        self._stop.wait(poll_s)

    self._worker = threading.Thread(target=loop, name="sona-schedule", daemon=True)
    self._worker.start()
    _STARTED.add(self)

  def stop(self, timeout: float | None = None) -> None:
    """Stops the schedule thread (a running cycle finishes first) and waits for checkpoints.

    With a `timeout` that runs out while a cycle is still running, it logs a warning and returns;
    the cycle finishes on its own (and at interpreter exit, the driver waits for it).
    """
    self._stop.set()
    deadline = None if timeout is None else _time.monotonic() + timeout
    left = lambda: None if deadline is None else max(0.0, deadline - _time.monotonic())  # noqa: E731
    if self._worker is not None:
      self._worker.join(left())
      if not self._worker.is_alive():
        self._worker = None
    for t in list(self._cycle_threads):
      t.join(left())
    self._cycle_threads = [t for t in self._cycle_threads if t.is_alive()]
    if self._worker is not None or self._cycle_threads:
      _log.warning("sona_jax: stop timed out with a cycle still running; it will finish")
      return
    self.wait_checkpoints()
