"""Persistence of a `SonaState` with orbax-checkpoint (docs/design.md, "Persistence").

A checkpoint step holds two items: `state`, the `SonaState` written with `ocp.args.StandardSave`,
and `metadata`, a JSON document with the config (`SonaConfig.to_dict()`), the library version, the
time origin of the state's `int32` clock (Unix seconds), the step and the caller's `extra` dict.

Restoring reads the metadata first and builds the abstract target from
`init_state(saved_config, ...)` under `jax.eval_shape`: without a target orbax hands back plain
dicts and lists instead of the NamedTuples. Every stored leaf's shape and dtype is checked against
that target before any array is read (orbax would otherwise cast a dtype silently).

No Python object serialisation anywhere: arrays are tensorstore data and metadata is JSON, so a
checkpoint from an untrusted source cannot run code when it is restored.

`TenantCheckpointer` is the same checkpointer for tenant-stacked states (`sona_jax.tenants`),
possibly sharded over devices and processes: it adds `n_tenants` to the metadata and stacks the
target, and shares every check, the fallback from a damaged newest step and the value checks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sona_jax import tenants
from sona_jax.config import SonaConfig
from sona_jax.state import SonaState, init_state

__all__ = ["Checkpointer", "STATE_FIELDS", "TenantCheckpointer"]

# Config fields that change the shapes of the state or the meaning of its values. A checkpoint can
# only be restored under a config that agrees with the saved one on all of these; every other field
# (learning rates, thresholds, intervals, ...) is a hyperparameter that may change between runs.
STATE_FIELDS = (
  "dim",
  "micro_rank",
  "base_rank",
  "micro_alpha",  # the LoRA scale alpha / rank multiplies the stored factors
  "base_alpha",
  "n_tiers",
  "max_ids",
  "graph_capacity",
  "graph_degree",
  "signal_capacity",
  "trajectory_capacity",
  "router_hidden",
  "router_proj_dim",
  "bank_capacity",
)

_STATE = "state"
_METADATA = "metadata"
_METADATA_KEYS = ("config", "version", "time_origin", "step", "extra")


# Leaves whose float values may legitimately be NaN: packed rows (a signal's "no feedback", the
# int fields bitcast into them) and the daily bins' "no measurement that day".
_PACKED = (".signals.data", ".trajectories.data", ".metrics.probe.data", ".metrics.daily.bins")


def _host(leaf) -> np.ndarray:
  """A leaf on the host; every process gathers the parts other processes hold (a collective)."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def _value_problems(state: SonaState, lead: int = 0) -> list[str]:
  """Values that would make a restored state unsafe or meaningless (host NumPy, after reading).

  Shapes and dtypes are checked before reading; this checks what they cannot: learned floats are
  finite, graph neighbour ids are in [-1, N), bank parents in [-1, P), and every ring buffer's
  head and size are within its capacity. `lead` leading axes are batch axes (1 for stacked tenants):
  a problem names the first tenants that have it.
  """

  def where(bad: np.ndarray) -> str:  # bad: bool[batch...]
    if lead == 0:
      return ""
    idx = np.argwhere(bad)[:5]
    return " (tenants " + ", ".join(str(tuple(i)) if lead > 1 else str(i[0]) for i in idx) + ")"

  def per_item(ok: np.ndarray) -> np.ndarray:  # all() over every axis after the batch axes
    return ok.reshape(ok.shape[:lead] + (-1,)).all(axis=-1)

  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    a = _host(leaf)
    if a.dtype.kind == "f" and name not in _PACKED:
      fine = per_item(np.isfinite(a))
      if not fine.all():
        problems.append(f"{name} has non-finite values{where(~fine)}")
  nbr = _host(state.graph.nbr)
  cap = nbr.shape[lead]
  fine = per_item((nbr >= -1) & (nbr < cap))
  if not fine.all():
    problems.append(f"graph edges name node ids outside [-1, {cap}){where(~fine)}")
  parent = _host(state.bank.parent)
  n_bank = parent.shape[lead]
  fine = per_item((parent >= -1) & (parent < n_bank))
  if not fine.all():
    problems.append(f"bank parents outside [-1, {n_bank}){where(~fine)}")
  for name, buf in (
    ("signals", state.signals),
    ("trajectories", state.trajectories),
    ("metrics.probe", state.metrics.probe),
  ):
    meta = _host(buf.meta)
    cap = jax.tree.leaves(buf.data)[0].shape[lead]
    head, size = meta[..., 0], meta[..., 1]
    fine = (head >= 0) & (head < cap) & (size >= 0) & (size <= cap)
    if not fine.all():
      first = tuple(np.argwhere(~fine)[0]) if lead else ()
      problems.append(
        f"{name} ring buffer head/size {meta[first][:2].tolist()} outside capacity {cap}"
        + where(~fine)
      )
  return problems


