"""Loop C phases 2-4: abstraction, dreams, cross-domain transfer (docs/design.md, "Loop C"; seed
`abstract_patterns`, `dream_learning`, `cross_domain_transfer`).

Each phase is a pure function returning the new structure and a report of host values that lists
everything it created, removed or displaced, with wall times:

- `abstract_patterns(bank, cfg, now)`: Ward hierarchical clustering of the level-0 pattern
  centroids; meta-patterns (`level > 0`) for the clusters of each level with more than
  `cfg.abstraction_min_cluster` children, linked to their children by `parent` pointers.
- `dream(graph, cfg, key)`: many random walks at once over the memory graph (`vmap` over walks,
  `lax.scan` over steps, jitted), a softmax over edge weights at a temperature; walks that are both
  novel and coherent propose weak `CREATIVE` edges to the nodes they reached.
- `transfer(graph, cfg)`: domains are Louvain communities of the non-synthetic graph, written into
  the `DOMAIN` node column; concepts of two domains whose offsets from their domain centroids align
  become `ANALOGY` edges.

The graph and bank are restructured on the host (NumPy, scikit-learn, networkx) where the work is
irregular, and in jitted JAX where it is many identical walks; none of it is on the request path.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import ward_tree

from sona_jax import graph as G
from sona_jax import patterns
from sona_jax.config import SonaConfig

__all__ = [
  "AbstractionReport",
  "abstract_patterns",
  "ward_levels",
  "DreamReport",
  "dream",
  "dream_starts",
  "dream_walks",
  "WalkStats",
  "walk_stats",
  "TransferReport",
  "transfer",
  "communities",
  "find_analogies",
]

_EPS = 1e-12


def _unit(x: np.ndarray) -> np.ndarray:
  """Unit-normalises the rows of `x` (float64); zero rows stay zero."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


# ----------------------------------------------------------------------------------- abstraction


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


# ---------------------------------------------------------------------------------------- dreams


class WalkStats(NamedTuple):
  """Per-walk quality of dream walks (`walk_stats`).

  Attributes:
    novelty: f32[W] fraction of the distinct nodes a walk reached that are not linked to its start.
    coherence: f32[W] mean cosine of consecutive nodes over the steps that moved.
    novel: bool[W, L + 1] positions holding a node counted as novel (first visit only).
    strength: f32[W, L + 1] `max(0, cos(start, node))` of each position.
  """

  novelty: jax.Array
  coherence: jax.Array
  novel: jax.Array
  strength: jax.Array


class DreamReport(NamedTuple):
  """What `dream` did (host values).

  Attributes:
    n_dreams: walks run.
    n_kept: walks above both the novelty and the coherence threshold.
    starts: i32[W] start node of each walk.
    paths: i32[W, L + 1] the walks (a stuck walk repeats its node).
    novelty: f32[W] per-walk novelty.
    coherence: f32[W] per-walk coherence.
    proposed: i32[m, 2] distinct `(start, node)` pairs the kept walks proposed.
    weights: f32[m] their proposed weights `dream_edge_scale * strength`.
    edges: the `graph.EdgeUpdate` of adding them (`inserted` are the new CREATIVE edges).
    seconds: wall times, keys `walks`, `edges`, `total`.
  """

  n_dreams: int
  n_kept: int
  starts: np.ndarray
  paths: np.ndarray
  novelty: np.ndarray
  coherence: np.ndarray
  proposed: np.ndarray
  weights: np.ndarray
  edges: G.EdgeUpdate
  seconds: dict[str, float]


def _walkable(kind: jax.Array, nbr: jax.Array, walk_synthetic: bool) -> jax.Array:
  ok = nbr >= 0
  if not walk_synthetic:
    ok = ok & (kind != G.CREATIVE) & (kind != G.ANALOGY)
  return ok


