"""Loop B: the hourly background cycle (docs/design.md, "Loop B"; seed section 3).

`background_step(state, cfg, now)` drains the learning signals Loop A pushed since the last cycle
(each signal is consumed exactly once: the ring buffer's read cursor moves past it), then:

1. consolidates the micro-LoRA into the base LoRA (`lora.consolidate`, weight space, rate from the
   mean signal quality) and resets the micro-LoRA;
2. trains the FastGRNN router on the signals with the EWC++ penalty (`router.router_step`, optax);
3. updates the EWC++ Fisher and anchor from per-sample gradients at the trained parameters;
4. extracts patterns with spherical k-means++ and merges them into the ReasoningBank.

Each phase is a public pure function of this module (`drain_signals`, `mean_quality`,
`consolidate_micro`, `row_features`, `train_router`, `fisher_step`, `extract_patterns`,
`update_metrics`). `cycle_phases` jits them (each on its own, so the cycle reports a wall time
per phase) and `run_cycle` is the one sequencer that runs them, for every way Loop B runs:

- one learner on one device (`background_step`);
- many tenants at once (`tenants.background_step_tenants`: `cycle_phases(cfg, vmapped=True)`);
- one learner data-parallel over a mesh (`sharding.background_step_sharded`: a `Placement` whose
  sharding constraints split the per-signal arrays over the devices).

Below `cfg.min_samples` waiting signals a scheduled cycle is skipped with a report saying why (the
peer refuses silently); `force=True` runs it with any number of signals (at least one).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sona_jax import buffer, ewc, lora, metrics, patterns, router, types
from sona_jax.config import SonaConfig
from sona_jax.state import SonaState, router_apply, router_optimizer

__all__ = [
  "ONE_DEVICE",
  "BackgroundReport",
  "CyclePhases",
  "CycleResult",
  "Placement",
  "background_cycle",
  "background_step",
  "consolidate_micro",
  "cycle_keys",
  "cycle_phases",
  "drain_signals",
  "extract_patterns",
  "fisher_step",
  "make_report",
  "mean_quality",
  "router_loss",
  "row_features",
  "run_cycle",
  "signal_features",
  "signal_labels",
  "skip_reason",
  "to_host",
  "train_router",
  "update_metrics",
]


class BackgroundReport(NamedTuple):
  """What a Loop B cycle did (host values).

  Attributes:
    ran: whether the cycle ran.
    reason: why it did not run ("" when it ran).
    n_signals: signals drained (waiting signals when skipped).
    missed: signals overwritten in the ring before this cycle could drain them.
    mean_quality: mean learning quality of the drained signals.
    consolidation_rate: the rate the micro-LoRA was added into the base with.
    router_loss_before: router loss on the drained signals before training.
    router_loss_after: the same after training.
    patterns_merged: new patterns merged into existing ones.
    patterns_inserted: new patterns given a slot of their own.
    patterns_evicted: slots evicted to make room (their ids are in `evicted_ids`).
    evicted_ids: the evicted pattern slots.
    retention: router accuracy now / when learned on the probes of earlier cycles (NaN: none).
    n_probes: probes it was measured on.
    seconds: wall time per phase (`drain`, `consolidate`, `router`, `fisher`, `patterns`,
      `metrics`, `total`).
  """

  ran: bool
  reason: str
  n_signals: int
  missed: int = 0
  mean_quality: float = float("nan")
  consolidation_rate: float = float("nan")
  router_loss_before: float = float("nan")
  router_loss_after: float = float("nan")
  patterns_merged: int = 0
  patterns_inserted: int = 0
  patterns_evicted: int = 0
  evicted_ids: tuple[int, ...] = ()
  retention: float = float("nan")
  n_probes: int = 0
  seconds: dict[str, float] | None = None


# ------------------------------------------------------------------------------- placement


def _same(x):
  return x


class Placement(NamedTuple):
  """Where the cycle's arrays live: the sharding hook of `cycle_phases`.

  Each field maps a pytree to the same pytree with a layout constraint (inside jit, e.g.
  `jax.lax.with_sharding_constraint`); `ONE_DEVICE` leaves every array where it is.

  Attributes:
    rows: per-signal arrays (leading axis: the drained ring rows or the Fisher samples).
    batches: router mini-batches `[steps, batch, ...]` (the batch axis is the second).
    whole: the state parts and scalars a phase returns (replicated on a mesh).
  """

  rows: Callable[[Any], Any] = _same
  batches: Callable[[Any], Any] = _same
  whole: Callable[[Any], Any] = _same


ONE_DEVICE = Placement()


def to_host(x) -> np.ndarray:
  """A device array as a host NumPy array, also when its shards live in several processes
  (`process_allgather`: every process gets the whole array).

  Examples:
    >>> import jax.numpy as jnp
    >>> h = to_host(jnp.arange(3))
    >>> type(h).__name__, h.tolist()
    ('ndarray', [0, 1, 2])
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ---------------------------------------------------------------------------------- phases


