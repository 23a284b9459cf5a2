"""A fixed-capacity ring buffer over any record pytree (docs/design.md, "Ring buffers").

The Loop A -> Loop B channel of learning signals and the trajectory log are such buffers inside the
learner state. A record is any pytree of arrays; the buffer stores each leaf with a leading axis of
length `capacity`. Everything here is a pure function of a `RingBuffer` and jittable, with the
capacity read from the static shape of the data.

When the buffer is full a push overwrites the OLDEST record. The peer implementation (ruvector
SONA) drops the NEWEST record instead, which is wrong for learning from recent traffic: the learner
would keep training on stale signals and never see the latest ones. We keep the newest and count
honestly: a record overwritten before it was consumed increments `dropped`.

Counters live in one `meta: i32[5]` array, indexed by the module constants `HEAD`, `SIZE`,
`WRITTEN`, `READ` and `DROPPED`:

- `head`: the next slot to write, in `[0, capacity)`.
- `size`: the number of valid records, `<= capacity`.
- `written`: the total number of records ever pushed; also the sequence number the next pushed
  record will get (the first record pushed is sequence number 0).
- `read`: the sequence number of the oldest record not yet consumed.
- `dropped`: records overwritten before being consumed.

`written`, `read` and `dropped` are int32 and wrap modulo 2**32. Every comparison uses wrapping
differences such as `written - cursor`, which are exact while fewer than 2**31 records separate the
two sequence numbers.

Examples:
  >>> import jax.numpy as jnp
  >>> buf = init_buffer({"x": jnp.zeros(2, jnp.float32)}, capacity=2)
  >>> for v in (1.0, 2.0, 3.0):
  ...   buf = push(buf, {"x": jnp.full(2, v, jnp.float32)})
  >>> [float(r["x"][0]) for r in to_list(buf)]
  [2.0, 3.0]
  >>> int(buf.meta[DROPPED]), int(unread(buf))
  (1, 2)
  >>> buf, records, mask = consume(buf)
  >>> records["x"][:, 0].tolist(), mask.tolist(), int(unread(buf))
  ([2.0, 3.0], [True, True], 0)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "DROPPED",
  "HEAD",
  "READ",
  "SIZE",
  "WRITTEN",
  "RingBuffer",
  "capacity",
  "consume",
  "init_buffer",
  "push",
  "push_many",
  "recent",
  "since",
  "to_list",
  "unread",
]

HEAD = 0
SIZE = 1
WRITTEN = 2
READ = 3
DROPPED = 4
_N_META = 5


class RingBuffer(NamedTuple):
  """State of a ring buffer.

  Attributes:
    data: pytree of arrays, each `[capacity, *record_shape]`: the record slots.
    meta: `i32[5]`, `[head, size, written, read, dropped]` (see the module docstring).
  """

  data: Any
  meta: jax.Array


def _leaf_spec(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    x = jnp.asarray(x)
  return tuple(x.shape), np.dtype(x.dtype)


def init_buffer(example_record: Any, capacity: int) -> RingBuffer:
  """An empty ring buffer for records shaped like `example_record`.

  Args:
    example_record: pytree of arrays or `jax.ShapeDtypeStruct` leaves describing ONE record;
      only shapes and dtypes are used. Must have at least one leaf.
    capacity: number of record slots, a positive Python int.

  Returns:
    A `RingBuffer` with `data` leaves `zeros[capacity, *leaf.shape]` and all counters 0.
  """
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
    raise ValueError(f"init_buffer: capacity must be a positive int, got {capacity!r}")
  capacity = int(capacity)
  leaves = jax.tree.leaves(example_record)
  if not leaves:
    raise ValueError("init_buffer: example_record must have at least one array leaf, got none")

  def zeros(x):
    shape, dtype = _leaf_spec(x)
    return jnp.zeros((capacity, *shape), dtype)

  data = jax.tree.map(zeros, example_record)
  return RingBuffer(data=data, meta=jnp.zeros((_N_META,), jnp.int32))


def capacity(buf: RingBuffer) -> int:
  """The number of record slots of `buf`: a static Python int read from the data's shape."""
  leaves = jax.tree.leaves(buf.data)
  if not leaves:
    raise ValueError("capacity: buffer data has no array leaves")
  caps = {int(x.shape[0]) for x in leaves}
  if len(caps) != 1:
    raise ValueError(f"capacity: data leaves disagree on the leading axis, got {sorted(caps)}")
  return caps.pop()


def _check_record(name: str, slot: jax.Array, value: Any, batched: bool) -> jax.Array:
  """Shape/dtype check of one record leaf against its buffer leaf; returns it cast to the dtype."""
  value = jnp.asarray(value)
  want = tuple(slot.shape[1:])
  got = tuple(value.shape[1:]) if batched else tuple(value.shape)
  if batched and value.ndim == 0:
    raise ValueError(f"{name}: batched record leaf must have a leading batch axis, got a scalar")
  if got != want:
    kind = "per-record shape" if batched else "shape"
    raise ValueError(f"{name}: record leaf {kind} {got} does not match the buffer's {want}")
  if not np.can_cast(value.dtype, slot.dtype, casting="same_kind"):
    raise TypeError(f"{name}: record leaf dtype {value.dtype} cannot be stored as {slot.dtype}")
  return value.astype(slot.dtype)


