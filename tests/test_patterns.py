"""Patterns and ReasoningBank: spherical k-means against scikit-learn, bank merges, eviction and
retrieval against NumPy references, and no retracing."""

import json

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from sona_jax import patterns as P

_merge_jit = jax.jit(
  lambda bank, c, s, q, ts, tc, v, now, thr: P.merge_patterns(
    bank, c, s, q, ts, tc, v, now=now, merge_threshold=thr
  )
)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _spherical_inertia(x, labels, k):
  """`2 sum (1 - cos)` of unit rows to the renormalised mean of their cluster (float64)."""
  c = _unit(np.stack([x[labels == j].sum(0) for j in range(k)]))
  return 2.0 * np.sum(1.0 - np.sum(x * c[labels], axis=1))


@pytest.fixture(scope="module")
def digits():
  return _unit(load_digits().data)


# ------------------------------------------------------------------------------------- k-means


def test_kmeans_inertia_matches_sklearn_on_digits(digits):
  # Like with like: both partitions scored by the spherical objective (renormalised cluster means),
  # averaged over 5 seeds each since single k-means runs land in different local optima.
  k, seeds = 10, range(5)
  ours = [
    _spherical_inertia(digits, np.asarray(P.kmeans_pp(jax.random.key(s), digits, k).labels), k)
    for s in seeds
  ]
  sk = [
    _spherical_inertia(
      digits, KMeans(k, init="k-means++", n_init=1, random_state=s).fit(digits).labels_, k
    )
    for s in seeds
  ]
  # Issue target: within 3% of scikit-learn, median over seeds (measured: ours ~0.5% lower).
  assert np.median(ours) <= 1.03 * np.median(sk), (ours, sk)
  # Deterministic per key.
  again = P.kmeans_pp(jax.random.key(0), digits, k)
  first = P.kmeans_pp(jax.random.key(0), digits, k)
  np.testing.assert_array_equal(np.asarray(again.labels), np.asarray(first.labels))
  assert np.asarray(again.centroids).tobytes() == np.asarray(first.centroids).tobytes()
  # A poor clustering (random labels) is far worse: the comparison has teeth.
  rand = np.random.default_rng(0).integers(0, k, digits.shape[0])
  assert _spherical_inertia(digits, rand, k) > 1.5 * np.mean(sk)


