"""Rolling daily metrics and `ImprovementMetrics` (docs/design.md, "Metrics and retention"; seed
section 6).

The state keeps 30 rolling daily bins (`DailyBins`): row `day % 30` holds the sums of day `day`
(days count from the time origin, `time // 86_400`). Loop B fills them from the signals it drains,
so every request Loop A recorded is counted exactly once and the per-request path pays nothing;
Loop B and Loop C add their own events (patterns learned, abstractions, novel connections,
transfers, the integration proxy, retention). A row is reset when a newer day claims it; a record
more than 30 days older than the newest day is outside the window and ignored.

Retention (seed: "forgetting resistance, 1.0 = no forgetting") is measured on a fixed probe set of
older signals (`Probe`, a ring buffer in the state): every Loop B cycle keeps a few of the signals
it learned from, with the router's features at that time and whether the freshly trained router
classified them correctly; later cycles re-evaluate the same probes. Retention is
`accuracy now / accuracy when learned` over the probes from earlier cycles (above 1 when the router
got better on them, NaN before there is any).

`improvement_metrics(state, cfg, now)` reads the bins, the graph and the bank into an
`ImprovementMetrics` with the seed's fields and `overall_score()`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import buffer, types

__all__ = [
  "N_DAYS",
  "DAY_S",
  "COLUMNS",
  "DailyBins",
  "init_daily",
  "record_signals",
  "record_event",
  "daily_table",
  "Probe",
  "init_probe",
  "probe_width",
  "pack_probe",
  "unpack_probe",
  "probe_update",
  "ImprovementMetrics",
  "improvement_metrics",
]

N_DAYS = 30
DAY_S = 86_400

# Columns of `DailyBins.bins` (tier counts follow, one per tier).
COLUMNS = (
  "requests",  # signals recorded that day
  "quality_sum",  # sum of learning quality
  "latency_sum",  # sum of latency / target latency
  "cost_sum",  # sum of cfg.tier_costs[tier]
  "successes",  # signals with quality >= cfg.success_threshold
  "patterns",  # patterns Loop B inserted into the bank (new slots)
  "abstractions",  # meta-patterns Loop C created
  "novel",  # CREATIVE edges Loop C added
  "transfers",  # ANALOGY edges Loop C added
  "phi",  # the last integration proxy measured that day (NaN none)
  "retention",  # the last retention measured that day (NaN none)
)
(
  REQUESTS,
  QUALITY_SUM,
  LATENCY_SUM,
  COST_SUM,
  SUCCESSES,
  PATTERNS,
  ABSTRACTIONS,
  NOVEL,
  TRANSFERS,
  PHI,
  RETENTION,
) = range(len(COLUMNS))
_LAST_VALUE = (PHI, RETENTION)  # columns that hold a last value, not a sum


class DailyBins(NamedTuple):
  """Rolling daily sums.

  Attributes:
    day: i32[30] the day each row holds (-1 empty).
    bins: f32[30, len(COLUMNS) + n_tiers] the sums (`COLUMNS`, then requests per tier).
  """

  day: jax.Array
  bins: jax.Array


def _empty_rows(n: int, width: int) -> jax.Array:
  rows = jnp.zeros((n, width), jnp.float32)
  return rows.at[:, list(_LAST_VALUE)].set(jnp.nan)


def init_daily(n_tiers: int) -> DailyBins:
  """Empty bins for `n_tiers` tiers."""
  return DailyBins(
    day=jnp.full((N_DAYS,), -1, jnp.int32), bins=_empty_rows(N_DAYS, len(COLUMNS) + n_tiers)
  )


def _claim(daily: DailyBins, days: jax.Array, valid: jax.Array):
  """Resets the rows that newer days claim; returns `(daily, slot, keep)` for each record."""
  slot = jnp.mod(days, N_DAYS)
  newest = jax.ops.segment_max(jnp.where(valid, days, -1), slot, num_segments=N_DAYS)
  newer = newest > daily.day
  bins = jnp.where(newer[:, None], _empty_rows(N_DAYS, daily.bins.shape[1]), daily.bins)
  day = jnp.where(newer, newest, daily.day)
  # Records more than 30 days older than the newest day are outside the window: ignored.
  keep = valid & (days == day[slot]) & (days > jnp.max(day) - N_DAYS)
  return DailyBins(day=day, bins=bins), slot, keep


@functools.partial(jax.jit, static_argnames=("cfg",))
def record_signals(daily: DailyBins, rows, mask, cfg) -> DailyBins:
  """Adds drained signals (packed rows `f32[n, W]`, `mask bool[n]`) to their days' bins.

  Args:
    daily: the bins.
    rows: packed signal rows (`types.unpack_signals` layout).
    mask: which rows are real signals.
    cfg: the config (static): `tier_costs` and `success_threshold`.

  Returns:
    The new bins.
  """
  n_tiers = cfg.n_tiers
  sig = types.unpack_signals(rows, cfg)
  days = jnp.floor_divide(sig.time, DAY_S)
  valid = mask & (sig.time >= 0)
  daily, slot, keep = _claim(daily, days, valid)
  tier = jnp.clip(sig.tier, 0, n_tiers - 1)
  cost = jnp.asarray(cfg.tier_costs, jnp.float32)[tier]
  w = keep.astype(jnp.float32)
  vals = jnp.zeros((rows.shape[0], daily.bins.shape[1]), jnp.float32)
  vals = vals.at[:, REQUESTS].set(w)
  vals = vals.at[:, QUALITY_SUM].set(w * sig.quality)
  vals = vals.at[:, LATENCY_SUM].set(w * sig.latency_ratio)
  vals = vals.at[:, COST_SUM].set(w * cost)
  vals = vals.at[:, SUCCESSES].set(w * (sig.quality >= cfg.success_threshold).astype(jnp.float32))
  tier_hot = jax.nn.one_hot(tier, n_tiers, dtype=jnp.float32) * w[:, None]
  vals = vals.at[:, len(COLUMNS) :].set(tier_hot)
  vals = jnp.where(jnp.isfinite(vals), vals, 0.0)
  added = jax.ops.segment_sum(vals, slot, num_segments=N_DAYS)
  added = added.at[:, list(_LAST_VALUE)].set(0.0)
  return daily._replace(bins=daily.bins + added)


@functools.partial(jax.jit, static_argnames=("column",))
def record_event(daily: DailyBins, now, column: int, value) -> DailyBins:
  """Adds `value` to `column` of day `now // 86400` (or sets it, for `phi` and `retention`)."""
  now = jnp.asarray(now, jnp.int32)
  days = jnp.floor_divide(now, DAY_S)[None]
  daily, slot, keep = _claim(daily, days, jnp.ones((1,), bool))
  value = jnp.asarray(value, jnp.float32)
  cur = daily.bins[slot[0], column]
  new = value if column in _LAST_VALUE else cur + value
  new = jnp.where(keep[0], new, cur)
  return daily._replace(bins=daily.bins.at[slot[0], column].set(new))


def daily_table(daily: DailyBins) -> list[dict]:
  """The bins as host rows, oldest day first: `{"day", "requests", "quality", "latency", "cost",
  "success_rate", "tier_share": [...], ...}` (means per request; events as counts)."""
  day = np.asarray(daily.day)
  bins = np.asarray(daily.bins, np.float64)
  out = []
  for i in np.argsort(day):
    if day[i] < 0 or day[i] <= day.max() - N_DAYS:  # empty, or a stale row not yet reclaimed
      continue
    b = bins[i]
    n = b[REQUESTS]
    mean = lambda s, n=n: float(s / n) if n > 0 else float("nan")  # noqa: E731
    out.append(
      {
        "day": int(day[i]),
        "requests": int(n),
        "quality": mean(b[QUALITY_SUM]),
        "latency_ratio": mean(b[LATENCY_SUM]),
        "cost": mean(b[COST_SUM]),
        "success_rate": mean(b[SUCCESSES]),
        "tier_share": [mean(x) for x in b[len(COLUMNS) :]],
        "patterns": int(b[PATTERNS]),
        "abstractions": int(b[ABSTRACTIONS]),
        "novel_connections": int(b[NOVEL]),
        "transfers": int(b[TRANSFERS]),
        "phi": float(b[PHI]),
        "retention": float(b[RETENTION]),
      }
    )
  return out


# ------------------------------------------------------------------------------ retention probe


class Probe(NamedTuple):
  """A probe record, unpacked (leading record axis).

  Attributes:
    features: f32[n, F] the router features of the signal when it was learned.
    tier: i32[n] the tier that served it.
    success: f32[n] its label (1 success, 0 failure).
    correct_then: f32[n] 1 when the router trained in that cycle classified it correctly.
    cycle: i32[n] the Loop B cycle time (seconds since the origin) it was learned in.
  """

  features: jax.Array
  tier: jax.Array
  success: jax.Array
  correct_then: jax.Array
  cycle: jax.Array


def probe_width(n_features: int) -> int:
  """Packed width of a probe record."""
  return n_features + 4


def init_probe(n_features: int, capacity: int) -> buffer.RingBuffer:
  """An empty probe ring of `capacity` records."""
  return buffer.init_buffer(jax.ShapeDtypeStruct((probe_width(n_features),), jnp.float32), capacity)


def pack_probe(p: Probe) -> jax.Array:
  """Packs probe records into `f32[n, F + 4]` rows (ints bitcast)."""
  i2f = lambda x: jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.float32)  # noqa: E731
  return jnp.concatenate(
    [
      p.features,
      i2f(p.tier)[:, None],
      p.success[:, None],
      p.correct_then[:, None],
      i2f(p.cycle)[:, None],
    ],
    axis=1,
  )


def unpack_probe(rows: jax.Array) -> Probe:
  """Inverse of `pack_probe`."""
  f2i = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)  # noqa: E731
  return Probe(
    features=rows[:, :-4],
    tier=f2i(rows[:, -4]),
    success=rows[:, -3],
    correct_then=rows[:, -2],
    cycle=f2i(rows[:, -1]),
  )


def _correct(params, apply_fn, features, tier, success) -> jax.Array:
  """1.0 where the router's success prediction on the served tier matches the label."""
  logits = jax.vmap(apply_fn, in_axes=(None, 0))(params, features[:, None, :])
  served = jnp.take_along_axis(logits, tier[:, None], axis=1)[:, 0]
  return ((served >= 0.0) == (success >= 0.5)).astype(jnp.float32)