def _as_bool_scalar(name: str, where: Any) -> jax.Array:
  where = jnp.asarray(where)
  if where.ndim != 0:
    raise ValueError(f"{name}: where must be a bool scalar, got shape {where.shape}")
  return where.astype(jnp.bool_)


def push(buf: RingBuffer, record: Any, *, where: Any = True) -> RingBuffer:
  """Writes one record at `head`, overwriting the oldest record when the buffer is full.

  If the overwritten record was not yet consumed (`written - read >= capacity`), `dropped` grows by
  one and `read` advances past it. The write is a `lax.dynamic_update_slice` of one row per leaf,
  O(record) work and in place when `buf` is donated.

  Args:
    buf: the buffer.
    record: pytree with the structure of `buf.data`, each leaf `[*record_shape]`.
    where: bool scalar, may be traced. When False the buffer comes back bit-identical: the old row
      at `head` is rewritten and the counters are unchanged.

  Returns:
    The updated buffer.
  """
  cap = capacity(buf)
  where = _as_bool_scalar("push", where)
  meta = buf.meta
  head = meta[HEAD]

  def write(slot, value):
    value = _check_record("push", slot, value, batched=False)
    start = (head,) + (0,) * value.ndim
    old = lax.dynamic_index_in_dim(slot, head, axis=0, keepdims=False)
    row = lax.select(where, value, old)
    return lax.dynamic_update_slice(slot, row[None], start)

  data = jax.tree.map(write, buf.data, record)

  size, written, read, dropped = meta[SIZE], meta[WRITTEN], meta[READ], meta[DROPPED]
  # Wrapping difference: exact while fewer than 2**31 records separate `read` from `written`.
  overwrite_unread = (written - read >= cap).astype(jnp.int32)
  new_meta = jnp.stack(
    [
      (head + 1) % cap,
      jnp.minimum(size + 1, cap),
      written + 1,
      read + overwrite_unread,
      dropped + overwrite_unread,
    ]
  )
  return RingBuffer(data=data, meta=lax.select(where, new_meta, meta))


def push_many(buf: RingBuffer, records: Any, *, where: Any = None) -> RingBuffer:
  """Pushes a batch of records with the result of pushing them one by one, in order.

  Record `j` with `where[j]` True gets the slot `(head + rank_j) % capacity`, where `rank_j` counts
  the valid records before it; only the last `capacity` valid records can survive, so the others
  are not written at all (a single scatter, O(min(n, capacity) * record) useful work, with any `n`).

  Args:
    buf: the buffer.
    records: pytree with the structure of `buf.data`, each leaf `[n, *record_shape]`.
    where: `bool[n]` (or a bool scalar applied to all), None for all True. Masked records are
      skipped as if they were never pushed.

  Returns:
    The updated buffer; bit-identical to `buf` when no record is valid.
  """
  cap = capacity(buf)
  values = jax.tree.map(
    lambda slot, value: _check_record("push_many", slot, value, batched=True), buf.data, records
  )
  ns = {int(x.shape[0]) for x in jax.tree.leaves(values)}
  if len(ns) != 1:
    raise ValueError(f"push_many: record leaves disagree on the batch axis, got {sorted(ns)}")
  n = ns.pop()
  if where is None:
    mask = jnp.ones((n,), jnp.bool_)
  else:
    mask = jnp.asarray(where).astype(jnp.bool_)
    if mask.ndim == 0:
      mask = jnp.broadcast_to(mask, (n,))
    if mask.shape != (n,):
      raise ValueError(f"push_many: where must be bool[{n}] or a scalar, got shape {mask.shape}")

  meta = buf.meta
  head, size, written, read, dropped = (meta[i] for i in range(_N_META))
  valid = mask.astype(jnp.int32)
  rank = jnp.cumsum(valid, dtype=jnp.int32) - 1  # rank among valid records, [n]
  total = jnp.sum(valid, dtype=jnp.int32)
  keep = mask & (rank >= total - cap)
  # Kept records land on distinct slots; the rest go to distinct out-of-range rows and are dropped.
  slot_idx = jnp.where(keep, (head + rank) % cap, cap + jnp.arange(n, dtype=jnp.int32))

  def write(slot, value):
    return slot.at[slot_idx].set(value, mode="drop", unique_indices=True)

  data = jax.tree.map(write, buf.data, values)

  # Sequentially each push overwriting an unread record keeps `unread == capacity`; in closed form:
  unread_before = written - read
  unread_after = jnp.minimum(unread_before + total, cap)
  lost = unread_before + total - unread_after
  new_meta = jnp.stack(
    [
      (head + total) % cap,
      jnp.minimum(size + total, cap),
      written + total,
      read + lost,
      dropped + lost,
    ]
  )
  return RingBuffer(data=data, meta=new_meta)


