"""Many tenants: one learner per tenant, stacked along a leading axis (docs/design.md, "Scale").

A tenant's state is a `SonaState`; `n` tenants are one `SonaState` whose every leaf has a leading
tenant axis of length `n` (`init_tenants`). Loop A and Loop B run on all of them at once under
`jax.vmap` of the same pure functions the single-tenant path jits, so a tenant learns exactly what
it would learn alone, and the stacked state shards over devices like any array
(`sona_jax.sharding`).

The partition is hard: one tenant's traffic never changes another tenant's arrays, bit for bit.
`instant_step_tenants` runs a batch in rounds, each stepping every tenant once under `vmap` with
its next interaction, or with a padding interaction when it has none: Loop A's own validation
masks the padding out, which leaves the state bit-identical except its `REJECTED` counter, and
that count is taken back out exactly. `background_step_tenants` runs Loop B's phases under `vmap`
and keeps the old state of every tenant that does not run, with a select.

Examples:
  >>> import jax, numpy as np, sona_jax as sona
  >>> from sona_jax import tenants
  >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
  >>> states = tenants.init_tenants(cfg, jax.random.key(0), 4)
  >>> its = sona.stack_interactions(
  ...   [sona.make_interaction(cfg, query=np.ones(8), quality=0.9) for _ in range(3)])
  >>> states, report = tenants.instant_step_tenants(states, its, [2, 0, 2], cfg)
  >>> np.asarray(states.step).tolist(), np.asarray(report.accepted).tolist()
  ([1, 0, 2, 0], [True, True, True])
"""

from __future__ import annotations

import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import buffer, lora, native, types
from sona_jax.config import SonaConfig
from sona_jax.loops import background as loop_b
from sona_jax.loops import instant as loop_a
from sona_jax.state import REJECTED, SonaState, init_state

__all__ = [
  "BAD_TENANT",
  "TENANT_OVERFLOW",
  "TenantsBackgroundReport",
  "adapt_tenants",
  "background_step_tenants",
  "check_stacked",
  "init_tenants",
  "instant_step_tenants",
  "n_tenants",
  "stack_states",
  "tenant",
]

# Reason bits of `InstantReport.reasons` that only the tenant path sets (above Loop A's `BAD_*`).
BAD_TENANT = 1 << 12  # tenant id outside [0, n_tenants): the interaction reached no tenant
TENANT_OVERFLOW = 1 << 13  # more interactions for one tenant than `max_per_tenant`: not applied


def n_tenants(states: SonaState) -> int:
  """The number of tenants of a stacked state (the length of its leading axis)."""
  return int(states.metrics.counters.shape[0])


def check_stacked(states: SonaState, cfg: SonaConfig, where: str) -> int:
  """Checks that `states` are tenants stacked under `cfg`; returns their number.

  Raises:
    TypeError: `states` is not a `SonaState` or `cfg` not a `SonaConfig`.
    ValueError: no leading tenant axis, or shapes that `cfg` does not give (`where` starts the
      message).
  """
  if not isinstance(cfg, SonaConfig):
    raise TypeError(f"{where}: cfg must be a SonaConfig, got {type(cfg).__name__}")
  if not isinstance(states, SonaState):
    raise TypeError(f"{where}: states must be a SonaState, got {type(states).__name__}")
  if states.metrics.counters.ndim != 2:
    raise ValueError(
      f"{where}: states must be stacked tenants (leading tenant axis, `init_tenants`); "
      f"metrics.counters has shape {states.metrics.counters.shape}"
    )
  n = n_tenants(states)
  expected = ((n, cfg.graph_capacity, cfg.dim), (n, cfg.dim, cfg.micro_rank))
  got = (states.graph.emb.shape, states.micro.a.shape)
  if got != expected:
    raise ValueError(
      f"{where}: states do not match cfg: graph.emb {got[0]}, micro.a {got[1]}; expected "
      f"{expected[0]} and {expected[1]} for {n} tenants (dim={cfg.dim}, "
      f"graph_capacity={cfg.graph_capacity}, micro_rank={cfg.micro_rank})"
    )
  return n


@functools.cache
def _init_fn(cfg: SonaConfig, sharding):
  return jax.jit(jax.vmap(lambda k: init_state(cfg, k)), out_shardings=sharding)


