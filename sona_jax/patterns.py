"""Patterns and the ReasoningBank (docs/design.md, "Patterns and the ReasoningBank").

Loop B clusters the query embeddings of the signals it drains with `kmeans_pp` (spherical k-means:
k-means++ seeding, then Lloyd iterations on the unit sphere), summarises each cluster with
`pattern_stats`, and folds the clusters into a fixed-capacity `Bank` with `merge_patterns`: a
new pattern merges into its nearest alive level-0 neighbour when their cosine is at least a
threshold (weighted by size), else takes a free slot, else evicts the lowest-value pattern, value
being `avg_quality * log(1 + size) * recency`. Retrieval is `find_patterns`, a jitted top-k by
cosine; `record_access` is the separate transition that marks what was retrieved as used.

Every transition is pure and jitted over fixed shapes, so a bank checkpoints as plain arrays and
nothing recompiles as values change. Patterns form a tree by `parent` pointers (Loop C writes
abstractions with `level > 0`); when a slot is evicted, pointers to it are cleared so a recycled
slot never adopts stale children.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "KMeansResult",
  "kmeans_pp",
  "lloyd",
  "Bank",
  "init_bank",
  "PatternStats",
  "pattern_stats",
  "MergeReport",
  "merge_patterns",
  "pattern_value",
  "find_patterns",
  "TierEstimate",
  "neighbour_estimates",
  "tier_estimates",
  "record_access",
  "export",
]

_EPS = 1e-12


def _normalize(x: jax.Array) -> jax.Array:
  """Unit-normalises the last axis; zero rows stay zero."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, jnp.float32(_EPS))


def _weights(weights, n: int) -> jax.Array:
  if weights is None:
    return jnp.ones((n,), jnp.float32)
  return jnp.clip(jnp.asarray(weights, jnp.float32), 0.0, None)


# --------------------------------------------------------------------------------------- k-means


class KMeansResult(NamedTuple):
  """Result of `kmeans_pp` / `lloyd`.

  Attributes:
    centroids: f32[k, d] unit-norm centroids.
    labels: i32[n] index of the nearest centroid (by cosine) of every row, padding rows included.
    inertia: f32[] `sum_i w_i ||x_i - c_{label_i}||^2 = 2 sum_i w_i (1 - cos)` over unit rows.
    n_iter: i32[] Lloyd iterations run.
  """

  centroids: jax.Array
  labels: jax.Array
  inertia: jax.Array
  n_iter: jax.Array


def _assign(xn: jax.Array, w: jax.Array, c: jax.Array):
  """Nearest-centroid labels `i32[n]`, squared distances `f32[n]` and weighted inertia `f32[]`."""
  sims = xn @ c.T  # [n, k]
  labels = jnp.argmax(sims, axis=1).astype(jnp.int32)
  d2 = jnp.clip(2.0 - 2.0 * jnp.max(sims, axis=1), 0.0, None)
  return labels, d2, jnp.sum(w * d2)


def _update(xn: jax.Array, w: jax.Array, c: jax.Array, labels: jax.Array, d2: jax.Array):
  """One spherical Lloyd update: centroid = normalised weighted mean of its members.

  An empty cluster is re-seeded with a point farthest from its own centroid: the j-th empty cluster
  takes the j-th farthest live point, so several empty clusters get distinct points.
  """
  k = c.shape[0]
  onehot = jax.nn.one_hot(labels, k, dtype=jnp.float32) * w[:, None]  # [n, k]
  sums = onehot.T @ xn  # [k, d]
  counts = jnp.sum(onehot, axis=0)  # [k]
  # A cluster whose members cancel out (antipodal) has no direction: it keeps its centroid.
  norms = jnp.linalg.norm(sums, axis=1)
  new = jnp.where((norms > _EPS)[:, None], sums / jnp.maximum(norms, _EPS)[:, None], c)
  empty = counts <= 0.0
  far_score = jnp.where(w > 0.0, d2, jnp.float32(-1.0))
  _, far = jax.lax.top_k(far_score, min(k, xn.shape[0]))
  rank = jnp.clip(jnp.cumsum(empty.astype(jnp.int32)) - 1, 0, far.shape[0] - 1)
  reseed = xn[far[rank]]  # [k, d]
  return jnp.where(empty[:, None], reseed, new)


