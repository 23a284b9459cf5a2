"""Loop C phase 2: abstraction (docs/design.md, "Loop C"; seed `abstract_patterns`).

`abstract_patterns(bank, cfg, now)`: Ward hierarchical clustering of the level-0 pattern centroids;
meta-patterns (`level > 0`) for the clusters of each level with more than
`cfg.abstraction_min_cluster` children, linked to their children by `parent` pointers. The bank is
restructured on the host (NumPy, scikit-learn), off the request path.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from sklearn.cluster import ward_tree

from sona_jax import patterns
from sona_jax.config import SonaConfig

__all__ = ["AbstractionReport", "abstract_patterns", "ward_levels"]

_EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
  """Unit-normalises the rows of `x` (float64); zero rows stay zero."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


class AbstractionReport(NamedTuple):
  """What `abstract_patterns` did (host values); entries of the `meta_*` tuples are aligned.

  Attributes:
    n_patterns: level-0 patterns clustered.
    cuts: clusters of each Ward cut, level 1 first.
    removed_ids: slots of the previous meta-patterns, removed (freed) before rebuilding.
    meta_ids: slots of the new meta-patterns.
    meta_levels: their levels (1 = finest cut).
    meta_members: number of level-0 patterns below each.
    meta_children: number of direct children of each (level-0 patterns or meta-patterns).
    confidence: cohesion of each meta-pattern in [0, 1] (see `abstract_patterns`).
    skipped: qualifying clusters not made into meta-patterns (cap or no slot, or left with too
      few children by the patterns evicted to make room).
    evicted_ids: level-0 pattern slots evicted to make room (reused by meta-patterns).
    seconds: wall times, keys `ward`, `build`, `total`.
  """

  n_patterns: int
  cuts: tuple[int, ...]
  removed_ids: tuple[int, ...]
  meta_ids: tuple[int, ...]
  meta_levels: tuple[int, ...]
  meta_members: tuple[int, ...]
  meta_children: tuple[int, ...]
  confidence: tuple[float, ...]
  skipped: int
  evicted_ids: tuple[int, ...]
  seconds: dict[str, float]