def init_tenants(
  cfg: SonaConfig, key: jax.Array, n: int, *, sharding: jax.sharding.Sharding | None = None
) -> SonaState:
  """`n` fresh tenants: `init_state(cfg, k_i)` for `n` keys split from `key`, stacked.

  Args:
    cfg: the config every tenant shares (shapes and hyperparameters).
    key: a PRNG key; tenant `i` gets the `i`-th key of `jax.random.split(key, n)`.
    n: number of tenants (positive int).
    sharding: optional sharding of the leading tenant axis of every leaf, e.g.
      `sona_jax.sharding.tenant_sharding(mesh)`; the states are then created in place on their
      devices (also across processes). None: the default device.

  Returns:
    A `SonaState` whose leaves have a leading axis of length `n`.
  """
  if not isinstance(cfg, SonaConfig):
    raise TypeError(f"init_tenants: cfg must be a SonaConfig, got {type(cfg).__name__}")
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"init_tenants: n must be a positive int, got {n!r}")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  return _init_fn(cfg, sharding)(jax.random.split(key, int(n)))


def tenant(states: SonaState, i) -> SonaState:
  """Tenant `i`'s own `SonaState` (a slice of the stacked state; usable with every single-tenant
  function: `instant_step`, `background_step`, `adapt`, `Checkpointer.save`)."""
  return jax.tree.map(lambda x: x[i], states)


def stack_states(states: list[SonaState] | tuple[SonaState, ...]) -> SonaState:
  """Stacks single-tenant states (same config) into one tenant-stacked state."""
  if len(states) == 0:
    raise ValueError("stack_states: need at least one state")
  for i, s in enumerate(states):
    if not isinstance(s, SonaState):
      raise TypeError(f"stack_states: item {i} is a {type(s).__name__}, not a SonaState")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


@jax.jit
def _adapt_tenants(micro, base, x, tids, base_scale, micro_scale):
  def one(t, v):
    m = jax.tree.map(lambda a: a[t], micro)
    b = jax.tree.map(lambda a: a[t], base)
    return lora.apply(m, v, lora.apply(b, v, v, scale=base_scale), scale=micro_scale)

  return jax.vmap(one)(tids, x)


def adapt_tenants(states: SonaState, x, tenant_ids, cfg: SonaConfig) -> jax.Array:
  """Each row of `x` adapted by its own tenant's LoRAs (`sona.adapt` per row).

  Args:
    states: tenant-stacked state.
    x: f32[B, dim] embeddings.
    tenant_ids: i32[B] the tenant of each row, in `[0, n_tenants)`.
    cfg: the config.

  Returns:
    f32[B, dim]: `x + delta_base_t(x) + delta_micro_t(x)` with `t` the row's tenant.
  """
  n = check_stacked(states, cfg, "adapt_tenants")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2 or x.shape[1] != cfg.dim:
    raise ValueError(f"adapt_tenants: x has shape {x.shape}; expected [batch, {cfg.dim}]")
  tids = _check_ids(tenant_ids, x.shape[0], n, "adapt_tenants")
  return _adapt_tenants(
    states.micro,
    states.base,
    x,
    tids,
    jnp.float32(cfg.base_scale),
    jnp.float32(cfg.micro_scale),
  )


def _check_ids(tenant_ids, batch: int, n: int, where: str):
  """Host checks of concrete tenant ids (traced ids are masked inside the step instead)."""
  if isinstance(tenant_ids, jax.core.Tracer):
    if tenant_ids.shape != (batch,):
      raise ValueError(f"{where}: tenant_ids has shape {tenant_ids.shape}; expected ({batch},)")
    return tenant_ids.astype(jnp.int32)
  ids = np.asarray(tenant_ids)
  if ids.shape != (batch,):
    raise ValueError(f"{where}: tenant_ids has shape {ids.shape}; expected ({batch},)")
  if batch and ids.dtype.kind not in "iu":
    raise ValueError(f"{where}: tenant_ids must be integers, got dtype {ids.dtype}")
  if batch and (ids.min() < 0 or ids.max() >= n):
    bad = ids[(ids < 0) | (ids >= n)]
    raise ValueError(f"{where}: tenant_ids must be in [0, {n}), got {bad[:5].tolist()}")
  return ids.astype(np.int32)


