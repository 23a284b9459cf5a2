"""`Sona`: the small stateful driver around the pure state transitions (docs/design.md, "Driver").

It holds the config, the current state and a clock, and calls the jitted pure functions. It is the
only stateful code of the library; everything it does can be done with the pure API directly.
It is safe under concurrent callers (a readers-writer lock, transitions serialised, concurrent
`observe` calls coalesced into one batched Loop A step), runs Loop B/C on a worker thread over a
snapshot, checkpoints, and reports memories that leave the graph.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
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
from sona_jax.loops.instant import InstantReport, scan_packed, step_packed
from sona_jax.state import MICRO_UPDATES, PROCESSED, REJECTED, SonaState, init_state, router_apply

__all__ = [
  "Sona",
  "Knobs",
  "MemoryEvent",
  "Due",
  "Routing",
  "adapt",
  "route",
  "tier_success",
  "due",
  "last_deep_slot",
]

_WEEK = 7 * 86_400


class Due(NamedTuple):
  """Which scheduled loops are due (`due`)."""

  background: bool
  deep: bool


def last_deep_slot(now: float, cfg: SonaConfig) -> float:
  """The most recent weekly Loop C time (`cfg.deep_weekday`, `cfg.deep_hour_utc`, UTC) <= now.

  Examples:
    >>> from datetime import datetime, timezone
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, deep_weekday=6, deep_hour_utc=3)  # Sundays, 03:00 UTC
    >>> now = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc).timestamp()  # a Thursday
    >>> slot = last_deep_slot(now, cfg)
    >>> datetime.fromtimestamp(slot, timezone.utc).isoformat()
    '2026-11-29T03:00:00+00:00'
    >>> last_deep_slot(slot, cfg) == slot  # a slot is its own latest slot
    True
  """
  # 1970-01-01 was a Thursday (weekday 3); Unix time has no leap seconds, so weeks are exact.
  offset = ((cfg.deep_weekday - 3) % 7) * 86_400 + cfg.deep_hour_utc * 3_600
  return now - ((now - offset) % _WEEK)


def due(now: float, last_background: float, last_deep: float, cfg: SonaConfig) -> Due:
  """Pure schedule (docs/design.md, "Schedule"): which loops are due at Unix time `now`.

  Loop B is due `cfg.background_interval_s` after the last cycle that ran (it still skips itself
  below `cfg.min_samples`, and is then due again at the next tick); Loop C is due when a weekly slot
  (`cfg.deep_weekday` at `cfg.deep_hour_utc`, UTC) has passed since the last one ran.

  Args:
    now: Unix seconds.
    last_background: Unix seconds of the last Loop B that ran (or the start).
    last_deep: Unix seconds of the last Loop C that ran (or the start).
    cfg: the config.

  Examples:
    >>> from datetime import datetime, timezone
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, background_interval_s=3600, deep_weekday=6, deep_hour_utc=3)
    >>> start = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc).timestamp()  # Thursday 08:00
    >>> due(start + 1800, start, start, cfg)
    Due(background=False, deep=False)
    >>> due(start + 3600, start, start, cfg)  # an hour after the last Loop B
    Due(background=True, deep=False)
    >>> due(start + 4 * 86_400, start, start, cfg)  # Monday 08:00: Sunday 03:00 has passed
    Due(background=True, deep=True)
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

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> x = jnp.linspace(-1.0, 1.0, 8)
    >>> bool(jnp.array_equal(adapt(state, x, cfg), x))  # B = 0 in both adapters: the identity
    True
    >>> micro = state.micro._replace(b=jnp.ones_like(state.micro.b))
    >>> y = adapt(state._replace(micro=micro), x, cfg)
    >>> bool(jnp.allclose(y, x + cfg.micro_scale * (x @ micro.a) @ micro.b, atol=1e-6))
    True
    >>> adapt(state, jnp.ones((3, 8)), cfg).shape  # any leading axes
    (3, 8)
  """
  x = jnp.asarray(x, jnp.float32)
  if x.shape[-1:] != (cfg.dim,):
    raise ValueError(f"adapt: x has shape {x.shape}; expected [..., {cfg.dim}]")
  return _adapt(
    state.micro, state.base, x, jnp.float32(cfg.base_scale), jnp.float32(cfg.micro_scale)
  )


class Routing(NamedTuple):
  """What `route` decided for one request.

  Attributes:
    tier: i32[] the tier to serve with.
    probs: f32[n_tiers] the estimated success probability of every tier (`tier_success`).
    propensity: f32[] the probability with which the policy picks `tier` for this query, in (0, 1]
      (Thompson sampling and epsilon exploration included): log it with the outcome to de-bias
      learning from partial feedback with inverse propensity weights.
  """

  tier: jax.Array
  probs: jax.Array
  propensity: jax.Array


def _estimates(bank, proj, params, signals, x, context_tokens, latency_ratio, cfg):
  # Only the leaves routing reads go in: a jitted call costs 1-3 us per leaf passed.
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
  feats = signal_features(sig, bank, proj, cfg)[0]  # [1, F]
  head = router.predict(params, router_apply(cfg), feats)
  rows = cfg.router_memory_rows
  if rows == 0:
    ones = jnp.ones_like(head)
    strength = jnp.float32(cfg.router_prior_strength)
    return patterns.TierEstimate(head, strength * head, strength * (ones - head), 0.0 * head)
  records, valid = buffer.recent(signals, rows)
  rec = types.unpack_signals(records, cfg)
  # The same labels Loop B trains the router head on (`loops.background`).
  success = (rec.quality >= cfg.success_threshold).astype(jnp.float32)
  return patterns.neighbour_estimates(
    rec.query,
    rec.tier,
    success,
    valid,
    x,
    head,
    k=cfg.router_neighbours,
    temperature=cfg.router_bank_temperature,
    strength=cfg.router_prior_strength,
  )


_tier_estimates = jax.jit(_estimates, static_argnums=7)


@functools.partial(jax.jit, static_argnums=13)
def _route(
  bank, proj, params, signals, x, context_tokens, latency_ratio, key, count, threshold, cost_weight,
  epsilon, thompson, cfg,
):  # fmt: skip
  # The request's key is folded in here: an eager `fold_in` per request cost ~150 us on CPU.
  key = jax.random.fold_in(key, count)
  est = _estimates(bank, proj, params, signals, x, context_tokens, latency_ratio, cfg)
  costs = jnp.asarray(cfg.tier_costs, jnp.float32)
  tier, propensity = router.choose(
    est.alpha, est.beta, costs, threshold, cost_weight, key, epsilon, thompson
  )
  return Routing(tier, est.mean, propensity)


def _route_call(state, x, cfg, key, count, context_tokens, latency_ratio, threshold, cost_weight,
                epsilon, explore):  # fmt: skip
  # NumPy scalars, not jnp ones: each eager jnp scalar is a device op of its own (~10-20 us).
  return _route(
    state.bank,
    state.router_proj,
    state.router.params,
    state.signals,
    x,
    np.int32(context_tokens),
    np.float32(latency_ratio),
    key,
    np.uint32(count),
    np.float32(threshold),
    np.float32(math.nan if cost_weight is None else cost_weight),
    np.float32(epsilon if explore else 0.0),
    np.bool_(cfg.router_thompson and explore),
    cfg,
  )


def route(
  state: SonaState,
  query,
  cfg: SonaConfig,
  key,
  *,
  context_tokens=0,
  latency_ratio=1.0,
  threshold=None,
  cost_weight=None,
  epsilon=None,
  explore: bool = True,
) -> Routing:
  """The tier to serve a request with, from calibrated per-tier success estimates.

  The estimates (`Routing.probs`) are the ReasoningBank's records of the nearest patterns, shrunk
  toward the FastGRNN router head's prediction (`patterns.tier_estimates`). The decision rule is
  the threshold rule (the cheapest tier estimated to succeed with probability `threshold`) or, with
  a `cost_weight`, the cost rule `argmax_k p_k - cost_weight * c_k` (`router.decide`); exploration
  is Thompson sampling from the estimates' Beta posteriors (`cfg.router_thompson`) plus uniform
  `epsilon` (`router.choose`). Every knob is traced: changing one never recompiles.

  Args:
    state: the learner's state.
    query: f32[dim] query embedding.
    cfg: the config (`tier_costs`, the estimate's settings, the knobs' defaults).
    key: PRNG key for exploration.
    context_tokens: context length of the request.
    latency_ratio: expected latency over target (1.0 when unknown).
    threshold: success probability a tier must reach (`cfg.router_threshold` when None).
    cost_weight: weight of the cost in the cost rule (`cfg.router_cost_weight` when None; the
      threshold rule when that is None too).
    epsilon: uniform exploration probability (`cfg.router_epsilon` when None).
    explore: False for the greedy decision on the estimates (no sampling, no epsilon), e.g. to
      evaluate the router.

  Returns:
    `Routing(tier, probs, propensity)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state, q, key = sona.init_state(cfg, jax.random.key(0)), [1.0] * 8, jax.random.key(1)
    >>> r = route(state, q, cfg, key, explore=False)  # greedy: no sampling, no epsilon
    >>> r.probs.shape, float(r.propensity)
    ((3,), 1.0)
    >>> int(route(state, q, cfg, key, threshold=0.0, explore=False).tier)  # all clear it: cheapest
    0
    >>> r = route(state, q, cfg, key, threshold=1.0, explore=False)  # none does: the most likely
    >>> int(r.tier) == int(jnp.argmax(r.probs))
    True
  """
  x = jnp.asarray(query, jnp.float32)
  if x.shape != (cfg.dim,):
    raise ValueError(f"route: query has shape {x.shape}; expected ({cfg.dim},)")
  threshold = cfg.router_threshold if threshold is None else threshold
  cost_weight = cfg.router_cost_weight if cost_weight is None else cost_weight
  epsilon = cfg.router_epsilon if epsilon is None else epsilon
  return _route_call(
    state, x, cfg, key, 0, context_tokens, latency_ratio, threshold, cost_weight, epsilon, explore
  )


def tier_success(state: SonaState, query, cfg: SonaConfig, *, context_tokens=0, latency_ratio=1.0):
  """The estimated success probability of every tier for `query`: f32[n_tiers].

  `route`'s `probs` without a decision: per tier, the nearest recorded outcomes of that tier among
  the recent learning signals, shrunk toward the router head's prediction
  (`patterns.neighbour_estimates`; `cfg.router_memory = 0`: the head alone).

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax.loops.instant import instant_step
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=32, trajectory_capacity=8)
    >>> state, q = sona.init_state(cfg, jax.random.key(0)), jnp.ones(8)
    >>> p = tier_success(state, q, cfg)  # no signal yet: the router head's prediction
    >>> head = tier_success(state, q, cfg.replace(router_memory=0))
    >>> probs = route(state, q, cfg, jax.random.key(1)).probs
    >>> bool(jnp.allclose(p, head)), bool(jnp.allclose(p, probs))
    (True, True)
    >>> it = sona.make_interaction(cfg, query=q, quality=1.0, tier=0)
    >>> for _ in range(20):  # tier 0 served q and succeeded 20 times
    ...   state, _ = instant_step(state, it, cfg)
    >>> after = tier_success(state, q, cfg)
    >>> m = cfg.router_prior_strength  # (20 + m h) / (20 + m) >= 20 / (20 + m)
    >>> bool(after[0] >= 20 / (20 + m) - 1e-6), bool(after[0] > p[0]), bool(after[1] == p[1])
    (True, True, True)
  """
  x = jnp.asarray(query, jnp.float32)
  if x.shape != (cfg.dim,):
    raise ValueError(f"tier_success: query has shape {x.shape}; expected ({cfg.dim},)")
  return _tier_estimates(
    state.bank,
    state.router_proj,
    state.router.params,
    state.signals,
    x,
    np.int32(context_tokens),
    np.float32(latency_ratio),
    cfg,
  ).mean


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


class _RWLock:
  """Many readers or one writer, writers first: a waiting writer holds back new readers, so a
  reader waits at most for the writer ahead of it (one Loop A step), and a stream of readers
  never starves Loop A. The writing thread may take the lock again, as reader or writer."""

  def __init__(self):
    self._cond = threading.Condition(threading.Lock())
    self._readers = 0
    self._writer: int | None = None
    self._depth = 0
    self._writers_waiting = 0

  @contextlib.contextmanager
  def read(self):
    me = threading.get_ident()
    with self._cond:
      nested = self._writer == me
      if not nested:
        while self._writer is not None or self._writers_waiting:
          self._cond.wait()
        self._readers += 1
    try:
      yield
    finally:
      if not nested:
        with self._cond:
          self._readers -= 1
          if self._readers == 0:
            self._cond.notify_all()

  def acquire_write(self) -> None:
    me = threading.get_ident()
    with self._cond:
      if self._writer == me:
        self._depth += 1
        return
      self._writers_waiting += 1
      while self._writer is not None or self._readers:
        self._cond.wait()
      self._writers_waiting -= 1
      self._writer, self._depth = me, 1

  def release_write(self) -> None:
    with self._cond:
      self._depth -= 1
      if self._depth == 0:
        self._writer = None
        self._cond.notify_all()

  @contextlib.contextmanager
  def write(self):
    self.acquire_write()
    try:
      yield
    finally:
      self.release_write()


class _Ticket:
  """One `observe`/`observe_many` call waiting in the dynamic batch."""

  __slots__ = ("packed", "rows", "report", "error", "done", "wake")

  _events = threading.local()

  def __init__(self, packed: np.ndarray, rows: int | None):
    self.packed, self.rows = packed, rows  # rows None: one unbatched interaction
    self.report = self.error = None
    self.done = False
    # Set when applied, or when this caller is to lead. One event per thread, reused: a thread
    # has one call in flight, and no one sets its event after that call returned.
    wake = getattr(_Ticket._events, "wake", None)
    if wake is None:
      wake = _Ticket._events.wake = threading.Event()
    wake.clear()
    self.wake = wake


class MemoryEvent(NamedTuple):
  """A memory that left the graph, for an external store keyed on memory ids to follow.

  Attributes:
    kind: `"evicted"` (a new memory took its slot) or `"merged"` (Loop C merged it as a
      near-duplicate into `into`).
    id: the memory's id (now stale: Loop A rejects it as `BAD_STALE`).
    into: the surviving memory's id for `"merged"`, -1 for `"evicted"`.
    time: the driver clock's Unix time when the driver learnt of it.
  """

  kind: str
  id: int
  into: int
  time: float


@dataclasses.dataclass(frozen=True)
class Knobs:
  """Values that can change while serving without recompiling anything (traced, not static).

  Attributes:
    micro_lr: the micro-LoRA learning rate of Loop A (>= 0).
    router_threshold: the success probability a tier must reach to be chosen, in [0, 1].
    router_epsilon: the exploration probability of `route`, in [0, 1].
    router_cost_weight: None for the threshold rule; a number >= 0 for the cost rule
      `argmax_k p_k - router_cost_weight * cost_k`.
  """

  micro_lr: float
  router_threshold: float
  router_epsilon: float
  router_cost_weight: float | None = None

  @classmethod
  def from_config(cls, cfg: SonaConfig) -> Knobs:
    """The knobs' values in `cfg`: what a new driver starts with.

    Examples:
      >>> import sona_jax as sona
      >>> sona.Knobs.from_config(sona.SonaConfig(dim=8, micro_lr=0.25, router_cost_weight=1))
      Knobs(micro_lr=0.25, router_threshold=0.93, router_epsilon=0.05, router_cost_weight=1.0)
    """
    return cls(
      float(cfg.micro_lr),
      float(cfg.router_threshold),
      float(cfg.router_epsilon),
      None if cfg.router_cost_weight is None else float(cfg.router_cost_weight),
    )

  def validate(self) -> Knobs:
    """Returns the knobs when every one is in range, else raises `ValueError` naming it.

    Examples:
      >>> import sona_jax as sona
      >>> sona.Knobs(micro_lr=0.1, router_threshold=0.9, router_epsilon=0.05).validate().micro_lr
      0.1
      >>> sona.Knobs(micro_lr=0.1, router_threshold=1.5, router_epsilon=0.05).validate()
      Traceback (most recent call last):
      ...
      ValueError: Knobs.router_threshold=1.5; expected a number in [0.0, 1.0]
    """
    w = self.router_cost_weight
    if w is not None and not (_is_number(w) and 0 <= w < math.inf):
      raise ValueError(f"Knobs.router_cost_weight={w!r}; expected None or a finite number >= 0")
    for name, lo, hi in (
      ("micro_lr", 0.0, math.inf),
      ("router_threshold", 0.0, 1.0),
      ("router_epsilon", 0.0, 1.0),
    ):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo <= v <= hi):
        raise ValueError(f"Knobs.{name}={v!r}; expected a number in [{lo}, {hi}]")
      if not math.isfinite(v):
        raise ValueError(f"Knobs.{name}={v!r}; expected a finite number")
    return self


def _is_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float))


_BUCKETS = tuple(2**i for i in range(1, 13))  # 2, 4, ..., 4096
_EVENT_QUEUE = 65_536  # memory events kept for `memory_events()` before the oldest are dropped


class Sona:
  """A SONA learner: config, current state, clock; safe to call from any number of threads.

  **Threads: what a caller sees.** Every public method may be called from any thread, while
  `start()` runs Loop B/C on its worker. State transitions (`observe`, `observe_many`,
  `add_memory`, `add_memories`, `find_patterns`'s access record) are serialised: each sees the
  result of the ones before it, in one order. Readers (`adapt`, `route`, `tier_success`-style
  reads, `stats`, `metrics`, `save`'s copy) run concurrently with each other and see the state
  between two transitions, never a half-applied one: every transition that returned before the
  read began is visible. A reader waits at most for the transition in progress (one Loop A
  step), never for a Loop B/C cycle: cycles run on a snapshot, and their result becomes the state
  in one swap (with the transitions made meanwhile replayed on it, in order). No method hands out
  an array that a later transition donates, except the `state` property (see there).

  **Dynamic batching.** With `batching=True` (the default), `observe` calls that arrive while
  another is being applied are coalesced: the next caller to get the state applies every waiting
  interaction, in arrival order, as one `instant_scan` (sequential semantics: the same result as
  one by one), padded to the next power of two (2, 4, ..., `max_batch`) so no batch size compiles
  twice. A lone caller takes the single-step path unchanged.

  **Memory ids.** `add_memory`/`add_memories` return ids that name a memory until it is evicted
  or merged (`graph.memory_id`): an interaction naming a gone memory is rejected as `BAD_STALE`,
  even when its slot holds a new memory. Evictions and Loop C merges are delivered as
  `MemoryEvent`s to `on_memory_event` and to the `memory_events()` queue.

  Args:
    cfg: the config.
    key: PRNG key for the initial state.
    checkpoint_dir: when given, an orbax checkpoint is written there after every Loop B and
      Loop C cycle that runs, and by `save()` (`Sona.restore(checkpoint_dir)` reads it back).
    clock: a function returning Unix seconds (`time.time` by default); tests and simulations inject
      their own. Interaction times are int32 seconds since the clock's value at construction;
      an interaction made without a time (`make_interaction(..., time=None)`, the default) is
      stamped with this clock when it arrives.
    batching: coalesce concurrent `observe` calls (see above).
    max_batch: the largest batch one Loop A call takes (a power of two in 2..4096); larger ones
      (`observe_many` of more) are applied in chunks of this size, in order.
    on_memory_event: called with each `MemoryEvent`, outside the driver's locks, in the thread
      that caused it (an exception it raises is logged, not propagated).
    transcript: keep every state transition in order, so `replay` can recompute the state from a
      copy of the initial one (for audits and tests; memory grows with traffic).

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
    batching: bool = True,
    max_batch: int = 4096,
    on_memory_event: Callable[[MemoryEvent], None] | None = None,
    transcript: bool = False,
  ):
    if not isinstance(cfg, SonaConfig):
      raise TypeError(f"Sona: cfg must be a SonaConfig, got {type(cfg).__name__}")
    if max_batch not in _BUCKETS:
      raise ValueError(f"Sona: max_batch={max_batch!r}; expected one of {_BUCKETS}")
    self.cfg = cfg
    self.checkpoint_dir = checkpoint_dir
    self.clock = clock or _time.time
    self.time_origin = float(self.clock())
    self._state = init_state(cfg, key)
    self._rw = _RWLock()
    self._cycle_lock = threading.Lock()  # one Loop B/C cycle at a time
    self._save_lock = threading.Lock()
    self._route_lock = threading.Lock()
    self._pending_lock = threading.Lock()
    self._pending: list[_Ticket] = []
    self._leading = False  # a caller is applying a batch (guarded by _pending_lock)
    self.batching = bool(batching)
    self.max_batch = int(max_batch)
    self._knobs = Knobs.from_config(cfg)
    self._journal: list | None = None  # transitions made while a background cycle runs
    self._transcript: list | None = [] if transcript else None
    self._worker: threading.Thread | None = None
    self._cycle_threads: list[threading.Thread] = []  # begin_background / begin_deep threads
    self._stop = threading.Event()
    self._route_key = jax.random.fold_in(key, 1)
    self._route_count = 0
    self._budget_weight = 0.0  # `route(budget=...)`: the cost weight in units of 1 / max cost
    self._routed = 0
    self._routed_cost = 0.0
    self._routed_inverse_propensity = 0.0
    self.last_background = self.time_origin
    self.last_deep = self.time_origin
    self._on_event = on_memory_event
    self._events: collections.deque[MemoryEvent] = collections.deque(maxlen=_EVENT_QUEUE)
    self._events_dropped = 0
    self._batch_sizes: collections.Counter[int] = collections.Counter()
    self._checkpointer = None
    if checkpoint_dir is not None:
      from sona_jax.checkpoint import Checkpointer

      self._checkpointer = Checkpointer(checkpoint_dir)
    self.history: list[tuple[str, float]] = []  # (loop, Unix time) of every cycle that ran

  # ------------------------------------------------------------------------------ transitions

  def _apply(self, op, replay=None):
    """Applies a state transition `op(state) -> (state, result)`; returns `result`.

    While a background cycle runs on a snapshot, every transition is also journalled (as
    `replay`, when given: an op that repeats the choices `op` made, e.g. the slots a memory
    took), and replayed on the cycle's result when it finishes: serving never waits for Loop B,
    and the outcome equals running Loop B at the snapshot, then every later request in order.
    Call with the write lock held.
    """
    self._state, result = op(self._state)
    replay = op if replay is None else replay
    if self._journal is not None:
      self._journal.append(replay)
    if self._transcript is not None:
      self._transcript.append(("op", replay))
    return result

  @property
  def state(self) -> SonaState:
    """The current state (a pytree of arrays). The next transition donates part of it: read it
    only while no other thread calls the driver, or keep `snapshot()` instead."""
    return self._state

  @state.setter
  def state(self, value: SonaState):
    if not isinstance(value, SonaState):
      raise TypeError(f"state must be a SonaState, got {type(value).__name__}")
    with self._rw.write():
      self._state = value

  def snapshot(self) -> SonaState:
    """A copy of the current state that no later transition touches (safe to keep and read).

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> before = engine.snapshot()
      >>> m = engine.add_memory([1.0, 0.0, 0.0, 0.0])
      >>> int(before.graph.alive.sum()), int(engine.snapshot().graph.alive.sum())  # the copy stays
      (0, 1)
    """
    with self._rw.read():
      return jax.block_until_ready(jax.tree.map(jnp.copy, self._state))

  def now(self) -> int:
    """Seconds since the time origin, as stored in interactions and the state.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> t = [1_000_000.0]  # a clock the example moves by hand
      >>> engine = sona.Sona(cfg, key=jax.random.key(0), clock=lambda: t[0])
      >>> engine.now()
      0
      >>> t[0] += 90.5
      >>> engine.now()
      90
    """
    return int(self.clock() - self.time_origin)

  # ---------------------------------------------------------------------------------- knobs

  @property
  def knobs(self) -> Knobs:
    """The live knobs (`Knobs`): learning rate, router threshold and exploration."""
    return self._knobs

  def set_knobs(self, **changes) -> Knobs:
    """Changes live knobs (`micro_lr`, `router_threshold`, `router_epsilon`,
    `router_cost_weight`) for the requests
    that follow; nothing recompiles. Returns the new `Knobs`.

    Raises:
      ValueError: an unknown knob or a value outside its range (nothing is changed).

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.set_knobs(router_threshold=0.8).router_threshold
      0.8
      >>> engine.set_knobs(router_epsilon=2.0)
      Traceback (most recent call last):
      ...
      ValueError: Knobs.router_epsilon=2.0; expected a number in [0.0, 1.0]
      >>> engine.knobs.router_epsilon == cfg.router_epsilon  # nothing changed
      True
    """
    unknown = set(changes) - {f.name for f in dataclasses.fields(Knobs)}
    if unknown:
      raise ValueError(f"Sona.set_knobs: unknown knob(s) {sorted(unknown)}")
    knobs = dataclasses.replace(self._knobs, **changes).validate()
    self._knobs = knobs  # one reference swap: a request reads either the old or the new knobs
    return knobs

  # -------------------------------------------------------------------------------- memories

  def _add(self, e: np.ndarray, q: np.ndarray, t: int, domain) -> tuple[np.ndarray, np.ndarray]:
    """Adds memories (write lock held); returns `(ids, evicted ids)` and journals a placement."""
    n = self.cfg.graph_capacity
    domain = np.broadcast_to(np.asarray(domain, np.int32), (e.shape[0],))

    def op(state):
      g, ids, evicted = graph_lib.add_nodes(
        state.graph,
        e,
        quality=q,
        time=jnp.int32(t),
        domain=jnp.asarray(domain),
        half_life_s=self.cfg.recency_half_life_s,
        admission_window_s=self.cfg.admission_window_s,
      )
      return state._replace(graph=g), (ids, evicted)

    # The replay repeats the slots and generations chosen here, so ids stay what was returned.
    chosen: list = []

    def replay(state):
      g = state.graph
      for slot, gen, emb, quality, dm in chosen:
        g = graph_lib.place_node(
          g, slot, emb, quality=quality, time=jnp.int32(t), domain=dm, generation=gen
        )
      return state._replace(graph=g), None

    self._state, (ids, evicted) = op(self._state)
    ids, evicted = np.asarray(ids), np.asarray(evicted)
    gens = np.asarray(self._state.graph.node[ids % n, graph_lib.GENERATION])
    for i in range(ids.shape[0]):
      chosen.append((int(ids[i] % n), int(gens[i]), e[i], float(q[i]), int(domain[i])))
    if self._journal is not None:
      self._journal.append(replay)
    if self._transcript is not None:
      self._transcript.append(("op", replay))
    return ids, evicted

  def _check_memories(self, name: str, e: np.ndarray, quality) -> np.ndarray:
    if not np.all(np.isfinite(e)) or not np.all(np.any(e, axis=-1)):
      raise ValueError(f"{name}: embeddings must be finite and non-zero")
    q = np.broadcast_to(np.asarray(quality, np.float32), e.shape[:1])
    if not np.all((q >= 0) & (q <= 1)):
      raise ValueError(f"{name}: quality={quality!r}; expected values in [0, 1]")
    return np.ascontiguousarray(q)

  def add_memory(
    self,
    embedding,
    *,
    quality: float = 0.5,
    time: int | None = None,
    domain: int = 0,
    return_evicted: bool = False,
  ):
    """Adds a memory node; returns its id (`(id, evicted_id)` with `return_evicted=True`, -1
    when nothing was evicted).

    At capacity the new memory takes the slot of the lowest-value established memory; memories
    younger than `cfg.admission_window_s` are kept while older ones exist (see
    `graph.add_node`). The evicted memory's id becomes stale and a `MemoryEvent` reports it.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> a = engine.add_memory([1.0, 0.0, 0.0, 0.0], quality=0.8)
      >>> b, evicted = engine.add_memory([0.0, 1.0, 0.0, 0.0], return_evicted=True)
      >>> a, b, evicted  # free slots: nothing evicted
      (0, 1, -1)
    """
    e = np.asarray(embedding, np.float32)
    if e.shape != (self.cfg.dim,):
      raise ValueError(f"add_memory: embedding has shape {e.shape}; expected ({self.cfg.dim},)")
    ids, evicted = self.add_memories(
      e[None], quality=quality, time=time, domain=domain, return_evicted=True
    )
    return (int(ids[0]), int(evicted[0])) if return_evicted else int(ids[0])

  def add_memories(
    self, embeddings, *, quality=0.5, time: int | None = None, domain=0, return_evicted=False
  ):
    """Adds a batch of memories in one call; returns their ids as a NumPy array (and the ids
    each evicted, -1 for none, with `return_evicted=True`). A batch of k <= capacity memories
    gets k distinct slots.

    Examples:
      >>> import jax, numpy as np, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.add_memories(np.eye(4), quality=0.5).tolist()
      [0, 1, 2, 3]
      >>> ids, evicted = engine.add_memories(2 * np.eye(4)[:2], return_evicted=True)
      >>> ids.tolist(), evicted.tolist()
      ([4, 5], [-1, -1])
    """
    e = np.asarray(embeddings, np.float32)
    if e.ndim != 2 or e.shape[1] != self.cfg.dim:
      raise ValueError(f"add_memories: embeddings {e.shape}; expected [n, {self.cfg.dim}]")
    q = self._check_memories("add_memories", e, quality)
    t = self.now() if time is None else int(time)
    with self._rw.write():
      ids, evicted = self._add(e, q, t, domain)
    gone = [int(v) for v in evicted if v >= 0]
    if gone:
      _log.info("sona_jax: %d memories evicted to make room", len(gone))
      stamp = float(self.clock())
      self._emit([MemoryEvent("evicted", v, -1, stamp) for v in gone])
    return (ids, evicted) if return_evicted else ids

  def _emit(self, events: list[MemoryEvent]) -> None:
    """Queues memory events and calls the callback (no driver lock held)."""
    for ev in events:
      if len(self._events) == self._events.maxlen:
        self._events_dropped += 1
      self._events.append(ev)
      if self._on_event is not None:
        try:
          self._on_event(ev)
        except Exception:
          _log.exception("sona_jax: on_memory_event raised; the driver goes on")

  def memory_events(self) -> list[MemoryEvent]:
    """Takes the queued `MemoryEvent`s (evictions and merges, oldest first). The queue keeps the
    newest 65,536; `stats()["memory_events"]["dropped"]` counts older ones lost unread.

    Examples:
      >>> import jax, numpy as np, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> ids = engine.add_memories(np.eye(4).repeat(2, axis=0), time=0)  # 8 memories: full
      >>> later = 2 * 86_400  # past the admission window: an established memory is evicted
      >>> new, evicted = engine.add_memory([1.0, 1.0, 0.0, 0.0], time=later, return_evicted=True)
      >>> [(e.kind, e.id) for e in engine.memory_events()] == [("evicted", evicted)]
      True
      >>> engine.memory_events()  # taken: the queue is empty now
      []
    """
    out = []
    while True:
      try:
        out.append(self._events.popleft())
      except IndexError:
        return out

  # --------------------------------------------------------------------------------- Loop A

  def _packed(self, interaction, batched: bool) -> np.ndarray:
    packed = types.pack(interaction, self.cfg, batched=batched)
    if not isinstance(packed, np.ndarray):
      raise TypeError("Sona.observe: interactions must hold concrete values (not traced)")
    return types.stamp(packed, self.cfg, now=self.now(), micro_lr=self._knobs.micro_lr)

  def observe(self, interaction: types.Interaction | None = None, **fields) -> InstantReport:
    """Loop A on one interaction (one fused jitted transition; coalesced with concurrent calls).

    Give an `Interaction`, or its fields as keywords (the arguments of `make_interaction`:
    `query=..., quality=..., used=..., unused=...`): those are packed straight into the vector
    Loop A reads (`types.pack_interaction`), the cheaper request path. An interaction made
    without a time is stamped with the driver's clock on arrival.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> m = engine.add_memory([1.0, 0.0, 0.0, 0.0], quality=0.8)
      >>> it = sona.make_interaction(cfg, query=[0.5, 0.5, 0.0, 0.0], quality=0.1, used=[m])
      >>> report = engine.observe(it)
      >>> bool(report.accepted), int(engine.snapshot().step)
      (True, 1)
      >>> bad = sona.make_interaction(cfg, query=[0.5, 0.5, 0.0, 0.0], quality=0.1, used=[5])
      >>> engine.observe(bad).reason_names()  # no live memory has id 5: rejected, counted
      ['BAD_STALE']
      >>> bool(engine.observe(query=[0.0, 1.0, 0.0, 0.0], quality=0.9, used=[m]).accepted)
      True
    """
    if interaction is None:
      if not fields:
        raise TypeError("Sona.observe: give an Interaction or its fields (query=, quality=, ...)")
      if fields.get("time") is None:
        fields["time"] = self.now()
      packed = types.pack_interaction(self.cfg, micro_lr=self._knobs.micro_lr, **fields)
    elif fields:
      raise TypeError("Sona.observe: give an Interaction or keyword fields, not both")
    else:
      packed = self._packed(interaction, False)
    return self._submit(_Ticket(packed, None))

  def observe_many(self, interactions: types.Interaction | Sequence[types.Interaction]):
    """Loop A on a batch (a stacked `Interaction` or a list), sequential semantics.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> its = [sona.make_interaction(cfg, query=[1.0, i, 0.0, 0.0], quality=0.9) for i in (0, 1)]
      >>> engine.observe_many(its).accepted.tolist(), int(engine.snapshot().step)
      ([True, True], 2)
    """
    if not isinstance(interactions, types.Interaction):
      interactions = types.stack_interactions(list(interactions))
    packed = self._packed(interactions, True)
    return self._submit(_Ticket(packed, packed.shape[0]))

  def _submit(self, ticket: _Ticket):
    """Applies `ticket`, alone or coalesced (flat combining: one caller at a time leads).

    The leader takes every waiting ticket, applies them as one batch under the write lock, wakes
    their callers, and hands the lead to the oldest ticket that arrived meanwhile; a lone caller
    leads at once and takes the single-step path."""
    if not self.batching:
      with self._rw.write():
        self._run_tickets([ticket])
    else:
      with self._pending_lock:
        self._pending.append(ticket)
        lead = not self._leading
        self._leading = True
      if not lead:
        ticket.wake.wait()
        lead = not ticket.done  # woken to lead: the previous leader handed over
      if lead:
        with self._pending_lock:
          tickets, self._pending = self._pending, []
        try:
          self._rw.acquire_write()
          try:
            self._run_tickets(tickets)
          finally:
            self._rw.release_write()
        finally:
          for t in tickets:
            if not t.done:  # interrupted before the batch ran: its callers must hear of it
              t.error, t.done = RuntimeError("Sona.observe: interrupted before it ran"), True
            if t is not ticket:
              t.wake.set()
          with self._pending_lock:
            nxt = self._pending[0] if self._pending else None
            self._leading = nxt is not None
          if nxt is not None:
            nxt.wake.set()
    if ticket.error is not None:
      raise ticket.error
    return ticket.report

  def _run_tickets(self, tickets: list[_Ticket]) -> None:
    """Applies waiting interactions in arrival order (write lock held)."""
    try:
      if len(tickets) == 1 and tickets[0].rows is None:
        packed = tickets[0].packed
        self._batch_sizes[1] += 1
        report = self._apply(lambda s: step_packed(s, packed, self.cfg))
        # Host values: reading `report.accepted` is then free (on a device array each field read
        # is a dispatch of its own, ~100 us on CPU).
        tickets[0].report = InstantReport(np.asarray(report.values))
        return
      rows = np.concatenate([t.packed[None] if t.rows is None else t.packed for t in tickets])
      values = []
      for lo in range(0, rows.shape[0], self.max_batch):
        chunk = rows[lo : lo + self.max_batch]
        n = chunk.shape[0]
        size = next(b for b in _BUCKETS if b >= n)
        padded = types.host_buffer((size, chunk.shape[1]))  # aligned: passed in without a copy
        padded[:n] = chunk
        padded[n:] = 0.0
        self._batch_sizes[n] += 1
        report = self._apply(lambda s, p=padded, n=n: scan_packed(s, p, self.cfg, n_valid=n))
        values.append(np.asarray(report.values)[:n])
      values = np.concatenate(values)
      at = 0
      for t in tickets:
        if t.rows is None:
          t.report, at = InstantReport(values[at]), at + 1
        else:
          t.report, at = InstantReport(values[at : at + t.rows]), at + t.rows
    except Exception as e:  # every waiting caller hears of it (from its own thread)
      for t in tickets:
        t.error = e
    finally:
      for t in tickets:
        t.done = True

  def warmup(self, max_size: int = 64) -> None:
    """Compiles Loop A's single step and the padded batch sizes up to `max_size` (those that
    concurrent single `observe` calls coalesce into), now, so no request pays for a compilation
    later. Changes nothing in the state.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.warmup(max_size=2)  # the single step and batches of 2
      >>> int(engine.snapshot().step)  # compiled only: the state is unchanged
      0
    """
    width = types.packed_width(self.cfg)
    with self._rw.write():
      for size in (b for b in _BUCKETS if b <= min(max_size, self.max_batch)):
        self._state, _ = scan_packed(
          self._state, np.zeros((size, width), np.float32), self.cfg, n_valid=0
        )
      # The single step has no padding mask: it runs once on a throwaway copy of the state.
      it = types.make_interaction(self.cfg, query=np.zeros(self.cfg.dim), quality=0.5, time=0)
      step_packed(jax.tree.map(jnp.copy, self._state), types.pack(it, self.cfg), self.cfg)

  # -------------------------------------------------------------------------------- readers

  def adapt(self, x) -> jax.Array:
    """The adapted embedding `x + delta_base(x) + delta_micro(x)`.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.adapt([1.0, 2.0, 3.0, 4.0]).tolist()  # a fresh learner: the identity
      [1.0, 2.0, 3.0, 4.0]
    """
    with self._rw.read():
      return jax.block_until_ready(adapt(self._state, x, self.cfg))

  def route(
    self,
    query,
    *,
    context_tokens: int = 0,
    cost_weight: float | None = None,
    budget: float | None = None,
    return_info: bool = False,
  ):
    """The model tier for a request, from calibrated per-tier success estimates (`route`).

    The rule is the knobs' (`router_threshold`, or the cost rule when `router_cost_weight` is
    set), with Thompson-sampling and epsilon exploration. Per request, either:

    - `cost_weight`: the cost rule `argmax_k p_k - cost_weight * c_k` with this weight; or
    - `budget`: a target mean cost per request. The driver adapts the cost weight online to meet
      it (dual ascent on the budget constraint): after each request routed with a budget,
      `w <- max(0, w + router_budget_rate * (cost - budget) / max_cost) ` in units of
      `1 / max_cost`, so the long-run mean cost of the budgeted requests approaches `budget`.
      One controller per driver, warm across calls; `stats()["routing"]` shows its weight.

    Args:
      query: f32[dim] query embedding.
      context_tokens: context length of the request.
      cost_weight: the cost rule's weight (>= 0) for this request.
      budget: target mean cost (> 0) for this request's controller (not with `cost_weight`).
      return_info: return a dict `{"tier", "probs", "propensity", "cost_weight"}` instead of the
        tier: the propensity is the probability with which the policy picked this tier (log it
        with the outcome for inverse-propensity weighting).

    Returns:
      The tier (int), or the dict with `return_info`.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.route([1.0, 0.0, 0.0, 0.0]) in range(cfg.n_tiers)
      True
      >>> info = engine.route([1.0, 0.0, 0.0, 0.0], return_info=True)
      >>> sorted(info), 0.0 < info["propensity"] <= 1.0
      (['cost_weight', 'probs', 'propensity', 'tier'], True)
      >>> _ = engine.set_knobs(router_epsilon=0.0)
      >>> {engine.route([1.0, 0.0, 0.0, 0.0], cost_weight=100.0) for _ in range(5)}  # cost rules
      {0}
    """
    if cost_weight is not None and budget is not None:
      raise ValueError("Sona.route: give cost_weight or budget, not both")
    if cost_weight is not None and not (_is_number(cost_weight) and 0 <= cost_weight < math.inf):
      raise ValueError(f"Sona.route: cost_weight must be a finite number >= 0, got {cost_weight!r}")
    if budget is not None and not (_is_number(budget) and 0 < budget < math.inf):
      raise ValueError(f"Sona.route: budget must be a finite number > 0, got {budget!r}")
    x = np.asarray(query, np.float32)
    if x.shape != (self.cfg.dim,):
      raise ValueError(f"Sona.route: query has shape {x.shape}; expected ({self.cfg.dim},)")
    max_cost = max(max(self.cfg.tier_costs), 1e-9)
    with self._route_lock:
      count = self._route_count % 2**32  # the request's key: fold_in(route key, count)
      self._route_count += 1
      if budget is not None:
        cost_weight = self._budget_weight / max_cost
    knobs = self._knobs
    if cost_weight is None:
      cost_weight = knobs.router_cost_weight
    with self._rw.read():
      decision = _route_call(
        self._state,
        x,
        self.cfg,
        self._route_key,
        count,
        context_tokens,
        1.0,
        knobs.router_threshold,
        cost_weight,
        knobs.router_epsilon,
        True,
      )
      tier, propensity = jax.device_get((decision.tier, decision.propensity))
    tier, propensity = int(tier), float(propensity)
    cost = self.cfg.tier_costs[tier]
    with self._route_lock:
      if budget is not None:
        step = self.cfg.router_budget_rate * (cost - budget) / max_cost
        self._budget_weight = max(0.0, self._budget_weight + step)
      self._routed += 1
      self._routed_cost += cost
      self._routed_inverse_propensity += 1.0 / propensity
    if not return_info:
      return tier
    return {
      "tier": tier,
      "probs": np.asarray(decision.probs),
      "propensity": propensity,
      "cost_weight": None if cost_weight is None else float(cost_weight),
    }

  def tier_success(self, query, *, context_tokens: int = 0) -> np.ndarray:
    """The estimated success probability of every tier for `query`: f32[n_tiers] (`route`'s
    estimates: the nearest patterns' records shrunk toward the router head's prediction).

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> p = engine.tier_success([1.0, 0.0, 0.0, 0.0])
      >>> p.shape, bool(((p > 0) & (p < 1)).all())
      ((3,), True)
    """
    with self._rw.read():
      return np.asarray(tier_success(self._state, query, self.cfg, context_tokens=context_tokens))

  def find_patterns(self, query, k: int = 5):
    """The `k` ReasoningBank patterns nearest to `query` (cosine), recorded as accessed.

    Returns:
      A list of dicts (`id`, `score`, `centroid`, `size`, `avg_quality`, per-tier success rates),
      best first; shorter than `k` when the bank holds fewer patterns.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.find_patterns([1.0, 0.0, 0.0, 0.0])  # an empty bank
      []
      >>> for _ in range(3):
      ...   _ = engine.observe(sona.make_interaction(cfg, query=[1.0, 0.5, 0.0, 0.0], quality=0.9))
      >>> _ = engine.run_background()  # Loop B extracts the pattern of these queries
      >>> found = engine.find_patterns([1.0, 0.5, 0.0, 0.0], k=2)
      >>> len(found), round(found[0]["score"], 4), found[0]["size"]
      (1, 1.0, 3.0)
    """
    x = jnp.asarray(query, jnp.float32)
    if x.shape != (self.cfg.dim,):
      raise ValueError(f"find_patterns: query has shape {x.shape}; expected ({self.cfg.dim},)")
    if not isinstance(k, int) or k < 1:
      raise ValueError(f"find_patterns: k must be a positive int, got {k!r}")
    with self._rw.write():
      bank = self._state.bank
      k = min(k, bank.capacity)
      ids, scores = patterns.find_patterns(bank, x, k)
      ids, scores = np.asarray(ids), np.asarray(scores)
      cen, size, q = np.array(bank.centroid), np.array(bank.size), np.array(bank.avg_quality)
      succ, cnt = np.array(bank.tier_success), np.array(bank.tier_count)
      now = jnp.int32(self.now())
      ids_j = jnp.asarray(ids)
      self._apply(lambda s: (s._replace(bank=patterns.record_access(s.bank, ids_j, now)), None))
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

  def metrics(self, now: float | None = None) -> metrics_lib.ImprovementMetrics:
    """The seed's `ImprovementMetrics` at Unix time `now` (the clock when None).

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> m = engine.metrics()
      >>> m.memory_nodes_added_7d, m.patterns_learned_7d  # nothing learnt yet
      (0, 0)
    """
    now = self.clock() if now is None else now
    with self._rw.read():
      return metrics_lib.improvement_metrics(self._state, self.cfg, int(now - self.time_origin))

  def stats(self, now: float | None = None) -> dict:
    """A JSON-serialisable summary: counters, buffers, graph, bank, schedule and metrics.

    Examples:
      >>> import json
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> _ = engine.add_memory([1.0, 0.0, 0.0, 0.0])
      >>> s = engine.stats()
      >>> s["graph"]["nodes"], s["graph"]["capacity"], s["schedule"]["cycles"]
      (1, 8, {'background': 0, 'deep': 0})
      >>> isinstance(json.dumps(s), str)  # JSON-serialisable
      True
    """
    now = self.clock() if now is None else now
    with self._rw.read():
      state = self._state
      summary = jax.tree.map(np.array, _summary(state))
      improvement = metrics_lib.improvement_metrics(state, self.cfg, int(now - self.time_origin))
      history = list(self.history)
    c, sig_meta, traj_meta = summary["counters"], summary["signals"], summary["trajectories"]
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
        "waiting": int(summary["signals_waiting"]),
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
        "nodes": int(summary["nodes"]),
        "capacity": self.cfg.graph_capacity,
        "edges": {
          name.lower(): int(summary["edges_by_kind"][i])
          for i, name in enumerate(graph_lib.EDGE_KINDS)
        },
      },
      "bank": {
        "patterns": int(summary["patterns"]),
        "capacity": self.cfg.bank_capacity,
        "by_level": {str(lv): int(n) for lv, n in enumerate(summary["patterns_by_level"]) if n > 0},
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
      "serving": {
        "batches": {str(k): v for k, v in sorted(self._batch_sizes.items())},
        "knobs": dataclasses.asdict(self._knobs),
      },
      "routing": {
        "routed": self._routed,
        "mean_cost": self._routed_cost / self._routed if self._routed else None,
        "mean_inverse_propensity": (
          self._routed_inverse_propensity / self._routed if self._routed else None
        ),
        "budget_cost_weight": self._budget_weight / max(max(self.cfg.tier_costs), 1e-9),
      },
      "memory_events": {"queued": len(self._events), "dropped": self._events_dropped},
      "improvement": improvement.to_dict(),
    }

  # --------------------------------------------------------------------------------- cycles

  def run_background(self, *, force: bool = True, now: float | None = None) -> BackgroundReport:
    """Loop B now; forced by default, so it runs below `min_samples` (with at least one signal).

    `now` is Unix seconds (the clock when None). It runs on a snapshot in the calling thread:
    other threads keep serving meanwhile (see `begin_background`).

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> for _ in range(3):
      ...   _ = engine.observe(sona.make_interaction(cfg, query=[1.0, 0.5, 0.0, 0.0], quality=0.9))
      >>> report = engine.run_background()
      >>> report.ran, report.n_signals, report.patterns_inserted
      (True, 3, 1)
      >>> engine.run_background().reason  # each signal is drained once
      '0 signals waiting, 1 needed'
    """
    return self._run_cycle("background", now, force=force)

  def run_deep(self, *, now: float | None = None):
    """Loop C now (`deep_step`): consolidation, abstraction, dreams, transfer, compression and
    the integration proxy, then a checkpoint when the driver has a directory.

    `now` is Unix seconds (the clock when None). Returns the `loops.deep.DeepReport`.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> ids = engine.add_memories([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.01, 0, 0]])
      >>> report = engine.run_deep()
      >>> report.compression.merged.tolist()  # the near-duplicate memory 2 is merged into 0
      [[2, 0]]
      >>> [(e.kind, e.id, e.into) for e in engine.memory_events()]
      [('merged', 2, 0)]
    """
    return self._run_cycle("deep", now)

  def _run_cycle(self, loop: str, now: float | None, *, force: bool = False):
    if not self._cycle_lock.acquire(blocking=False):
      raise RuntimeError(f"run_{loop}: a background cycle is running (begin_{loop})")
    try:
      now = self.clock() if now is None else now
      snapshot = self._begin_snapshot(loop, now, force)
      report = self._cycle_on_snapshot(loop, snapshot, now, force)
    finally:
      self._cycle_lock.release()
    return report

  def _begin_snapshot(self, loop: str, now: float, force: bool) -> SonaState:
    """Copies the state and starts the journal (cycle lock held)."""
    with self._rw.read():  # no transition between the copy and the journal's start
      snapshot = jax.tree.map(jnp.copy, self._state)  # Loop A donates the live arrays
      self._journal = []
      if self._transcript is not None:
        self._transcript.append(("cycle", loop, now, force))
    return snapshot

  def _cycle_on_snapshot(self, loop: str, snapshot: SonaState, now: float, force: bool):
    """Runs the cycle on `snapshot`, then swaps its result in with the journal replayed."""
    try:
      new_state, report, ran = self._cycle(loop, snapshot, now, force=force)
    except BaseException:  # keep serving on the live state; nothing half-applied
      with self._rw.write():
        self._journal = None
      _log.exception("sona_jax: Loop %s failed; the live state is unchanged", _NAMES[loop])
      raise
    events = []
    try:
      with self._rw.write():
        if ran:
          if loop == "deep":
            events = _merge_events(snapshot, report, float(self.clock()))
          state = new_state
          for op in self._journal:
            state, _ = op(state)
          self._state = state
        self._journal = None
        if ran:
          self._finish_cycle(loop, now, report)
    except BaseException:  # never leave the journal running
      with self._rw.write():
        self._journal = None
      _log.exception("sona_jax: Loop %s bookkeeping failed", _NAMES[loop])
      raise
    _log_report(loop, report)
    self._emit(events)
    return report

  def tick(self, now: float | None = None) -> dict:
    """Runs whichever loops are due (`due`) at Unix time `now` (the clock when None).

    Returns:
      `{"background": BackgroundReport | None, "deep": dict | None}` for the loops that were due.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> t = [1_000_000.0]  # a clock the example moves by hand
      >>> engine = sona.Sona(cfg, key=jax.random.key(0), clock=lambda: t[0])
      >>> engine.tick()  # nothing is due at the start
      {'background': None, 'deep': None}
      >>> t[0] += 3600  # an hour later Loop B is due; it skips itself, with too few signals
      >>> out = engine.tick()
      >>> out["background"].ran, out["background"].n_signals, out["deep"]
      (False, 0, None)
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

  def replay(self, state: SonaState) -> SonaState:
    """Recomputes the state from `state` (a copy of the initial one) by applying every recorded
    transition and cycle in the order the driver serialised them (needs `transcript=True`).

    The result equals the live state: each transition is the same jitted function on the same
    inputs. Used by the tests to check concurrent serving against its sequential order.

    Examples:
      >>> import jax, numpy as np, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0), transcript=True)
      >>> initial = engine.snapshot()
      >>> m = engine.add_memory([1.0, 0.0, 0.0, 0.0], quality=0.8)
      >>> _ = engine.observe(sona.make_interaction(cfg, query=[0.5, 0.5, 0.0, 0.0], quality=0.1,
      ...                                          used=[m]))
      >>> replayed, live = engine.replay(initial), engine.snapshot()
      >>> same = jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
      ...                     replayed, live)
      >>> all(jax.tree.leaves(same))  # bit for bit
      True
    """
    if self._transcript is None:
      raise ValueError("Sona.replay: this driver was built without transcript=True")
    with self._rw.read():
      entries = list(self._transcript)
    for entry in entries:
      if entry[0] == "op":
        state, _ = entry[1](state)
      else:
        _, loop, now, force = entry
        new_state, _, ran = self._cycle(loop, state, now, force=force)
        state = new_state if ran else state
    return state

  # ---------------------------------------------------------------------------- checkpoints

  def save(self) -> int:
    """Writes a checkpoint of the current state (async; `wait_checkpoints()` blocks on it).

    Returns:
      The checkpoint step.

    Raises:
      ValueError: the driver was built without a `checkpoint_dir`.

    Examples:
      >>> import tempfile
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> with tempfile.TemporaryDirectory() as d:
      ...   engine = sona.Sona(cfg, key=jax.random.key(0), checkpoint_dir=d)
      ...   _ = engine.add_memory([1.0, 0.0, 0.0, 0.0])
      ...   step = engine.save()
      ...   engine.wait_checkpoints()
      ...   restored = sona.Sona.restore(d)
      ...   int(restored.snapshot().graph.alive.sum())
      1
    """
    if self._checkpointer is None:
      raise ValueError("Sona.save: this driver has no checkpoint_dir")
    # The copy off the device sees no transition. Lock order: the state lock, then the save lock
    # (a cycle that finishes holds the state lock when it saves).
    with self._rw.read(), self._save_lock:
      last = self._checkpointer.latest_step()
      step = 0 if last is None else last + 1
      self._checkpointer.save(
        step,
        self._state,
        self.cfg,
        time_origin=self.time_origin,
        extra=self.schedule_extra(),
      )
    _log.info("sona_jax: checkpoint step %d saved to %s", step, self.checkpoint_dir)
    return step

  def schedule_extra(self) -> dict:
    """Driver state outside the pytree that a restore needs to continue exactly (saved in every
    checkpoint's metadata): the last Loop B and Loop C times and the route key and count.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> extra = engine.schedule_extra()
      >>> sorted(extra), extra["route_count"]
      (['last_background', 'last_deep', 'route_count', 'route_key'], 0)
    """
    return {
      "last_background": self.last_background,
      "last_deep": self.last_deep,
      "route_key": [int(v) for v in np.asarray(jax.random.key_data(self._route_key))],
      "route_count": self._route_count,
    }

  def wait_checkpoints(self) -> None:
    """Blocks until pending asynchronous checkpoint writes are on disk.

    Examples:
      >>> import os, tempfile
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> with tempfile.TemporaryDirectory() as d:
      ...   engine = sona.Sona(cfg, key=jax.random.key(0), checkpoint_dir=d)
      ...   step = engine.save()
      ...   engine.wait_checkpoints()  # the write is on disk now
      ...   len(os.listdir(d)) > 0
      True
    """
    if self._checkpointer is not None:
      with self._save_lock:
        self._checkpointer.wait()

  @classmethod
  def restore(cls, checkpoint_dir, *, cfg: SonaConfig | None = None, clock=None, **kwargs) -> Sona:
    """A driver from the newest good checkpoint in `checkpoint_dir` (see `checkpoint.Checkpointer`).

    Args:
      checkpoint_dir: the directory a `Sona(..., checkpoint_dir=...)` wrote.
      cfg: optional config; must agree with the saved one on every field that shapes the state.
      clock: the clock (Unix seconds), `time.time` by default.
      **kwargs: the driver's other keyword arguments (`batching`, `on_memory_event`, ...).

    Examples:
      >>> import tempfile
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> with tempfile.TemporaryDirectory() as d:
      ...   engine = sona.Sona(cfg, key=jax.random.key(0), checkpoint_dir=d)
      ...   m = engine.add_memory([0.0, 1.0, 0.0, 0.0])
      ...   _ = engine.observe(sona.make_interaction(cfg, query=[0.0, 1.0, 0.0, 0.0], quality=0.9))
      ...   _ = engine.save()
      ...   engine.wait_checkpoints()
      ...   restored = sona.Sona.restore(d)
      ...   restored.cfg == cfg, int(restored.snapshot().step), restored.add_memory([1.0, 0, 0, 0])
      (True, 1, 1)
    """
    from sona_jax.checkpoint import Checkpointer

    with Checkpointer(checkpoint_dir) as ck:
      state, cfg, meta = ck.restore(cfg)
    engine = cls(cfg, key=jax.random.key(0), checkpoint_dir=checkpoint_dir, clock=clock, **kwargs)
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

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> its = [sona.make_interaction(cfg, query=[1.0, 0.5, 0, 0], quality=0.9) for _ in range(3)]
      >>> reports = [engine.observe(it) for it in its[:2]]
      >>> future = engine.begin_background()  # on a snapshot: the two signals so far
      >>> _ = engine.observe(its[2])  # served meanwhile, replayed on the cycle's result
      >>> future.result().n_signals, int(engine.snapshot().step)
      (2, 3)
    """
    return self._begin_cycle("background", now, force=force)

  def begin_deep(self, *, now: float | None = None):
    """Starts Loop C on a snapshot in a thread, like `begin_background` (see there).

    Transitions made meanwhile are replayed on the restructured state; an observation naming a
    memory that compression merged away is then rejected by Loop A's validation and counted
    (`BAD_STALE`), never applied to a recycled slot. Merges are delivered as `MemoryEvent` records.

    Returns:
      A `concurrent.futures.Future` of the `DeepReport`.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> ids = engine.add_memories([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0.01, 0, 0]])
      >>> engine.begin_deep().result().compression.merged.tolist()  # memory 2 merged into 0
      [[2, 0]]
      >>> it = sona.make_interaction(cfg, query=[1.0, 0.0, 0.0, 0.0], quality=0.9, used=[ids[2]])
      >>> engine.observe(it).reason_names()  # naming the merged memory: rejected, counted
      ['BAD_STALE']
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
    """Bookkeeping after a cycle ran (write lock held): schedule, history, checkpoint."""
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
    if not self._cycle_lock.acquire(blocking=False):
      raise RuntimeError(f"begin_{loop}: a background cycle is already running")
    try:
      now = self.clock() if now is None else now
      snapshot = self._begin_snapshot(loop, now, force)
    except BaseException:
      self._cycle_lock.release()
      raise

    def work():
      try:
        report = self._cycle_on_snapshot(loop, snapshot, now, force)
      except BaseException as e:  # logged by _cycle_on_snapshot
        self._cycle_lock.release()
        future.set_exception(e)
        return
      self._cycle_lock.release()
      future.set_result(report)

    thread = threading.Thread(target=work, name=f"sona-loop-{_NAMES[loop]}", daemon=True)
    self._cycle_threads = [t for t in self._cycle_threads if t.is_alive()] + [thread]
    _STARTED.add(self)
    thread.start()
    return future

  def start(self, *, poll_s: float = 1.0) -> None:
    """Runs the schedule (`due`) on a worker thread: Loop B via `begin_background`, Loop C via
    `begin_deep`, each on a snapshot while Loop A keeps serving.

    Examples:
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.start(poll_s=0.01)
      >>> engine.start()
      Traceback (most recent call last):
      ...
      RuntimeError: Sona.start: already started
      >>> engine.stop(timeout=10)
    """
    if self._worker is not None and self._worker.is_alive():
      raise RuntimeError("Sona.start: already started")
    self._stop.clear()

    def loop():
      while not self._stop.is_set():
        now = self.clock()
        d = due(now, self.last_background, self.last_deep, self.cfg)
        for name, is_due in (("background", d.background), ("deep", d.deep)):
          if not is_due or self._stop.is_set():
            continue
          try:
            if name == "background":
              self.begin_background(force=False, now=now).result()
            else:
              self.begin_deep(now=now).result()
          except Exception:  # logged by the cycle (or a user's run_* holds the cycle lock)
            pass
        self._stop.wait(poll_s)

    self._worker = threading.Thread(target=loop, name="sona-schedule", daemon=True)
    self._worker.start()
    _STARTED.add(self)

  def stop(self, timeout: float | None = None) -> None:
    """Stops the schedule thread (a running cycle finishes first) and waits for checkpoints.

    With a `timeout` that runs out while a cycle is still running, it logs a warning and returns;
    the cycle finishes on its own (and at interpreter exit, the driver waits for it).

    Examples:
      >>> import threading
      >>> import jax, sona_jax as sona
      >>> cfg = sona.SonaConfig(dim=4, base_rank=4, graph_capacity=8, signal_capacity=8,
      ...                       trajectory_capacity=8)
      >>> engine = sona.Sona(cfg, key=jax.random.key(0))
      >>> engine.start(poll_s=0.01)
      >>> engine.stop(timeout=10)
      >>> engine.start(poll_s=0.01)  # stopped, so it starts again
      >>> engine.stop(timeout=10)
      >>> any(t.name == "sona-schedule" for t in threading.enumerate())  # the worker has ended
      False
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


@jax.jit
def _summary(state: SonaState) -> dict:
  """The small arrays `Sona.stats` reports, computed in one call (no large host copies)."""
  g = state.graph
  alive = g.alive
  has = (g.nbr >= 0) & alive[:, None]
  kinds = jnp.arange(len(graph_lib.EDGE_KINDS), dtype=jnp.int32)
  bank_alive = state.bank.alive
  level = state.bank.level
  levels = jnp.arange(16, dtype=level.dtype)
  return {
    "counters": state.metrics.counters,
    "signals": state.signals.meta,
    "trajectories": state.trajectories.meta,
    "signals_waiting": buffer.unread(state.signals),
    "nodes": jnp.sum(alive),
    "edges_by_kind": jnp.sum(has[None] & (g.kind[None] == kinds[:, None, None]), axis=(1, 2)),
    "patterns": jnp.sum(bank_alive),
    "patterns_by_level": jnp.sum(bank_alive[None] & (level[None] == levels[:, None]), axis=1),
  }


def _merge_events(before: SonaState, report, stamp: float) -> list[MemoryEvent]:
  """`MemoryEvent`s for Loop C's merges, in memory ids (`before` is the cycle's input)."""
  comp = getattr(report, "compression", None)
  merged = np.asarray(getattr(comp, "merged", np.zeros((0, 2), np.int32))).reshape(-1, 2)
  if merged.shape[0] == 0:
    return []
  ids = np.asarray(graph_lib.memory_ids(before.graph))
  into = {int(a): int(b) for a, b in merged}
  events = []
  for removed in merged[:, 0]:
    survivor = into[int(removed)]
    seen = {int(removed)}
    while survivor in into and survivor not in seen:  # merged again in a later round
      seen.add(survivor)
      survivor = into[survivor]
    events.append(MemoryEvent("merged", int(ids[removed]), int(ids[survivor]), stamp))
  return events