@functools.partial(jax.jit, static_argnames=("n", "walk_synthetic"))
def dream_starts(graph: G.Graph, key, n: int, *, walk_synthetic: bool = False) -> jax.Array:
  """Start nodes of `n` dream walks, drawn with replacement with probability proportional to
  `1 + access_count` among the alive nodes with at least one walkable edge (frequently recalled
  memories dream more, and every walkable memory can). All -1 when no node is walkable.

  Args:
    graph: the graph.
    key: PRNG key.
    n: number of walks (static).
    walk_synthetic: whether CREATIVE and ANALOGY edges count as walkable.

  Returns:
    i32[n] start nodes.
  """
  k = graph.degree
  ok = _walkable(graph.edges[:, 2 * k :], graph.edges[:, :k], walk_synthetic)
  eligible = graph.alive & jnp.any(ok, axis=1)
  p = jnp.where(eligible, 1.0 + graph.access_count.astype(jnp.float32), 0.0)
  any_ok = jnp.any(eligible)
  p = jnp.where(any_ok, p, 1.0) / jnp.where(any_ok, jnp.sum(p), jnp.float32(graph.capacity))
  starts = jax.random.choice(key, graph.capacity, (n,), p=p).astype(jnp.int32)
  return jnp.where(any_ok, starts, -1)


@functools.partial(jax.jit, static_argnames=("length", "temperature", "walk_synthetic"))
def dream_walks(
  graph: G.Graph, starts, key, *, length: int, temperature: float, walk_synthetic: bool = False
):
  """Random walks over the memory graph, all at once (`vmap` over walks, `lax.scan` over steps).

  At each step a walk at node `u` moves along one of `u`'s edges, edge `j` with probability
  `softmax(w_uj / temperature)` over the existing edges (empty slots never; synthetic CREATIVE and
  ANALOGY edges only with `walk_synthetic`, so dreams stay grounded in real associations by
  default). `temperature == 0` follows the heaviest edge exactly (argmax; ties to the lower slot).
  A walk at a node without a walkable edge stays there. Each step reads one packed edge row per
  walk (no large gathers).

  Args:
    graph: the graph.
    starts: i32[W] start nodes (alive, in range).
    key: PRNG key; walk `i` uses `fold_in(key, i)`.
    length: steps per walk (static).
    temperature: softmax temperature >= 0 (static).
    walk_synthetic: whether synthetic edges are walkable (static).

  Returns:
    `(paths i32[W, length + 1], moved bool[W, length])`: the visited nodes, start first, and
    whether each step moved.
  """
  k = graph.degree
  starts = jnp.asarray(starts, jnp.int32)

  def walk(start, wkey):
    def step(node, skey):
      row = graph.edges[node]
      ids, w, kind = (
        row[:k],
        jax.lax.bitcast_convert_type(row[k : 2 * k], jnp.float32),
        row[2 * k :],
      )
      ok = _walkable(kind, ids, walk_synthetic)
      if temperature == 0.0:
        j = jnp.argmax(jnp.where(ok, w, -jnp.inf))
      else:
        j = jax.random.categorical(skey, jnp.where(ok, w / jnp.float32(temperature), -jnp.inf))
      has = jnp.any(ok)
      nxt = jnp.where(has, ids[j], node)
      return nxt, (nxt, has)

    _, (path, moved) = jax.lax.scan(step, start, jax.random.split(wkey, length))
    return jnp.concatenate([start[None], path]), moved

  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(starts.shape[0]))
  return jax.vmap(walk)(starts, keys)