def signal_features(sig: types.Signal, bank: patterns.Bank, router_proj, cfg: SonaConfig):
  """Router features `f32[n, 1, F]` of drained signals (T = 1: a single request each).

  The projected query, log context tokens, latency ratio, and the per-tier success rates of the
  nearest pattern in the bank (NaN, read as 0.5 by `router_features`, when it has no record).

  Examples:
    >>> import jax, sona_jax as sona
    >>> from sona_jax import buffer, types
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> it = sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9, latency_ms=200.0,
    ...                            target_latency_ms=100.0, context_tokens=0, time=0)
    >>> state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained signals, padded to capacity
    >>> feats = signal_features(types.unpack_signals(rows, cfg), state.bank, state.router_proj, cfg)
    >>> feats.shape == (cfg.signal_capacity, 1, cfg.router_proj_dim + 2 + cfg.n_tiers)
    True
    >>> p = cfg.router_proj_dim  # after the projected query: log1p(tokens), latency ratio, rates
    >>> feats[0, 0, p:].tolist()  # an empty bank: no pattern record, so each rate reads 0.5
    [0.0, 2.0, 0.5, 0.5, 0.5]
  """
  q = sig.query
  ids, _ = patterns.find_patterns(bank, q, 1)
  pid = jnp.clip(ids[:, 0], 0, bank.capacity - 1)
  succ, cnt = bank.tier_success[pid], bank.tier_count[pid]
  rates = jnp.where((ids[:, :1] >= 0) & (cnt > 0), succ / jnp.maximum(cnt, 1e-9), jnp.nan)
  feats = router.router_features(q @ router_proj, sig.context_tokens, sig.latency_ratio, rates)
  return feats[:, None, :]


def signal_labels(sig: types.Signal, cfg: SonaConfig):
  """The router's training labels of signals: `(tier i32[n], success f32[n])`, success meaning
  quality at least `cfg.success_threshold`.

  Examples:
    >>> import jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import types
    >>> cfg = sona.SonaConfig(dim=8)  # success_threshold 0.5, three tiers
    >>> sig = types.unpack_signals(jnp.zeros((3, types.signal_width(cfg))), cfg)
    >>> sig = sig._replace(quality=jnp.array([0.9, 0.5, 0.2]), tier=jnp.array([0, 1, 7]))
    >>> tier, success = signal_labels(sig, cfg)
    >>> tier.tolist(), success.tolist()  # tier 7 clipped to the last tier
    ([0, 1, 2], [1.0, 1.0, 0.0])
  """
  success = (sig.quality >= cfg.success_threshold).astype(jnp.float32)
  tier = jnp.clip(sig.tier, 0, cfg.n_tiers - 1)
  return tier, success


def router_loss(params, feats, tier, success, weight, cfg: SonaConfig):
  """Weighted mean binary cross-entropy of the router's logit for the tier each request was
  served by against its success (the loss `train_router` minimises).

  Args:
    params: router parameters.
    feats: f32[n, T, F] features.
    tier: i32[n] served tiers.
    success: f32[n] 1 when the request succeeded.
    weight: f32[n] per-request weight (0 for padding).
    cfg: the config.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> feats = row_features(rows, state.bank, state.router_proj, cfg)
    >>> from sona_jax import types
    >>> tier, success = signal_labels(types.unpack_signals(rows, cfg), cfg)
    >>> w = mask.astype(jnp.float32)
    >>> loss = router_loss(state.router.params, feats, tier, success, w, cfg)
    >>> loss.shape, bool(loss > 0)
    ((), True)
    >>> bool(jnp.allclose(router_loss(state.router.params, feats, tier, success, 3 * w, cfg), loss))
    True
    >>> float(router_loss(state.router.params, feats, tier, success, 0 * w, cfg))  # no weight
    0.0
  """
  logits = jax.vmap(router_apply(cfg), in_axes=(None, 0))(params, feats)
  served = jnp.take_along_axis(logits, tier[:, None], axis=1)[:, 0]
  per = optax.sigmoid_binary_cross_entropy(served, success)
  return jnp.sum(weight * per) / jnp.maximum(jnp.sum(weight), 1e-6)