def _padding_row(cfg: SonaConfig) -> np.ndarray:
  """A packed interaction that Loop A rejects (quality -1: `BAD_QUALITY`) and that reads no row."""
  pad = types.make_interaction(cfg, query=np.zeros(cfg.dim, np.float32), quality=-1.0)
  return np.array(types.pack(pad, cfg))


def _tenant_step(
  sub: loop_a.LoopAState,
  base,
  emb,
  packed,
  tids,
  cfg: SonaConfig,
  rounds: int,
  use_native: bool = False,
):
  """Loop A for a batch spread over tenants, each tenant's interactions in batch order.

  An interaction goes to its tenant when the id is in range and fewer than `rounds` earlier
  interactions of the batch went to the same tenant; the others are dropped with
  `BAD_TENANT` or `TENANT_OVERFLOW`. On CPU (`use_native`) one native call applies the batch in
  order (`native.loop_a_tenants`); elsewhere, rounds of Loop A's transition under `vmap`
  (`_rounds`).
  """
  n = sub.counters.shape[0]
  in_range = (tids >= 0) & (tids < n)
  occ, _ = loop_a.occurrence(tids, in_range, n)
  fits = in_range & (occ < rounds)
  jax_rule = lambda sub: _rounds(sub, base, emb, packed, tids, occ, fits, cfg, rounds)
  if use_native:
    on_cpu = lambda sub: native.loop_a_tenants(
      sub, base.a, base.b, emb, packed, jnp.where(fits, tids, -1), cfg
    )
    sub, report = jax.lax.platform_dependent(sub, cpu=on_cpu, default=jax_rule)
  else:
    sub, report = jax_rule(sub)
  bits = jnp.where(in_range, jnp.where(fits, 0, TENANT_OVERFLOW), BAD_TENANT)
  dropped = jnp.zeros_like(report).at[:, loop_a.R_REASONS].set(loop_a.reason_bits(bits))
  return sub, jnp.where(fits[:, None], report, dropped)


def _rounds(sub: loop_a.LoopAState, base, emb, packed, tids, occ, fits, cfg, rounds: int):
  """Rounds of Loop A's per-request transition, vmapped over tenants.

  Interaction `j` goes to round `occ_j`, the number of earlier interactions of the same tenant, so
  each tenant sees its interactions in batch order. Round `r` steps every tenant at once with its
  `r`-th interaction, or with a padding interaction that Loop A rejects when it has none.
  Rejection leaves a tenant's state bit-identical except `REJECTED`, from which the padding rows
  are subtracted again (exact int32 arithmetic, wrapping included).
  """
  n = sub.counters.shape[0]
  row = jnp.where(fits, tids, n)  # n: past the table, dropped
  col = jnp.where(fits, occ, 0)
  pad = jnp.asarray(_padding_row(cfg))
  dense = jnp.broadcast_to(pad, (rounds, n, pad.shape[0]))
  dense = dense.at[col, row].set(packed, mode="drop")
  count = jnp.zeros((n,), jnp.int32).at[row].add(1, mode="drop")
  step = jax.vmap(loop_a.transition, in_axes=(0, 0, 0, 0, None))
  sub, reports = jax.lax.scan(lambda s, x: step(s, base, emb, x, cfg), sub, dense)
  counters = sub.counters.at[:, REJECTED].add(count - rounds)
  return sub._replace(counters=counters), reports[col, jnp.clip(row, 0, n - 1)]  # [B, 5]


@functools.cache
def _tenant_step_jitted(use_native: bool = False):
  """The jitted tenant step, with Loop A's per-function XLA:CPU options when this XLA has them
  (the memory-optimised scheduler: measured ~2x the throughput of the default at 1,000 tenants).
  """
  options = dict(loop_a.COMPILER_OPTIONS)
  try:
    jax.jit(lambda v: v + 1, compiler_options=options).lower(jnp.float32(0)).compile()
  except Exception:  # an option this XLA does not know (Loop A logs the same fallback)
    options = {}
  step = functools.partial(_tenant_step, use_native=use_native)
  return jax.jit(step, static_argnums=(5, 6), donate_argnums=0, compiler_options=options)


def _on_one_device(states: SonaState) -> bool:
  """Whether the stacked states live on one device (the native call does not shard)."""
  sharding = getattr(states.micro.a, "sharding", None)
  return sharding is not None and len(sharding.device_set) == 1


def _bucket(m: int) -> int:
  """Rounds up to a power of two so that batches compile for few distinct row counts."""
  return 1 << max(0, math.ceil(math.log2(max(m, 1))))