def probe_update(probe, params, apply_fn, features, tier, success, mask, key, now, per_cycle: int):
  """Measures retention on the probe set, then adds this cycle's probes.

  Call it right after the router was trained on this cycle's signals (inside a jit; `apply_fn`
  and `per_cycle` static).

  Args:
    probe: the probe ring buffer.
    params: the router parameters just trained.
    apply_fn: `apply_fn(params, f32[T, F]) -> f32[n_tiers]` success logits.
    features: f32[n, F] router features of this cycle's signals.
    tier: i32[n] served tiers.
    success: f32[n] labels.
    mask: bool[n] which rows are real signals.
    key: PRNG key choosing the new probes among the real signals.
    now: the cycle time.
    per_cycle: number of new probes.

  Returns:
    `(probe, retention, n_probes)`: retention = accuracy now / accuracy when learned over the probes
    of earlier cycles (NaN when there are none or none was right when learned).
  """
  cap = buffer.capacity(probe)
  rows = probe.data
  held = jnp.arange(cap) < probe.meta[buffer.SIZE]
  p = unpack_probe(rows)
  correct_now = _correct(params, apply_fn, p.features, jnp.maximum(p.tier, 0), p.success)
  w = held.astype(jnp.float32)
  then = jnp.sum(w * p.correct_then)
  retention = jnp.where(then > 0, jnp.sum(w * correct_now) / jnp.maximum(then, 1.0), jnp.nan)
  if per_cycle > 0:
    n = features.shape[0]
    # Distinct real signals, in a random order (Gumbel top-k over the mask).
    g = jax.random.gumbel(key, (n,)) + jnp.where(mask, 0.0, -jnp.inf)
    _, idx = jax.lax.top_k(g, min(per_cycle, n))
    real = mask[idx]
    ok = _correct(params, apply_fn, features[idx], tier[idx], success[idx])
    new = Probe(
      features=features[idx],
      tier=tier[idx],
      success=success[idx],
      correct_then=ok,
      cycle=jnp.full(idx.shape, now, jnp.int32),
    )
    probe = buffer.push_many(probe, pack_probe(new), where=real)
  return probe, retention, jnp.sum(held)


