"""All-pairs cosine search: brute force against dense NumPy, the inverted file against it."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sona_jax import ivf


def _clustered(n, dim, clusters, spread, seed, dup=0.1):
  """Unit rows around `clusters` random centres, with a fraction of planted near-duplicates."""
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(clusters, dim))
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  x = c[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, dim)) / np.sqrt(dim)
  nd = int(dup * n)
  src, dst = rng.integers(n, size=nd), rng.choice(n, nd, replace=False)
  x[dst] = x[src] + 0.15 * rng.normal(size=(nd, dim)) / np.sqrt(dim)
  return x.astype(np.float32)


def _dense(x, mask, threshold):
  """Reference pairs `i < j` from the dense float64 cosine matrix, and the matrix."""
  xn = x.astype(np.float64)
  xn /= np.linalg.norm(xn, axis=1, keepdims=True)
  s = xn @ xn.T
  ok = np.triu(mask[:, None] & mask[None, :], 1)
  i, j = np.nonzero(ok & (s >= threshold))
  return i, j, s


def _keys(i, j, n):
  return set((np.asarray(i, np.int64) * n + np.asarray(j)).tolist())


def test_brute_force_equals_dense_reference():
  x = _clustered(700, 16, 12, 0.6, seed=0)
  mask = np.random.default_rng(1).uniform(size=700) > 0.2
  for threshold in (0.95, 0.8, 0.5):
    i, j, c = ivf.brute_force_pairs(x, mask, threshold, block=256)  # several blocks
    ri, rj, s = _dense(x, mask, threshold)
    # No reference cosine sits within float32 rounding of the threshold (so exact equality holds).
    assert np.min(np.abs(s[mask][:, mask] - threshold)) > 1e-6
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(j, rj)
    np.testing.assert_allclose(c, s[ri, rj], atol=1e-5)
    assert i.dtype == np.int32 and j.dtype == np.int32 and c.dtype == np.float32
  # The block size changes nothing.
  a = ivf.brute_force_pairs(x, mask, 0.8, block=128)
  b = ivf.brute_force_pairs(x, mask, 0.8, block=4096)
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)


@settings(max_examples=15, deadline=None)
@given(
  seed=st.integers(0, 2**31 - 1),
  threshold=st.floats(0.3, 0.99),
  p_dead=st.floats(0.0, 0.9),
)
def test_brute_force_matches_dense_on_random_inputs(seed, threshold, p_dead):
  rng = np.random.default_rng(seed)
  x = _clustered(150, 8, 5, float(rng.uniform(0.2, 1.5)), seed=seed)
  mask = rng.uniform(size=150) >= p_dead
  i, j, _ = ivf.brute_force_pairs(x, mask, threshold)
  ri, rj, s = _dense(x, mask, threshold)
  # Pairs within float32 rounding of the threshold may go either way; all others must agree.
  near = np.abs(s - threshold) < 1e-5
  got = {(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if not near[a, b]}
  want = {(a, b) for a, b in zip(ri.tolist(), rj.tolist(), strict=True) if not near[a, b]}
  assert got == want
  assert np.all(mask[i]) and np.all(mask[j]) and np.all(i < j)


def test_ivf_recall_on_clustered_data_and_exact_when_probing_every_cell():
  n = 2000
  x = _clustered(n, 16, 20, 0.5, seed=2)
  mask = np.random.default_rng(3).uniform(size=n) > 0.05
  for threshold in (0.95, 0.7):
    bi, bj, bc = ivf.brute_force_pairs(x, mask, threshold)
    assert bi.size > 100
    i, j, c = ivf.ivf_pairs(x, mask, threshold, probe=4, key=jax.random.key(0))
    truth, got = _keys(bi, bj, n), _keys(i, j, n)
    assert got <= truth  # every candidate is a true pair (cosines are exact)
    recall = len(got) / len(truth)
    assert recall >= 0.95, (threshold, recall)
    # The sampled estimate agrees with the full recall.
    est = ivf.pair_recall((i, j), x, mask, threshold, sample=500, key=jax.random.key(1))
    assert abs(est - recall) < 0.05
    # Cosines agree with brute force on the common pairs.
    pos = {k: p for p, k in enumerate((bi.astype(np.int64) * n + bj).tolist())}
    idx = np.array([pos[k] for k in (i.astype(np.int64) * n + j).tolist()])
    np.testing.assert_allclose(c, bc[idx], atol=1e-5)
  # Probing every cell is exhaustive.
  i, j, _ = ivf.ivf_pairs(x, mask, 0.9, cells=8, probe=8, key=jax.random.key(0))
  bi, bj, _ = ivf.brute_force_pairs(x, mask, 0.9)
  np.testing.assert_array_equal(i, bi)
  np.testing.assert_array_equal(j, bj)


def test_ivf_pairs_are_unique_ordered_and_never_touch_dead_rows():
  n = 2000
  x = _clustered(n, 16, 20, 0.5, seed=4, dup=0.3)
  mask = np.random.default_rng(5).uniform(size=n) > 0.5
  # Dead rows are exact copies of live ones: any leak would show up as a pair.
  dead, live = np.flatnonzero(~mask), np.flatnonzero(mask)
  m = min(dead.size, live.size)
  x[dead[:m]] = x[live[:m]]
  i, j, c = ivf.ivf_pairs(x, mask, 0.9, probe=3, key=jax.random.key(6))
  assert i.size > 0
  assert np.all(i < j)
  assert len(_keys(i, j, n)) == i.size
  assert np.all(mask[i]) and np.all(mask[j])
  assert np.all(c >= np.float32(0.9))
  # Same key, same answer.
  i2, j2, c2 = ivf.ivf_pairs(x, mask, 0.9, probe=3, key=jax.random.key(6))
  np.testing.assert_array_equal(i, i2)
  np.testing.assert_array_equal(c, c2)


def test_query_pairs_and_pair_recall():
  n = 600
  x = _clustered(n, 16, 8, 0.6, seed=7, dup=0.3)
  mask = np.random.default_rng(8).uniform(size=n) > 0.1
  _, _, s = _dense(x, mask, 0.9)
  rows = np.array([3, 10, 11, 500, 599])
  r, j, c = ivf.query_pairs(x, mask, rows, 0.9, block=128)
  want = {
    (a, b)
    for a in rows.tolist()
    for b in np.flatnonzero(mask).tolist()
    if a != b and s[a, b] >= 0.9
  }
  assert set(zip(r.tolist(), j.tolist(), strict=True)) == want
  np.testing.assert_allclose(c, s[r, j], atol=1e-5)
  # Recall of the exact list is 1; of half of it about a half; NaN with nothing to find.
  pairs = ivf.brute_force_pairs(x, mask, 0.9)
  assert ivf.pair_recall(pairs, x, mask, 0.9, sample=n, key=jax.random.key(0)) == 1.0
  half = np.stack(pairs[:2], axis=1)[::2]
  rec = ivf.pair_recall(half, x, mask, 0.9, sample=n, key=jax.random.key(0))
  assert 0.4 < rec < 0.6
  assert np.isnan(ivf.pair_recall(pairs, x, mask, 1.01, key=jax.random.key(0)))


def test_degenerate_inputs():
  x = np.ones((5, 4), np.float32)
  none = np.zeros(5, bool)
  for out in (
    ivf.brute_force_pairs(x, none, 0.5),
    ivf.ivf_pairs(x, none, 0.5, key=jax.random.key(0)),
    ivf.ivf_pairs(x, np.eye(5, dtype=bool)[0], 0.5, key=jax.random.key(0)),
  ):
    assert [a.size for a in out] == [0, 0, 0]
  i, j, _ = ivf.brute_force_pairs(x, None, 0.5)
  assert i.size == 10
  with pytest.raises(ValueError, match="probe"):
    ivf.ivf_pairs(x, None, 0.5, probe=0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="mask"):
    ivf.brute_force_pairs(x, np.ones(3, bool), 0.5)