def cycle_keys(key_data):
  """The cycle's keys from the state's key data: `(next key data, k_router, k_fisher,
  k_patterns, k_probe)`.

  Examples:
    >>> import jax
    >>> kd = jax.random.key_data(jax.random.key(0))
    >>> next_kd, *ks = cycle_keys(kd)
    >>> next_kd.shape == kd.shape, bool((next_kd != kd).any()), len(ks)
    (True, True, 4)
    >>> len({tuple(jax.random.key_data(k).tolist()) for k in ks})  # four distinct keys
    4
  """
  key = jax.random.wrap_key_data(key_data)
  key, *ks = jax.random.split(key, 5)
  return jax.random.key_data(key), *ks


def drain_signals(signals: buffer.RingBuffer, cfg: SonaConfig):
  """Consumes every waiting signal: `(signals, rows f32[cap, W], mask bool[cap], missed)`, with
  `missed` the signals overwritten before they could be drained.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> signals, rows, mask, missed = drain_signals(state.signals, cfg)
    >>> rows.shape == (cfg.signal_capacity, sona.types.signal_width(cfg))
    True
    >>> int(mask.sum()), int(missed), int(buffer.unread(signals))  # all four taken, none left
    (4, 0, 0)
  """
  del cfg  # the ring's shapes carry everything; kept for the phases' common signature
  missed = buffer.since(signals, signals.meta[buffer.READ])[3]
  signals, rows, mask = buffer.consume(signals)
  return signals, rows, mask, missed