def ward_levels(x, *, branching: int = 8, max_levels: int = 3) -> list[np.ndarray]:
  """Nested cuts of the Ward tree of the rows of `x` (unit-normalised here).

  Level `l` cuts the tree into `ceil(n / branching**l)` clusters, `l = 1 .. max_levels`, stopping
  after the cut with one cluster. Cuts of one tree are nested: every level-`l` cluster is a union
  of level-`(l - 1)` clusters. Ward merges minimise the increase of the within-cluster sum of
  squares; on unit vectors `||a - b||^2 = 2 - 2 cos(a, b)`, so Euclidean Ward approximates a
  cosine-geometry clustering (the seed's "Ward, cosine").

  Args:
    x: f[n, d] points, n >= 2.
    branching: ratio of the cluster counts of consecutive levels.
    max_levels: most levels.

  Returns:
    One `i64[n]` label array per level, labels `0 .. k_l - 1`.

  Examples:
    >>> import numpy as np
    >>> x = np.array([[1, 0.1 * i, 0] for i in range(4)] + [[0, 1, 0.1 * i] for i in range(4)])
    >>> [lab.tolist() for lab in ward_levels(x, branching=2)]  # 4, 2, then 1 cluster: nested
    [[2, 2, 0, 0, 3, 3, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]]
    >>> [int(lab.max()) + 1 for lab in ward_levels(x, branching=4)]  # ceil(8 / 4), then the root
    [2, 1]
  """
  x = _unit(x)
  n = x.shape[0]
  children = ward_tree(x)[0]  # [n - 1, 2]: merge s makes node n + s
  counts = []
  for level in range(1, max_levels + 1):
    k = max(1, -(-n // branching**level))
    if counts and k >= counts[-1]:
      break
    counts.append(k)
    if k == 1:
      break
  # Merge pointers applied in order; the k-cluster cut is the state after n - k merges.
  root = np.arange(2 * n - 1)
  cuts = {}
  for s in range(n):
    if n - s in counts:
      cuts[n - s] = _cut_labels(root, n)
    if s < n - 1:
      root[children[s]] = n + s
  return [cuts[k] for k in counts]


def _cut_labels(root: np.ndarray, n: int) -> np.ndarray:
  """Labels `0 .. k-1` of the leaves from a merge-pointer array (pointer jumping, vectorised)."""
  r = root.copy()
  while True:
    nxt = r[r]
    if np.array_equal(nxt, r):
      break
    r = nxt
  return np.unique(r[:n], return_inverse=True)[1]


def abstract_patterns(
  bank: patterns.Bank,
  cfg: SonaConfig,
  now,
  *,
  branching: int = 8,
  max_levels: int = 3,
  max_meta_fraction: float = 0.1,
  max_patterns: int = 4096,
  evict: bool = True,
  half_life_s: float = 7 * 86_400.0,
) -> tuple[patterns.Bank, AbstractionReport]:
  """Phase 2: builds a concept hierarchy of meta-patterns over the level-0 patterns.

  1. **Rebuild.** Meta-patterns are rebuilt from scratch each run, so reruns never stack
     duplicates: the previous ones (alive, `level > 0`) are removed first, their slots freed and
     their ids reported, and every `parent` pointer is cleared.
  2. **Levels.** The alive level-0 centroids are unit-normalised and clustered with Ward linkage
     (scikit-learn's `ward_tree`); level `l` is the cut into `ceil(n / branching**l)` clusters
     (`ward_levels`), so level 1 is the finest cut and the levels are nested.
  3. **Meta-patterns.** Going up the levels, the *roots* are the level-0 patterns and
     meta-patterns that have no parent yet. A level-`l` cluster becomes a meta-pattern of level `l`
     when it holds more than `cfg.abstraction_min_cluster` roots (seed: "clusters larger than 3");
     those roots become its children. A cluster equal to one lower meta-pattern therefore never
     repeats it, and parents always have a higher level than their children: the pointers form a
     forest.
  4. **Aggregates.** Over the level-0 patterns below it (its members): centroid = normalised
     size-weighted mean of their centroids, `size` = sum, `avg_quality` = size-weighted mean,
     tier successes and counts summed, `created = now`, `last_access` = the members' latest,
     `access_count = 0`.
  5. **Confidence** = cohesion: the size-weighted mean cosine of the members' centroids to the
     meta-pattern's centroid, clipped to [0, 1]. The bank has no field for it, so it is reported
     (`AbstractionReport.confidence`), not stored.
  6. **Slots.** At most `floor(max_meta_fraction * capacity)` meta-patterns (largest first, by
     members) are made. They take free slots first (the slots of the previous meta-patterns
     among them, so a rerun on an unchanged bank evicts nothing); when too few are free, the
     lowest-value level-0 patterns (`patterns.pattern_value`, the bank's own eviction rule) are
     evicted for the rest and reported in `evicted_ids` (their statistics live on in the
     meta-patterns that cover them). With `evict=False` only free slots are used. Clusters left
     without a slot are counted in `skipped`; each level-0 pattern points at its nearest ancestor
     that was made.

  At most `max_patterns` level-0 patterns (highest value first) are clustered: Ward needs
  O(n^2) memory.

  Args:
    bank: the bank.
    cfg: the config (`abstraction_min_cluster`).
    now: current time, int seconds.
    branching: ratio of the cluster counts of consecutive levels.
    max_levels: most levels of meta-patterns.
    max_meta_fraction: cap on the meta-patterns, as a fraction of the bank capacity.
    max_patterns: cap on the level-0 patterns clustered.
    evict: evict the lowest-value level-0 patterns when too few slots are free.
    half_life_s: recency half-life of the eviction value.

  Returns:
    `(bank, AbstractionReport)`.

  Examples:
    >>> import numpy as np, sona_jax as sona
    >>> from sona_jax import patterns
    >>> cfg = sona.SonaConfig(dim=8)  # abstraction_min_cluster 3
    >>> x = np.zeros((8, 8), np.float32)  # two groups of 4 patterns
    >>> x[:, :3] = [[1, 0.1 * i, 0] for i in range(4)] + [[0, 1, 0.1 * i] for i in range(4)]
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit centroids
    >>> bank = patterns.init_bank(20, 8, 3)  # room for 20 * 0.1 = 2 meta-patterns
    >>> bank = bank._replace(centroid=bank.centroid.at[:8].set(x), size=bank.size.at[:8].set(1.0),
    ...                      alive=bank.alive.at[:8].set(True))
    >>> bank, rep = abstract_patterns(bank, cfg, now=0, branching=4)
    >>> rep.cuts, rep.meta_ids, rep.meta_levels, rep.meta_members  # level 2: 2 roots, too few
    ((2, 1), (8, 9), (1, 1), (4, 4))
    >>> bank.parent[:10].tolist(), bank.size[8:10].tolist()
    ([8, 8, 8, 8, 9, 9, 9, 9, -1, -1], [4.0, 4.0])
    >>> bank, rep = abstract_patterns(bank, cfg, now=0, branching=4)  # rebuilt, not stacked
    >>> rep.removed_ids, rep.meta_ids, int(bank.alive.sum())
    ((8, 9), (8, 9), 10)
  """
  t0 = time.perf_counter()
  if branching < 2:
    raise ValueError(f"abstract_patterns: branching must be >= 2, got {branching!r}")
  if not 0.0 <= max_meta_fraction <= 1.0:
    raise ValueError(
      f"abstract_patterns: max_meta_fraction must be in [0, 1], got {max_meta_fraction!r}"
    )
  now = int(now)
  dtypes = [a.dtype for a in bank]
  b = patterns.Bank(*[np.array(a) for a in bank])
  value = np.asarray(patterns.pattern_value(bank, now, half_life_s))
  removed = np.flatnonzero(b.alive & (b.level > 0))
  b.alive[removed] = False
  b.level[removed] = 0
  b.size[removed] = 0.0
  b.parent[:] = -1
  leaves = np.flatnonzero(b.alive & (b.level == 0))
  if leaves.size > max_patterns:
    leaves = np.sort(leaves[np.argsort(-value[leaves], kind="stable")[:max_patterns]])
  n0 = leaves.size
  min_cluster = cfg.abstraction_min_cluster

  def done(cuts=(), meta=(), skipped=0, evicted=(), t_ward=0.0, t_build=0.0):
    out = patterns.Bank(*[jnp.asarray(a, dt) for a, dt in zip(b, dtypes, strict=True)])
    meta = list(meta)
    report = AbstractionReport(
      n_patterns=int(n0),
      cuts=tuple(int(k) for k in cuts),
      removed_ids=tuple(int(i) for i in removed),
      meta_ids=tuple(int(m["slot"]) for m in meta),
      meta_levels=tuple(int(m["level"]) for m in meta),
      meta_members=tuple(int(m["members"].size) for m in meta),
      meta_children=tuple(int(m["n_children"]) for m in meta),
      confidence=tuple(float(m["cohesion"]) for m in meta),
      skipped=int(skipped),
      evicted_ids=tuple(int(i) for i in evicted),
      seconds={"ward": t_ward, "build": t_build, "total": time.perf_counter() - t0},
    )
    return out, report

  if n0 <= min_cluster:
    return done()
  x = _unit(b.centroid[leaves])
  t1 = time.perf_counter()
  levels = ward_levels(x, branching=branching, max_levels=max_levels)
  t_ward = time.perf_counter() - t1
  t1 = time.perf_counter()

  # Items: 0..n0-1 are the level-0 patterns, n0 + j the j-th candidate meta-pattern.
  up = [-1] * n0  # up[item]: the candidate that took the item as a child (-1 none)
  root_of = np.arange(n0)  # current root item of each level-0 pattern
  cand = []
  for level, labels in enumerate(levels, start=1):
    order = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
    for members in np.split(order, starts[1:]):
      roots = np.unique(root_of[members])
      if roots.size <= min_cluster:
        continue
      j = n0 + len(cand)
      for r in roots:
        up[r] = j
      up.append(-1)
      cand.append({"level": level, "members": members})
      root_of[members] = j

  cap = int(np.floor(max_meta_fraction * b.alive.shape[0]))
  order = sorted(range(len(cand)), key=lambda j: (-cand[j]["members"].size, -cand[j]["level"], j))
  want = order[:cap]
  free = np.flatnonzero(~b.alive)
  evicted = np.zeros((0,), np.int64)
  if len(want) > free.size and evict:
    pool = leaves[np.argsort(value[leaves], kind="stable")]
    evicted = np.sort(pool[: len(want) - free.size])
    b.alive[evicted] = False
    free = np.flatnonzero(~b.alive)
  want = want[: free.size]
  skipped = len(cand) - len(want)
  made = {n0 + j: int(slot) for j, slot in zip(want, free, strict=False)}

  def made_ancestor(item):
    a = up[item]
    while a >= 0 and a not in made:
      a = up[a]
    return made.get(a, -1)

  for i, leaf in enumerate(leaves):
    if b.alive[leaf]:
      b.parent[leaf] = made_ancestor(i)
  size0 = np.maximum(b.size[leaves].astype(np.float64), 0.0)
  weight0 = size0 if size0.sum() > 0 else np.ones_like(size0)
  meta = []
  for j in want:
    c = cand[j]
    mem = c["members"]
    slot = made[n0 + j]
    wm = weight0[mem]
    centroid = _unit(wm @ x[mem])
    cohesion = float(np.clip(np.sum(wm * (x[mem] @ centroid)) / max(wm.sum(), _EPS), 0.0, 1.0))
    sm = size0[mem]
    b.centroid[slot] = centroid
    b.size[slot] = sm.sum()
    b.avg_quality[slot] = np.sum(sm * b.avg_quality[leaves[mem]]) / max(sm.sum(), _EPS)
    b.tier_success[slot] = b.tier_success[leaves[mem]].sum(axis=0)
    b.tier_count[slot] = b.tier_count[leaves[mem]].sum(axis=0)
    b.created[slot] = now
    b.last_access[slot] = b.last_access[leaves[mem]].max()
    b.access_count[slot] = 0
    b.level[slot] = c["level"]
    b.parent[slot] = made_ancestor(n0 + j)
    b.alive[slot] = True
    meta.append({"slot": slot, "level": c["level"], "members": mem, "cohesion": cohesion})
  # Patterns evicted above to free slots may have been children: a meta-pattern left with too few
  # children is dissolved (its children go to its parent), the lowest level first, until every
  # remaining one has more than `min_cluster` children.
  while True:
    n_children = np.bincount(b.parent[b.alive & (b.parent >= 0)], minlength=b.alive.shape[0])
    weak = [m for m in meta if n_children[m["slot"]] <= min_cluster]
    if not weak:
      break
    m = min(weak, key=lambda m: (m["level"], m["slot"]))
    slot = m["slot"]
    b.parent[b.alive & (b.parent == slot)] = b.parent[slot]
    b.alive[slot], b.level[slot], b.size[slot], b.parent[slot] = False, 0, 0.0, -1
    meta = [o for o in meta if o is not m]
    skipped += 1
  for m in meta:
    m["n_children"] = n_children[m["slot"]]
  t_build = time.perf_counter() - t1
  return done([lab.max() + 1 for lab in levels], meta, skipped, evicted, t_ward, t_build)