# --------------------------------------------------------------------------- ImprovementMetrics


@dataclasses.dataclass(frozen=True)
class ImprovementMetrics:
  """The seed's improvement metrics (section 6), from the state's daily bins, graph and bank.

  Deltas compare the newest day with data against the oldest day with data inside the window
  (7 or 30 days, the newest day included): quality deltas are absolute (quality is in [0, 1]),
  latency deltas relative (`newest / oldest - 1`, of latency over target latency; negative is
  better). With data on a single day the deltas are 0. Counts cover the last 7 days.

  Attributes:
    quality_delta_7d, quality_delta_30d: change of mean learning quality.
    latency_delta_7d, latency_delta_30d: relative change of mean latency / target latency.
    cost_delta_7d: relative change of mean tier cost per request (not in the seed; routing's gain).
    memory_nodes_added_7d: alive memory nodes created in the last 7 days.
    patterns_learned_7d: patterns Loop B inserted into the bank in the last 7 days.
    abstractions_created_7d: meta-patterns Loop C created in the last 7 days.
    retention_rate_7d: the newest retention within 7 days (1.0 = no forgetting; NaN: none yet).
    phi_current: the newest integration proxy (Phi_AR, not IIT's Phi; NaN: never measured).
    phi_delta_7d: its change against the oldest value within 7 days.
    novel_connections_7d: CREATIVE edges Loop C added in the last 7 days.
    cross_domain_transfers_7d: ANALOGY edges Loop C added in the last 7 days.
  """

  quality_delta_7d: float
  quality_delta_30d: float
  latency_delta_7d: float
  latency_delta_30d: float
  cost_delta_7d: float
  memory_nodes_added_7d: int
  patterns_learned_7d: int
  abstractions_created_7d: int
  retention_rate_7d: float
  phi_current: float
  phi_delta_7d: float
  novel_connections_7d: int
  cross_domain_transfers_7d: int

  def overall_score(self) -> float:
    """The seed's weighted score: 0.3 quality + 0.2 latency + 0.2 knowledge + 0.15 retention +
    0.15 creativity, each term as in the seed (`max(delta, 0)`, `min(patterns / 100, 1)`,
    retention clipped to [0, 1], `min(novel / 50, 1)`); undefined terms (NaN) count as 0."""
    z = lambda x: 0.0 if not math.isfinite(x) else float(x)  # noqa: E731
    quality = max(z(self.quality_delta_7d), 0.0)
    latency = max(-z(self.latency_delta_7d), 0.0)
    knowledge = min(self.patterns_learned_7d / 100.0, 1.0)
    retention = min(max(z(self.retention_rate_7d), 0.0), 1.0)
    creativity = min(self.novel_connections_7d / 50.0, 1.0)
    return 0.3 * quality + 0.2 * latency + 0.2 * knowledge + 0.15 * retention + 0.15 * creativity

  def to_dict(self) -> dict:
    """JSON-serialisable (NaN becomes None) with `overall_score` added."""
    d = {
      k: (None if isinstance(v, float) and not math.isfinite(v) else v)
      for k, v in dataclasses.asdict(self).items()
    }
    d["overall_score"] = self.overall_score()
    return d