def mean_quality(rows, mask, cfg: SonaConfig):
  """Mean learning quality of the drained signals and their number: `(f32, i32)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> q, n = mean_quality(rows, mask, cfg)  # (0.9 + 0.9 + 0.1 + 0.1) / 4, padding ignored
    >>> round(float(q), 4), int(n)
    (0.5, 4)
  """
  sig = types.unpack_signals(rows, cfg)
  n = jnp.sum(mask.astype(jnp.int32))
  q = jnp.sum(jnp.where(mask, sig.quality, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32)
  return q, n


def consolidate_micro(base, micro, mean_q, cfg: SonaConfig):
  """Phase 1: the micro-LoRA added into the base at `lora.consolidation_rate(mean_q)`, then
  reset: `(base, micro, rate)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> micro = state.micro._replace(b=state.micro.b + 1.0)  # a micro-LoRA that learned something
    >>> base, micro, rate = consolidate_micro(state.base, micro, 0.5, cfg)
    >>> float(rate), float(abs(micro.b).sum())  # rate 0.5 * 0.5; the micro-LoRA is reset
    (0.25, 0.0)
    >>> bool(abs(base.b).sum() > abs(state.base.b).sum())  # folded into the base
    True
  """
  rate = lora.consolidation_rate(mean_q)
  base, micro = lora.consolidate(
    base, micro, rate, base_scale=cfg.base_scale, micro_scale=cfg.micro_scale
  )
  return base, micro, rate


def row_features(rows, bank: patterns.Bank, router_proj, cfg: SonaConfig):
  """`signal_features` of packed signal rows.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> feats = row_features(rows, state.bank, state.router_proj, cfg)
    >>> feats.shape == (cfg.signal_capacity, 1, cfg.router_proj_dim + 2 + cfg.n_tiers)
    True
  """
  return signal_features(types.unpack_signals(rows, cfg), bank, router_proj, cfg)


def train_router(
  rstate, ewc_state, feats, sig_rows, mask, cfg: SonaConfig, key, place: Placement = ONE_DEVICE
):
  """Phase 2: `cfg.router_steps` EWC++-regularised optax steps of the router on mini-batches
  drawn from the drained signals: `(router state, loss before, loss after)`.

  With a `place.batches` hook the mini-batches are gathered whole before the scan (they are
  small: `[batch, F]` features) so that the hook can split each one over devices; the gradient of
  the batch mean then becomes a local sum plus an all-reduce. Without one, each step gathers its
  own mini-batch: under `vmap` over tenants, gathering them all first would materialise
  `[tenants, steps, batch, F]` (measured 1.4x slower at 64 tenants).

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> feats = row_features(rows, state.bank, state.router_proj, cfg)
    >>> rstate, before, after = train_router(state.router, state.ewc, feats, rows, mask, cfg,
    ...                                      jax.random.key(1))
    >>> bool(after < before)  # two optax steps lower the loss on the drained signals
    True
    >>> jax.tree.structure(rstate.params) == jax.tree.structure(state.router.params)
    True
  """
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = signal_labels(sig, cfg)
  weight = mask.astype(jnp.float32)
  loss_before = router_loss(rstate.params, feats, tier, success, weight, cfg)
  optimizer = router_optimizer(cfg)
  # The current Fisher and anchor go into the EWC++ transform's state (never its closure).
  rstate = rstate._replace(opt_state=ewc.with_ewc(rstate.opt_state, ewc_state))
  n = feats.shape[0]
  p = weight / jnp.maximum(jnp.sum(weight), 1.0)
  idx = jax.random.choice(key, n, (max(cfg.router_steps, 1), cfg.router_batch), p=p)
  gather_first = place.batches is not _same
  batches = idx
  if gather_first:
    batches = place.batches((feats[idx], tier[idx], success[idx], weight[idx]))

  def one(rs, b):
    if not gather_first:
      b = (feats[b], tier[b], success[b], weight[b])
    # optax's Adam mixes int and float scalars; keep it working under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
      rs, loss = router.router_step(rs, router_apply(cfg), optimizer, *b)
    return place.whole(rs), loss

  if cfg.router_steps > 0:
    rstate, _ = jax.lax.scan(one, rstate, batches)
  loss_after = router_loss(rstate.params, feats, tier, success, weight, cfg)
  return rstate, loss_before, loss_after


def fisher_step(
  ewc_state, params, feats, sig_rows, mask, cfg: SonaConfig, key, place: Placement = ONE_DEVICE
):
  """Phase 3: the EWC++ Fisher and anchor updated (`ewc.ewc_step`) from the per-sample gradients
  of `cfg.fisher_samples` signals drawn from the drained ones at the trained `params`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> feats = row_features(rows, state.bank, state.router_proj, cfg)
    >>> e = fisher_step(state.ewc, state.router.params, feats, rows, mask, cfg, jax.random.key(1))
    >>> int(e.count) - int(state.ewc.count)  # one EWC++ update folded in
    1
    >>> all(bool((f >= 0).all()) for f in jax.tree.leaves(e.fisher))  # a diagonal Fisher
    True
  """
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = signal_labels(sig, cfg)
  n = feats.shape[0]
  weight = mask.astype(jnp.float32)
  p = weight / jnp.maximum(jnp.sum(weight), 1.0)
  # Sampled with replacement from the drained signals only (padding has probability 0).
  idx = jax.random.choice(key, n, (cfg.fisher_samples,), p=p)
  if place.rows is _same:  # gather per sample (cheaper under vmap over tenants, see above)

    def one_loss(prm, i):
      return router_loss(prm, feats[i][None], tier[i][None], success[i][None], jnp.ones((1,)), cfg)

    grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0))(params, idx)
  else:  # gathered first, so that the hook can split the samples over devices

    def one_loss(prm, f, t, s):
      return router_loss(prm, f[None], t[None], s[None], jnp.ones((1,)), cfg)

    samples = place.rows((feats[idx], tier[idx], success[idx]))
    grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0, 0))(params, *samples)
  return ewc.ewc_step(ewc_state, grads, params, alpha=cfg.ewc_alpha)


def extract_patterns(bank: patterns.Bank, sig_rows, mask, cfg: SonaConfig, key, now):
  """Phase 4: spherical k-means++ over the drained queries, merged into the ReasoningBank:
  `(bank, patterns.MergeReport)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> bank, rep = extract_patterns(state.bank, rows, mask, cfg, jax.random.key(1), 3600)
    >>> n_new = int(rep.n_merged) + int(rep.n_inserted)
    >>> 0 < n_new <= cfg.pattern_clusters, int(rep.n_evicted)  # an empty bank evicts nothing
    (True, 0)
  """
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = signal_labels(sig, cfg)
  weights = mask.astype(jnp.float32)
  k = min(cfg.pattern_clusters, sig_rows.shape[0])
  km = patterns.kmeans_pp(key, sig.query, k, weights=weights)
  stats = patterns.pattern_stats(
    sig.query, km.labels, k, sig.quality, tier, success, cfg.n_tiers, weights=weights
  )
  return patterns.merge_patterns(
    bank,
    km.centroids,
    stats.size,
    stats.avg_quality,
    stats.tier_success,
    stats.tier_count,
    stats.size > 0,
    now=now,
    merge_threshold=cfg.pattern_merge_threshold,
    half_life_s=cfg.recency_half_life_s,
  )