@jax.jit
def walk_stats(graph: G.Graph, paths, moved) -> WalkStats:
  """Novelty, coherence and proposal strength of dream walks.

  With `s` the start of a walk and `U` the distinct nodes it visited other than `s`:

  - a node `v` of `U` is *novel* when `s` and `v` have no edge of any kind in either direction
    (a first step is along an edge of `s`, so novel nodes are at least two hops away);
  - **novelty** = `|novel| / |U|` (0 when `U` is empty): the share of what the dream reached that
    memory does not already connect to where it started;
  - **coherence** = the mean cosine similarity of consecutive nodes over the steps that moved
    (0 for a walk that never moved): whether each association on the way makes sense;
  - **strength** of a proposed connection `(s, v)` = `max(0, cos(s, v))`: how related the two
    ends are, independent of the path (path weight products vanish with length).

  Args:
    graph: the graph.
    paths: i32[W, L + 1] walks, start first.
    moved: bool[W, L] whether each step moved.

  Returns:
    `WalkStats`.
  """
  k = graph.degree
  paths = jnp.asarray(paths, jnp.int32)
  moved = jnp.asarray(moved, jnp.bool_)
  start = paths[:, 0]
  emb = graph.emb[paths]  # [W, L + 1, d]
  emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), jnp.float32(_EPS))
  step_cos = jnp.sum(emb[:, 1:] * emb[:, :-1], axis=-1)  # [W, L]
  n_moved = jnp.sum(moved.astype(jnp.float32), axis=1)
  coherence = jnp.sum(jnp.where(moved, step_cos, 0.0), axis=1) / jnp.maximum(n_moved, 1.0)
  start_row = graph.edges[start][:, :k]  # [W, K]
  rows = graph.edges[paths][..., :k]  # [W, L + 1, K]
  linked = jnp.any(start_row[:, None, :] == paths[:, :, None], axis=-1) | jnp.any(
    rows == start[:, None, None], axis=-1
  )
  n = paths.shape[1]
  earlier = jnp.tril(jnp.ones((n, n), jnp.bool_), -1)  # earlier[t, s]: s < t
  seen = jnp.any((paths[:, :, None] == paths[:, None, :]) & earlier[None], axis=-1)
  visited = ~seen & (paths != start[:, None])
  novel = visited & ~linked
  n_visited = jnp.sum(visited.astype(jnp.float32), axis=1)
  novelty = jnp.sum(novel.astype(jnp.float32), axis=1) / jnp.maximum(n_visited, 1.0)
  strength = jnp.clip(jnp.sum(emb * emb[:, :1], axis=-1), 0.0, 1.0)
  return WalkStats(novelty, coherence, novel, strength)


def dream(
  graph: G.Graph, cfg: SonaConfig, key, *, walk_synthetic: bool = False
) -> tuple[G.Graph, DreamReport]:
  """Phase 3: dream learning (seed `dream_learning`, inspired by REM sleep).

  Runs `cfg.n_dreams` walks of `cfg.dream_length` steps at `cfg.dream_temperature` from starts
  drawn by `dream_starts` (probability proportional to `1 + access_count`), scores them with
  `walk_stats`, and keeps the walks with novelty `> cfg.dream_min_novelty` and coherence
  `> cfg.dream_min_coherence`. Each kept walk proposes its novel connections: the directed pairs
  `(start, v)` for every novel node `v`, with weight `cfg.dream_edge_scale * strength`
  (`strength = max(0, cos(start, v))`; pairs of strength 0 are dropped). They are added with
  `graph.add_edges(kind=CREATIVE, mode="max")`: weak, synthetic, and excluded from retrieval by
  `neighbors(..., exclude_synthetic=True)`. A row that is full keeps its `K` strongest edges; the
  report lists what was inserted, rejected and displaced.

  Args:
    graph: the graph.
    cfg: the config (`n_dreams`, `dream_length`, `dream_temperature`, `dream_min_novelty`,
      `dream_min_coherence`, `dream_edge_scale`).
    key: PRNG key (the same key gives the same dreams).
    walk_synthetic: whether walks may follow CREATIVE and ANALOGY edges.

  Returns:
    `(graph, DreamReport)`.
  """
  t0 = time.perf_counter()
  k_start, k_walk = jax.random.split(key)
  n = cfg.n_dreams
  empty = G.EdgeUpdate(*[np.zeros((0, 2), np.int32)] * 4)
  starts = np.full((0,), -1, np.int32)
  if n > 0:
    starts = np.asarray(dream_starts(graph, k_start, n, walk_synthetic=walk_synthetic))
  if n == 0 or starts[0] < 0:
    z = np.zeros((0,), np.float32)
    report = DreamReport(
      0,
      0,
      np.zeros((0,), np.int32),
      np.zeros((0, cfg.dream_length + 1), np.int32),
      z,
      z,
      np.zeros((0, 2), np.int32),
      z,
      empty,
      {"walks": 0.0, "edges": 0.0, "total": time.perf_counter() - t0},
    )
    return graph, report
  paths, moved = dream_walks(
    graph,
    starts,
    k_walk,
    length=cfg.dream_length,
    temperature=float(cfg.dream_temperature),
    walk_synthetic=walk_synthetic,
  )
  stats = jax.tree.map(np.asarray, walk_stats(graph, paths, moved))
  paths = np.asarray(paths)
  t_walks = time.perf_counter() - t0
  t1 = time.perf_counter()
  keep = (stats.novelty > cfg.dream_min_novelty) & (stats.coherence > cfg.dream_min_coherence)
  sel = stats.novel & keep[:, None] & (stats.strength > 0.0)
  w_idx, t_idx = np.nonzero(sel)
  src, dst = paths[w_idx, 0], paths[w_idx, t_idx]
  weight = np.float32(cfg.dream_edge_scale) * stats.strength[w_idx, t_idx]
  # Distinct pairs, strongest proposal first (add_edges would keep the same one).
  order = np.lexsort((-weight, dst, src))
  src, dst, weight = src[order], dst[order], weight[order]
  first = np.r_[True, (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])] if src.size else src > 0
  src, dst, weight = src[first], dst[first], weight[first].astype(np.float32)
  update = empty
  if src.size:
    graph, update = G.add_edges(graph, src, dst, weight, G.CREATIVE, mode="max")
  report = DreamReport(
    n_dreams=n,
    n_kept=int(keep.sum()),
    starts=starts,
    paths=paths,
    novelty=stats.novelty,
    coherence=stats.coherence,
    proposed=np.stack([src, dst], axis=1).astype(np.int32),
    weights=weight,
    edges=update,
    seconds={
      "walks": t_walks,
      "edges": time.perf_counter() - t1,
      "total": time.perf_counter() - t0,
    },
  )
  return graph, report


