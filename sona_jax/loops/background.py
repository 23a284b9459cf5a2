"""Loop B: the hourly background cycle (docs/design.md, "Loop B"; seed section 3).

`background_step(state, cfg, now)` drains the learning signals Loop A pushed since the last cycle
(each signal is consumed exactly once: the ring buffer's read cursor moves past it), then:

1. consolidates the micro-LoRA into the base LoRA (`lora.consolidate`, weight space, rate from the
   mean signal quality) and resets the micro-LoRA;
2. trains the FastGRNN router on the signals with the EWC++ penalty (`router.router_step`, optax);
3. updates the EWC++ Fisher and anchor from per-sample gradients at the trained parameters;
4. extracts patterns with spherical k-means++ and merges them into the ReasoningBank.

Each phase is a jitted pure function; the cycle reports a wall time per phase. Below
`cfg.min_samples` waiting signals a scheduled cycle is skipped with a report saying why (the peer
refuses silently); `force=True` runs it with any number of signals (at least one).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sona_jax import buffer, ewc, lora, metrics, patterns, router, types
from sona_jax.config import SonaConfig
from sona_jax.state import SonaState, router_apply, router_optimizer

__all__ = ["BackgroundReport", "background_step", "signal_features"]


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


_features = jax.jit(signal_features, static_argnums=3)


@functools.partial(jax.jit, static_argnums=1)
def _drain(signals: buffer.RingBuffer, cfg: SonaConfig):
  missed = buffer.since(signals, signals.meta[buffer.READ])[3]
  signals, rows, mask = buffer.consume(signals)
  return signals, rows, mask, missed


@functools.partial(jax.jit, static_argnums=3)
def _consolidate(base, micro, mean_quality, cfg: SonaConfig):
  rate = lora.consolidation_rate(mean_quality)
  base, micro = lora.consolidate(
    base, micro, rate, base_scale=cfg.base_scale, micro_scale=cfg.micro_scale
  )
  return base, micro, rate


def _labels(sig: types.Signal, cfg: SonaConfig):
  success = (sig.quality >= cfg.success_threshold).astype(jnp.float32)
  tier = jnp.clip(sig.tier, 0, cfg.n_tiers - 1)
  return tier, success


def _loss(params, feats, tier, success, weight, cfg: SonaConfig):
  logits = jax.vmap(router_apply(cfg), in_axes=(None, 0))(params, feats)
  served = jnp.take_along_axis(logits, tier[:, None], axis=1)[:, 0]
  per = optax.sigmoid_binary_cross_entropy(served, success)
  return jnp.sum(weight * per) / jnp.maximum(jnp.sum(weight), 1e-6)


@functools.partial(jax.jit, static_argnums=5)
def _train_router(rstate, ewc_state, feats, sig_rows, mask, cfg: SonaConfig, key):
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = _labels(sig, cfg)
  weight = mask.astype(jnp.float32)
  loss_before = _loss(rstate.params, feats, tier, success, weight, cfg)
  optimizer = router_optimizer(cfg)
  # The current Fisher and anchor go into the EWC++ transform's state (never its closure).
  rstate = rstate._replace(opt_state=ewc.with_ewc(rstate.opt_state, ewc_state))
  n = feats.shape[0]
  p = weight / jnp.maximum(jnp.sum(weight), 1.0)
  idx = jax.random.choice(key, n, (max(cfg.router_steps, 1), cfg.router_batch), p=p)

  def one(rs, batch_idx):
    # optax's Adam mixes int and float scalars; keep it working under strict promotion.
    with jax.numpy_dtype_promotion("standard"):
      rs, loss = router.router_step(
        rs,
        router_apply(cfg),
        optimizer,
        feats[batch_idx],
        tier[batch_idx],
        success[batch_idx],
        weight[batch_idx],
      )
    return rs, loss

  if cfg.router_steps > 0:
    rstate, _ = jax.lax.scan(one, rstate, idx)
  loss_after = _loss(rstate.params, feats, tier, success, weight, cfg)
  return rstate, loss_before, loss_after


@functools.partial(jax.jit, static_argnums=5)
def _fisher(ewc_state, params, feats, sig_rows, mask, cfg: SonaConfig, key):
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = _labels(sig, cfg)
  n = feats.shape[0]
  weight = mask.astype(jnp.float32)
  p = weight / jnp.maximum(jnp.sum(weight), 1.0)
  # Sampled with replacement from the drained signals only (padding has probability 0).
  idx = jax.random.choice(key, n, (cfg.fisher_samples,), p=p)

  def one_loss(prm, i):
    return _loss(prm, feats[i][None], tier[i][None], success[i][None], jnp.ones((1,)), cfg)

  grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0))(params, idx)
  return ewc.ewc_step(ewc_state, grads, params, alpha=cfg.ewc_alpha)


@functools.partial(jax.jit, static_argnums=3)
def _patterns(bank, sig_rows, mask, cfg: SonaConfig, key, now):
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = _labels(sig, cfg)
  weights = mask.astype(jnp.float32)
  k = min(cfg.pattern_clusters, sig_rows.shape[0])
  km = patterns.kmeans_pp(key, sig.query, k, weights=weights)
  stats = patterns.pattern_stats(
    sig.query, km.labels, k, sig.quality, tier, success, cfg.n_tiers, weights=weights
  )
  bank, rep = patterns.merge_patterns(
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
  return bank, rep


@functools.partial(jax.jit, static_argnums=5)
def _metrics(mstate, params, feats, sig_rows, mask, cfg: SonaConfig, key, now, n_inserted):
  """Daily bins from the drained signals, retention on the probe set, new probes, patterns."""
  sig = types.unpack_signals(sig_rows, cfg)
  tier, success = _labels(sig, cfg)
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
  waiting = int(buffer.unread(state.signals))
  need = 1 if force else cfg.min_samples
  if waiting < need:
    why = f"{waiting} signals waiting, {need} needed" + ("" if force else " (cfg.min_samples)")
    return state, BackgroundReport(ran=False, reason=why, n_signals=waiting)
  seconds: dict[str, float] = {}
  t_start = t = time.perf_counter()

  def lap(name):
    nonlocal t
    now_t = time.perf_counter()
    seconds[name] = now_t - t
    t = now_t

  key = jax.random.wrap_key_data(state.key)
  key, k_router, k_fisher, k_patterns, k_probe = jax.random.split(key, 5)
  now_i = jnp.int32(now)

  signals, rows, mask, missed = jax.block_until_ready(_drain(state.signals, cfg))
  lap("drain")
  sig = types.unpack_signals(rows, cfg)
  n = int(jnp.sum(mask))
  mean_q = jnp.sum(jnp.where(mask, sig.quality, 0.0)) / max(n, 1)

  base, micro, rate = jax.block_until_ready(_consolidate(state.base, state.micro, mean_q, cfg))
  lap("consolidate")

  feats = _features(sig, state.bank, state.router_proj, cfg)
  rstate, loss_before, loss_after = jax.block_until_ready(
    _train_router(state.router, state.ewc, feats, rows, mask, cfg, k_router)
  )
  lap("router")

  ewc_state = jax.block_until_ready(
    _fisher(state.ewc, rstate.params, feats, rows, mask, cfg, k_fisher)
  )
  lap("fisher")

  bank, rep = jax.block_until_ready(_patterns(state.bank, rows, mask, cfg, k_patterns, now_i))
  lap("patterns")

  mstate, retention, n_probes = jax.block_until_ready(
    _metrics(state.metrics, rstate.params, feats, rows, mask, cfg, k_probe, now_i, rep.n_inserted)
  )
  lap("metrics")
  seconds["total"] = time.perf_counter() - t_start

  new_state = state._replace(
    signals=signals,
    base=base,
    micro=micro,
    router=rstate,
    ewc=ewc_state,
    bank=bank,
    metrics=mstate,
    key=jax.random.key_data(key),
  )
  evicted = np.asarray(rep.evicted)
  report = BackgroundReport(
    ran=True,
    reason="",
    n_signals=n,
    missed=int(missed),
    mean_quality=float(mean_q),
    consolidation_rate=float(rate),
    router_loss_before=float(loss_before),
    router_loss_after=float(loss_after),
    patterns_merged=int(rep.n_merged),
    patterns_inserted=int(rep.n_inserted),
    patterns_evicted=int(rep.n_evicted),
    evicted_ids=tuple(int(i) for i in evicted[evicted >= 0]),
    retention=float(retention),
    n_probes=int(n_probes),
    seconds=seconds,
  )
  return new_state, report
