"""Tests of `sona_jax.buffer`: a deque-based reference model, bit-identity of masked pushes, `since`
cursors, int32 wrap-around of the counters, and no retracing of the donated jitted push."""

import collections

import hypothesis.strategies as st
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sona_jax.buffer import (
  DROPPED,
  HEAD,
  READ,
  SIZE,
  WRITTEN,
  RingBuffer,
  capacity,
  consume,
  init_buffer,
  push,
  push_many,
  since,
  to_list,
  unread,
)

# A few fixed capacities and batch sizes so the jitted ops compile once per shape, not per example.
CAPACITIES = (1, 2, 3, 7)
BATCH_SIZES = (1, 3, 9)  # 9 > every capacity: overflow inside one batch

_push = jax.jit(push)
_push_many = jax.jit(push_many)
_consume = jax.jit(consume)
_since = jax.jit(since)

EXAMPLE = {"x": jax.ShapeDtypeStruct((3,), jnp.float32), "i": jax.ShapeDtypeStruct((), jnp.int32)}


def wrap_i32(v: int) -> int:
  """Python int -> the int32 it wraps to (two's complement)."""
  return (v + 2**31) % 2**32 - 2**31


def make_record(i: int, x=None) -> dict:
  if x is None:
    x = (i, -0.5 * i, i + 0.25)
  return {"x": np.asarray(x, np.float32), "i": np.int32(i)}


def stack(records: list) -> dict:
  return jax.tree.map(lambda *xs: np.stack(xs), *records)