def update_metrics(mstate, params, feats, sig_rows, mask, cfg: SonaConfig, key, now, n_inserted):
  """Daily bins from the drained signals, retention on the probe set, new probes, patterns:
  `(metrics state, retention, n_probes)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> _, rows, mask = buffer.consume(state.signals)  # the drained rows, padded to capacity
    >>> feats = row_features(rows, state.bank, state.router_proj, cfg)
    >>> m, retention, n_probes = update_metrics(state.metrics, state.router.params, feats, rows,
    ...                                         mask, cfg, jax.random.key(1), 3600, jnp.int32(2))
    >>> bool(jnp.isnan(retention)), int(n_probes)  # no probes from earlier cycles to measure on
    (True, 0)
  """
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = signal_labels(sig, cfg)
  daily = metrics.record_signals(mstate.daily, sig_rows, mask, cfg)
  probe, retention, n_probes = metrics.probe_update(
    mstate.probe,
    params,
    router_apply(cfg),
    feats[:, 0, :],
    tier,
    success,
    mask,
    key,
    now,
    cfg.probe_per_cycle,
  )
  daily = metrics.record_event(daily, now, metrics.PATTERNS, n_inserted.astype(jnp.float32))
  daily = jax.lax.cond(
    jnp.isfinite(retention),
    lambda d: metrics.record_event(d, now, metrics.RETENTION, retention),
    lambda d: d,
    daily,
  )
  return mstate._replace(daily=daily, probe=probe), retention, n_probes


# ------------------------------------------------------------------------------- sequencer


class CyclePhases(NamedTuple):
  """Loop B's phases as callables of device arrays, `cfg` bound (`cycle_phases` builds them)."""

  keys: Callable
  drain: Callable
  mean_quality: Callable
  consolidate: Callable
  features: Callable
  router: Callable
  fisher: Callable
  patterns: Callable
  metrics: Callable


@functools.cache
def cycle_phases(
  cfg: SonaConfig, place: Placement = ONE_DEVICE, *, vmapped: bool = False
) -> CyclePhases:
  """Loop B's phases for `cfg`, each jitted on its own (the cycle times each one); cached.

  Args:
    cfg: the config (bound into every phase).
    place: where the arrays live (`ONE_DEVICE`, or a mesh's constraints from
      `sharding.cycle_phases`).
    vmapped: every phase vmapped over a leading tenant axis of every argument (stacked tenants).

  Returns:
    A `CyclePhases` for `run_cycle`.

  Examples:
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> phases = cycle_phases(cfg)
    >>> len(phases), phases._fields[:3], phases._fields[-1]  # one jitted callable per phase
    (9, ('keys', 'drain', 'mean_quality'), 'metrics')
    >>> cycle_phases(cfg) is phases, phases.drain.__name__  # cached; named for compile logs
    (True, 'loop_b_drain')
  """
  w, r = place.whole, place.rows

  def drain(signals):
    signals, rows, mask, missed = drain_signals(signals, cfg)
    return w(signals), r(rows), r(mask), w(missed)

  fns = CyclePhases(
    keys=lambda kd: w(cycle_keys(kd)),
    drain=drain,
    mean_quality=lambda rows, mask: w(mean_quality(rows, mask, cfg)),
    consolidate=lambda b, m, q: w(consolidate_micro(b, m, q, cfg)),
    features=lambda rows, bank, proj: r(row_features(rows, bank, proj, cfg)),
    router=lambda rs, e, f, rows, mask, k: w(train_router(rs, e, f, rows, mask, cfg, k, place)),
    fisher=lambda e, p, f, rows, mask, k: w(fisher_step(e, p, f, rows, mask, cfg, k, place)),
    patterns=lambda b, rows, mask, k, now: w(extract_patterns(b, rows, mask, cfg, k, now)),
    metrics=lambda m, p, f, rows, mask, k, now, ins: w(
      update_metrics(m, p, f, rows, mask, cfg, k, now, ins)
    ),
  )
  for name, f in zip(CyclePhases._fields, fns, strict=True):
    f.__name__ = f.__qualname__ = f"loop_b_{name}"  # what compile logs and profiles show
  if vmapped:
    return CyclePhases(*(jax.jit(jax.vmap(f)) for f in fns))
  return CyclePhases(*(jax.jit(f) for f in fns))