def since(buf: RingBuffer, cursor: Any) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
  """A non-consuming view of the records with sequence number `>= cursor`.

  Args:
    buf: the buffer.
    cursor: `i32[]` sequence number, e.g. a `written` seen earlier. Records between `cursor` and
      `written` that were already overwritten are reported as `missed`. A cursor ahead of `written`
      yields nothing.

  Returns:
    `(records, mask, n_new, missed)`: `records` has the structure of `buf.data`, each leaf
    `[capacity, *record_shape]`, with the `n_new` available records oldest -> newest in the first
    rows and zeros after; `mask: bool[capacity]` marks the first `n_new` rows; `n_new: i32[]`;
    `missed: i32[]` counts records after the cursor that are no longer available.
  """
  cap = capacity(buf)
  cursor = jnp.asarray(cursor, jnp.int32)
  meta = buf.meta
  head, size, written = meta[HEAD], meta[SIZE], meta[WRITTEN]
  pending = jnp.maximum(written - cursor, 0)  # wrapping difference
  n_new = jnp.minimum(pending, size)
  missed = pending - n_new
  i = jnp.arange(cap, dtype=jnp.int32)
  mask = i < n_new
  idx = (head - n_new + i) % cap

  def gather(slot):
    rows = jnp.take(slot, idx, axis=0, mode="clip")
    m = mask.reshape((cap,) + (1,) * (slot.ndim - 1))
    return jnp.where(m, rows, jnp.zeros_like(rows))

  return jax.tree.map(gather, buf.data), mask, n_new, missed


def recent(buf: RingBuffer, n: int) -> tuple[Any, jax.Array]:
  """A window of `n` record slots that holds the newest record, without copying the ring in order.

  For reading many recent records at once (e.g. a nearest-neighbour lookup over them), where order
  does not matter and a gather of the whole ring would cost more than the lookup. The window is
  the `n` slots ending at the newest record; once the ring has wrapped past the window's start it is
  slots `[0, n)`: the newest `head` records and the oldest `n - head` ones. Either way it holds
  `min(n, size)` valid records, the newest among them.

  Args:
    buf: the buffer.
    n: window length (static); at least the capacity reads every slot.

  Returns:
    `(records, valid)`: `records` has the structure of `buf.data` with leading axis `min(n,
    capacity)` (slots in ring order, not time order); `valid: bool[min(n, capacity)]` marks the
    slots holding a record.

  Examples:
    >>> buf = init_buffer(jnp.zeros((), jnp.float32), capacity=4)
    >>> for v in (1.0, 2.0, 3.0, 4.0, 5.0):
    ...   buf = push(buf, jnp.float32(v))
    >>> rows, valid = recent(buf, 2)  # head is slot 1 after the wrap: slots 0 and 1
    >>> rows.tolist(), valid.tolist()
    ([5.0, 2.0], [True, True])
    >>> rows, valid = recent(init_buffer(jnp.zeros((), jnp.float32), 4), 2)
    >>> valid.tolist()
    [False, False]
  """
  cap = capacity(buf)
  n = min(int(n), cap)
  head, size = buf.meta[HEAD], buf.meta[SIZE]
  if n == cap:
    start = jnp.int32(0)
    records = buf.data
  else:
    start = jnp.clip(head - n, 0, cap - n)
    records = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, start, n, axis=0), buf.data)
  slots = start + jnp.arange(n, dtype=jnp.int32)
  age = (head - 1 - slots) % cap  # 0 for the newest record
  return records, age < size


def consume(buf: RingBuffer) -> tuple[RingBuffer, Any, jax.Array]:
  """Takes every unread record: `since(buf, read)` and advances `read` to `written`.

  Loop B drains the Loop A -> Loop B channel with it, so each record is consumed exactly once.

  Returns:
    `(buf, records, mask)` as in `since`; `buf` has `read == written`.
  """
  records, mask, _, _ = since(buf, buf.meta[READ])
  meta = buf.meta.at[READ].set(buf.meta[WRITTEN])
  return RingBuffer(data=buf.data, meta=meta), records, mask


def unread(buf: RingBuffer) -> jax.Array:
  """The number of records not yet consumed, `i32[]` (`written - read`, wrapping)."""
  return buf.meta[WRITTEN] - buf.meta[READ]


def to_list(buf: RingBuffer) -> list[Any]:
  """Host helper (not jittable): the valid records oldest -> newest, as NumPy pytrees."""
  cap = capacity(buf)
  meta = np.asarray(jax.device_get(buf.meta))
  data = jax.device_get(buf.data)
  head, size = int(meta[HEAD]), int(meta[SIZE])
  slots = [(head - size + i) % cap for i in range(size)]
  return [jax.tree.map(lambda x, s=s: np.asarray(x[s]), data) for s in slots]