# -------------------------------------------------------------------------------------- transfer


def _undirected_edges(graph: G.Graph):
  """Live non-synthetic edges as unique undirected pairs `(lo, hi, w)`, sorted; the weight of a
  pair linked both ways is the larger of the two."""
  n = graph.capacity
  nbr = np.asarray(graph.nbr)
  w = np.asarray(graph.w)
  kind = np.asarray(graph.kind)
  alive = np.asarray(graph.alive)
  ok = (nbr >= 0) & (kind != G.CREATIVE) & (kind != G.ANALOGY) & (w > 0.0)
  r, c = np.nonzero(ok)
  a, b, ww = r, nbr[r, c], w[r, c]
  live = alive[a] & alive[b] & (a != b)
  a, b, ww = a[live], b[live], ww[live].astype(np.float64)
  key = np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b)
  order = np.argsort(key)
  key, ww = key[order], ww[order]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else key
  key = key[starts]
  ww = np.maximum.reduceat(ww, starts) if key.size else ww
  return key // n, key % n, ww


def _contract(n, lo, hi, w, loop, group):
  """Contracts nodes by `group` (i64[n] -> 0..n'-1): edges summed, inner weight into `loop`."""
  n2 = int(group.max()) + 1
  loop2 = np.bincount(group, weights=loop, minlength=n2)
  a, b = group[lo], group[hi]
  inner = a == b
  loop2 += np.bincount(a[inner], weights=w[inner], minlength=n2)
  a, b, w = np.minimum(a[~inner], b[~inner]), np.maximum(a[~inner], b[~inner]), w[~inner]
  key, inv = np.unique(a * n2 + b, return_inverse=True)
  w2 = np.bincount(inv, weights=w, minlength=key.size)
  return n2, key // n2, key % n2, w2, loop2


