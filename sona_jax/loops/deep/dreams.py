"""Loop C phase 3: dreams (docs/design.md, "Loop C"; seed `dream_learning`, inspired by REM sleep).

`dream(graph, cfg, key)`: many random walks at once over the memory graph (`vmap` over walks,
`lax.scan` over steps, jitted), a softmax over edge weights at a temperature; walks that are both
novel and coherent propose weak `CREATIVE` edges to the nodes they reached.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import graph as G
from sona_jax.config import SonaConfig

__all__ = ["DreamReport", "WalkStats", "dream", "dream_starts", "dream_walks", "walk_stats"]

_EPS = 1e-12


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

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sona_jax import graph as G
    >>> xyz = jnp.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]], jnp.float32)
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xyz, ((0, 0), (0, 5))))  # unit-norm
    >>> g, _ = G.add_edges(g, [0, 1, 2], [1, 2, 3], [0.9, 0.8, 0.7], G.HEBBIAN)  # 0 -> 1 -> 2 -> 3
    >>> g = g._replace(node=g.node.at[0, G.ACCESS].set(100))  # node 0 is recalled most
    >>> starts = dream_starts(g, jax.random.key(0), 8)
    >>> set(starts.tolist()) <= {0, 1, 2}  # never node 3 (no edge out) nor a dead slot
    True
    >>> bool((starts == 0).sum() > 4)  # probability 101 / 103 each
    True
    >>> dream_starts(G.init_graph(16, 8, 4), jax.random.key(0), 8).tolist()  # nothing walkable
    [-1, -1, -1, -1, -1, -1, -1, -1]
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

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sona_jax import graph as G
    >>> xyz = jnp.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]], jnp.float32)
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xyz, ((0, 0), (0, 5))))  # unit-norm
    >>> g, _ = G.add_edges(g, [0, 1, 2], [1, 2, 3], [0.9, 0.8, 0.7], G.HEBBIAN)  # 0 -> 1 -> 2 -> 3
    >>> g, _ = G.add_edges(g, [0], [3], [0.1], G.HEBBIAN)  # a weaker branch 0 -> 3
    >>> paths, moved = dream_walks(g, jnp.array([0, 2]), jax.random.key(0), length=3,
    ...                            temperature=0.0)  # temperature 0: the heaviest edge
    >>> paths.tolist()  # node 3 has no edge out: the second walk stays there
    [[0, 1, 2, 3], [2, 3, 3, 3]]
    >>> moved.tolist()
    [[True, True, True], [True, False, False]]
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

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sona_jax import graph as G
    >>> xyz = jnp.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]], jnp.float32)
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xyz, ((0, 0), (0, 5))))  # unit-norm
    >>> g, _ = G.add_edges(g, [0, 1, 2], [1, 2, 3], [0.9, 0.8, 0.7], G.HEBBIAN)  # 0 -> 1 -> 2 -> 3
    >>> paths = jnp.array([[0, 1, 2, 3], [2, 3, 3, 3]])
    >>> moved = jnp.array([[True, True, True], [True, False, False]])
    >>> st = walk_stats(g, paths, moved)
    >>> [round(float(x), 4) for x in st.novelty]  # walk 0 reached 1, 2, 3: only 1 links to 0
    [0.6667, 0.0]
    >>> [round(float(x), 4) for x in st.coherence]  # (0.7071 + 0.8165 + 0.8165) / 3; cos(2, 3)
    [0.78, 0.8165]
    >>> st.novel[0].tolist(), [round(float(x), 4) for x in st.strength[0]]  # cos(start, node)
    ([False, False, True, True], [1.0, 0.7071, 0.5774, 0.7071])
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

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import graph as G
    >>> xyz = jnp.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]], jnp.float32)
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xyz, ((0, 0), (0, 5))))  # unit-norm
    >>> g, _ = G.add_edges(g, [0, 1, 2], [1, 2, 3], [0.9, 0.8, 0.7], G.HEBBIAN)  # 0 -> 1 -> 2 -> 3
    >>> g = g._replace(node=g.node.at[0, G.ACCESS].set(100))  # node 0 dreams most
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4, n_dreams=8,
    ...                       dream_length=3)
    >>> g, rep = dream(g, cfg, jax.random.key(0))
    >>> rep.n_dreams, rep.paths.shape
    (8, (8, 4))
    >>> rep.proposed.tolist()  # only walks from 0 are novel (2/3 > 0.5) and coherent enough
    [[0, 2], [0, 3]]
    >>> [round(float(x), 4) for x in rep.weights]  # dream_edge_scale 0.1 * cos(0, node)
    [0.0577, 0.0707]
    >>> g.nbr[0].tolist(), [G.EDGE_KINDS[k] for k in g.kind[0, :3].tolist()]  # 0's row now
    ([1, 3, 2, -1], ['HEBBIAN', 'CREATIVE', 'CREATIVE'])
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