def test_kmeans_labels_are_nearest_centroid_and_inertia_consistent(digits):
  r = P.kmeans_pp(jax.random.key(3), digits, 10)
  c = np.asarray(r.centroids, np.float64)
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
  sims = digits @ c.T
  labels = np.asarray(r.labels)
  # Ties aside, every label is the nearest centroid.
  top2 = np.sort(sims, axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-5
  np.testing.assert_array_equal(labels[clear], np.argmax(sims, axis=1)[clear])
  inertia = 2.0 * np.sum(1.0 - sims[np.arange(len(labels)), labels])
  np.testing.assert_allclose(float(r.inertia), inertia, rtol=1e-4)
  assert 1 <= int(r.n_iter) <= 50
  assert len(np.unique(labels)) == 10


def _three_blobs(n_per=20, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.eye(3)
  x = np.concatenate([c + 0.05 * rng.normal(size=(n_per, 3)) for c in centres])
  return _unit(x).astype(np.float32)


def test_lloyd_reseeds_an_empty_cluster():
  x = _three_blobs()
  # The third initial centroid points away from all data: its cluster starts empty.
  c0 = _unit([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
  start = P.lloyd(x, c0, n_iter=0)
  assert 2 not in np.asarray(start.labels)
  r = P.lloyd(x, c0)
  labels = np.asarray(r.labels)
  assert sorted(np.bincount(labels, minlength=3)) == [20, 20, 20]
  assert float(r.inertia) < 0.2 * float(start.inertia)
  # Each centroid sits on one blob.
  np.testing.assert_allclose(np.sort(np.max(np.asarray(r.centroids), axis=1)), 1.0, atol=0.02)


@pytest.mark.parametrize("k", [3, 5])
def test_kmeans_on_duplicated_points(k):
  # Three distinct directions, ten copies each: k = 3 recovers them exactly; k = 5 (more clusters
  # than distinct points) stays finite, unit norm, and optimal.
  x = np.repeat(np.eye(3, 4, dtype=np.float32) * 2.0, 10, axis=0)
  r = P.kmeans_pp(jax.random.key(1), x, k)
  c = np.asarray(r.centroids)
  assert np.all(np.isfinite(c))
  np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-6)
  assert float(r.inertia) == pytest.approx(0.0, abs=1e-5)
  labels = np.asarray(r.labels)
  assert len(np.unique(labels)) == 3
  for j in range(3):
    assert len(np.unique(labels[10 * j : 10 * j + 10])) == 1


def test_padding_rows_do_not_affect_the_result():
  x = _three_blobs(n_per=15)
  rng = np.random.default_rng(1)
  w = np.concatenate([np.ones(45), np.zeros(20)]).astype(np.float32)
  pads = [rng.normal(size=(20, 3)).astype(np.float32) * s for s in (1.0, 100.0)]
  rs = [P.kmeans_pp(jax.random.key(2), np.concatenate([x, pad]), 3, weights=w) for pad in pads]
  np.testing.assert_array_equal(np.asarray(rs[0].centroids), np.asarray(rs[1].centroids))
  assert float(rs[0].inertia) == float(rs[1].inertia)
  # The inertia counts real rows only, and the real rows form the three blobs.
  c = np.asarray(rs[0].centroids, np.float64)
  sims = _unit(x) @ c.T
  np.testing.assert_allclose(float(rs[0].inertia), 2 * np.sum(1 - sims.max(1)), rtol=1e-4)
  assert sorted(np.bincount(np.asarray(rs[0].labels)[:45], minlength=3)) == [15, 15, 15]


# ----------------------------------------------------------------------------------------- bank


def _bank_with(centroids, sizes, quality, last_access, capacity, n_tiers=2):
  bank = P.init_bank(capacity, len(centroids[0]), n_tiers)
  m = len(centroids)
  bank, report = P.merge_patterns(
    bank,
    np.asarray(centroids, np.float32),
    np.asarray(sizes, np.float32),
    np.asarray(quality, np.float32),
    np.ones((m, n_tiers), np.float32),
    np.full((m, n_tiers), 2.0, np.float32),
    np.ones(m, bool),
    now=0,
    merge_threshold=0.99,
  )
  assert int(report.n_inserted) == m
  return bank._replace(last_access=bank.last_access.at[:m].set(np.asarray(last_access, np.int32)))


def _merge(bank, c, size, q, now, **kw):
  t = bank.tier_count.shape[1]
  return P.merge_patterns(
    bank,
    np.asarray([c], np.float32),
    np.asarray([size], np.float32),
    np.asarray([q], np.float32),
    np.asarray([[1.0] + [0.0] * (t - 1)], np.float32),
    np.asarray([[3.0] + [0.0] * (t - 1)], np.float32),
    np.ones(1, bool),
    now=now,
    **kw,
  )


def test_merge_above_threshold_is_size_weighted():
  c1 = _unit([1.0, 0.1, 0.0, 0.0])
  bank = _bank_with([c1], [3.0], [0.5], [0], capacity=4)
  c2 = _unit([1.0, 0.0, 0.3, 0.0])
  assert c1 @ c2 >= 0.9
  bank, report = _merge(bank, c2, 1.0, 1.0, now=100)
  assert (int(report.n_merged), int(report.n_inserted), int(report.n_evicted)) == (1, 0, 0)
  assert int(report.slot[0]) == 0
  assert int(np.sum(bank.alive)) == 1
  np.testing.assert_allclose(np.asarray(bank.centroid[0]), _unit(3 * c1 + c2), atol=1e-6)
  assert float(bank.size[0]) == 4.0
  assert float(bank.avg_quality[0]) == pytest.approx((3 * 0.5 + 1.0) / 4)
  np.testing.assert_allclose(np.asarray(bank.tier_success[0]), [2.0, 1.0])
  np.testing.assert_allclose(np.asarray(bank.tier_count[0]), [5.0, 2.0])
  assert int(bank.last_access[0]) == 100 and int(bank.created[0]) == 0


def test_merge_below_threshold_inserts():
  bank = _bank_with([_unit([1.0, 0.1, 0.0, 0.0])], [3.0], [0.5], [0], capacity=4)
  c2 = _unit([0.0, 1.0, 0.0, 0.0])
  bank, report = _merge(bank, c2, 1.0, 1.0, now=50, merge_threshold=0.9)
  assert (int(report.n_merged), int(report.n_inserted), int(report.n_evicted)) == (0, 1, 0)
  slot = int(report.slot[0])
  assert slot == 1 and int(report.evicted[0]) == -1
  np.testing.assert_allclose(np.asarray(bank.centroid[slot]), c2, atol=1e-6)
  assert float(bank.size[0]) == 3.0 and float(bank.size[slot]) == 1.0
  assert int(bank.created[slot]) == 50 and int(bank.parent[slot]) == -1


def test_full_bank_evicts_the_lowest_value_pattern():
  half_life = 1000.0
  eye = np.eye(4)
  quality = np.array([0.9, 0.5, 0.6])
  sizes = np.array([10.0, 2.0, 4.0])
  last = np.array([0, 3500, 3600])  # slot 0 is best by quality and size, but stale
  bank = _bank_with(eye[:3], sizes, quality, last, capacity=3)
  bank = bank._replace(parent=bank.parent.at[1].set(0), level=bank.level.at[0].set(1))
  now = 4000
  value = quality * np.log1p(sizes) * 0.5 ** ((now - last) / half_life)
  np.testing.assert_allclose(np.asarray(P.pattern_value(bank, now, half_life)), value, rtol=1e-5)
  victim = int(np.argmin(value))
  assert victim == 0
  bank, report = _merge(bank, eye[3], 1.0, 0.7, now=now, half_life_s=half_life)
  assert (int(report.n_merged), int(report.n_inserted), int(report.n_evicted)) == (0, 1, 1)
  assert int(report.evicted[0]) == victim and int(report.slot[0]) == victim
  np.testing.assert_allclose(np.asarray(bank.centroid[victim]), eye[3], atol=1e-6)
  assert float(bank.size[victim]) == 1.0 and int(bank.level[victim]) == 0
  # The evicted pattern's child no longer points at the recycled slot.
  assert int(bank.parent[1]) == -1


def _random_bank(rng, capacity=16, n_alive=10, dim=8):
  bank = P.init_bank(capacity, dim, 3)
  c = _unit(rng.normal(size=(capacity, dim))).astype(np.float32)
  alive = np.zeros(capacity, bool)
  alive[rng.choice(capacity, n_alive, replace=False)] = True
  return bank._replace(centroid=jnp.asarray(c), alive=jnp.asarray(alive)), c, alive


def test_find_patterns_matches_brute_force():
  rng = np.random.default_rng(0)
  bank, c, alive = _random_bank(rng)
  queries = rng.normal(size=(5, 8)).astype(np.float32)
  for q in queries:
    ids, scores = P.find_patterns(bank, q, 4)
    ref = np.where(alive, c @ _unit(q), -np.inf)
    order = np.argsort(-ref)[:4]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_allclose(np.asarray(scores), ref[order], rtol=1e-5)
  # Batched queries give the same answer; k beyond the alive count pads with -1 / -inf.
  ids, scores = P.find_patterns(bank, queries, 12)
  assert ids.shape == (5, 12)
  ids, scores = np.asarray(ids), np.asarray(scores)
  assert np.all(ids[:, 10:] == -1) and np.all(np.isneginf(scores[:, 10:]))
  assert np.all(alive[ids[:, :10]])
  ref = np.where(alive[None], queries @ c.T / np.linalg.norm(queries, axis=1)[:, None], -np.inf)
  np.testing.assert_array_equal(ids[:, :10], np.argsort(-ref, axis=1)[:, :10])


def test_record_access_is_a_separate_transition():
  rng = np.random.default_rng(1)
  bank, _, _ = _random_bank(rng)
  ids, _ = P.find_patterns(bank, rng.normal(size=8).astype(np.float32), 12)
  # Retrieval alone changes nothing (it returns ids, not a bank).
  ids = np.asarray(ids)
  new = P.record_access(bank, ids, 77)
  hit = np.zeros(16, bool)
  hit[ids[ids >= 0]] = True
  np.testing.assert_array_equal(np.asarray(new.access_count), hit.astype(np.int32))
  np.testing.assert_array_equal(np.asarray(new.last_access), np.where(hit, 77, 0))
  np.testing.assert_array_equal(np.asarray(bank.access_count), 0)
  for a, b in zip(bank[:5], new[:5], strict=True):  # centroid .. tier_count untouched
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  new = P.record_access(new, np.array([ids[0], ids[0], -1], np.int32), 80)
  assert int(new.access_count[ids[0]]) == 3


def test_pattern_stats_matches_numpy():
  rng = np.random.default_rng(2)
  n, k, t = 50, 4, 3
  labels = rng.integers(-1, k, n).astype(np.int32)
  quality = rng.uniform(size=n).astype(np.float32)
  tier = rng.integers(0, t, n).astype(np.int32)
  success = rng.uniform(size=n) < 0.6
  w = (rng.uniform(size=n) < 0.8).astype(np.float32)
  s = P.pattern_stats(np.zeros((n, 2), np.float32), labels, k, quality, tier, success, t, w)
  for j in range(k):
    m = (labels == j) & (w > 0)
    assert float(s.size[j]) == m.sum()
    assert float(s.avg_quality[j]) == pytest.approx(quality[m].mean() if m.any() else 0.0, 1e-5)
    for i in range(t):
      assert float(s.tier_count[j, i]) == np.sum(m & (tier == i))
      assert float(s.tier_success[j, i]) == np.sum(m & (tier == i) & success)


def test_export_is_json_serialisable():
  bank = _bank_with(np.eye(3), [1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [5, 6, 7], capacity=5)
  out = P.export(bank)
  assert [p["id"] for p in out] == [0, 1, 2]
  back = json.loads(json.dumps(out))
  assert back[1]["size"] == 2.0 and back[2]["last_access"] == 7
  assert back[0]["centroid"] == [1.0, 0.0, 0.0] and back[0]["tier_count"] == [2.0, 2.0]
  assert P.export(P.init_bank(3, 2, 1)) == []


# ---------------------------------------------------------------------------------- no retracing


def test_jitted_functions_compile_once_across_values(compiles):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  w = np.ones(30, np.float32)
  bank = P.init_bank(6, 4, 2)
  cents = _unit(rng.normal(size=(3, 4))).astype(np.float32)

  def calls(seed, now, thr):
    r = P.kmeans_pp(jax.random.key(seed), x * (seed + 1), 3, n_iter=10 + seed, tol=1e-3, weights=w)
    s = P.pattern_stats(x, r.labels, 3, w * 0.5, r.labels % 2, w > 0, 2, w)
    b, _ = P.merge_patterns(
      bank, cents, s.size, s.avg_quality, s.tier_success, s.tier_count, s.size > 0,
      now=now, merge_threshold=thr, half_life_s=100.0 * now,
    )  # fmt: skip
    ids, _ = P.find_patterns(b, x[seed], 2)
    return P.record_access(b, ids, now)

  fns = (P.kmeans_pp, P.pattern_stats, P.merge_patterns, P.find_patterns, P.record_access)
  with compiles() as first:
    jax.block_until_ready(calls(0, 10, 0.9))
  with compiles() as later:
    jax.block_until_ready(calls(1, 20, 0.5))
    jax.block_until_ready(calls(2, 30, 0.7))
  assert later.of(*fns) == []
  assert len(first.of(*fns)) <= len(fns)  # at most once each (fewer when compiled before)


@settings(max_examples=25, deadline=None)
@given(
  seed=st.integers(0, 10_000),
  n_new=st.integers(1, 6),
  threshold=st.sampled_from([0.5, 0.9, 0.99]),
  rounds=st.integers(1, 4),
)
def test_bank_invariants_hold_under_random_merges(seed, n_new, threshold, rounds):
  """Capacity never exceeded; sizes add up after merges; find_patterns equals brute force."""
  rng = np.random.default_rng(seed)
  dim, tiers = 4, 2
  small = P.init_bank(5, dim, tiers)  # evicts
  big = P.init_bank(32, dim, tiers)  # never needs to evict: sizes must add up exactly
  total = 0.0
  for r in range(rounds):
    cen = _unit(rng.normal(size=(n_new, dim))).astype(np.float32)
    sizes = rng.integers(1, 20, n_new).astype(np.float32)
    quality = rng.uniform(size=n_new).astype(np.float32)
    valid = rng.uniform(size=n_new) < 0.8
    succ = rng.integers(0, 5, (n_new, tiers)).astype(np.float32)
    args = (cen, sizes, quality, succ, succ + 1.0, valid, r * 10, threshold)
    small, rep = _merge_jit(small, *args)
    big, rep_big = _merge_jit(big, *args)
    total += float(sizes[valid].sum())
    assert int(np.sum(np.asarray(small.alive))) <= 5
    assert int(rep.n_merged) + int(rep.n_inserted) == int(valid.sum())
    assert int(rep.n_evicted) == int(np.sum(np.asarray(rep.evicted) >= 0))
    assert int(rep_big.n_evicted) == 0
    alive_size = np.where(np.asarray(big.alive), np.asarray(big.size), 0.0)
    np.testing.assert_allclose(float(alive_size.sum()), total, rtol=1e-5)
  for bank in (small, big):
    q = _unit(rng.normal(size=dim)).astype(np.float32)
    alive = np.asarray(bank.alive)
    m = min(3, int(alive.sum()))
    ids, scores = P.find_patterns(bank, q, 3)
    sims = np.where(alive, np.asarray(bank.centroid, np.float64) @ q, -np.inf)
    top = np.sort(sims)[::-1][:m]
    np.testing.assert_allclose(np.asarray(scores)[:m], top, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sims[np.asarray(ids)[:m]], top, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(ids)[m:] == -1)


def test_new_patterns_never_merge_into_abstractions():
  bank = P.init_bank(4, 3, 2)
  c = jnp.asarray([[1.0, 0.0, 0.0]], jnp.float32)
  one = jnp.ones((1,), jnp.float32)
  tiers = jnp.zeros((1, 2), jnp.float32)
  valid = jnp.ones((1,), bool)
  bank, _ = P.merge_patterns(bank, c, one, one, tiers, tiers, valid, now=0)
  bank = bank._replace(level=bank.level.at[0].set(1))  # slot 0 is now a Loop C abstraction
  bank, rep = P.merge_patterns(bank, c, one, one, tiers, tiers, valid, now=1)
  assert int(rep.n_merged) == 0 and int(rep.n_inserted) == 1
  assert float(bank.size[0]) == 1.0 and int(bank.level[int(rep.slot[0])]) == 0
