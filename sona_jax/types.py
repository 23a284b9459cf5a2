"""Contracts between inference code and the loops: `Interaction`, signals and trajectories.

An `Interaction` is what inference code reports for one request (docs/design.md,
"Interactions and packed rows"). Its fields have fixed shapes so Loop A never retraces. Shapes and
dtypes are checked at the boundary (a wrong one raises `ValueError` before any jit); values are
checked inside Loop A, where a bad one is masked out and counted, never raised.

On the per-request path an interaction crosses into jitted code as ONE packed `f32` vector: a jitted
call costs 1-3 us per pytree leaf passed in, and an interaction has 13 fields. Integer fields travel
bitcast inside the float vector, so ids and times are exact. `pack`, `unpack` and the `S_*`
constants define that layout; nothing outside this module and Loop A needs it.

Loop A writes two records per accepted interaction, also as packed rows of one ring buffer each:
a *signal* (the Loop A -> Loop B channel) and a *trajectory* (query, retrieved ids, precision,
quality, time). `unpack_signals` and `unpack_trajectories` turn rows back into named fields.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax.config import SonaConfig

__all__ = [
  "Interaction",
  "Signal",
  "Trajectory",
  "make_interaction",
  "pack_interaction",
  "stack_interactions",
  "check_interaction",
  "pack",
  "unpack",
  "packed_lr",
  "stamp",
  "resolve_time",
  "TIME_UNSET",
  "packed_width",
  "signal_width",
  "trajectory_width",
  "unpack_signals",
  "unpack_trajectories",
  "host_buffer",
]


class Interaction(NamedTuple):
  """One request's feedback, with fixed shapes (a leading batch axis when stacked).

  Attributes:
    query: f32[dim] query embedding (the input of the adapted layer).
    anchor: i32[] memory node of the query, -1 for none (Hebbian updates start from it).
    used: i32[k] memory ids used in the answer, -1 padded.
    unused: i32[k] memory ids retrieved but not used, -1 padded.
    quality: f32[] estimated answer quality in [0, 1].
    latency_ms: f32[] observed latency.
    target_latency_ms: f32[] latency target (> 0).
    tier: i32[] model tier that served the request, in [0, n_tiers).
    context_tokens: i32[] context length in tokens (>= 0).
    feedback: f32[] explicit user feedback in [0, 1], NaN for none. When given it replaces `quality`
      as the learning signal (explicit beats estimated).
    grad: f32[dim] `dL/dy` at the adapted output, when the caller has a loss (supervised mode).
    has_grad: bool[] whether `grad` is given; otherwise the micro-LoRA learns from retrieval
      feedback.
    time: i32[] seconds since the state's time origin (>= 0).
  """

  query: Any
  anchor: Any
  used: Any
  unused: Any
  quality: Any
  latency_ms: Any
  target_latency_ms: Any
  tier: Any
  context_tokens: Any
  feedback: Any
  grad: Any
  has_grad: Any
  time: Any


class _PackedInteraction(Interaction):
  """An `Interaction` built by `make_interaction`: its fields are read-only views of one packed
  vector, which `pack` returns without copying. Anything that rebuilds it (`_replace`, tree
  unflattening) yields a plain tuple of the subclass without the cache, so a stale vector can
  never be used."""

  _packed: np.ndarray


class Signal(NamedTuple):
  """A learning signal, the Loop A -> Loop B record (fields with a leading record axis)."""

  query: jax.Array  # f32[n, dim]
  quality: jax.Array  # f32[n]: the learning quality (explicit feedback when given, else estimated)
  estimated_quality: jax.Array  # f32[n]: the inference code's own quality estimate
  latency_ratio: jax.Array  # f32[n]: latency_ms / target_latency_ms
  tier: jax.Array  # i32[n]
  context_tokens: jax.Array  # i32[n]
  feedback: jax.Array  # f32[n], NaN for none
  time: jax.Array  # i32[n]
  anchor: jax.Array  # i32[n]


class Trajectory(NamedTuple):
  """A query trajectory record (seed section 2, `QueryTrajectory`), leading record axis.

  `precision` is the fraction of retrieved memories that were used. The seed's estimated recall is
  not observable from an interaction, so the record keeps the learning quality instead.
  """

  query: jax.Array  # f32[n, dim]
  used: jax.Array  # i32[n, k]
  unused: jax.Array  # i32[n, k]
  precision: jax.Array  # f32[n]
  quality: jax.Array  # f32[n]
  time: jax.Array  # i32[n]
  anchor: jax.Array  # i32[n]


# Scalar slots of the packed interaction, after query, used and unused.
(
  S_ANCHOR,
  S_QUALITY,
  S_LATENCY,
  S_TARGET,
  S_TIER,
  S_CONTEXT,
  S_FEEDBACK,
  S_HAS_GRAD,
  S_TIME,
  S_LR,
) = range(10)
N_SCALARS = 10
# `S_LR` is not an `Interaction` field: it carries the micro-LoRA learning rate of a live knob
# into Loop A with the request (NaN: `SonaConfig.micro_lr`), so changing it never recompiles.

TIME_UNSET = -(2**31)
"""The packed time of an interaction made without one: Loop A stamps it with the newest time the
state has seen (`Sona.observe` stamps it with the driver's clock before that)."""
_INT_SCALARS = (S_ANCHOR, S_TIER, S_CONTEXT, S_TIME)

_FIELD_KIND = {  # field -> (numpy kind codes accepted, packed dtype)
  "query": ("f", np.float32),
  "anchor": ("iu", np.int32),
  "used": ("iu", np.int32),
  "unused": ("iu", np.int32),
  "quality": ("f", np.float32),
  "latency_ms": ("f", np.float32),
  "target_latency_ms": ("f", np.float32),
  "tier": ("iu", np.int32),
  "context_tokens": ("iu", np.int32),
  "feedback": ("f", np.float32),
  "grad": ("f", np.float32),
  "has_grad": ("b", np.bool_),
  "time": ("iu", np.int32),
}
_EXACT_DTYPES = tuple(np.dtype(v[1]) for v in _FIELD_KIND.values())


def packed_width(cfg: SonaConfig) -> int:
  """Length of the packed interaction vector: query, used, unused, scalars, grad."""
  return 2 * cfg.dim + 2 * cfg.max_ids + N_SCALARS


def _scalar_offset(cfg: SonaConfig) -> int:
  return cfg.dim + 2 * cfg.max_ids


@functools.lru_cache(maxsize=64)
def _expected_shapes(cfg: SonaConfig, batch: tuple[int, ...] = ()) -> tuple:
  d, k = (cfg.dim,), (cfg.max_ids,)
  s = ()
  return tuple(batch + x for x in (d, s, k, k, s, s, s, s, s, s, d, s, s))


def check_interaction(interaction: Interaction, cfg: SonaConfig, *, batched: bool = False):
  """Raises `ValueError` when a field's shape or dtype does not match `cfg`.

  Values are not checked here (Loop A masks and counts bad values). Floating fields accept any float
  dtype, id and count fields any integer dtype whose values fit int32, `has_grad` only bool.

  Args:
    interaction: an `Interaction` of NumPy or JAX arrays (or Python scalars).
    cfg: the config it must match.
    batched: whether every field has one leading batch axis.

  Returns:
    The batch size (0 when not batched).
  """
  if not isinstance(interaction, Interaction):
    raise TypeError(f"expected an Interaction, got {type(interaction).__name__}")
  batch: tuple[int, ...] = ()
  if batched:
    q = np.shape(interaction.query)
    if len(q) != 2:
      raise ValueError(f"Interaction.query must be f32[batch, {cfg.dim}] when batched, got {q}")
    batch = (q[0],)
  expected = _expected_shapes(cfg, batch)
  for (name, (kinds, _)), value, shape in zip(
    _FIELD_KIND.items(), interaction, expected, strict=True
  ):
    got = np.shape(value)
    if got != shape:
      raise ValueError(f"Interaction.{name} has shape {got}; expected {shape} for {cfg.dim=}")
    # np.result_type would read a list as a structured dtype and a string as a dtype name.
    dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype
    if dtype.kind not in kinds:
      raise ValueError(
        f"Interaction.{name} has dtype {dtype}; expected "
        + {"f": "a float dtype", "iu": "an integer dtype", "b": "bool"}[kinds]
      )
    if kinds == "iu" and dtype.itemsize > 4 or dtype == np.uint32:
      arr = np.asarray(value)
      if arr.size and (arr.min() < -(2**31) or arr.max() > 2**31 - 1):
        raise ValueError(f"Interaction.{name} has values outside int32")
  return batch[0] if batched else 0


_SCALARS = struct.Struct("<ifffiiffif")  # anchor, quality, latency, target, ... in S_* order
assert [
  S_ANCHOR,
  S_QUALITY,
  S_LATENCY,
  S_TARGET,
  S_TIER,
  S_CONTEXT,
  S_FEEDBACK,
  S_HAS_GRAD,
  S_TIME,
  S_LR,
] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


_ALIGN = 64  # bytes


def host_buffer(shape) -> np.ndarray:
  """An uninitialised float32 NumPy array whose data is 64-byte aligned.

  JAX on CPU passes an aligned host array into a jitted call without copying it (measured: a
  [256, 1566] batch in 15 us against 250 us for NumPy's default 16-byte alignment), so packed
  batches are built in one. A single packed interaction is not: for one row the copy is cheaper
  than this allocation (~2 us), and the step measured the same either way. The array must not
  change while a call that received it may still read it (JAX then holds it).

  Examples:
    >>> from sona_jax import types
    >>> buf = types.host_buffer((3, 5))
    >>> buf.shape, buf.dtype.name, buf.ctypes.data % 64
    ((3, 5), 'float32', 0)
  """
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  n = math.prod(shape)
  raw = np.empty(n + _ALIGN // 4, np.float32)
  at = (-raw.ctypes.data % _ALIGN) // 4
  return raw[at : at + n].reshape(shape)


def _pack_one(i: Interaction) -> np.ndarray:
  """Host packing of one exact-dtype interaction (the per-request fast path, ~2 us)."""
  scalars = _SCALARS.pack(
    int(i.anchor),
    float(i.quality),
    float(i.latency_ms),
    float(i.target_latency_ms),
    int(i.tier),
    int(i.context_tokens),
    float(i.feedback),
    float(bool(i.has_grad)),
    int(i.time),
    math.nan,
  )
  return np.concatenate(
    [
      i.query,
      i.used.view(np.float32),
      i.unused.view(np.float32),
      np.frombuffer(scalars, np.float32),
      i.grad,
    ]
  )


def _pack_numpy(interaction: Interaction, cfg: SonaConfig, batch: tuple[int, ...]) -> np.ndarray:
  width = packed_width(cfg)
  out = host_buffer(batch + (width,)) if batch else np.empty((width,), np.float32)
  with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf (rejected)
    return _pack_numpy_into(out, interaction, cfg)


def _pack_numpy_into(out: np.ndarray, interaction: Interaction, cfg: SonaConfig) -> np.ndarray:
  d, k = cfg.dim, cfg.max_ids
  iv = out.view(np.int32)
  s0 = _scalar_offset(cfg)
  out[..., :d] = interaction.query
  iv[..., d : d + k] = interaction.used
  iv[..., d + k : s0] = interaction.unused
  iv[..., s0 + S_ANCHOR] = interaction.anchor
  out[..., s0 + S_QUALITY] = interaction.quality
  out[..., s0 + S_LATENCY] = interaction.latency_ms
  out[..., s0 + S_TARGET] = interaction.target_latency_ms
  iv[..., s0 + S_TIER] = interaction.tier
  iv[..., s0 + S_CONTEXT] = interaction.context_tokens
  out[..., s0 + S_FEEDBACK] = interaction.feedback
  out[..., s0 + S_HAS_GRAD] = interaction.has_grad
  iv[..., s0 + S_TIME] = interaction.time
  out[..., s0 + S_LR] = np.nan
  out[..., s0 + N_SCALARS :] = interaction.grad
  return out


def _bits(x) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.float32)


def _pack_jax(interaction: Interaction, cfg: SonaConfig) -> jax.Array:
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  i = interaction
  scalars = [
    _bits(i.anchor),
    f32(i.quality),
    f32(i.latency_ms),
    f32(i.target_latency_ms),
    _bits(i.tier),
    _bits(i.context_tokens),
    f32(i.feedback),
    f32(i.has_grad),
    _bits(i.time),
    jnp.full(jnp.shape(i.quality), jnp.nan, jnp.float32),
  ]
  parts = [f32(i.query), _bits(i.used), _bits(i.unused), jnp.stack(scalars, axis=-1), f32(i.grad)]
  return jnp.concatenate(parts, axis=-1)


def pack(interaction: Interaction, cfg: SonaConfig, *, batched: bool = False, check: bool = True):
  """Packs an interaction into one `f32[packed_width(cfg)]` vector (or `[batch, width]`).

  NumPy (or concrete JAX) fields are packed on the host, which is far cheaper than passing 13 leaves
  into a jitted call; traced fields (inside a user's `jit`/`vmap`) are packed with `jnp`.

  Raises:
    ValueError: a field's shape or dtype does not match `cfg` (see `check_interaction`).
  """
  if not isinstance(interaction, Interaction):
    raise TypeError(f"expected an Interaction, got {type(interaction).__name__}")
  # Fastest path: built by `make_interaction` for this config; already packed, read-only.
  cached = getattr(interaction, "_packed", None)
  if (
    cached is not None
    and not batched
    and interaction.query.shape[0] == cfg.dim
    and interaction.used.shape[0] == cfg.max_ids
  ):
    return cached
  # Fast path: NumPy arrays of exactly the packed dtypes and shapes.
  if (
    not batched
    and all(type(x) is np.ndarray for x in interaction)
    and tuple(x.dtype for x in interaction) == _EXACT_DTYPES
    and tuple(x.shape for x in interaction) == _expected_shapes(cfg)
  ):
    return _pack_one(interaction)
  if check:
    check_interaction(interaction, cfg, batched=batched)
  if any(isinstance(x, jax.core.Tracer) for x in interaction):
    return _pack_jax(interaction, cfg)
  batch = (int(np.shape(interaction.query)[0]),) if batched else ()
  return _pack_numpy(interaction, cfg, batch)


def unpack(packed: jax.Array, cfg: SonaConfig) -> Interaction:
  """Inverse of `pack` for one packed vector (used inside Loop A)."""
  d, k = cfg.dim, cfg.max_ids
  s0 = _scalar_offset(cfg)
  as_int = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
  s = packed[s0 : s0 + N_SCALARS]
  return Interaction(
    query=packed[:d],
    anchor=as_int(s[S_ANCHOR]),
    used=as_int(packed[d : d + k]),
    unused=as_int(packed[d + k : s0]),
    quality=s[S_QUALITY],
    latency_ms=s[S_LATENCY],
    target_latency_ms=s[S_TARGET],
    tier=as_int(s[S_TIER]),
    context_tokens=as_int(s[S_CONTEXT]),
    feedback=s[S_FEEDBACK],
    grad=packed[s0 + N_SCALARS :],
    has_grad=s[S_HAS_GRAD] != 0,
    time=as_int(s[S_TIME]),
  )


def packed_lr(packed: jax.Array, cfg: SonaConfig) -> jax.Array:
  """The micro-LoRA learning rate a packed interaction carries: its live knob, or `cfg.micro_lr`
  when it carries none (NaN)."""
  lr = packed[..., _scalar_offset(cfg) + S_LR]
  return jnp.where(jnp.isnan(lr), jnp.float32(cfg.micro_lr), lr)


def stamp(packed: np.ndarray, cfg: SonaConfig, *, now: int | None = None, micro_lr=None):
  """A copy of host-packed interactions with an unset time set to `now` and the learning-rate knob
  set to `micro_lr` (each left as is when None). The driver's per-request path (~1 us).

  Args:
    packed: f32[width] or f32[batch, width] from `pack`.
    cfg: the config.
    now: seconds since the origin, for interactions made without a time.
    micro_lr: the live micro-LoRA learning rate (None: `cfg.micro_lr`).
  """
  if np.ndim(packed) == 1:  # one request: a plain copy (alignment gains nothing for one row)
    out = np.array(packed, np.float32, copy=True)
  else:
    out = host_buffer(np.shape(packed))
    out[...] = packed
  j = _scalar_offset(cfg) + S_TIME
  if now is not None:
    iv = out.view(np.int32)
    if out.ndim == 1:  # the per-request case: a scalar test, no mask
      if iv[j] == TIME_UNSET:
        iv[j] = now
    else:
      times = iv[:, j]
      times[times == TIME_UNSET] = now
  if micro_lr is not None:
    out[..., j + (S_LR - S_TIME)] = micro_lr
  return out


def resolve_time(packed: jax.Array, cfg: SonaConfig, newest) -> jax.Array:
  """Inside Loop A: an unset time (`TIME_UNSET`) becomes `newest`, the newest time the state saw."""
  j = _scalar_offset(cfg) + S_TIME
  t = jax.lax.bitcast_convert_type(packed[..., j], jnp.int32)
  t = jnp.where(t == TIME_UNSET, jnp.asarray(newest, jnp.int32), t)
  return packed.at[..., j].set(jax.lax.bitcast_convert_type(t, jnp.float32))


def _ids_into(out: np.ndarray, name: str, ids, k: int):
  """Writes `ids` into the int32 view `out[k]`, padding with -1."""
  if type(ids) in (list, tuple) and all(type(v) is int for v in ids):
    n = len(ids)
    if n > k:
      raise ValueError(
        f"make_interaction: {name} has {n} ids; at most max_ids={k} (SonaConfig.max_ids)"
      )
    if n and (min(ids) < -(2**31) or max(ids) > 2**31 - 1):
      raise ValueError(f"make_interaction: {name} has ids outside int32")
    out[:n] = ids
    out[n:] = -1
    return
  arr = np.asarray(ids)
  if arr.size == 0:
    arr = arr.reshape(0).astype(np.int64)
  if arr.ndim != 1:
    raise ValueError(
      f"make_interaction: {name} must be a 1-D sequence of ids, got shape {arr.shape}"
    )
  if arr.dtype.kind not in "iu":
    raise ValueError(f"make_interaction: {name} must hold integers, got dtype {arr.dtype}")
  if arr.shape[0] > k:
    raise ValueError(
      f"make_interaction: {name} has {arr.shape[0]} ids; at most max_ids={k} (SonaConfig.max_ids)"
    )
  if arr.size and (arr.min() < -(2**31) or arr.max() > 2**31 - 1):
    raise ValueError(f"make_interaction: {name} has ids outside int32")
  out[: arr.shape[0]] = arr
  out[arr.shape[0] :] = -1


def _int(name: str, value) -> int:
  if type(value) is int:
    v = value
  elif isinstance(value, (np.integer, np.ndarray, jax.Array)) and np.ndim(value) == 0:
    if np.asarray(value).dtype.kind not in "iu":
      raise ValueError(f"make_interaction: {name} must be an integer, got {value!r}")
    v = int(value)
  else:
    raise ValueError(f"make_interaction: {name} must be an integer, got {value!r}")
  if not -(2**31) <= v <= 2**31 - 1:
    raise ValueError(f"make_interaction: {name}={value!r} does not fit int32")
  return v


_F32_MAX = float(np.finfo(np.float32).max)


def _float(name: str, value) -> float:
  """A Python float of `value`; beyond float32's range it becomes +-inf (Loop A then rejects it)."""
  if type(value) is float or type(value) is int:
    v = float(value)
  elif (
    isinstance(value, (np.floating, np.integer, np.ndarray, jax.Array))
    and np.ndim(value) == 0
    and np.asarray(value).dtype.kind in "fiu"
  ):
    v = float(value)
  else:
    raise ValueError(f"make_interaction: {name} must be a number, got {value!r}")
  if abs(v) > _F32_MAX:  # also true for +-inf; NaN stays NaN
    return math.copysign(math.inf, v)
  return v


def pack_interaction(
  cfg: SonaConfig,
  *,
  query,
  quality,
  anchor: int = -1,
  used: Sequence[int] = (),
  unused: Sequence[int] = (),
  tier: int = 0,
  latency_ms: float = 0.0,
  target_latency_ms: float | None = None,
  context_tokens: int = 0,
  feedback: float = math.nan,
  grad=None,
  time: int | None = None,
  micro_lr: float | None = None,
  out: np.ndarray | None = None,
) -> np.ndarray:
  """`pack(make_interaction(cfg, ...))` in one pass: the fields written straight into the packed
  vector, without building an `Interaction` (the request path of `Sona.observe(query=...)`).

  Args:
    cfg: the learner's config.
    query: as in `make_interaction`, like every field up to `time` (`quality`, `anchor`, `used`,
      `unused`, `tier`, `latency_ms`, `target_latency_ms`, `context_tokens`, `feedback`, `grad`):
      the same checks, the same errors.
    micro_lr: the live micro-LoRA learning rate it carries into Loop A (None: `cfg.micro_lr`).
    out: f32[packed_width(cfg)] to write into (a new array when None).

  Returns:
    f32[packed_width(cfg)], the packed interaction (`out` when given).

  Examples:
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=4, base_rank=4)
    >>> p = sona.types.pack_interaction(cfg, query=[1.0, 0.0, 0.0, 0.0], quality=0.2, used=[3])
    >>> p.shape == (sona.types.packed_width(cfg),)
    True
  """
  d, k = cfg.dim, cfg.max_ids
  s0 = _scalar_offset(cfg)
  width = packed_width(cfg)
  if out is None:
    buf = np.empty((width,), np.float32)
  elif type(out) is not np.ndarray or out.shape != (width,) or out.dtype != np.float32:
    raise ValueError(f"pack_interaction: out must be a float32 NumPy array of shape ({width},)")
  else:
    buf = out
  ibuf = buf.view(np.int32)
  q = query if type(query) is np.ndarray else np.asarray(query)
  if q.dtype.kind not in "fiu":
    raise ValueError(f"make_interaction: query must be numeric, got dtype {q.dtype}")
  if q.shape != (d,):
    raise ValueError(f"make_interaction: query has shape {q.shape}; expected ({d},)")
  if q.dtype.itemsize > 4:  # float64 beyond float32's range becomes inf (rejected), silently
    with np.errstate(over="ignore"):
      buf[:d] = q
  else:
    buf[:d] = q
  if grad is None:
    buf[s0 + N_SCALARS :] = 0.0
  else:
    g = grad if type(grad) is np.ndarray else np.asarray(grad)
    if g.dtype.kind not in "fiu":
      raise ValueError(f"make_interaction: grad must be numeric, got dtype {g.dtype}")
    if g.shape != (d,):
      raise ValueError(f"make_interaction: grad has shape {g.shape}; expected ({d},)")
    with np.errstate(over="ignore"):
      buf[s0 + N_SCALARS :] = g
  _ids_into(ibuf[d : d + k], "used", used, k)
  _ids_into(ibuf[d + k : s0], "unused", unused, k)
  if target_latency_ms is None:
    target_latency_ms = cfg.target_latency_ms
  _SCALARS.pack_into(
    buf,
    4 * s0,
    _int("anchor", anchor),
    _float("quality", quality),
    _float("latency_ms", latency_ms),
    _float("target_latency_ms", target_latency_ms),
    _int("tier", tier),
    _int("context_tokens", context_tokens),
    _float("feedback", feedback),
    0.0 if grad is None else 1.0,
    TIME_UNSET if time is None else _int("time", time),
    math.nan if micro_lr is None else _float("micro_lr", micro_lr),
  )
  return buf


def make_interaction(
  cfg: SonaConfig,
  *,
  query,
  quality,
  anchor: int = -1,
  used: Sequence[int] = (),
  unused: Sequence[int] = (),
  tier: int = 0,
  latency_ms: float = 0.0,
  target_latency_ms: float | None = None,
  context_tokens: int = 0,
  feedback: float = math.nan,
  grad=None,
  time: int | None = None,
) -> Interaction:
  """Builds an `Interaction` of NumPy arrays from Python values, padding the id lists with -1.

  Shapes and dtypes are checked here (`ValueError` naming the field); values are not: a NaN quality
  or an out-of-range id is rejected and counted by Loop A, which never lets it reach the state.

  Args:
    cfg: the learner's config (`dim`, `max_ids`, default `target_latency_ms`).
    query: f32[dim] query embedding.
    quality: estimated answer quality in [0, 1].
    anchor: memory node of the query, -1 for none.
    used: ids of memories used in the answer (at most `cfg.max_ids`).
    unused: ids of memories retrieved but not used (at most `cfg.max_ids`).
    tier: model tier that served the request.
    latency_ms: observed latency.
    target_latency_ms: latency target; `cfg.target_latency_ms` when None.
    context_tokens: context length in tokens.
    feedback: explicit user feedback in [0, 1], NaN for none.
    grad: optional f32[dim] gradient `dL/dy` at the adapted output (supervised mode).
    time: int seconds since the state's time origin; None (the default) for "now": the driver
      (`Sona.observe`) stamps it with its clock, and Loop A called directly with the newest time
      the state has seen (`types.TIME_UNSET` in the packed vector).

  Returns:
    An `Interaction` whose fields are NumPy arrays of the exact packed dtypes.

  Examples:
    >>> import sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=4, base_rank=4, max_ids=4)
    >>> it = sona.make_interaction(cfg, query=[1.0, 0.0, 0.0, 0.0], quality=0.2, used=[3])
    >>> it.used.tolist()  # padded with -1 to max_ids
    [3, -1, -1, -1]
  """
  d, k = cfg.dim, cfg.max_ids
  s0 = _scalar_offset(cfg)
  buf = pack_interaction(
    cfg,
    query=query,
    quality=quality,
    anchor=anchor,
    used=used,
    unused=unused,
    tier=tier,
    latency_ms=latency_ms,
    target_latency_ms=target_latency_ms,
    context_tokens=context_tokens,
    feedback=feedback,
    grad=grad,
    time=time,
  )
  ibuf = buf.view(np.int32)
  buf.setflags(write=False)
  ibuf.setflags(write=False)
  fview = lambda j: buf[s0 + j : s0 + j + 1].reshape(())
  iview = lambda j: ibuf[s0 + j : s0 + j + 1].reshape(())
  has = np.array(grad is not None)
  has.setflags(write=False)
  out = _PackedInteraction(
    query=buf[:d],
    anchor=iview(S_ANCHOR),
    used=ibuf[d : d + k],
    unused=ibuf[d + k : s0],
    quality=fview(S_QUALITY),
    latency_ms=fview(S_LATENCY),
    target_latency_ms=fview(S_TARGET),
    tier=iview(S_TIER),
    context_tokens=iview(S_CONTEXT),
    feedback=fview(S_FEEDBACK),
    grad=buf[s0 + N_SCALARS :],
    has_grad=has,
    time=iview(S_TIME),
  )
  out._packed = buf
  return out


def stack_interactions(interactions: Sequence[Interaction]) -> Interaction:
  """Stacks interactions along a new leading batch axis (for `instant_scan`)."""
  if len(interactions) == 0:
    raise ValueError("stack_interactions: need at least one interaction")
  for i, it in enumerate(interactions):
    if not isinstance(it, Interaction):
      raise TypeError(f"stack_interactions: item {i} is a {type(it).__name__}, not an Interaction")
  columns = zip(*interactions, strict=True)
  return Interaction(*(np.stack([np.asarray(f) for f in fields]) for fields in columns))


# ---------------------------------------------------------------------------------------------
# Signal and trajectory rows (packed f32 rows of the Loop A ring buffers).

(
  G_QUALITY,
  G_EST_QUALITY,
  G_LATENCY_RATIO,
  G_TIER,
  G_CONTEXT,
  G_FEEDBACK,
  G_TIME,
  G_ANCHOR,
) = range(8)
N_SIGNAL_SCALARS = 8

T_PRECISION, T_QUALITY, T_TIME, T_ANCHOR = range(4)
N_TRAJ_SCALARS = 4


def signal_width(cfg: SonaConfig) -> int:
  """Width of a packed signal row: query then 8 scalars."""
  return cfg.dim + N_SIGNAL_SCALARS


def trajectory_width(cfg: SonaConfig) -> int:
  """Width of a packed trajectory row: query, used ids, unused ids, then 4 scalars."""
  return cfg.dim + 2 * cfg.max_ids + N_TRAJ_SCALARS


def _as_int(x):
  if isinstance(x, np.ndarray):
    return np.ascontiguousarray(x).view(np.int32)
  return jax.lax.bitcast_convert_type(x, jnp.int32)


def unpack_signals(rows, cfg: SonaConfig) -> Signal:
  """Signal fields from packed rows `f32[n, signal_width]` (NumPy or JAX)."""
  d = cfg.dim
  s = rows[..., d:]
  return Signal(
    query=rows[..., :d],
    quality=s[..., G_QUALITY],
    estimated_quality=s[..., G_EST_QUALITY],
    latency_ratio=s[..., G_LATENCY_RATIO],
    tier=_as_int(s[..., G_TIER]),
    context_tokens=_as_int(s[..., G_CONTEXT]),
    feedback=s[..., G_FEEDBACK],
    time=_as_int(s[..., G_TIME]),
    anchor=_as_int(s[..., G_ANCHOR]),
  )


def unpack_trajectories(rows, cfg: SonaConfig) -> Trajectory:
  """Trajectory fields from packed rows `f32[n, trajectory_width]` (NumPy or JAX)."""
  d, k = cfg.dim, cfg.max_ids
  s = rows[..., d + 2 * k :]
  return Trajectory(
    query=rows[..., :d],
    used=_as_int(rows[..., d : d + k]),
    unused=_as_int(rows[..., d + k : d + 2 * k]),
    precision=s[..., T_PRECISION],
    quality=s[..., T_QUALITY],
    time=_as_int(s[..., T_TIME]),
    anchor=_as_int(s[..., T_ANCHOR]),
  )