def _local_moving(n, lo, hi, w, loop, rng, resolution=1.0, max_sweeps=32, tol=0.005):
  """Louvain's local-moving phase, synchronous and vectorised (NumPy, one sort per sweep).

  Each sweep, every active node computes the modularity gain of moving to each neighbouring
  community (Blondel et al. 2008: `k_i,C - resolution * k_i * tot_C / 2m`, against staying, with
  itself taken out of its own community), and a random half of the nodes whose best move gains
  make it. Moving only half at a time damps the oscillation of synchronous updates (two nodes
  swapping communities forever), the usual fix of parallel Louvain (Lu et al. 2015). A node stays
  active while it has a gainful move or a neighbour moved (the pruning of Ozaki et al. 2016).
  Sweeps stop when fewer than `tol * n` nodes move, or after `max_sweeps`.

  Returns:
    i64[n] community labels `0 .. c - 1`.
  """
  src = np.concatenate([lo, hi])
  dst = np.concatenate([hi, lo])
  ww = np.concatenate([w, w])
  deg = 2.0 * loop + np.bincount(src, weights=ww, minlength=n)
  two_m = max(deg.sum(), _EPS)
  comm = np.arange(n)
  active = np.ones(n, bool)
  for _ in range(max_sweeps):
    tot = np.bincount(comm, weights=deg, minlength=n)
    e = np.flatnonzero(active[src])
    keys = src[e] * n + comm[dst[e]]
    order = np.argsort(keys)
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    k_ic = np.add.reduceat(ww[e[order]], starts)
    node, c = keys[starts] // n, keys[starts] % n  # sorted by node, then community
    own = comm[node] == c
    k_own = np.zeros(n)
    k_own[node[own]] = k_ic[own]
    stay = k_own - resolution * deg * (tot[comm] - deg) / two_m
    gain = np.where(own, -np.inf, k_ic - resolution * deg[node] * tot[c] / two_m)
    new_node = np.r_[True, node[1:] != node[:-1]]
    seg = np.flatnonzero(new_node)
    seg_id = np.cumsum(new_node) - 1
    best_gain = np.maximum.reduceat(gain, seg)
    # First (lowest community id) entry reaching the best gain of its node.
    pos = np.where(gain == best_gain[seg_id], np.arange(gain.size), gain.size)
    first = np.minimum.reduceat(pos, seg)
    best_node, best_c = node[seg], c[np.minimum(first, gain.size - 1)]
    gainful = best_gain > stay[best_node] + 1e-12 * two_m
    move = gainful & (rng.random(seg.size) < 0.5)
    comm[best_node[move]] = best_c[move]
    moved = np.zeros(n, bool)
    moved[best_node[move]] = True
    active = np.zeros(n, bool)
    active[best_node[gainful]] = True
    active[dst[moved[src]]] = True
    if move.sum() < tol * n:
      break
  return np.unique(comm, return_inverse=True)[1]


