"""Interaction contract: building, padding, packing round trip, batch stacking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sona_jax as sona
from sona_jax import types

CFG = sona.SonaConfig(dim=6, base_rank=4, max_ids=3)


def _fields(it):
  return {k: np.asarray(v) for k, v in it._asdict().items()}


def test_make_interaction_pads_and_types_fields():
  it = sona.make_interaction(CFG, query=np.arange(6), quality=0.25, used=[4], unused=(1, 2), time=9)
  f = _fields(it)
  assert f["used"].tolist() == [4, -1, -1] and f["unused"].tolist() == [1, 2, -1]
  assert f["query"].dtype == np.float32 and f["used"].dtype == np.int32
  assert f["anchor"] == -1 and f["time"] == 9 and f["tier"] == 0
  assert math.isnan(float(f["feedback"])) and not bool(f["has_grad"])
  assert float(f["target_latency_ms"]) == CFG.target_latency_ms
  np.testing.assert_array_equal(f["grad"], np.zeros(6, np.float32))


def test_fields_are_read_only():
  it = sona.make_interaction(CFG, query=np.zeros(6), quality=0.5)
  with pytest.raises(ValueError):
    it.query[0] = 1.0
  with pytest.raises(ValueError):
    it.quality[...] = 0.9


@settings(max_examples=50, deadline=None)
@given(
  q=st.floats(-1e6, 1e6, width=32),
  quality=st.floats(allow_nan=True, allow_infinity=True, width=32),
  anchor=st.integers(-(2**31), 2**31 - 1),
  used=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3),
  time=st.integers(0, 2**31 - 1),
  has_grad=st.booleans(),
)
def test_pack_unpack_round_trip_is_exact(q, quality, anchor, used, time, has_grad):
  grad = np.full(6, q, np.float32) if has_grad else None
  it = sona.make_interaction(
    CFG, query=np.full(6, q), quality=quality, anchor=anchor, used=used, time=time, grad=grad
  )
  packed = types.pack(it, CFG)
  assert packed.shape == (types.packed_width(CFG),) and packed.dtype == np.float32
  back = types.unpack(jnp.asarray(packed), CFG)
  for name, a, b in zip(types.Interaction._fields, it, back, strict=True):
    a, b = np.asarray(a), np.asarray(b)
    assert a.tobytes() == b.astype(a.dtype).tobytes(), name
  # The slow path (a rebuilt tuple, no cached vector) packs to the same bytes.
  rebuilt = types.Interaction(*(np.array(v) for v in it))
  assert types.pack(rebuilt, CFG).tobytes() == packed.tobytes()


def test_pack_of_traced_interaction_matches_host_packing():
  it = sona.make_interaction(CFG, query=np.arange(6), quality=0.3, used=[1, 2], anchor=5, time=3)
  host = types.pack(it, CFG)
  traced = jax.jit(lambda i: types.pack(i, CFG))(types.Interaction(*map(jnp.asarray, it)))
  assert np.asarray(traced).tobytes() == host.tobytes()


def test_bad_shapes_and_dtypes_name_the_field():
  it = sona.make_interaction(CFG, query=np.zeros(6), quality=0.5)
  with pytest.raises(ValueError, match="Interaction.grad has shape"):
    types.pack(it._replace(grad=np.zeros(5, np.float32)), CFG)
  with pytest.raises(ValueError, match="Interaction.tier has dtype float32"):
    types.pack(it._replace(tier=np.float32(1)), CFG)
  with pytest.raises(ValueError, match="Interaction.has_grad"):
    types.pack(it._replace(has_grad=np.int32(1)), CFG)
  with pytest.raises(ValueError, match="outside int32"):
    types.pack(it._replace(time=np.int64(2**40)), CFG)
  with pytest.raises(ValueError, match="query must be numeric"):
    sona.make_interaction(CFG, query=np.array(["a"] * 6), quality=0.5)
  with pytest.raises(ValueError, match="anchor=.* does not fit int32"):
    sona.make_interaction(CFG, query=np.zeros(6), quality=0.5, anchor=2**40)
  with pytest.raises(ValueError, match="at most max_ids=3"):
    sona.make_interaction(CFG, query=np.zeros(6), quality=0.5, unused=np.arange(4))


def test_stack_interactions_and_batched_pack():
  its = [sona.make_interaction(CFG, query=np.full(6, i), quality=0.1 * i, time=i) for i in range(4)]
  batch = sona.stack_interactions(its)
  assert batch.query.shape == (4, 6) and batch.used.shape == (4, 3)
  packed = types.pack(batch, CFG, batched=True)
  for i in range(4):
    assert packed[i].tobytes() == types.pack(its[i], CFG).tobytes()
  with pytest.raises(ValueError):
    sona.stack_interactions([])
  with pytest.raises(TypeError):
    sona.stack_interactions([its[0], (1, 2)])


def test_signal_and_trajectory_rows_unpack_by_name():
  rows = np.zeros((2, types.signal_width(CFG)), np.float32)
  rows[:, CFG.dim + types.G_QUALITY] = [0.25, 0.75]
  rows.view(np.int32)[:, CFG.dim + types.G_TIER] = [2, 1]
  sig = types.unpack_signals(rows, CFG)
  assert sig.quality.tolist() == [0.25, 0.75] and sig.tier.tolist() == [2, 1]
  assert sig.query.shape == (2, CFG.dim)


def test_pack_interaction_equals_pack_of_make_interaction():
  rng = np.random.default_rng(3)
  cases = [
    dict(query=rng.normal(size=6), quality=0.25),
    dict(
      query=rng.normal(size=6).astype(np.float32),
      quality=0.9,
      anchor=7,
      used=[1, 2],
      unused=np.array([4], np.int64),
      tier=2,
      latency_ms=12.5,
      target_latency_ms=40.0,
      context_tokens=300,
      feedback=0.75,
      grad=rng.normal(size=6),
      time=11,
    ),
  ]
  for kw in cases:
    want = types.pack(sona.make_interaction(CFG, **kw), CFG)
    got = types.pack_interaction(CFG, **kw)
    assert got.dtype == np.float32 and got.tobytes() == np.asarray(want).tobytes()
    out = np.full(types.packed_width(CFG), 7.0, np.float32)
    assert types.pack_interaction(CFG, **kw, out=out) is out
    assert out.tobytes() == got.tobytes()
  # The live learning rate rides along; NaN (the default) means cfg.micro_lr.
  p = types.pack_interaction(CFG, query=np.ones(6), quality=0.5, micro_lr=0.125)
  assert float(types.packed_lr(jnp.asarray(p), CFG)) == 0.125
  assert float(
    types.packed_lr(jnp.asarray(types.pack_interaction(CFG, query=np.ones(6), quality=0.5)), CFG)
  ) == np.float32(CFG.micro_lr)


def test_pack_interaction_checks_like_make_interaction():
  with pytest.raises(ValueError, match="at most max_ids=3"):
    types.pack_interaction(CFG, query=np.ones(6), quality=0.5, used=[1, 2, 3, 4])
  with pytest.raises(ValueError, match="query has shape"):
    types.pack_interaction(CFG, query=np.ones(5), quality=0.5)
  with pytest.raises(ValueError, match="out must be"):
    types.pack_interaction(CFG, query=np.ones(6), quality=0.5, out=np.zeros(3, np.float32))