class CycleResult(NamedTuple):
  """The device values a cycle reports (per tenant when the phases are vmapped)."""

  n_signals: Any
  missed: Any
  mean_quality: Any
  consolidation_rate: Any
  router_loss_before: Any
  router_loss_after: Any
  merge: Any  # patterns.MergeReport
  retention: Any
  n_probes: Any


def run_cycle(state: SonaState, phases: CyclePhases, now) -> tuple[SonaState, CycleResult, dict]:
  """The one Loop B sequencer: drain, consolidate, router, Fisher, patterns, metrics.

  Runs `phases` (from `cycle_phases`) on `state` (one learner, or stacked tenants with vmapped
  phases) unconditionally: the callers decide who is due (`background_cycle`,
  `tenants.background_step_tenants`).

  Args:
    state: the learner's state (not donated).
    phases: the jitted phases.
    now: int seconds since the time origin (an i32 array of one entry per tenant when vmapped).

  Returns:
    `(new state, CycleResult, seconds)`: `seconds` is the wall time per phase and `total`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> new, result, seconds = run_cycle(state, cycle_phases(cfg), jnp.int32(3600))
    >>> int(result.n_signals), float(result.consolidation_rate), int(buffer.unread(new.signals))
    (4, 0.25, 0)
    >>> sorted(seconds)
    ['consolidate', 'drain', 'fisher', 'metrics', 'patterns', 'router', 'total']
  """
  seconds: dict[str, float] = {}
  t_start = t = time.perf_counter()

  def lap(name, out):
    nonlocal t
    out = jax.block_until_ready(out)
    now_t = time.perf_counter()
    seconds[name] = now_t - t
    t = now_t
    return out

  ph = phases
  key, k_router, k_fisher, k_patterns, k_probe = ph.keys(state.key)
  signals, rows, mask, missed = lap("drain", ph.drain(state.signals))
  mean_q, n = ph.mean_quality(rows, mask)
  base, micro, rate = lap("consolidate", ph.consolidate(state.base, state.micro, mean_q))
  feats = ph.features(rows, state.bank, state.router_proj)
  rstate, loss_before, loss_after = lap(
    "router", ph.router(state.router, state.ewc, feats, rows, mask, k_router)
  )
  ewc_state = lap("fisher", ph.fisher(state.ewc, rstate.params, feats, rows, mask, k_fisher))
  bank, rep = lap("patterns", ph.patterns(state.bank, rows, mask, k_patterns, now))
  mstate, retention, n_probes = lap(
    "metrics",
    ph.metrics(state.metrics, rstate.params, feats, rows, mask, k_probe, now, rep.n_inserted),
  )
  seconds["total"] = time.perf_counter() - t_start
  new_state = state._replace(
    signals=signals,
    base=base,
    micro=micro,
    router=rstate,
    ewc=ewc_state,
    bank=bank,
    metrics=mstate,
    key=key,
  )
  result = CycleResult(n, missed, mean_q, rate, loss_before, loss_after, rep, retention, n_probes)
  return new_state, result, seconds


def skip_reason(waiting: int, cfg: SonaConfig, force: bool) -> str:
  """Why a learner with `waiting` signals does not run ("" when it runs).

  Examples:
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, min_samples=4)
    >>> skip_reason(4, cfg, force=False), skip_reason(2, cfg, force=True)
    ('', '')
    >>> skip_reason(2, cfg, force=False)
    '2 signals waiting, 4 needed (cfg.min_samples)'
    >>> skip_reason(0, cfg, force=True)
    '0 signals waiting, 1 needed'
  """
  need = 1 if force else cfg.min_samples
  if waiting >= need:
    return ""
  return f"{waiting} signals waiting, {need} needed" + ("" if force else " (cfg.min_samples)")