def communities(
  graph: G.Graph, *, seed: int = 0, max_nodes: int = 2_000, resolution: float = 1.0
) -> tuple[np.ndarray, dict]:
  """Domains: Louvain communities of the undirected view of the live non-synthetic edges.

  The undirected view has one edge per linked pair (weight: the larger of the two directions).
  Up to `max_nodes` linked nodes this is exactly networkx's Louvain
  (`louvain_communities(weight="weight", resolution=resolution, seed=seed)`). That is pure Python:
  on 2 cores it took ~28 s on 100,000 nodes with 1.3M edges (clustered kNN graph) and ~20-25 s on
  only 20,000 nodes of an unclustered kNN graph, too slow for Loop C's budget. Larger graphs are
  therefore first coarsened by Louvain's own first phase, run in NumPy (`_local_moving`: all nodes
  at once, a random half of the gainful moves per sweep) and contracted into super-nodes (edges
  summed, inner weight kept as a self-loop, so the modularity of any partition of the coarse graph
  equals that of its projection), level after level until at most `max_nodes` remain; networkx's
  Louvain then finishes on the coarse graph. Measured against direct networkx Louvain (seeds 0
  and 1): on a 20,000-node unclustered kNN graph, modularity 0.539 / 0.540 against 0.536 / 0.542
  in 2.7 s instead of ~20 s; on a 100,000-node clustered graph with 200 planted clusters, 0.9929
  (199 domains) against 0.9946 (200) in ~6 s instead of ~31 s. The local-moving phase uses a NumPy
  generator seeded with `seed`, so the whole result stays deterministic.

  Communities are numbered by size (largest first, ties by smallest node id); dead nodes and
  nodes without a non-synthetic edge get domain -1. The result is deterministic for a seed.

  Args:
    graph: the graph.
    seed: Louvain seed.
    max_nodes: coarsen until at most this many super-nodes remain (or a level merges < 10%).
    resolution: Louvain resolution (> 1 favours smaller communities).

  Returns:
    `(domain i32[N], info)` with info keys `n_linked` (nodes with an edge), `n_coarse` (nodes
    Louvain ran on), `n_edges` (undirected edges), `modularity` (of the result, on the undirected
    view) and `seconds`.
  """
  t0 = time.perf_counter()
  n_all = graph.capacity
  lo, hi, w = _undirected_edges(graph)
  linked = np.unique(np.concatenate([lo, hi]))
  domain = np.full(n_all, -1, np.int32)
  info = {"n_linked": int(linked.size), "n_coarse": 0, "n_edges": int(lo.size)}
  if linked.size == 0:
    info.update(modularity=0.0, seconds=time.perf_counter() - t0)
    return domain, info
  n = linked.size
  lo_c, hi_c = np.searchsorted(linked, lo), np.searchsorted(linked, hi)
  group = np.arange(n)
  cn, clo, chi, cw, cloop = n, lo_c, hi_c, w, np.zeros(n)
  rng = np.random.default_rng(seed)
  while cn > max_nodes:
    g = _local_moving(cn, clo, chi, cw, cloop, rng, resolution)
    if g.max() + 1 > 0.9 * cn:
      break
    group = g[group]
    cn, clo, chi, cw, cloop = _contract(cn, clo, chi, cw, cloop, g)
  info["n_coarse"] = int(cn)
  import networkx as nx  # here, not at import: `import sona_jax` stays free of it

  nxg = nx.Graph()
  nxg.add_nodes_from(range(cn))
  nxg.add_weighted_edges_from(zip(clo.tolist(), chi.tolist(), cw.tolist(), strict=True))
  loops = np.flatnonzero(cloop > 0)
  nxg.add_weighted_edges_from(
    zip(loops.tolist(), loops.tolist(), cloop[loops].tolist(), strict=True)
  )
  comms = nx.community.louvain_communities(nxg, weight="weight", resolution=resolution, seed=seed)
  coarse_label = np.empty(cn, np.int64)
  for i, c in enumerate(comms):
    coarse_label[list(c)] = i
  label = coarse_label[group]  # per linked node
  # Deterministic numbering: by size (descending), then by smallest member.
  size = np.bincount(label, minlength=len(comms))
  smallest = np.full(len(comms), n, np.int64)
  np.minimum.at(smallest, label, np.arange(n))
  rank = np.empty(len(comms), np.int64)
  rank[np.lexsort((smallest, -size))] = np.arange(len(comms))
  domain[linked] = rank[label]
  # Modularity of the result on the undirected view (O(E)).
  dl = domain[lo]
  deg = np.bincount(lo_c, weights=w, minlength=n) + np.bincount(hi_c, weights=w, minlength=n)
  m = w.sum()
  inner = np.bincount(dl[dl == domain[hi]], weights=w[dl == domain[hi]], minlength=len(comms))
  tot = np.bincount(rank[label], weights=deg, minlength=len(comms))
  info["modularity"] = float(np.sum(inner / m - resolution * (tot / (2 * m)) ** 2))
  info["seconds"] = time.perf_counter() - t0
  return domain, info