def _lloyd(xn, w, c0, n_iter, tol) -> KMeansResult:
  labels0, d20, inertia0 = _assign(xn, w, c0)

  def cond(state):
    _, _, _, prev, cur, it = state
    # Relative change of the inertia; `prev` is +inf before the first update.
    return (it < n_iter) & (jnp.abs(prev - cur) > tol * jnp.maximum(cur, jnp.float32(_EPS)))

  def body(state):
    c, labels, d2, _, cur, it = state
    c = _update(xn, w, c, labels, d2)
    labels, d2, new = _assign(xn, w, c)
    return c, labels, d2, cur, new, it + 1

  init = (c0, labels0, d20, jnp.float32(jnp.inf), inertia0, jnp.int32(0))
  c, labels, _, _, inertia, it = jax.lax.while_loop(cond, body, init)
  return KMeansResult(c, labels, inertia, it)


def _seed(key: jax.Array, xn: jax.Array, w: jax.Array, k: int) -> jax.Array:
  """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; greedy variant as in scikit-learn).

  Each new centre is the best, by resulting potential, of `2 + floor(log k)` candidates drawn with
  probability proportional to `w * D^2`. When every live point already sits on a centre
  (`D^2 = 0`, fewer distinct points than `k`), candidates are drawn by weight alone.
  """
  n_trials = 2 + int(math.log(k))
  live_logits = jnp.where(w > 0.0, jnp.log(jnp.maximum(w, _EPS)), -jnp.inf)
  key0, key = jax.random.split(key)
  first = jax.random.categorical(key0, live_logits)
  c = jnp.zeros((k, xn.shape[1]), jnp.float32).at[0].set(xn[first])
  d2 = jnp.clip(2.0 - 2.0 * (xn @ xn[first]), 0.0, None)

  def body(i, carry):
    c, d2 = carry
    p = w * d2
    logits = jnp.where(p > 0.0, jnp.log(jnp.maximum(p, _EPS)), -jnp.inf)
    logits = jnp.where(jnp.sum(p) > 0.0, logits, live_logits)
    cand = jax.random.categorical(jax.random.fold_in(key, i), logits, shape=(n_trials,))
    cand_d2 = jnp.clip(2.0 - 2.0 * (xn[cand] @ xn.T), 0.0, None)  # [trials, n]
    new_d2 = jnp.minimum(d2[None, :], cand_d2)
    best = jnp.argmin(jnp.sum(new_d2 * w[None, :], axis=1))
    return c.at[i].set(xn[cand[best]]), new_d2[best]

  c, _ = jax.lax.fori_loop(1, k, body, (c, d2))
  return c


