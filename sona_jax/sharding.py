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
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sona_jax import tenants
from sona_jax.checkpoint import TenantCheckpointer
from sona_jax.config import SonaConfig
from sona_jax.loops import background as loop_b
from sona_jax.state import SonaState

__all__ = [
  "AXIS",
  "TenantCheckpointer",
  "background_step_sharded",
  "batch_sharding",
  "cycle_phases",
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


@functools.cache
def cycle_phases(cfg: SonaConfig, mesh: Mesh, axis: str = AXIS) -> loop_b.CyclePhases:
  """Loop B's phases (`loops.background.cycle_phases`) with the signal batch split over `mesh`.

  The `Placement` hook constrains the per-signal arrays (drained rows, features, Fisher samples)
  to be split along `axis`, each router mini-batch to be split along its batch axis, and
  everything a phase returns to be replicated. Each device then computes the loss terms of its
  part of a mini-batch (or of the Fisher samples), and the gradient of the batch mean, a sum over
  the sharded axis, becomes a local sum plus an all-reduce (GSPMD inserts it); k-means assigns
  the sharded points locally.
  """
  rows = NamedSharding(mesh, P(axis))
  batches = NamedSharding(mesh, P(None, axis))
  whole = NamedSharding(mesh, P())
  place = loop_b.Placement(
    rows=lambda x: jax.lax.with_sharding_constraint(x, rows),
    batches=lambda x: jax.lax.with_sharding_constraint(x, batches),
    whole=lambda x: jax.lax.with_sharding_constraint(x, whole),
  )
  return loop_b.cycle_phases(cfg, place)


def background_step_sharded(
  state: SonaState, cfg: SonaConfig, now, mesh: Mesh, *, force: bool = False, axis: str = AXIS
):
  """Loop B for one learner with its signal batch split over the devices of `mesh`.

  The same cycle as `background_step` (the one sequencer, `loops.background.run_cycle`: drain,
  consolidate, router with EWC++, Fisher, patterns, metrics; skipped below `cfg.min_samples`
  unless `force`), data-parallel (`cycle_phases`): the drained signals are sharded along `axis`;
  features, router mini-batches, Fisher samples and k-means assignments are computed where their
  rows live, and gradients, Fisher sums and centroid sums are combined with all-reduces. Equal to
  the single-device `background_step` (same keys) up to float rounding. The returned state is
  replicated over the mesh.

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
  return loop_b.background_cycle(state, cfg, now, cycle_phases(cfg, mesh, axis), force=force)