def _window(rows: list[dict], today: int, days: int) -> list[dict]:
  return [r for r in rows if today - days < r["day"] <= today]


def _delta(rows: list[dict], key: str, *, relative: bool) -> float:
  vals = [r[key] for r in rows if math.isfinite(r[key])]
  if len(vals) < 2:
    return 0.0 if vals else float("nan")
  first, last = vals[0], vals[-1]
  if relative:
    return last / first - 1.0 if first > 0 else float("nan")
  return last - first


def improvement_metrics(state, cfg, now) -> ImprovementMetrics:
  """`ImprovementMetrics` at time `now` (int seconds since the origin) from a `SonaState`."""
  now = int(now)
  today = now // DAY_S
  rows = daily_table(state.metrics.daily)
  w7, w30 = _window(rows, today, 7), _window(rows, today, 30)
  served7 = [r for r in w7 if r["requests"] > 0]
  served30 = [r for r in w30 if r["requests"] > 0]
  last = lambda rs, k: next((r[k] for r in reversed(rs) if math.isfinite(r[k])), float("nan"))  # noqa: E731
  g = state.graph
  created = np.asarray(g.created)
  alive = np.asarray(g.alive)
  phi7 = [r for r in w7 if math.isfinite(r["phi"])]
  return ImprovementMetrics(
    quality_delta_7d=_delta(served7, "quality", relative=False),
    quality_delta_30d=_delta(served30, "quality", relative=False),
    latency_delta_7d=_delta(served7, "latency_ratio", relative=True),
    latency_delta_30d=_delta(served30, "latency_ratio", relative=True),
    cost_delta_7d=_delta(served7, "cost", relative=True),
    memory_nodes_added_7d=int(np.sum(alive & (created > now - 7 * DAY_S))),
    patterns_learned_7d=int(sum(r["patterns"] for r in w7)),
    abstractions_created_7d=int(sum(r["abstractions"] for r in w7)),
    retention_rate_7d=last(w7, "retention"),
    phi_current=last(rows, "phi"),
    phi_delta_7d=(phi7[-1]["phi"] - phi7[0]["phi"]) if phi7 else float("nan"),
    novel_connections_7d=int(sum(r["novel_connections"] for r in w7)),
    cross_domain_transfers_7d=int(sum(r["transfers"] for r in w7)),
  )