def instant_step_tenants(
  states: SonaState,
  interactions: types.Interaction,
  tenant_ids,
  cfg: SonaConfig,
  *,
  max_per_tenant: int | None = None,
):
  """Loop A for a batch of interactions, each addressed to one tenant.

  Each tenant takes its own interactions in batch order, exactly as `instant_step` would one by
  one on that tenant alone (bit for bit, under the same rule); every tenant the batch does not
  address keeps every array bit-identical. One call, one compile per batch size and per
  power-of-two bound on the interactions per tenant.

  On CPU, with the states on one device, one native call applies the batch in order
  (`native.loop_a_tenants`): the cost is the batch's interactions. Otherwise (GPU, TPU, states
  sharded over devices, inside a user's `jit`, or without the native library) the batch runs in
  rounds of Loop A's JAX rule (a `lax.scan`), each stepping all tenants at once under `vmap`,
  which shards along the tenant axis; the number of rounds is the most interactions any one
  tenant has, so the cost is `n_tenants x rounds` steps: batches that spread evenly over tenants
  are cheapest.

  Args:
    states: tenant-stacked state (`init_tenants`); its Loop A part is donated: use the returned
      state. It may be sharded over devices along the tenant axis (`sona_jax.sharding`).
    interactions: an `Interaction` with a leading batch axis (`stack_interactions`).
    tenant_ids: i32[batch] the tenant of each interaction. Concrete ids are checked (`ValueError`
      when outside `[0, n_tenants)`); traced ids outside that range are masked (`BAD_TENANT`).
    cfg: the config every tenant shares (static).
    max_per_tenant: bound on the interactions of one tenant in this batch (static). None: the
      count of the busiest tenant, rounded up to a power of two (or the batch size when the ids
      are traced). Interactions beyond it are not applied (`TENANT_OVERFLOW`).

  Returns:
    `(states, report)`: the new states and an `InstantReport` with `values` `[batch, 5]`, in the
    order of the batch.
  """
  n = check_stacked(states, cfg, "instant_step_tenants")
  packed = types.pack(interactions, cfg, batched=True)
  batch = int(packed.shape[0])
  tids = _check_ids(tenant_ids, batch, n, "instant_step_tenants")
  if max_per_tenant is None:
    if isinstance(tids, jax.core.Tracer):
      rounds = batch
    else:
      rounds = _bucket(int(np.bincount(tids, minlength=1).max()) if batch else 1)
  else:
    if (
      isinstance(max_per_tenant, bool) or not isinstance(max_per_tenant, int) or max_per_tenant < 1
    ):
      raise ValueError(
        f"instant_step_tenants: max_per_tenant must be a positive int, got {max_per_tenant!r}"
      )
    rounds = max_per_tenant
  traced = isinstance(tids, jax.core.Tracer) or loop_a.in_user_transform(packed, states)
  if traced:  # inside a user's jit: the JAX rule, which shards with the states
    step = _tenant_step
  else:
    step = _tenant_step_jitted(_on_one_device(states) and native.enabled())
  sub, report = step(
    loop_a.split_state(states), states.base, states.graph.emb, packed, tids, cfg, rounds
  )
  return loop_a.merge_state(states, sub), loop_a.InstantReport(report)


# ------------------------------------------------------------------------------------- Loop B


class TenantsBackgroundReport(NamedTuple):
  """What a Loop B cycle did for each tenant (host NumPy arrays of length `n_tenants`).

  The fields are those of `BackgroundReport`, one entry per tenant; a tenant that did not run has
  `ran` False, its waiting signals in `n_signals`, and NaN or 0 elsewhere. `tenant(i)` gives one
  tenant's `BackgroundReport`. `seconds` is the wall time per phase for all tenants together.
  """

  ran: np.ndarray
  reason: str
  n_signals: np.ndarray
  missed: np.ndarray
  mean_quality: np.ndarray
  consolidation_rate: np.ndarray
  router_loss_before: np.ndarray
  router_loss_after: np.ndarray
  patterns_merged: np.ndarray
  patterns_inserted: np.ndarray
  patterns_evicted: np.ndarray
  retention: np.ndarray
  n_probes: np.ndarray
  seconds: dict[str, float] | None = None

  def tenant(self, i: int) -> loop_b.BackgroundReport:
    """Tenant `i`'s `BackgroundReport` (`evicted_ids` is not kept per tenant: empty)."""
    if not self.ran[i]:
      return loop_b.BackgroundReport(
        ran=False, reason=self.reason, n_signals=int(self.n_signals[i])
      )
    return loop_b.BackgroundReport(
      ran=True,
      reason="",
      n_signals=int(self.n_signals[i]),
      missed=int(self.missed[i]),
      mean_quality=float(self.mean_quality[i]),
      consolidation_rate=float(self.consolidation_rate[i]),
      router_loss_before=float(self.router_loss_before[i]),
      router_loss_after=float(self.router_loss_after[i]),
      patterns_merged=int(self.patterns_merged[i]),
      patterns_inserted=int(self.patterns_inserted[i]),
      patterns_evicted=int(self.patterns_evicted[i]),
      retention=float(self.retention[i]),
      n_probes=int(self.n_probes[i]),
      seconds=self.seconds,
    )


