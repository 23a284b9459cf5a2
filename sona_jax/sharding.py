"""Devices and hosts: tenants and signal batches sharded with JAX's own engine (docs/design.md,
"Scale").

Nothing here is a home-made distribution scheme: a `jax.sharding.Mesh` names the devices (of one
process, or of every process after `jax.distributed.initialize`), a `NamedSharding` says how an
array is laid out over it, and `jax.jit` partitions the same pure functions the single-device path
runs (GSPMD), inserting the collectives.

- **Tenants** (`sona_jax.tenants`): the tenant axis of a stacked state is sharded over the mesh
  (`shard_tenants`, or `init_tenants(..., sharding=tenant_sharding(mesh))`); every tenant's Loop A
  and Loop B run on the device that holds it, with no communication.
- **One learner, data-parallel Loop B** (`background_step_sharded`): the drained signal batch is
  sharded over the mesh. Router features are computed where the signals are; each router
  mini-batch and the Fisher's per-sample gradients are split over the devices, whose gradients are
  summed by an all-reduce (an average over the whole batch, as on one device); spherical k-means
  assigns the sharded points locally and all-reduces the per-centroid sums and counts (k-means++
  seeding and the re-seeding of empty clusters read rows of a gathered copy of the normalised
  points, taken once per cycle). The result equals `background_step` on one device up to float
  rounding (`tests/test_sharding.py`).
- **Checkpoints** (`TenantCheckpointer`, defined in `sona_jax.checkpoint` with `Checkpointer`'s
  checks and fallback, re-exported here): orbax writes each shard from the process that holds it
  and restores onto whatever target sharding it is given, so a state saved from 8 devices
  restores onto 1 or 4.

Across hosts every process runs the same program on the same global arrays (JAX's multi-controller
model, `examples/multihost.py`); host values are read with `process_allgather` when an array is not
fully addressable, and nothing here assumes one process.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sona_jax import buffer, ewc, router, tenants, types
from sona_jax.checkpoint import TenantCheckpointer
from sona_jax.config import SonaConfig
from sona_jax.loops import background as loop_b
from sona_jax.state import SonaState, router_apply, router_optimizer

__all__ = [
  "AXIS",
  "TenantCheckpointer",
  "background_step_sharded",
  "batch_sharding",
  "make_mesh",
  "replicate",
  "replicated",
  "shard_tenants",
  "tenant_sharding",
]

AXIS = "data"  # the mesh axis that tenants and signal batches are split along


def make_mesh(n_devices: int | None = None, *, axis: str = AXIS, devices=None) -> Mesh:
  """A one-axis `Mesh` over `n_devices` devices (default: every device of every process).

  Args:
    n_devices: how many of the devices to use (the first ones); None for all.
    axis: the axis name.
    devices: explicit devices (a sequence); overrides `n_devices`.

  Returns:
    `Mesh(devices, (axis,))`.
  """
  if devices is None:
    devices = jax.devices()
    if n_devices is not None:
      if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"make_mesh: n_devices must be a positive int, got {n_devices!r}")
      if n_devices > len(devices):
        raise ValueError(f"make_mesh: n_devices={n_devices} but only {len(devices)} devices exist")
      devices = devices[:n_devices]
  return Mesh(np.asarray(devices), (axis,))


def tenant_sharding(mesh: Mesh, *, axis: str = AXIS) -> NamedSharding:
  """Leading (tenant) axis split over `axis`, every other axis whole: for stacked states."""
  return NamedSharding(mesh, P(axis))


batch_sharding = tenant_sharding  # a signal batch is split the same way: along its leading axis


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of the mesh holds the whole array."""
  return NamedSharding(mesh, P())


@functools.cache
def _reshard_fn(sharding):
  return jax.jit(lambda tree: tree, out_shardings=sharding)


def _reshard(tree, sharding):
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)  # from any device or the host
  # Across processes, a jitted identity moves global arrays (and host values that are the same
  # in every process) onto a sharding whose devices span the processes.
  return _reshard_fn(sharding)(tree)