class _Damaged(Exception):
  """A checkpoint step that cannot be read (internal: triggers the fallback to an older step)."""


def _key_name(k) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """`{"micro.a": (shape, dtype name)}` for every leaf of `tree` (arrays or orbax metadata)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    ".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
    for path, leaf in flat
  }


def _spec_mismatches(found: dict, expected: dict) -> list[str]:
  problems = []
  for name in sorted(set(expected) - set(found)):
    problems.append(f"{name}: missing")
  for name in sorted(set(found) - set(expected)):
    problems.append(f"{name}: unexpected leaf")
  for name in sorted(set(found) & set(expected)):
    (shape, dtype), (eshape, edtype) = found[name], expected[name]
    if shape != eshape or dtype != edtype:
      problems.append(f"{name}: {dtype}{list(shape)}, expected {edtype}{list(eshape)}")
  return problems


def _abstract_state(cfg: SonaConfig) -> SonaState:
  return jax.eval_shape(lambda: init_state(cfg, jax.random.key(0)))


def _version() -> str:
  import sona_jax  # the package imports this module's siblings; a top-level import would cycle

  return sona_jax.__version__


def _incompatible_fields(cfg: SonaConfig, saved: SonaConfig) -> list[str]:
  """Fields on which `cfg` and `saved` disagree and that the state depends on."""
  differing = [
    f.name for f in dataclasses.fields(SonaConfig) if getattr(cfg, f.name) != getattr(saved, f.name)
  ]
  bad = [name for name in differing if name in STATE_FIELDS]
  if not bad and differing:
    # Belt and braces: if a field outside STATE_FIELDS ever changes a shape, name every difference.
    if _leaf_specs(_abstract_state(cfg)) != _leaf_specs(_abstract_state(saved)):
      bad = differing
  return bad


class Checkpointer:
  """Saves and restores `SonaState` checkpoints in a directory, keeping the last `max_to_keep`.

  Saves are asynchronous by default: `save` returns once the arrays are copied off the device and
  writes in the background; call `wait()` before reading the directory. Use it as a context manager
  (or call `close()`) so pending writes finish.

  Args:
    directory: the checkpoint directory (created if missing).
    max_to_keep: number of most recent steps kept on disk; older ones are deleted. None keeps all.
    async_save: write in a background thread.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save=True):
    if max_to_keep is not None and (
      isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
    ):
      raise ValueError(
        f"{self._who}: max_to_keep must be a positive int or None, got {max_to_keep!r}"
      )
    self.directory = os.path.abspath(os.fspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=bool(async_save),
        create=True,
      ),
      item_handlers={
        _STATE: ocp.StandardCheckpointHandler(),
        _METADATA: ocp.JsonCheckpointHandler(),
      },
    )

  # ------------------------------------------------------------------ what a subclass changes

  @property
  def _who(self) -> str:
    return type(self).__name__

  def _layout(self, state: SonaState, cfg: SonaConfig) -> dict:
    """Checks `state` against `cfg` for `save`; returns the metadata entries that describe its
    layout (none for one state)."""
    if not isinstance(state, SonaState):
      raise TypeError(f"{self._who}.save: state must be a SonaState, got {type(state).__name__}")
    problems = _spec_mismatches(_leaf_specs(state), _leaf_specs(_abstract_state(cfg)))
    if problems:
      raise ValueError(f"{self._who}.save: state does not match cfg: " + "; ".join(problems[:10]))
    return {}

  def _check_layout(self, metadata: dict) -> None:
    """Raises `_Damaged` when the layout entries of `_layout` are missing or malformed."""

  def _target(self, cfg: SonaConfig, metadata: dict) -> SonaState:
    """The abstract state a step saved under `cfg` with `metadata` holds."""
    return _abstract_state(cfg)

  def _problems(self, state: SonaState) -> list[str]:
    """Values no state can have (`_value_problems`)."""
    return _value_problems(state)

  # ----------------------------------------------------------------------------------- API

  def save(
    self,
    step: int,
    state: SonaState,
    cfg: SonaConfig,
    *,
    time_origin: float,
    extra: dict | None = None,
  ) -> None:
    """Writes `state` and its metadata as checkpoint `step` (asynchronously unless disabled).

    Args:
      step: non-negative int, larger than every step already saved.
      state: the `SonaState`; it must match `cfg`. It may be donated to a jitted step as soon as
        this returns (the arrays are already copied off the device).
      cfg: the config the state was built with.
      time_origin: Unix time in seconds of the state's clock zero (`Sona.time_origin`).
      extra: JSON-serialisable dict stored with the metadata (e.g. host-side totals).

    Raises:
      ValueError: bad `step`, `time_origin` or `extra`, or `state` does not match `cfg`.
      TypeError: `state` is not a `SonaState` or `cfg` not a `SonaConfig`.
    """
    who = f"{self._who}.save"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"{who}: step must be a non-negative int, got {step!r}")
    if not isinstance(cfg, SonaConfig):
      raise TypeError(f"{who}: cfg must be a SonaConfig, got {type(cfg).__name__}")
    if isinstance(time_origin, bool) or not isinstance(time_origin, (int, float)):
      raise ValueError(f"{who}: time_origin must be a number, got {time_origin!r}")
    if not math.isfinite(time_origin):
      raise ValueError(f"{who}: time_origin must be finite, got {time_origin!r}")
    if extra is not None and not isinstance(extra, dict):
      raise ValueError(f"{who}: extra must be a dict or None, got {type(extra).__name__}")
    layout = self._layout(state, cfg)
    metadata = {
      "config": cfg.to_dict(),
      **layout,
      "version": _version(),
      "time_origin": float(time_origin),
      "step": step,
      "extra": {} if extra is None else extra,
    }
    try:
      json.dumps(metadata, allow_nan=False)  # fail here, not in the background writer
    except (TypeError, ValueError) as e:
      raise ValueError(f"{who}: extra must be JSON-serialisable: {e}") from e
    self._manager.save(
      step,
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)}
      ),
    )

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is on disk (re-raises a failed write)."""
    self._manager.wait_until_finished()

  def latest_step(self) -> int | None:
    """The newest step on disk (finished saves only), or None. It may be damaged: `restore` then
    falls back to an older one."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every step on disk, ascending."""
    return sorted(self._manager.all_steps())

  def restore(
    self,
    cfg: SonaConfig | None = None,
    *,
    step: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
  ) -> tuple[SonaState, SonaConfig, dict]:
    """Reads a checkpoint back.

    With `step=None` the newest readable step is restored: a damaged newer step (unreadable or
    missing files, bad metadata) is skipped with a `RuntimeWarning` naming it. An explicit `step`
    never falls back.

    Args:
      cfg: the config to run with. It must agree with the saved config on every field in
        `STATE_FIELDS`; other fields (learning rates, thresholds) may differ and `cfg` is returned.
        None returns the saved config.
      step: the step to restore; None for the newest readable one.
      sharding: the layout of every restored array (e.g. replicated over a mesh, or tenants split
        over it); None puts them on the first local device, whatever the devices at save time.

    Returns:
      `(state, cfg, metadata)`: the state, the config, and the metadata dict (`config`,
      `version`, `time_origin`, `step`, `extra`, and `n_tenants` for tenant checkpoints).

    Raises:
      FileNotFoundError: no checkpoint in the directory, or `step` is not one of them.
      ValueError: `cfg` disagrees with the saved config (the fields are named), the stored arrays
        do not have the shapes and dtypes the saved config implies (the leaves are named), or they
        hold values no state can have (non-finite learned floats, ids out of range).
      RuntimeError: every step (or the requested one) is damaged.
    """
    who = f"{self._who}.restore"
    if cfg is not None and not isinstance(cfg, SonaConfig):
      raise TypeError(f"{who}: cfg must be a SonaConfig, got {type(cfg).__name__}")
    if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
      raise TypeError(f"{who}: sharding must be a jax.sharding.Sharding, got {sharding!r}")
    self.wait()  # a pending save of ours must land before we read the directory
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"{who}: no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(
          f"{who}: step {step!r} not in {self.directory}; steps on disk: {steps}"
        )
      try:
        return self._restore_step(step, cfg, sharding)
      except _Damaged as e:
        raise RuntimeError(f"{who}: checkpoint step {step} is damaged: {e}") from e
    failures = []
    for candidate in reversed(steps):
      try:
        result = self._restore_step(candidate, cfg, sharding)
      except _Damaged as e:
        failures.append((candidate, e))
        continue
      for bad, err in failures:
        warnings.warn(
          f"{who}: checkpoint step {bad} in {self.directory} is damaged ({err}); "
          f"restored step {candidate} instead",
          RuntimeWarning,
          stacklevel=2,
        )
      return result
    detail = "; ".join(f"step {s}: {e}" for s, e in failures)
    raise RuntimeError(f"{who}: no readable checkpoint in {self.directory} ({detail})") from (
      failures[0][1]
    )

  def _read_metadata(self, step: int) -> tuple[dict, SonaConfig]:
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
      )
      metadata = restored[_METADATA]
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise _Damaged(f"metadata unreadable: {type(e).__name__}: {e}") from e
    if not isinstance(metadata, dict) or any(k not in metadata for k in _METADATA_KEYS):
      raise _Damaged(f"metadata must be a dict with keys {list(_METADATA_KEYS)}")
    if metadata["step"] != step:
      raise _Damaged(f"metadata says step {metadata['step']!r}")
    origin = metadata["time_origin"]
    if (
      isinstance(origin, bool)
      or not isinstance(origin, (int, float))
      or not (math.isfinite(origin) and abs(origin) < 1e12)
    ):
      raise _Damaged(f"metadata time_origin {origin!r} is not a finite Unix time")
    if not isinstance(metadata["version"], str):
      raise _Damaged(f"metadata version {metadata['version']!r} is not a string")
    if metadata.get("extra") is not None and not isinstance(metadata["extra"], dict):
      raise _Damaged(f"metadata extra must be a dict, got {type(metadata['extra']).__name__}")
    self._check_layout(metadata)
    try:
      saved_cfg = SonaConfig.from_dict(metadata["config"])
    except (TypeError, ValueError) as e:
      raise _Damaged(f"metadata config invalid: {e}") from e
    return metadata, saved_cfg

  def _restore_step(self, step: int, cfg: SonaConfig | None, sharding):
    who = f"{self._who}.restore"
    metadata, saved_cfg = self._read_metadata(step)
    if cfg is not None:
      bad = _incompatible_fields(cfg, saved_cfg)
      if bad:
        detail = ", ".join(
          f"{n}={getattr(saved_cfg, n)!r} (given {getattr(cfg, n)!r})" for n in bad
        )
        raise ValueError(
          f"{who}: checkpoint step {step} was saved with an incompatible config: {detail}"
        )
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      self._target(saved_cfg, metadata),
    )
    try:
      stored = self._manager.item_metadata(step)[_STATE]
      if stored is None:
        raise FileNotFoundError("no state metadata")
      stored_specs = _leaf_specs(stored)
    except Exception as e:
      raise _Damaged(f"state metadata unreadable: {type(e).__name__}: {e}") from e
    expected = _leaf_specs(target)
    problems = _spec_mismatches(stored_specs, expected)
    if problems:
      raise ValueError(
        f"{who}: checkpoint step {step} (sona_jax {metadata['version']}) does not match the "
        f"state of its saved config: " + "; ".join(problems[:10])
      )
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)})
      )
      state = restored[_STATE]
    except Exception as e:
      raise _Damaged(f"arrays unreadable: {type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(state, SonaState):
      raise _Damaged(f"restored a {type(state).__name__}, not a SonaState")
    problems = _spec_mismatches(_leaf_specs(state), expected)
    if problems:
      raise _Damaged("restored arrays do not match: " + "; ".join(problems[:10]))
    problems = self._problems(state)
    if problems:
      raise ValueError(
        f"{who}: checkpoint step {step} holds values no sona_jax state can have: "
        + "; ".join(problems[:10])
      )
    return state, (saved_cfg if cfg is None else cfg), metadata

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


class TenantCheckpointer(Checkpointer):
  """`Checkpointer` for tenant-stacked states (`tenants.init_tenants`), sharded or not.

  The same layout and the same safety: no Python object serialisation, shapes and dtypes checked
  against `init_tenants(saved config, n_tenants)` before any array is read, a damaged newest step
  skipped with a warning, values no state can have refused (naming the tenants). The metadata
  adds `n_tenants`. Each process writes the shards it holds (every process must call `save` and
  `restore`); `restore(sharding=...)` lays the arrays out on any device count, e.g.
  `sharding.tenant_sharding(make_mesh(4))` for a state saved from 8 devices (the number of
  tenants must split evenly over it), and reads each device's part directly.

  `time_origin` defaults to 0.0 here (tenant states are usually driven by an external clock).
  """

  def save(
    self,
    step: int,
    states: SonaState,
    cfg: SonaConfig,
    *,
    time_origin: float = 0.0,
    extra: dict | None = None,
  ) -> None:
    """Writes tenant-stacked `states` as checkpoint `step` (see `Checkpointer.save`)."""
    super().save(step, states, cfg, time_origin=time_origin, extra=extra)

  def _layout(self, states: SonaState, cfg: SonaConfig) -> dict:
    n = tenants.check_stacked(states, cfg, f"{self._who}.save")
    problems = _spec_mismatches(_leaf_specs(states), _leaf_specs(_tenant_target(cfg, n)))
    if problems:
      raise ValueError(f"{self._who}.save: states do not match cfg: " + "; ".join(problems[:10]))
    return {"n_tenants": n}

  def _check_layout(self, metadata: dict) -> None:
    n = metadata.get("n_tenants")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n < 2**31:
      raise _Damaged(f"metadata n_tenants {n!r} is not a positive int")

  def _target(self, cfg: SonaConfig, metadata: dict) -> SonaState:
    return _tenant_target(cfg, metadata["n_tenants"])

  def _problems(self, states: SonaState) -> list[str]:
    return _value_problems(states, lead=1)


@functools.cache
def _tenant_target(cfg: SonaConfig, n: int) -> SonaState:
  return jax.eval_shape(lambda: tenants.init_tenants(cfg, jax.random.key(0), n))