def find_analogies(
  emb,
  domain,
  access,
  *,
  n_concepts: int = 16,
  max_domains: int = 64,
  min_domain_size: int = 4,
  min_confidence: float = 0.6,
):
  """Analogies between the concepts of pairs of domains whose offsets align.

  Per domain (the `max_domains` largest with at least `min_domain_size` members), the centroid is
  the mean embedding of its members and the *concepts* are its `n_concepts` most accessed members
  (ties: lower id). A concept's offset is its embedding minus its domain centroid. For each pair of
  domains `(A, B)`, concept `a` of A and concept `b` of B form an analogy when each is the other's
  best match by offset cosine (mutual best: a one-to-one partial matching) and that cosine,
  the confidence, is above `min_confidence`: `a` plays the same role in A as `b` in B (seed:
  "analogical mappings"). The work is bounded by `(max_domains * n_concepts)^2 * dim`, whatever
  the graph size; no two nodes of one domain are ever paired.

  Args:
    emb: f[N, d] node embeddings.
    domain: i[N] domain of each node (-1 none).
    access: i[N] access counts (concept ranking).
    n_concepts: concepts per domain.
    max_domains: most domains compared (largest first).
    min_domain_size: smallest domain compared.
    min_confidence: analogies need a confidence above this.

  Returns:
    `(pairs i32[m, 2], confidence f32[m], n_concepts_total)`, pairs `(a, b)` with `domain[a] <
    domain[b]`, sorted.
  """
  domain = np.asarray(domain)
  access = np.asarray(access)
  valid = domain >= 0
  n_dom = int(domain.max()) + 1 if valid.any() else 0
  size = np.bincount(domain[valid], minlength=n_dom)
  doms = np.flatnonzero(size >= max(min_domain_size, 2))
  doms = doms[np.lexsort((doms, -size[doms]))][:max_domains]
  empty = (np.zeros((0, 2), np.int32), np.zeros((0,), np.float32), 0)
  if doms.size < 2:
    return empty
  nd, m = doms.size, n_concepts
  ids = np.full((nd, m), -1, np.int64)
  offsets = np.zeros((nd, m, np.shape(emb)[1]))
  for i, d in enumerate(doms):
    members = np.flatnonzero(domain == d)
    x = np.asarray(emb[members], np.float64)
    centroid = x.mean(axis=0)
    top = np.lexsort((members, -access[members]))[:m]
    ids[i, : top.size] = members[top]
    offsets[i, : top.size] = x[top] - centroid
  norm = np.linalg.norm(offsets, axis=-1)
  ok = (ids >= 0) & (norm > 1e-6)
  unit = np.where(ok[..., None], offsets / np.maximum(norm, _EPS)[..., None], 0.0)
  flat = unit.reshape(nd * m, -1)
  s = (flat @ flat.T).reshape(nd, m, nd, m)
  s = np.where(ok[:, :, None, None] & ok[None, None, :, :], s, -np.inf)
  best = np.argmax(s, axis=3)  # [A, i, B]: best concept of B for concept i of A
  conf = np.max(s, axis=3)
  a_dom, a_i, b_dom = np.meshgrid(np.arange(nd), np.arange(m), np.arange(nd), indexing="ij")
  back = best[b_dom, best, a_dom]  # best concept of A for that concept of B
  keep = (a_dom < b_dom) & (back == a_i) & (conf > min_confidence)
  src = ids[a_dom[keep], a_i[keep]]
  dst = ids[b_dom[keep], best[keep]]
  c = conf[keep]
  # Domain order follows `domain` labels, so `(a, b)` has domain[a] < domain[b] after a swap.
  swap = domain[src] > domain[dst]
  src, dst = np.where(swap, dst, src), np.where(swap, src, dst)
  order = np.lexsort((dst, src))
  pairs = np.stack([src[order], dst[order]], axis=1).astype(np.int32)
  return pairs, c[order].astype(np.float32), int(ok.sum())


class TransferReport(NamedTuple):
  """What `transfer` did (host values).

  Attributes:
    n_domains: communities found (domain ids `0 .. n_domains - 1`).
    domain_sizes: nodes per domain, largest first.
    n_unassigned: alive nodes given domain -1 (no non-synthetic edge).
    modularity: modularity of the domains on the undirected non-synthetic view.
    n_coarse: nodes Louvain ran on after coarsening (= linked nodes when not coarsened).
    n_concepts: concepts compared.
    analogies: i32[m, 2] `(a, b)` concept pairs across domains.
    confidence: f32[m] their offset cosines (> `analogy_min_confidence`).
    skipped_linked: i32[s, 2] directed pairs left alone: a non-ANALOGY edge already links them.
    edges: the `graph.EdgeUpdate` of adding the ANALOGY edges (both directions).
    seconds: wall times, keys `louvain`, `analogies`, `edges`, `total`.
  """

  n_domains: int
  domain_sizes: tuple[int, ...]
  n_unassigned: int
  modularity: float
  n_coarse: int
  n_concepts: int
  analogies: np.ndarray
  confidence: np.ndarray
  skipped_linked: np.ndarray
  edges: G.EdgeUpdate
  seconds: dict[str, float]