@functools.partial(jax.jit, static_argnames=("k",))
def kmeans_pp(key, x, k: int, *, n_iter=50, tol=1e-4, weights=None) -> KMeansResult:
  """Spherical k-means with k-means++ seeding (Arthur & Vassilvitskii 2007; Dhillon & Modha 2001).

  Rows of `x` are unit-normalised; distances are squared Euclidean between unit vectors
  (`2 - 2 cos`). Lloyd iterations run in a `lax.while_loop` until the relative inertia change is
  below `tol` or `n_iter` iterations ran; centroids are re-normalised each iteration and an empty
  cluster is re-seeded with the point farthest from its centroid.

  Args:
    key: PRNG key for the seeding.
    x: f32[n, d] embeddings (need not be unit norm).
    k: number of clusters (static).
    n_iter: maximum Lloyd iterations (traced).
    tol: relative inertia change that stops the iterations (traced).
    weights: optional f32[n] non-negative row weights; rows of weight 0 (padding of a fixed-size
      buffer) are ignored by seeding, centroids and inertia (they still get a nearest label).

  Returns:
    `KMeansResult(centroids f32[k, d], labels i32[n], inertia f32[], n_iter i32[])`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.1], [2.0, 0.0], [0.0, 1.0], [0.1, 3.0]])  # two directions
    >>> km = kmeans_pp(jax.random.key(0), x, 2)
    >>> a, b, c, d = km.labels.tolist()
    >>> a == b, c == d, a != c  # clustered by direction, not by length
    (True, True, True)
    >>> jnp.linalg.norm(km.centroids, axis=1).round(4).tolist()  # centroids on the unit sphere
    [1.0, 1.0]
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f"kmeans_pp: x must be f32[n, d], got shape {x.shape}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"kmeans_pp: k must be a positive int, got {k!r}")
  xn = _normalize(x)
  w = _weights(weights, x.shape[0])
  c0 = _seed(key, xn, w, k)
  return _lloyd(xn, w, c0, jnp.asarray(n_iter, jnp.int32), jnp.asarray(tol, jnp.float32))


@jax.jit
def lloyd(x, centroids, *, n_iter=50, tol=1e-4, weights=None) -> KMeansResult:
  """Spherical Lloyd iterations from given `centroids f32[k, d]` (warm start; see `kmeans_pp`).

  Args:
    x: f32[n, d] embeddings.
    centroids: f32[k, d] initial centroids (normalised here).
    n_iter: maximum iterations.
    tol: relative inertia change that stops the iterations.
    weights: optional f32[n] row weights (0 = padding).

  Returns:
    `KMeansResult`.

  Examples:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 0.1], [2.0, 0.0], [0.0, 1.0], [0.1, 3.0]])
    >>> km = lloyd(x, jnp.array([[1.0, 0.0], [0.0, 1.0]]))  # a warm start
    >>> km.labels.tolist(), jnp.argmax(km.centroids, axis=1).tolist()
    ([0, 0, 1, 1], [0, 1])
  """
  x = jnp.asarray(x, jnp.float32)
  xn = _normalize(x)
  c0 = _normalize(jnp.asarray(centroids, jnp.float32))
  w = _weights(weights, x.shape[0])
  return _lloyd(xn, w, c0, jnp.asarray(n_iter, jnp.int32), jnp.asarray(tol, jnp.float32))


# ---------------------------------------------------------------------------------- pattern bank


class Bank(NamedTuple):
  """The ReasoningBank: `P` pattern slots.

  Attributes:
    centroid: f32[P, d] unit-norm pattern centroids.
    size: f32[P] number of signals merged in.
    avg_quality: f32[P] size-weighted mean quality.
    tier_success: f32[P, T] per-tier success counts.
    tier_count: f32[P, T] per-tier trial counts.
    created: i32[P] creation time (s).
    last_access: i32[P] last merge or retrieval time (s).
    access_count: i32[P] retrievals recorded by `record_access`.
    level: i32[P] 0 = extracted, > 0 = abstraction (Loop C).
    parent: i32[P] parent slot, -1 for none.
    alive: bool[P] slot holds a pattern.
  """

  centroid: jax.Array
  size: jax.Array
  avg_quality: jax.Array
  tier_success: jax.Array
  tier_count: jax.Array
  created: jax.Array
  last_access: jax.Array
  access_count: jax.Array
  level: jax.Array
  parent: jax.Array
  alive: jax.Array

  @property
  def capacity(self) -> int:
    return self.centroid.shape[0]


def init_bank(capacity: int, dim: int, n_tiers: int) -> Bank:
  """An empty bank of `capacity` slots for `dim`-dimensional patterns over `n_tiers` tiers.

  Examples:
    >>> bank = init_bank(4, 3, 2)
    >>> bank.capacity, bank.centroid.shape, bank.tier_count.shape
    (4, (4, 3), (4, 2))
    >>> int(bank.alive.sum()), bank.parent.tolist()  # empty; no parents
    (0, [-1, -1, -1, -1])
  """
  for name, v in (("capacity", capacity), ("dim", dim), ("n_tiers", n_tiers)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"init_bank: {name} must be a positive int, got {v!r}")
  zf = jnp.zeros((capacity,), jnp.float32)
  zi = jnp.zeros((capacity,), jnp.int32)
  return Bank(
    centroid=jnp.zeros((capacity, dim), jnp.float32),
    size=zf,
    avg_quality=zf,
    tier_success=jnp.zeros((capacity, n_tiers), jnp.float32),
    tier_count=jnp.zeros((capacity, n_tiers), jnp.float32),
    created=zi,
    last_access=zi,
    access_count=zi,
    level=zi,
    parent=jnp.full((capacity,), -1, jnp.int32),
    alive=jnp.zeros((capacity,), jnp.bool_),
  )


class PatternStats(NamedTuple):
  """Per-cluster statistics from `pattern_stats`.

  Attributes:
    size: f32[k] total weight of the cluster.
    avg_quality: f32[k] weighted mean quality (0 for an empty cluster).
    tier_success: f32[k, T] weighted successes per tier.
    tier_count: f32[k, T] weighted trials per tier.
  """

  size: jax.Array
  avg_quality: jax.Array
  tier_success: jax.Array
  tier_count: jax.Array


@functools.partial(jax.jit, static_argnames=("k", "n_tiers"))
def pattern_stats(x, labels, k: int, quality, tier, success, n_tiers: int, weights=None):
  """Summarises clusters for `merge_patterns` (one-hot sums, no loop).

  Args:
    x: f32[n, d] the clustered rows (only their count is used; the centroids come from k-means).
    labels: i32[n] cluster of each row; out-of-range labels (e.g. -1) are ignored.
    k: number of clusters (static).
    quality: f32[n] quality of each row.
    tier: i32[n] tier each row was served by; out-of-range tiers count in `size` but in no tier.
    success: bool[n] or f32[n] success of each row.
    n_tiers: number of tiers `T` (static).
    weights: optional f32[n] row weights (0 = padding).

  Returns:
    `PatternStats(size f32[k], avg_quality f32[k], tier_success f32[k, T], tier_count f32[k, T])`.

  Examples:
    >>> import jax.numpy as jnp
    >>> labels = jnp.array([0, 0, 1, -1])  # the last row is in no cluster
    >>> quality, tier = jnp.array([0.5, 1.0, 0.25, 0.75]), jnp.array([0, 1, 1, 0])
    >>> success = jnp.array([1.0, 0.0, 1.0, 1.0])
    >>> s = pattern_stats(jnp.zeros((4, 8)), labels, 2, quality, tier, success, 2)
    >>> s.size.tolist(), s.avg_quality.tolist()
    ([2.0, 1.0], [0.75, 0.25])
    >>> s.tier_count.tolist(), s.tier_success.tolist()
    ([[1.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
  """
  n = jnp.shape(x)[0]
  w = _weights(weights, n)
  member = jax.nn.one_hot(labels, k, dtype=jnp.float32) * w[:, None]  # [n, k]
  size = jnp.sum(member, axis=0)
  q_sum = jnp.sum(member * jnp.asarray(quality, jnp.float32)[:, None], axis=0)
  avg_quality = jnp.where(size > 0.0, q_sum / jnp.maximum(size, _EPS), 0.0)
  tier_oh = jax.nn.one_hot(tier, n_tiers, dtype=jnp.float32)  # [n, T]
  ok = jnp.asarray(success, jnp.float32)[:, None]
  tier_count = member.T @ tier_oh
  tier_success = member.T @ (tier_oh * ok)
  return PatternStats(size, avg_quality, tier_success, tier_count)


class MergeReport(NamedTuple):
  """What `merge_patterns` did, aligned with its `m` input patterns; nothing is removed silently.

  Attributes:
    n_merged: i32[] new patterns merged into an existing one.
    n_inserted: i32[] new patterns given a slot of their own (free or evicted).
    n_evicted: i32[] live patterns evicted to make room.
    slot: i32[m] slot each new pattern went to (-1 for an invalid one).
    evicted: i32[m] slot evicted for each new pattern (-1 when none).
  """

  n_merged: jax.Array
  n_inserted: jax.Array
  n_evicted: jax.Array
  slot: jax.Array
  evicted: jax.Array


def pattern_value(bank: Bank, now, half_life_s=7 * 86_400.0) -> jax.Array:
  """f32[P] eviction value `avg_quality * log(1 + size) * 0.5^((now - last_access) / half_life)`.

  Dead slots get +inf (never evicted: a free slot is taken before any eviction).

  Examples:
    >>> import math
    >>> import jax.numpy as jnp
    >>> bank = init_bank(2, 2, 1)._replace(alive=jnp.array([True, False]))
    >>> bank = bank._replace(size=jnp.array([3.0, 0.0]), avg_quality=jnp.array([0.5, 0.0]))
    >>> v = pattern_value(bank, 86_400, half_life_s=86_400.0)  # one half-life since last access
    >>> math.isclose(float(v[0]), 0.5 * math.log(1 + 3) * 0.5, rel_tol=1e-6), float(v[1])
    (True, inf)
  """
  idle = (jnp.asarray(now, jnp.int32) - bank.last_access).astype(jnp.float32)
  recency = jnp.exp2(-idle / jnp.asarray(half_life_s, jnp.float32))
  value = bank.avg_quality * jnp.log1p(bank.size) * recency
  return jnp.where(bank.alive, value, jnp.float32(jnp.inf))


def _merge_one(bank: Bank, new, now, threshold, half_life_s):
  c, size, q, t_succ, t_cnt, valid = new
  c = _normalize(c)
  # Only extracted (level-0) patterns absorb new ones: merging into a Loop C abstraction would
  # count the new pattern's size twice (once in the abstraction, once in its members).
  cos = jnp.where(bank.alive & (bank.level == 0), bank.centroid @ c, -jnp.inf)
  near = jnp.argmax(cos).astype(jnp.int32)
  merge = valid & (cos[near] >= threshold)
  has_free = ~jnp.all(bank.alive)
  free = jnp.argmin(bank.alive).astype(jnp.int32)  # first dead slot
  worst = jnp.argmin(pattern_value(bank, now, half_life_s)).astype(jnp.int32)
  insert = valid & ~merge
  evict = insert & ~has_free
  slot = jnp.where(merge, near, jnp.where(has_free, free, worst))

  # Merged values: size-weighted means, summed counts (Seed: weighted merge).
  s_old = bank.size[slot]
  s_tot = s_old + size
  denom = jnp.maximum(s_tot, _EPS)
  m_c = _normalize(s_old * bank.centroid[slot] + size * c)
  m_q = jnp.where(s_tot > 0.0, (s_old * bank.avg_quality[slot] + size * q) / denom, q)
  merged = (m_c, s_tot, m_q, bank.tier_success[slot] + t_succ, bank.tier_count[slot] + t_cnt)
  fresh = (c, size, q, t_succ, t_cnt)
  row = [jnp.where(merge, a, b) for a, b in zip(merged, fresh, strict=True)]

  def put(field, value):
    return field.at[slot].set(jnp.where(valid, value, field[slot]))

  # An evicted slot's children lose their parent, so the recycled slot adopts no stale subtree.
  parent = jnp.where(evict & (bank.parent == slot), jnp.int32(-1), bank.parent)
  bank = Bank(
    centroid=put(bank.centroid, row[0]),
    size=put(bank.size, row[1]),
    avg_quality=put(bank.avg_quality, row[2]),
    tier_success=put(bank.tier_success, row[3]),
    tier_count=put(bank.tier_count, row[4]),
    created=put(bank.created, jnp.where(merge, bank.created[slot], now)),
    last_access=put(bank.last_access, now),
    access_count=put(bank.access_count, jnp.where(merge, bank.access_count[slot], 0)),
    level=put(bank.level, jnp.where(merge, bank.level[slot], 0)),
    parent=put(parent, jnp.where(merge, parent[slot], -1)),
    alive=put(bank.alive, True),
  )
  out = (merge, insert, evict, jnp.where(valid, slot, -1), jnp.where(evict, slot, -1))
  return bank, out


@jax.jit
def merge_patterns(
  bank: Bank,
  centroids,
  sizes,
  avg_quality,
  tier_success,
  tier_count,
  valid,
  *,
  now,
  merge_threshold=0.9,
  half_life_s=7 * 86_400.0,
):
  """Folds `m` new patterns into the bank, in order (`lax.scan`).

  Each valid new pattern merges into its nearest alive level-0 pattern (never a Loop C
  abstraction) when their cosine is
  `>= merge_threshold` (centroid = normalised size-weighted mean, sizes and tier counts summed,
  quality size-weighted, `last_access = now`); else it takes the first free slot; else it evicts the
  pattern of lowest `pattern_value` and takes its slot. All hyperparameters are traced.

  Args:
    bank: the bank.
    centroids: f32[m, d] new centroids (normalised here).
    sizes: f32[m] their sizes.
    avg_quality: f32[m] their mean qualities.
    tier_success: f32[m, T] their per-tier successes.
    tier_count: f32[m, T] their per-tier trials.
    valid: bool[m] which rows are real patterns (False = padding, ignored).
    now: current time, int seconds.
    merge_threshold: cosine at or above which a new pattern merges.
    half_life_s: recency half-life of the eviction value.

  Returns:
    `(bank, MergeReport)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> bank = init_bank(2, 2, 1)
    >>> new = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])  # the third is near the first
    >>> sizes, quality = jnp.array([1.0, 1.0, 3.0]), jnp.array([0.5, 1.0, 0.75])
    >>> ones, valid = jnp.ones((3, 1)), jnp.array([True, True, True])
    >>> bank, rep = merge_patterns(bank, new, sizes, quality, ones, ones, valid, now=10)
    >>> int(rep.n_inserted), int(rep.n_merged), rep.slot.tolist()
    (2, 1, [0, 1, 0])
    >>> bank.size.tolist(), bank.avg_quality.tolist(), bank.tier_count[:, 0].tolist()
    ([4.0, 1.0], [0.6875, 1.0], [2.0, 1.0])
    >>> one = jnp.ones((1, 1))  # the bank is full: the lowest-value pattern (slot 1) makes room
    >>> bank, rep = merge_patterns(bank, -new[:1], one[0], one[0], one, one, valid[:1], now=10)
    >>> int(rep.n_evicted), rep.evicted.tolist()
    (1, [1])
  """
  now = jnp.asarray(now, jnp.int32)
  threshold = jnp.asarray(merge_threshold, jnp.float32)
  xs = (
    jnp.asarray(centroids, jnp.float32),
    jnp.asarray(sizes, jnp.float32),
    jnp.asarray(avg_quality, jnp.float32),
    jnp.asarray(tier_success, jnp.float32),
    jnp.asarray(tier_count, jnp.float32),
    jnp.asarray(valid, jnp.bool_),
  )
  bank, (merged, inserted, evicted, slot, ev_slot) = jax.lax.scan(
    lambda b, new: _merge_one(b, new, now, threshold, half_life_s), bank, xs
  )
  count = lambda a: jnp.sum(a.astype(jnp.int32))
  report = MergeReport(count(merged), count(inserted), count(evicted), slot, ev_slot)
  return bank, report


@functools.partial(jax.jit, static_argnames=("k",))
def find_patterns(bank: Bank, query, k: int):
  """Top-k alive patterns by cosine to `query`.

  Args:
    bank: the bank.
    query: f32[d] or f32[B, d] query embedding(s) (normalised here).
    k: number of patterns (static).

  Returns:
    `(ids i32[..., k], scores f32[..., k])`, best first; when fewer than `k` patterns are alive the
    tail has id -1 and score -inf.

  Examples:
    >>> import jax.numpy as jnp
    >>> bank = init_bank(3, 2, 1)._replace(alive=jnp.array([True, True, False]))
    >>> bank = bank._replace(centroid=jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> ids, scores = find_patterns(bank, jnp.array([3.0, 1.0]), 3)
    >>> ids.tolist(), [round(s, 4) for s in scores.tolist()]  # cosines 3/sqrt(10), 1/sqrt(10)
    ([0, 1, -1], [0.9487, 0.3162, -inf])
    >>> find_patterns(bank, jnp.ones((5, 2)), 2)[0].shape  # a batch of queries
    (5, 2)
  """
  q = _normalize(jnp.asarray(query, jnp.float32))
  # `centroid @ q.T`, not `q @ centroid.T`: for one query XLA:CPU made the latter a slow
  # transposed product (25 ms against 0.6 ms at 1,000 patterns of dim 4,096).
  flat = q.reshape(-1, q.shape[-1])
  scores = (bank.centroid @ flat.T).T.reshape(q.shape[:-1] + (bank.capacity,))  # [..., P]
  scores = jnp.where(jnp.broadcast_to(bank.alive, scores.shape), scores, -jnp.inf)
  top, idx = jax.lax.top_k(scores, k)
  return jnp.where(top > -jnp.inf, idx.astype(jnp.int32), -1), top


class TierEstimate(NamedTuple):
  """Per-tier success estimates for one query: a Beta posterior per tier.

  Attributes:
    mean: f32[..., T] the estimated success probability `alpha / (alpha + beta)`.
    alpha: f32[..., T] Beta posterior: pseudo-successes.
    beta: f32[..., T] Beta posterior: pseudo-failures.
    evidence: f32[..., T] proximity-weighted trials behind the estimate (the bank's part).
  """

  mean: jax.Array
  alpha: jax.Array
  beta: jax.Array
  evidence: jax.Array


def tier_estimates(bank: Bank, query, prior, *, k: int, temperature, strength) -> TierEstimate:
  """Per-tier success estimates: the nearest patterns' records, shrunk toward a prior.

  A nonparametric estimate in the spirit of nearest-neighbour and cluster routers (Li 2025,
  arXiv 2505.12601; UniRoute, arXiv 2502.08773): the `k` alive extracted patterns (level 0; a
  Loop C abstraction sums its members' records) nearest to the query
  (cosine `s_i`) each weigh in with `w_i = exp((s_i - s_max) / temperature)` (1 for the nearest),
  their per-tier successes and trials summed, `S_t = sum_i w_i succ_it`, `N_t = sum_i w_i cnt_it`.
  A Beta prior of mean `prior_t` and strength `m` (pseudo-trials) gives the posterior

    alpha_t = S_t + m prior_t,  beta_t = N_t - S_t + m (1 - prior_t),  mean_t = alpha_t / (m + N_t)

  so a tier the nearby patterns never tried keeps the prior, and a well-tried one follows its
  record (empirical-Bayes shrinkage, e.g. Efron and Morris 1975). The driver's prior is the router
  head's prediction (`router.predict`), trained on every signal with EWC++; any f32[T] works.

  Args:
    bank: the ReasoningBank.
    query: f32[d] or f32[B, d] query embedding(s).
    prior: f32[..., T] prior success probabilities (clipped to [1e-3, 1 - 1e-3]).
    k: nearest patterns used (static; at most the bank capacity).
    temperature: proximity temperature (> 0); small values trust only the nearest pattern.
    strength: prior strength `m` in pseudo-trials (> 0).

  Returns:
    `TierEstimate(mean, alpha, beta, evidence)`.

  Examples:
    >>> b = init_bank(2, 2, 2)
    >>> b = b._replace(centroid=jnp.eye(2), alive=jnp.array([True, True]),
    ...                tier_success=jnp.array([[3.0, 0.0], [0.0, 0.0]]),
    ...                tier_count=jnp.array([[4.0, 0.0], [0.0, 0.0]]))
    >>> e = tier_estimates(b, jnp.array([1.0, 0.0]), jnp.array([0.5, 0.5]), k=1,
    ...                    temperature=0.1, strength=2.0)
    >>> [round(v, 4) for v in e.mean.tolist()]  # (3 + 2 * 0.5) / (4 + 2); the prior when untried
    [0.6667, 0.5]
  """
  # Extracted patterns only: a Loop C abstraction's record is the sum of its members', so counting
  # it beside them would count the same requests twice.
  extracted = bank._replace(alive=bank.alive & (bank.level == 0))
  ids, scores = find_patterns(extracted, query, min(k, bank.capacity))
  found = ids >= 0
  safe = jnp.where(found, ids, 0)
  best = scores[..., :1]
  w = jnp.where(found, jnp.exp((jnp.where(found, scores, best) - best) / temperature), 0.0)
  succ = jnp.einsum("...k,...kt->...t", w, bank.tier_success[safe])
  cnt = jnp.einsum("...k,...kt->...t", w, bank.tier_count[safe])
  prior = jnp.clip(jnp.asarray(prior, jnp.float32), 1e-3, 1.0 - 1e-3)
  alpha = succ + strength * prior
  beta = jnp.maximum(cnt - succ, 0.0) + strength * (1.0 - prior)
  return TierEstimate(alpha / (alpha + beta), alpha, beta, cnt)


def neighbour_estimates(
  keys, tiers, successes, valid, query, prior, *, k: int, temperature, strength
) -> TierEstimate:
  """Per-tier success estimates from the nearest recorded outcomes of each tier, shrunk to a prior.

  A k-nearest-neighbour estimate under partial feedback (one tier's outcome per record; kNN-UCB,
  Reeve et al. 2018; nearest-neighbour routers, Li 2025, arXiv 2505.12601): for each tier `t`, the
  `k` valid records served by `t` nearest to the query (cosine `s_i`) weigh in with
  `w_i = exp((s_i - s_max,t) / temperature)` (1 for that tier's nearest record), giving
  `S_t = sum_i w_i success_i` and `N_t = sum_i w_i`, and a Beta prior of mean `prior_t` and strength
  `m` gives

    alpha_t = S_t + m prior_t,  beta_t = N_t - S_t + m (1 - prior_t),  mean_t = alpha_t / (m + N_t).

  The driver reads the records from the learning-signal ring (`buffer.recent`) and takes the prior
  from the router head (docs/design.md, "Routing").

  Args:
    keys: f32[M, d] the records' query embeddings.
    tiers: i32[M] the tier each record was served by (others are ignored).
    successes: f32[M] the outcome in [0, 1].
    valid: bool[M] which records exist.
    query: f32[d] the query embedding.
    prior: f32[T] prior success probabilities (clipped to [1e-3, 1 - 1e-3]).
    k: neighbours per tier (static; at most M are read).
    temperature: proximity temperature (> 0).
    strength: prior strength `m` in pseudo-trials (> 0).

  Returns:
    `TierEstimate(mean, alpha, beta, evidence)` with f32[T] fields (`evidence` is `N_t`).

  Examples:
    >>> keys = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> e = neighbour_estimates(keys, jnp.array([0, 0, 1]), jnp.array([1.0, 0.0, 1.0]),
    ...                         jnp.array([True, True, True]), jnp.array([1.0, 0.0]),
    ...                         jnp.array([0.5, 0.5]), k=2, temperature=1.0, strength=2.0)
    >>> # tier 0: two records at cosine 1, one success: (1 + 2 * 0.5) / (2 + 2) = 0.5; tier 1:
    >>> # one record at cosine 0 (its tier's nearest: weight 1), a success: (1 + 1) / (1 + 2)
    >>> [round(v, 4) for v in e.mean.tolist()], e.evidence.tolist()
    ([0.5, 0.6667], [2.0, 1.0])
  """
  keys = jnp.asarray(keys, jnp.float32)
  q = jnp.asarray(query, jnp.float32)
  prior = jnp.clip(jnp.asarray(prior, jnp.float32), 1e-3, 1.0 - 1e-3)
  n_tiers = prior.shape[-1]
  sims = (keys @ q) * lax.rsqrt(jnp.maximum(jnp.sum(keys * keys, -1) * jnp.dot(q, q), 1e-24))
  own = valid[None, :] & (tiers[None, :] == jnp.arange(n_tiers, dtype=jnp.int32)[:, None])
  near, idx = lax.top_k(jnp.where(own, sims[None, :], -jnp.inf), min(k, keys.shape[0]))  # [T, k]
  found = jnp.isfinite(near)
  near = jnp.where(found, near, 0.0)
  w = jnp.where(found, jnp.exp((near - near[:, :1]) / temperature), 0.0)
  succ = jnp.sum(w * jnp.asarray(successes, jnp.float32)[idx], -1)
  cnt = jnp.sum(w, -1)
  alpha = succ + strength * prior
  beta = jnp.maximum(cnt - succ, 0.0) + strength * (1.0 - prior)
  return TierEstimate(alpha / (alpha + beta), alpha, beta, cnt)


@jax.jit
def record_access(bank: Bank, ids, now) -> Bank:
  """Marks retrieved patterns used: `access_count += 1`, `last_access = now` for `ids >= 0`.

  Args:
    bank: the bank.
    ids: i32[k] pattern ids, -1 padded (as returned by `find_patterns`); a repeated id counts twice.
    now: current time, int seconds.

  Returns:
    The bank.

  Examples:
    >>> import jax.numpy as jnp
    >>> bank = record_access(init_bank(3, 2, 1), jnp.array([2, 0, 2, -1]), 100)
    >>> bank.access_count.tolist(), bank.last_access.tolist()
    ([1, 0, 2], [100, 0, 100])
  """
  ids = jnp.asarray(ids, jnp.int32).reshape(-1)
  p = bank.capacity
  idx = jnp.where(ids >= 0, ids, p)  # out of range: dropped
  count = bank.access_count.at[idx].add(1, mode="drop")
  last = bank.last_access.at[idx].set(jnp.asarray(now, jnp.int32), mode="drop")
  return bank._replace(access_count=count, last_access=last)


def export(bank: Bank) -> list[dict]:
  """Host-side export of the alive patterns as plain JSON-able dicts (floats, ints, lists).

  Examples:
    >>> import json
    >>> import jax.numpy as jnp
    >>> c, one = jnp.array([[0.0, 2.0]]), jnp.ones(1)
    >>> bank, _ = merge_patterns(init_bank(3, 2, 1), c, 4 * one, one / 2, 3 * one[:, None],
    ...                          4 * one[:, None], one > 0, now=7)
    >>> rows = export(bank)
    >>> len(rows), rows[0]["id"], rows[0]["centroid"], rows[0]["size"], rows[0]["tier_success"]
    (1, 0, [0.0, 1.0], 4.0, [3.0])
    >>> json.loads(json.dumps(rows)) == rows  # plain JSON
    True
  """
  b = jax.tree.map(np.asarray, bank)
  out = []
  for i in np.flatnonzero(b.alive):
    out.append(
      {
        "id": int(i),
        "centroid": [float(v) for v in b.centroid[i]],
        "size": float(b.size[i]),
        "avg_quality": float(b.avg_quality[i]),
        "tier_success": [float(v) for v in b.tier_success[i]],
        "tier_count": [float(v) for v in b.tier_count[i]],
        "created": int(b.created[i]),
        "last_access": int(b.last_access[i]),
        "access_count": int(b.access_count[i]),
        "level": int(b.level[i]),
        "parent": int(b.parent[i]),
      }
    )
  return out