@functools.cache
def _waiting_and_select():
  def select(run, new, old):
    def pick(a, b):
      return jnp.where(run.reshape(run.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)

  return jax.jit(jax.vmap(buffer.unread)), jax.jit(select)


def background_step_tenants(states: SonaState, cfg: SonaConfig, now, *, force: bool = False):
  """Loop B for every tenant that is due, all at once (`background_step` per tenant, vmapped).

  A tenant runs when it has at least `cfg.min_samples` waiting signals (with `force`, at least
  one); every other tenant's state comes back bit-identical. The phases (drain, consolidate,
  router with EWC++, Fisher, patterns, metrics) are the jitted pure functions of
  `loops.background`, vmapped over the tenant axis, so a tenant's result equals its own
  `background_step` up to float rounding of batched kernels. Works on sharded states (each device
  runs its own tenants) and across processes.

  Args:
    states: tenant-stacked state (not donated).
    cfg: the config.
    now: int seconds since the time origin.
    force: run every tenant with at least one signal, regardless of `cfg.min_samples`.

  Returns:
    `(states, TenantsBackgroundReport)`.
  """
  n = check_stacked(states, cfg, "background_step_tenants")
  waiting_fn, select = _waiting_and_select()
  need = 1 if force else cfg.min_samples
  waiting_dev = waiting_fn(states.signals)
  waiting = loop_b.to_host(waiting_dev)
  run = waiting >= need
  nan = np.full((n,), np.nan, np.float32)
  zero = np.zeros((n,), np.int32)
  why = f"fewer than {need} signals waiting" + ("" if force else " (cfg.min_samples)")
  if not run.any():
    report = TenantsBackgroundReport(
      run, why, waiting, zero, nan, nan, nan, nan, zero, zero, zero, nan, zero
    )
    return states, report

  # The one Loop B sequencer over every tenant, its phases vmapped; `now` is each tenant's.
  phases = loop_b.cycle_phases(cfg, vmapped=True)
  new_states, res, seconds = loop_b.run_cycle(states, phases, np.full((n,), now, np.int32))
  t = time.perf_counter()
  new_states = jax.block_until_ready(select(waiting_dev >= need, new_states, states))
  seconds["select"] = time.perf_counter() - t
  seconds["total"] += seconds["select"]

  def per(x, fill):
    return np.where(run, loop_b.to_host(x), fill)

  rep = res.merge
  report = TenantsBackgroundReport(
    ran=run,
    reason=why if not run.all() else "",
    n_signals=np.where(run, loop_b.to_host(res.n_signals), waiting).astype(np.int32),
    missed=per(res.missed, 0).astype(np.int32),
    mean_quality=per(res.mean_quality, np.nan).astype(np.float32),
    consolidation_rate=per(res.consolidation_rate, np.nan).astype(np.float32),
    router_loss_before=per(res.router_loss_before, np.nan).astype(np.float32),
    router_loss_after=per(res.router_loss_after, np.nan).astype(np.float32),
    patterns_merged=per(rep.n_merged, 0).astype(np.int32),
    patterns_inserted=per(rep.n_inserted, 0).astype(np.int32),
    patterns_evicted=per(rep.n_evicted, 0).astype(np.int32),
    retention=per(res.retention, np.nan).astype(np.float32),
    n_probes=per(res.n_probes, 0).astype(np.int32),
    seconds=seconds,
  )
  return new_states, report