def leaves_bit_equal(a, b) -> bool:
  """True when both pytrees have the same structure, shapes, dtypes and bytes (NaN payloads too)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
    return False
  for x, y in zip(la, lb, strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      return False
  return True


def assert_records_equal(got: list, want: list):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert int(g["i"]) == int(w["i"])
    np.testing.assert_array_equal(g["x"], w["x"])


def masked_rows(records, mask) -> list:
  """The rows of a `since`/`consume` result where mask is True, as a list of per-record dicts."""
  mask = np.asarray(mask)
  n = int(mask.sum())
  # The valid rows must be a prefix.
  assert mask[:n].all() and not mask[n:].any()
  return [jax.tree.map(lambda x, j=j: np.asarray(x)[j], records) for j in range(n)]


class DequeModel:
  """Reference: a `deque(maxlen=capacity)` of `(seq, record)` with Python-int counters."""

  def __init__(self, cap: int):
    self.q = collections.deque(maxlen=cap)
    self.written = 0
    self.read = 0
    self.dropped = 0

  def push(self, record):
    if len(self.q) == self.q.maxlen:
      oldest_seq = self.q[0][0]
      if oldest_seq >= self.read:  # overwritten before being consumed
        self.dropped += 1
        self.read = oldest_seq + 1
    self.q.append((self.written, record))
    self.written += 1

  def since(self, cursor: int):
    records = [r for s, r in self.q if s >= cursor]
    pending = max(self.written - cursor, 0)
    return records, pending - len(records)

  def consume(self):
    records, _ = self.since(self.read)
    self.read = self.written
    return records

  @property
  def unread(self) -> int:
    return self.written - self.read


record_x = st.lists(
  st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=3, max_size=3
)


class RingBufferMachine(RuleBasedStateMachine):
  """Random push / push_many / consume / since sequences against `DequeModel`."""

  @initialize(cap=st.sampled_from(CAPACITIES))
  def setup(self, cap):
    self.cap = cap
    self.buf = init_buffer(EXAMPLE, cap)
    self.model = DequeModel(cap)
    self.next_id = 0

  def new_record(self, x):
    self.next_id += 1
    return make_record(self.next_id, x)

  @rule(x=record_x, where=st.booleans())
  def push_one(self, x, where):
    record = self.new_record(x)
    self.buf = _push(self.buf, record, where=np.bool_(where))
    if where:
      self.model.push(record)

  @rule(data=st.data())
  def push_batch(self, data):
    n = data.draw(st.sampled_from(BATCH_SIZES), label="n")
    xs = data.draw(st.lists(record_x, min_size=n, max_size=n), label="xs")
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label="mask")
    records = [self.new_record(x) for x in xs]
    batch, mask = stack(records), np.asarray(mask, np.bool_)
    new = _push_many(self.buf, batch, where=mask)
    # Same bits as n single pushes in order (slots that were never valid included).
    sequential = self.buf
    for j in range(n):
      sequential = _push(sequential, records[j], where=mask[j])
    assert leaves_bit_equal(new, sequential)
    self.buf = new
    for record, valid in zip(records, mask, strict=True):
      if valid:
        self.model.push(record)

  @rule()
  def take_all(self):
    self.buf, records, mask = _consume(self.buf)
    assert_records_equal(masked_rows(records, mask), self.model.consume())

  @precondition(lambda self: self.model.written > 0)
  @rule(back=st.integers(min_value=-1, max_value=20))
  def view_since(self, back):
    cursor = max(self.model.written - back, 0)
    records, mask, n_new, missed = _since(self.buf, np.int32(cursor))
    want, want_missed = self.model.since(cursor)
    assert_records_equal(masked_rows(records, mask), want)
    assert int(n_new) == len(want)
    assert int(missed) == want_missed

  @invariant()
  def matches_model(self):
    meta = np.asarray(self.buf.meta)
    assert_records_equal(to_list(self.buf), [r for _, r in self.model.q])
    assert int(meta[SIZE]) == len(self.model.q)
    assert int(meta[WRITTEN]) == wrap_i32(self.model.written)
    assert int(meta[READ]) == wrap_i32(self.model.read)
    assert int(meta[DROPPED]) == wrap_i32(self.model.dropped)
    assert int(unread(self.buf)) == self.model.unread
    assert 0 <= int(meta[HEAD]) < self.cap
    assert 0 <= int(unread(self.buf)) <= int(meta[SIZE])


RingBufferMachine.TestCase.settings = settings(
  max_examples=60, stateful_step_count=25, deadline=None
)
TestRingBufferModel = RingBufferMachine.TestCase


def filled(cap: int, n_push: int, n_consume_after: int | None = None) -> RingBuffer:
  """A buffer of capacity `cap` after `n_push` pushes (consuming after the first few if asked)."""
  buf = init_buffer(EXAMPLE, cap)
  for i in range(n_push):
    buf = _push(buf, make_record(i))
    if n_consume_after is not None and i + 1 == n_consume_after:
      buf, _, _ = _consume(buf)
  return buf


@pytest.mark.parametrize(
  "n_push,n_consume_after",
  [(0, None), (2, None), (5, None), (9, None), (9, 7), (9, 9)],
  ids=["empty", "partial", "full", "overflowed", "overflowed-part-read", "all-read"],
)
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_where_false_is_bit_identical(n_push, n_consume_after, jitted):
  cap = 5
  buf = filled(cap, n_push, n_consume_after)
  # Put NaN payloads and -0.0 in the data: bit identity, not just value equality.
  nan_payload = np.array([0x7FC01234, 0xFFC00001, 0x80000000], np.uint32).view(np.float32)
  buf = buf._replace(data={**buf.data, "x": jnp.asarray(np.tile(nan_payload, (cap, 1)))})
  before = jax.device_get(buf)
  push_fn = _push if jitted else push
  push_many_fn = _push_many if jitted else push_many
  out = push_fn(buf, make_record(1000, (1.0, 2.0, 3.0)), where=np.bool_(False))
  assert leaves_bit_equal(out, before)
  batch = stack([make_record(1000 + j) for j in range(7)])
  out = push_many_fn(buf, batch, where=np.zeros(7, np.bool_))
  assert leaves_bit_equal(out, before)
  # And the same call with where=True does change the buffer.
  out = push_fn(buf, make_record(1000, (1.0, 2.0, 3.0)), where=np.bool_(True))
  assert not leaves_bit_equal(out, before)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_push_writes_one_row_without_a_full_array_select():
  cap = 6  # distinct from the meta length, so shapes below cannot be confused with it
  buf = init_buffer(EXAMPLE, cap)
  jaxpr = jax.make_jaxpr(lambda b, r, w: push(b, r, where=w))(buf, make_record(0), True).jaxpr
  eqns = list(_all_eqns(jaxpr))
  data_shapes = {tuple(x.shape) for x in jax.tree.leaves(buf.data)}
  updates = [e for e in eqns if e.primitive.name == "dynamic_update_slice"]
  assert len(updates) == len(data_shapes)
  for e in eqns:
    if e.primitive.name in ("select_n", "scatter", "gather"):
      for v in e.outvars:
        assert tuple(v.aval.shape) not in data_shapes, f"{e.primitive.name} over the whole buffer"


@pytest.mark.parametrize("n_push", [0, 1, 4, 5, 6, 11])
def test_since_returns_records_after_cursor_and_counts_missed(n_push):
  cap = 5
  buf = filled(cap, n_push)
  available = list(range(max(0, n_push - cap), n_push))  # seqs still in the buffer
  for cursor in range(0, n_push + 3):
    records, mask, n_new, missed = _since(buf, np.int32(cursor))
    want = [s for s in available if s >= cursor]
    want_missed = len([s for s in range(cursor, n_push) if s not in available])
    rows = masked_rows(records, mask)
    assert [int(r["i"]) for r in rows] == want  # record i was pushed as seq i
    assert int(n_new) == len(want)
    assert int(missed) == want_missed
    # Padding rows are zero.
    for leaf in jax.tree.leaves(records):
      assert not np.asarray(leaf)[len(want) :].any()
  # since() does not consume.
  assert int(unread(buf)) == len(available)


def test_since_with_previous_written_as_cursor():
  cap = 4
  buf = filled(cap, 3)
  cursor = buf.meta[WRITTEN]
  for i in range(3, 6):
    buf = _push(buf, make_record(i))
  records, mask, n_new, missed = _since(buf, cursor)
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [3, 4, 5]
  assert (int(n_new), int(missed)) == (3, 0)
  for i in range(6, 9):  # 6 records since the cursor, 4 slots: the first 2 are lost
    buf = _push(buf, make_record(i))
  records, mask, n_new, missed = _since(buf, cursor)
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [5, 6, 7, 8]
  assert (int(n_new), int(missed)) == (4, 2)


def test_counters_wrap_around_int32():
  cap = 4
  start = 2**31 - 3  # three pushes from the int32 wrap
  buf = init_buffer(EXAMPLE, cap)
  meta = np.array([2, 0, start, start, 2**31 - 2], np.int32)  # head, size, written, read, dropped
  buf = RingBuffer(data=buf.data, meta=jnp.asarray(meta))
  before_wrap = buf

  # Not yet full, but records before `start` were never here: a cursor before them counts as missed.
  two = _push(_push(buf, make_record(0)), make_record(1))
  records, mask, n_new, missed = _since(two, np.int32(start - 3))
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [0, 1]
  assert (int(n_new), int(missed)) == (2, 3)

  for i in range(6):  # seqs start .. start + 5; the last 4 remain, 2 are dropped unread
    buf = _push(buf, make_record(i))
  meta = np.asarray(buf.meta)
  assert int(meta[WRITTEN]) == wrap_i32(start + 6) < 0
  assert int(meta[READ]) == wrap_i32(start + 2)
  assert int(meta[DROPPED]) == wrap_i32(2**31 - 2 + 2) < 0
  assert int(unread(buf)) == 4
  assert [int(r["i"]) for r in to_list(buf)] == [2, 3, 4, 5]

  # since() across the wrap: cursor before it (a large positive int32), written after it.
  records, mask, n_new, missed = _since(buf, np.int32(start))
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [2, 3, 4, 5]
  assert (int(n_new), int(missed)) == (4, 2)
  records, mask, n_new, missed = _since(buf, np.int32(wrap_i32(start + 4)))
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [4, 5]
  assert (int(n_new), int(missed)) == (2, 0)
  records, mask, n_new, missed = _since(buf, buf.meta[WRITTEN])
  assert (int(n_new), int(missed), bool(np.asarray(mask).any())) == (0, 0, False)

  buf, records, mask = _consume(buf)
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [2, 3, 4, 5]
  assert int(unread(buf)) == 0
  buf = _push(buf, make_record(6))
  buf = _push(buf, make_record(7))
  assert int(unread(buf)) == 2
  buf, records, mask = _consume(buf)
  assert [int(r["i"]) for r in masked_rows(records, mask)] == [6, 7]
  buf, records, mask = _consume(buf)
  assert not np.asarray(mask).any()

  # push_many across the wrap gives the same bits as the pushes one by one.
  batch = [make_record(i) for i in range(7)]
  where = np.array([1, 1, 0, 1, 1, 1, 1], np.bool_)
  many = _push_many(before_wrap, stack(batch), where=where)
  one_by_one = before_wrap
  for record, w in zip(batch, where, strict=True):
    one_by_one = _push(one_by_one, record, where=w)
  assert leaves_bit_equal(many, one_by_one)
  assert int(many.meta[WRITTEN]) == wrap_i32(start + 6)


def test_jitted_donated_push_compiles_once():
  traces = collections.Counter()

  def counted_push(buf, record, where):
    traces["push"] += 1
    return push(buf, record, where=where)

  def counted_push_many(buf, records, where):
    traces["push_many"] += 1
    return push_many(buf, records, where=where)

  def counted_consume(buf):
    traces["consume"] += 1
    return consume(buf)

  push_fn = jax.jit(counted_push, donate_argnums=0)
  push_many_fn = jax.jit(counted_push_many, donate_argnums=0)
  consume_fn = jax.jit(counted_consume, donate_argnums=0)

  cap = 4
  buf = init_buffer(EXAMPLE, cap)
  model = DequeModel(cap)
  for i in range(25):
    where = np.bool_(i % 3 != 0)
    old = buf
    buf = push_fn(buf, make_record(i), where)
    assert old.meta.is_deleted()  # donated: updated in place
    if where:
      model.push(make_record(i))
    if i % 5 == 4:
      batch = [make_record(100 + 10 * i + j) for j in range(6)]
      mask = np.arange(6) % 2 == 0
      buf = push_many_fn(buf, stack(batch), mask)
      for record, m in zip(batch, mask, strict=True):
        if m:
          model.push(record)
    if i % 7 == 6:
      buf, records, mask = consume_fn(buf)
      assert_records_equal(masked_rows(records, mask), model.consume())
  assert_records_equal(to_list(buf), [r for _, r in model.q])
  assert traces == {"push": 1, "push_many": 1, "consume": 1}


def test_init_and_boundary_errors():
  buf = init_buffer({"a": jnp.zeros((2, 3), jnp.float32), "b": np.int32(0)}, 3)
  assert capacity(buf) == 3
  assert buf.data["a"].shape == (3, 2, 3) and buf.data["b"].shape == (3,)
  assert buf.data["b"].dtype == jnp.int32 and buf.meta.dtype == jnp.int32
  assert np.asarray(buf.meta).tolist() == [0, 0, 0, 0, 0]
  assert to_list(buf) == []
  with pytest.raises(ValueError, match="capacity"):
    init_buffer(EXAMPLE, 0)
  with pytest.raises(ValueError, match="leaf"):
    init_buffer({}, 3)
  with pytest.raises(ValueError, match="shape"):
    push(buf, {"a": jnp.zeros((3, 2), jnp.float32), "b": np.int32(0)})
  with pytest.raises(TypeError, match="dtype"):
    push(buf, {"a": jnp.zeros((2, 3), jnp.float32), "b": np.float32(0.5)})
  with pytest.raises(ValueError, match="where"):
    push_many(buf, {"a": jnp.zeros((4, 2, 3), jnp.float32), "b": np.zeros(4, np.int32)}, where=[1])
