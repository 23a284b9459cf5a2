"""Persistence of a `SonaState` with orbax-checkpoint (DESIGN.md section 7).

A checkpoint step holds two items: `state`, the `SonaState` written with `ocp.args.StandardSave`,
and `metadata`, a JSON document with the config (`SonaConfig.to_dict()`), the library version, the
time origin of the state's `int32` clock (Unix seconds), the step and the caller's `extra` dict.

Restoring reads the metadata first and builds the abstract target from
`init_state(saved_config, ...)` under `jax.eval_shape`: without a target orbax hands back plain
dicts and lists instead of the NamedTuples. Every stored leaf's shape and dtype is checked against
that target before any array is read (orbax would otherwise cast a dtype silently).

No Python object serialisation anywhere: arrays are tensorstore data and metadata is JSON, so a
checkpoint from an untrusted source cannot run code when it is restored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sona_jax.config import SonaConfig
from sona_jax.state import SonaState, init_state

__all__ = ["Checkpointer", "STATE_FIELDS"]

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


def _value_problems(state: SonaState) -> list[str]:
  """Values that would make a restored state unsafe or meaningless (host NumPy, after reading).

  Shapes and dtypes are checked before reading; this checks what they cannot: learned floats are
  finite, graph neighbour ids are in [-1, N), bank parents in [-1, P), and every ring buffer's
  head and size are within its capacity.
  """
  problems = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = jax.tree_util.keystr(path)
    a = np.asarray(leaf)
    if a.dtype.kind == "f" and name not in _PACKED and not np.all(np.isfinite(a)):
      problems.append(f"{name} has non-finite values")
  g = state.graph
  nbr = np.asarray(g.nbr)
  if np.any((nbr < -1) | (nbr >= g.capacity)):
    problems.append(f"graph edges name node ids outside [-1, {g.capacity})")
  parent = np.asarray(state.bank.parent)
  if np.any((parent < -1) | (parent >= parent.shape[0])):
    problems.append(f"bank parents outside [-1, {parent.shape[0]})")
  for name, buf in (
    ("signals", state.signals),
    ("trajectories", state.trajectories),
    ("metrics.probe", state.metrics.probe),
  ):
    meta = np.asarray(buf.meta)
    cap = jax.tree.leaves(buf.data)[0].shape[0]
    if not (0 <= meta[0] < cap and 0 <= meta[1] <= cap):
      problems.append(f"{name} ring buffer head/size {meta[:2].tolist()} outside capacity {cap}")
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
        f"Checkpointer: max_to_keep must be a positive int or None, got {max_to_keep!r}"
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
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f"Checkpointer.save: step must be a non-negative int, got {step!r}")
    if not isinstance(cfg, SonaConfig):
      raise TypeError(f"Checkpointer.save: cfg must be a SonaConfig, got {type(cfg).__name__}")
    if not isinstance(state, SonaState):
      raise TypeError(f"Checkpointer.save: state must be a SonaState, got {type(state).__name__}")
    if isinstance(time_origin, bool) or not isinstance(time_origin, (int, float)):
      raise ValueError(f"Checkpointer.save: time_origin must be a number, got {time_origin!r}")
    if not math.isfinite(time_origin):
      raise ValueError(f"Checkpointer.save: time_origin must be finite, got {time_origin!r}")
    if extra is not None and not isinstance(extra, dict):
      raise ValueError(
        f"Checkpointer.save: extra must be a dict or None, got {type(extra).__name__}"
      )
    problems = _spec_mismatches(_leaf_specs(state), _leaf_specs(_abstract_state(cfg)))
    if problems:
      raise ValueError("Checkpointer.save: state does not match cfg: " + "; ".join(problems[:10]))
    metadata = {
      "config": cfg.to_dict(),
      "version": _version(),
      "time_origin": float(time_origin),
      "step": step,
      "extra": {} if extra is None else extra,
    }
    try:
      json.dumps(metadata, allow_nan=False)  # fail here, not in the background writer
    except (TypeError, ValueError) as e:
      raise ValueError(f"Checkpointer.save: extra must be JSON-serialisable: {e}") from e
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
    self, cfg: SonaConfig | None = None, *, step: int | None = None
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

    Returns:
      `(state, cfg, metadata)`: the `SonaState`, the config, and the metadata dict (`config`,
      `version`, `time_origin`, `step`, `extra`).

    Raises:
      FileNotFoundError: no checkpoint in the directory, or `step` is not one of them.
      ValueError: `cfg` disagrees with the saved config (the fields are named), or the stored arrays
        do not have the shapes and dtypes the saved config implies (the leaves are named).
      RuntimeError: every step (or the requested one) is damaged.
    """
    if cfg is not None and not isinstance(cfg, SonaConfig):
      raise TypeError(f"Checkpointer.restore: cfg must be a SonaConfig, got {type(cfg).__name__}")
    self.wait()  # a pending save of ours must land before we read the directory
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(
          f"Checkpointer.restore: step {step!r} not in {self.directory}; steps on disk: {steps}"
        )
      try:
        return self._restore_step(step, cfg)
      except _Damaged as e:
        raise RuntimeError(f"Checkpointer.restore: checkpoint step {step} is damaged: {e}") from e
    failures = []
    for candidate in reversed(steps):
      try:
        result = self._restore_step(candidate, cfg)
      except _Damaged as e:
        failures.append((candidate, e))
        continue
      for bad, err in failures:
        warnings.warn(
          f"Checkpointer.restore: checkpoint step {bad} in {self.directory} is damaged ({err}); "
          f"restored step {candidate} instead",
          RuntimeWarning,
          stacklevel=2,
        )
      return result
    detail = "; ".join(f"step {s}: {e}" for s, e in failures)
    raise RuntimeError(
      f"Checkpointer.restore: no readable checkpoint in {self.directory} ({detail})"
    ) from failures[0][1]

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
    try:
      saved_cfg = SonaConfig.from_dict(metadata["config"])
    except (TypeError, ValueError) as e:
      raise _Damaged(f"metadata config invalid: {e}") from e
    return metadata, saved_cfg

  def _restore_step(self, step: int, cfg: SonaConfig | None):
    metadata, saved_cfg = self._read_metadata(step)
    if cfg is not None:
      bad = _incompatible_fields(cfg, saved_cfg)
      if bad:
        detail = ", ".join(
          f"{n}={getattr(saved_cfg, n)!r} (given {getattr(cfg, n)!r})" for n in bad
        )
        raise ValueError(
          f"Checkpointer.restore: checkpoint step {step} was saved with an incompatible config: "
          f"{detail}"
        )
    target = _abstract_state(saved_cfg)
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
        f"Checkpointer.restore: checkpoint step {step} (sona_jax {metadata['version']}) does not "
        f"match the state of its saved config: " + "; ".join(problems[:10])
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
    problems = _value_problems(state)
    if problems:
      raise ValueError(
        f"Checkpointer.restore: checkpoint step {step} holds values no sona_jax state can have: "
        + "; ".join(problems[:10])
      )
    return state, (saved_cfg if cfg is None else cfg), metadata

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