def make_report(result: CycleResult, seconds: dict | None) -> BackgroundReport:
  """The host `BackgroundReport` of one learner's cycle.

  Examples:
    >>> import numpy as np
    >>> from sona_jax import patterns
    >>> i = np.int32
    >>> merge = patterns.MergeReport(i(1), i(1), i(1), np.array([2, 0], i), np.array([-1, 3], i))
    >>> result = CycleResult(i(4), i(0), np.float32(0.5), np.float32(0.25), np.float32(0.7),
    ...                      np.float32(0.6), merge, np.float32(np.nan), i(0))
    >>> rep = make_report(result, {"total": 0.1})
    >>> rep.ran, rep.n_signals, rep.consolidation_rate, rep.patterns_inserted, rep.evicted_ids
    (True, 4, 0.25, 1, (3,))
  """
  h = to_host
  rep = result.merge
  evicted = h(rep.evicted)
  return BackgroundReport(
    ran=True,
    reason="",
    n_signals=int(h(result.n_signals)),
    missed=int(h(result.missed)),
    mean_quality=float(h(result.mean_quality)),
    consolidation_rate=float(h(result.consolidation_rate)),
    router_loss_before=float(h(result.router_loss_before)),
    router_loss_after=float(h(result.router_loss_after)),
    patterns_merged=int(h(rep.n_merged)),
    patterns_inserted=int(h(rep.n_inserted)),
    patterns_evicted=int(h(rep.n_evicted)),
    evicted_ids=tuple(int(i) for i in evicted[evicted >= 0]),
    retention=float(h(result.retention)),
    n_probes=int(h(result.n_probes)),
    seconds=seconds,
  )


def background_cycle(
  state: SonaState, cfg: SonaConfig, now, phases: CyclePhases, *, force: bool = False
):
  """One learner's Loop B cycle with `phases`: skipped below `cfg.min_samples` waiting signals
  (at least one with `force`), else `run_cycle`. Returns `(state, BackgroundReport)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import buffer
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> phases = cycle_phases(cfg)
    >>> background_cycle(state, cfg, 0, phases)[1].reason  # nothing waiting: skipped
    '0 signals waiting, 4 needed (cfg.min_samples)'
    >>> for i in range(4):  # four signals: two that succeeded (0.9), two that failed (0.1)
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9 if i < 2 else 0.1,
    ...                              grad=[0.5, -0.5] * 4, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> state, report = background_cycle(state, cfg, 3600, phases)
    >>> report.ran, report.n_signals, report.consolidation_rate
    (True, 4, 0.25)
  """
  waiting = int(to_host(buffer.unread(state.signals)))
  why = skip_reason(waiting, cfg, force)
  if why:
    return state, BackgroundReport(ran=False, reason=why, n_signals=waiting)
  new_state, result, seconds = run_cycle(state, phases, jnp.int32(now))
  return new_state, make_report(result, seconds)


def background_step(state: SonaState, cfg: SonaConfig, now, *, force: bool = False):
  """Loop B: one background cycle (see the module docstring).

  Args:
    state: the learner's state (not donated: the driver may still serve from it).
    cfg: the config.
    now: int seconds since the time origin.
    force: run even below `cfg.min_samples` (still needs at least one signal).

  Returns:
    `(state, BackgroundReport)`; when skipped, `state` is returned unchanged.

  Examples:
    >>> import jax, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8,
    ...                       min_samples=4, pattern_clusters=2, bank_capacity=4, router_steps=2,
    ...                       router_batch=4, fisher_samples=4)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> state, report = background_step(state, cfg, now=0)
    >>> report.ran, report.reason
    (False, '0 signals waiting, 4 needed (cfg.min_samples)')
    >>> g = [0.5, -0.5] * 4  # supervised interactions, so the micro-LoRA learns
    >>> for i in range(4):
    ...   it = sona.make_interaction(cfg, query=[i + 1.0, 1.0] * 4, quality=0.9, grad=g, time=i)
    ...   state, _ = sona.instant_step(state, it, cfg)
    >>> state, report = background_step(state, cfg, now=3600)
    >>> report.ran, report.n_signals, report.consolidation_rate, report.patterns_inserted > 0
    (True, 4, 1.0, True)
    >>> float(abs(state.micro.b).sum()), bool(abs(state.base.b).sum() > 0)  # micro folded into base
    (0.0, True)
    >>> background_step(state, cfg, now=7200, force=True)[1].ran  # each signal is drained once
    False
  """
  return background_cycle(state, cfg, now, cycle_phases(cfg), force=force)