def transfer(
  graph: G.Graph,
  cfg: SonaConfig,
  *,
  n_concepts: int = 16,
  max_domains: int = 64,
  min_domain_size: int = 4,
  edge_scale: float = 1.0,
  louvain_max_nodes: int = 2_000,
) -> tuple[G.Graph, TransferReport]:
  """Phase 4: cross-domain transfer (seed `cross_domain_transfer`).

  Domains are the Louvain communities of `communities` (seed `cfg.louvain_seed`), written into the
  `DOMAIN` node column (-1 for dead nodes and nodes without a non-synthetic edge). Analogies come
  from `find_analogies` with `min_confidence = cfg.analogy_min_confidence`; each becomes a pair of
  ANALOGY edges `a -> b` and `b -> a` of weight `edge_scale * confidence`, added with
  `graph.add_edges(kind=ANALOGY, mode="max")`, so they always join two domains. A direction that
  a HEBBIAN or CONSOLIDATED edge already covers is left alone (its weight is not raised by a
  synthetic proposal) and reported in `skipped_linked`.

  Args:
    graph: the graph.
    cfg: the config (`louvain_seed`, `analogy_min_confidence`).
    n_concepts: concepts per domain (most accessed members).
    max_domains: most domains compared (largest first).
    min_domain_size: smallest domain compared.
    edge_scale: ANALOGY edge weight = `edge_scale * confidence`.
    louvain_max_nodes: coarsen the graph to at most this many nodes before Louvain.

  Returns:
    `(graph, TransferReport)`.
  """
  t0 = time.perf_counter()
  domain, info = communities(graph, seed=cfg.louvain_seed, max_nodes=louvain_max_nodes)
  graph = graph._replace(node=graph.node.at[:, G.DOMAIN].set(jnp.asarray(domain, jnp.int32)))
  t_louvain = time.perf_counter() - t0
  t1 = time.perf_counter()
  pairs, conf, n_conc = find_analogies(
    np.asarray(graph.emb),
    domain,
    np.asarray(graph.access_count),
    n_concepts=n_concepts,
    max_domains=max_domains,
    min_domain_size=min_domain_size,
    min_confidence=cfg.analogy_min_confidence,
  )
  t_analogies = time.perf_counter() - t1
  t1 = time.perf_counter()
  src = np.concatenate([pairs[:, 0], pairs[:, 1]])
  dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
  weight = np.float32(edge_scale) * np.concatenate([conf, conf])
  nbr, kind = np.asarray(graph.nbr), np.asarray(graph.kind)
  hit = nbr[src] == dst[:, None]
  real = np.any(hit & (kind[src] != G.ANALOGY), axis=1)
  skipped = np.stack([src[real], dst[real]], axis=1).astype(np.int32)
  src, dst, weight = src[~real], dst[~real], weight[~real]
  update = G.EdgeUpdate(*[np.zeros((0, 2), np.int32)] * 4)
  if src.size:
    graph, update = G.add_edges(graph, src, dst, weight, G.ANALOGY, mode="max")
  alive = np.asarray(graph.alive)
  n_dom = int(domain.max()) + 1 if (domain >= 0).any() else 0
  report = TransferReport(
    n_domains=n_dom,
    domain_sizes=tuple(int(s) for s in np.bincount(domain[domain >= 0], minlength=n_dom)),
    n_unassigned=int(np.sum(alive & (domain < 0))),
    modularity=float(info["modularity"]),
    n_coarse=int(info["n_coarse"]),
    n_concepts=n_conc,
    analogies=pairs,
    confidence=conf,
    skipped_linked=skipped,
    edges=update,
    seconds={
      "louvain": t_louvain,
      "analogies": t_analogies,
      "edges": time.perf_counter() - t1,
      "total": time.perf_counter() - t0,
    },
  )
  return graph, report