def shard_tenants(states: SonaState, mesh: Mesh, *, axis: str = AXIS) -> SonaState:
  """Lays a tenant-stacked state out over the mesh, the tenant axis split along `axis`.

  Raises:
    ValueError: the number of tenants is not a multiple of the mesh size along `axis`.
  """
  n = tenants.n_tenants(states)
  size = mesh.shape[axis]
  if n % size:
    raise ValueError(
      f"shard_tenants: {n} tenants do not split evenly over {size} devices; use a multiple of "
      f"{size} tenants (spare tenants cost memory only)"
    )
  return _reshard(states, tenant_sharding(mesh, axis=axis))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A pytree with every leaf replicated on every device of the mesh (e.g. one learner's state
  before `background_step_sharded`)."""
  return _reshard(tree, replicated(mesh))


# ------------------------------------------------------------------------ data-parallel Loop B


def _constrain(x, sharding):
  return jax.lax.with_sharding_constraint(x, sharding)


@functools.cache
def _dp_phases(cfg: SonaConfig, mesh: Mesh, axis: str):
  """Loop B's router and Fisher phases with their batch axes split over the mesh.

  They are `loops.background`'s `_train_router` and `_fisher` with sharding constraints on the
  per-sample arrays: each device computes the loss terms of its part of a mini-batch (or of the
  Fisher samples), and the gradient of the batch mean, a sum over the sharded axis, becomes a
  local sum plus an all-reduce. The other phases need no change: their inputs are sharded.
  """
  rows_s = NamedSharding(mesh, P(axis))
  repl = NamedSharding(mesh, P())

  def train_router(rstate, ewc_state, feats, sig_rows, mask, key):
    sig = types.unpack_signals(sig_rows, cfg)
    tier, success = loop_b._labels(sig, cfg)
    weight = mask.astype(jnp.float32)
    loss_before = loop_b._loss(rstate.params, feats, tier, success, weight, cfg)
    optimizer = router_optimizer(cfg)
    rstate = rstate._replace(opt_state=ewc.with_ewc(rstate.opt_state, ewc_state))
    n = feats.shape[0]
    p = weight / jnp.maximum(jnp.sum(weight), 1.0)
    idx = jax.random.choice(key, n, (max(cfg.router_steps, 1), cfg.router_batch), p=p)
    # The mini-batches are gathered whole (they are small: [batch, F] features), then split.
    batches = (feats[idx], tier[idx], success[idx], weight[idx])
    batches = jax.tree.map(lambda x: _constrain(x, NamedSharding(mesh, P(None, axis))), batches)

    def one(rs, b):
      with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        rs, loss = router.router_step(rs, router_apply(cfg), optimizer, *b)
      return _constrain(rs, repl), loss

    if cfg.router_steps > 0:
      rstate, _ = jax.lax.scan(one, rstate, batches)
    loss_after = loop_b._loss(rstate.params, feats, tier, success, weight, cfg)
    return rstate, loss_before, loss_after

  def fisher(ewc_state, params, feats, sig_rows, mask, key):
    sig = types.unpack_signals(sig_rows, cfg)
    tier, success = loop_b._labels(sig, cfg)
    n = feats.shape[0]
    weight = mask.astype(jnp.float32)
    p = weight / jnp.maximum(jnp.sum(weight), 1.0)
    idx = jax.random.choice(key, n, (cfg.fisher_samples,), p=p)
    samples = jax.tree.map(lambda x: _constrain(x[idx], rows_s), (feats, tier, success))

    def one_loss(prm, f, t, s):
      return loop_b._loss(prm, f[None], t[None], s[None], jnp.ones((1,)), cfg)

    grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0, 0))(params, *samples)
    return _constrain(ewc.ewc_step(ewc_state, grads, params, alpha=cfg.ewc_alpha), repl)

  def drain(signals):
    signals, rows, mask, missed = loop_b._drain(signals, cfg)
    return signals, _constrain(rows, rows_s), _constrain(mask, rows_s), missed

  def mean_quality(rows, mask):
    sig = types.unpack_signals(rows, cfg)
    n = jnp.sum(mask.astype(jnp.int32))
    return jnp.sum(jnp.where(mask, sig.quality, 0.0)) / jnp.maximum(n, 1).astype(jnp.float32), n

  def features(rows, bank, proj):
    feats = loop_b.signal_features(types.unpack_signals(rows, cfg), bank, proj, cfg)
    return _constrain(feats, rows_s)

  def patterns(bank, rows, mask, key, now):
    return _constrain(loop_b._patterns(bank, rows, mask, cfg, key, now), repl)

  def metrics(mstate, params, feats, rows, mask, key, now, n_inserted):
    return _constrain(
      loop_b._metrics(mstate, params, feats, rows, mask, cfg, key, now, n_inserted), repl
    )

  def consolidate(base, micro, mean_q):
    return _constrain(loop_b._consolidate(base, micro, mean_q, cfg), repl)

  j = jax.jit
  return {
    "drain": j(drain),
    "mean_quality": j(mean_quality),
    "consolidate": j(consolidate),
    "features": j(features),
    "router": j(train_router),
    "fisher": j(fisher),
    "patterns": j(patterns),
    "metrics": j(metrics),
  }


def background_step_sharded(
  state: SonaState, cfg: SonaConfig, now, mesh: Mesh, *, force: bool = False, axis: str = AXIS
):
  """Loop B for one learner with its signal batch split over the devices of `mesh`.

  The same cycle as `background_step` (drain, consolidate, router with EWC++, Fisher, patterns,
  metrics; skipped below `cfg.min_samples` unless `force`), data-parallel: the drained signals
  are sharded along `axis`; features, router mini-batches, Fisher samples and k-means assignments
  are computed where their rows live, and gradients, Fisher sums and centroid sums are combined
  with all-reduces. Equal to the single-device `background_step` (same keys) up to float
  rounding. The returned state is replicated over the mesh.

  Args:
    state: the learner's state (anywhere: it is replicated over the mesh first).
    cfg: the config.
    now: int seconds since the time origin.
    mesh: the devices to use.
    force: run even below `cfg.min_samples` (still needs at least one signal).
    axis: the mesh axis to split the signals along.

  Returns:
    `(state, BackgroundReport)`.
  """
  if not isinstance(state, SonaState):
    raise TypeError(f"background_step_sharded: state must be a SonaState, got {type(state)}")
  if not isinstance(mesh, Mesh):
    raise TypeError(f"background_step_sharded: mesh must be a jax.sharding.Mesh, got {type(mesh)}")
  state = replicate(state, mesh)
  waiting = int(tenants._host(buffer.unread(state.signals)))
  need = 1 if force else cfg.min_samples
  if waiting < need:
    why = f"{waiting} signals waiting, {need} needed" + ("" if force else " (cfg.min_samples)")
    return state, loop_b.BackgroundReport(ran=False, reason=why, n_signals=waiting)
  ph = _dp_phases(cfg, mesh, axis)
  seconds: dict[str, float] = {}
  t_start = t = time.perf_counter()

  def lap(name, out):
    nonlocal t
    out = jax.block_until_ready(out)
    now_t = time.perf_counter()
    seconds[name] = now_t - t
    t = now_t
    return out

  key = jax.random.wrap_key_data(state.key)
  key, k_router, k_fisher, k_patterns, k_probe = jax.random.split(key, 5)
  now_i = jnp.int32(now)
  signals, rows, mask, missed = lap("drain", ph["drain"](state.signals))
  mean_q, n = ph["mean_quality"](rows, mask)
  base, micro, rate = lap("consolidate", ph["consolidate"](state.base, state.micro, mean_q))
  feats = ph["features"](rows, state.bank, state.router_proj)
  rstate, loss_before, loss_after = lap(
    "router", ph["router"](state.router, state.ewc, feats, rows, mask, k_router)
  )
  ewc_state = lap("fisher", ph["fisher"](state.ewc, rstate.params, feats, rows, mask, k_fisher))
  bank, rep = lap("patterns", ph["patterns"](state.bank, rows, mask, k_patterns, now_i))
  mstate, retention, n_probes = lap(
    "metrics",
    ph["metrics"](state.metrics, rstate.params, feats, rows, mask, k_probe, now_i, rep.n_inserted),
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
    key=replicate(jax.random.key_data(key), mesh),
  )
  h = tenants._host
  evicted = h(rep.evicted)
  report = loop_b.BackgroundReport(
    ran=True,
    reason="",
    n_signals=int(h(n)),
    missed=int(h(missed)),
    mean_quality=float(h(mean_q)),
    consolidation_rate=float(h(rate)),
    router_loss_before=float(h(loss_before)),
    router_loss_after=float(h(loss_after)),
    patterns_merged=int(h(rep.n_merged)),
    patterns_inserted=int(h(rep.n_inserted)),
    patterns_evicted=int(h(rep.n_evicted)),
    evicted_ids=tuple(int(i) for i in evicted[evicted >= 0]),
    retention=float(h(retention)),
    n_probes=int(h(n_probes)),
    seconds=seconds,
  )
  return new_state, report
