"""Domains of Loop C phase 4: Louvain communities of the memory graph (docs/design.md, "Loop C").

`communities(graph)`: Louvain (Blondel et al. 2008) on the undirected view of the live
non-synthetic edges. Large graphs go to igraph's Leiden (Traag et al. 2019) when igraph is
installed; otherwise they are first coarsened by Louvain's own local-moving phase, run in NumPy,
then networkx's Louvain finishes on the coarse graph. Used by `analogies.transfer`.
"""

from __future__ import annotations

import random
import time

import numpy as np

from sona_jax import graph as G

__all__ = ["communities", "igraph_communities", "undirected_edges"]

_METHODS = ("auto", "numpy", "multilevel", "leiden")

_EPS = 1e-12


def undirected_edges(graph: G.Graph):
  """Live non-synthetic edges as unique undirected pairs `(lo, hi, w)`, sorted; the weight of a
  pair linked both ways is the larger of the two.

  Examples:
    >>> import jax.numpy as jnp
    >>> from sona_jax import graph as G
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.eye(8)[:4])
    >>> g, _ = G.add_edges(g, [0, 1, 1, 2], [1, 0, 2, 3], [0.5, 0.75, 0.25, 0.5], G.HEBBIAN)
    >>> g, _ = G.add_edges(g, [3], [0], [0.9], G.CREATIVE)  # synthetic: left out
    >>> lo, hi, w = undirected_edges(g)
    >>> lo.tolist(), hi.tolist(), w.tolist()  # 0 - 1 once, with the larger weight
    ([0, 1, 2], [1, 2, 3], [0.75, 0.25, 0.5])
  """
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


def _coarsened_louvain(n, lo_c, hi_c, w, seed, max_nodes, resolution):
  """Louvain labels `i64[n]` of the linked nodes: NumPy local moving and contraction down to
  `max_nodes` super-nodes, then networkx's Louvain; returns `(label, nodes networkx ran on)`."""
  group = np.arange(n)
  cn, clo, chi, cw, cloop = n, lo_c, hi_c, w, np.zeros(n)
  rng = np.random.default_rng(seed)
  while cn > max_nodes:
    g = _local_moving(cn, clo, chi, cw, cloop, rng, resolution)
    if g.max() + 1 > 0.9 * cn:
      break
    group = g[group]
    cn, clo, chi, cw, cloop = _contract(cn, clo, chi, cw, cloop, g)
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
  return coarse_label[group], int(cn)


def _igraph_installed() -> bool:
  try:
    import igraph  # noqa: F401
  except ImportError:
    return False
  return True


def igraph_communities(n, lo, hi, w, *, method="multilevel", seed=0, resolution=1.0):
  """Community labels `i64[n]` of an undirected weighted graph by igraph (optional dependency).

  `method="multilevel"` is igraph's Louvain (Blondel et al. 2008), `"leiden"` its Leiden
  algorithm (Traag, Waltman & van Eck 2019) with the modularity objective, iterated to
  convergence. Both draw random numbers; igraph's generator is a `random.Random(seed)` for the
  call (and Python's `random` module again after), so the result is deterministic for a seed.

  Args:
    n: number of nodes `0 .. n - 1`.
    lo: i[m] first ends of the edges.
    hi: i[m] second ends.
    w: f[m] weights.
    method: `"multilevel"` or `"leiden"`.
    seed: seed of igraph's generator for the call.
    resolution: modularity resolution.

  Returns:
    i64[n] labels `0 .. c - 1`.

  Examples:
    >>> lo, hi = [0, 1, 2, 3, 4, 5, 2], [1, 2, 0, 4, 5, 3, 3]  # two triangles and a bridge 2 - 3
    >>> w = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1]
    >>> igraph_communities(6, lo, hi, w).tolist()
    [0, 0, 0, 1, 1, 1]
    >>> igraph_communities(6, lo, hi, w, method="leiden").tolist()
    [0, 0, 0, 1, 1, 1]
  """
  import igraph as ig  # optional: pip install 'sona-jax[igraph]'

  # Tuples: igraph converts a list of tuples ~2x faster than a list of lists or an array.
  edges = list(zip(np.asarray(lo).tolist(), np.asarray(hi).tolist(), strict=True))
  g = ig.Graph(n=int(n), edges=edges)
  g.es["weight"] = np.asarray(w, np.float64).tolist()
  ig.set_random_number_generator(random.Random(seed))
  try:
    if method == "multilevel":
      parts = g.community_multilevel(weights="weight", resolution=resolution)
    elif method == "leiden":
      parts = g.community_leiden(
        objective_function="modularity", weights="weight", resolution=resolution, n_iterations=-1
      )
    else:
      raise ValueError(f"igraph_communities: method must be multilevel or leiden, got {method!r}")
  finally:
    ig.set_random_number_generator(random)
  return np.unique(np.asarray(parts.membership, np.int64), return_inverse=True)[1]


def communities(
  graph: G.Graph,
  *,
  seed: int = 0,
  max_nodes: int = 2_000,
  resolution: float = 1.0,
  method: str = "auto",
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

  When igraph is installed (`pip install 'sona-jax[igraph]'`), graphs above `max_nodes` go to
  igraph's Leiden on the whole graph instead (`method="auto"`). Measured side by side in one run
  (`bench_deep.py --louvain`, 100,000 nodes, 2 loaded cores, seeds 0 and 1): on bench_deep's
  clustered kNN graph (941k edges) modularity 0.9967 for both, 5.6-5.8 s against 11-24 s for the
  coarsening; with a fifth of the edges rewired at random (1.01M edges) 0.7816 (all 300 planted
  clusters) against 0.7815 (290), 10.4-10.9 s against 18.5-18.9 s. The coarsening stays the
  path of the default install, which has no igraph.

  Communities are numbered by size (largest first, ties by smallest node id); dead nodes and
  nodes without a non-synthetic edge get domain -1. The result is deterministic for a seed.

  Args:
    graph: the graph.
    seed: Louvain seed.
    max_nodes: coarsen until at most this many super-nodes remain (or a level merges < 10%).
    resolution: Louvain resolution (> 1 favours smaller communities).
    method: `"auto"` (default): networkx's Louvain up to `max_nodes` linked nodes; above, igraph's
      Leiden when igraph is installed, else the NumPy coarsening. `"numpy"`: the coarsening
      above `max_nodes`, then networkx. `"multilevel"` (Louvain) or `"leiden"`: igraph on the
      whole graph (`igraph_communities`).

  Returns:
    `(domain i32[N], info)` with info keys `n_linked` (nodes with an edge), `n_coarse` (nodes
    Louvain ran on), `n_edges` (undirected edges), `method` (the one that ran), `modularity` (of
    the result, on the undirected view) and `seconds`.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sona_jax import graph as G
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.eye(8))
    >>> src, dst = np.nonzero(np.kron(np.eye(2), np.ones((4, 4))) - np.eye(8))  # two 4-cliques
    >>> g, _ = G.add_edges(g, src, dst, [0.5] * 24, G.HEBBIAN)
    >>> g, _ = G.add_edges(g, [3], [4], [0.1], G.HEBBIAN)  # a weak bridge
    >>> domain, info = communities(g)
    >>> domain.tolist()  # dead slots: -1
    [0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1]
    >>> info["n_linked"], info["n_edges"], info["method"]  # 2 x 6 clique edges and the bridge
    (8, 13, 'numpy')
    >>> round(info["modularity"], 4), round(2 * (3 / 6.1 - 0.25), 4)  # sum_c e_c / m - (d_c / 2m)^2
    (0.4836, 0.4836)
  """
  t0 = time.perf_counter()
  n_all = graph.capacity
  if method not in _METHODS:
    raise ValueError(f"communities: method must be one of {_METHODS}, got {method!r}")
  lo, hi, w = undirected_edges(graph)
  linked = np.unique(np.concatenate([lo, hi]))
  domain = np.full(n_all, -1, np.int32)
  info = {"n_linked": int(linked.size), "n_coarse": 0, "n_edges": int(lo.size)}
  if linked.size == 0:
    info.update(method=method, modularity=0.0, seconds=time.perf_counter() - t0)
    return domain, info
  n = linked.size
  lo_c, hi_c = np.searchsorted(linked, lo), np.searchsorted(linked, hi)
  if method == "auto":
    method = "leiden" if n > max_nodes and _igraph_installed() else "numpy"
  info["method"] = method
  if method == "numpy":
    label, info["n_coarse"] = _coarsened_louvain(n, lo_c, hi_c, w, seed, max_nodes, resolution)
  else:
    label = igraph_communities(n, lo_c, hi_c, w, method=method, seed=seed, resolution=resolution)
    info["n_coarse"] = int(n)
  n_comm = int(label.max()) + 1
  # Deterministic numbering: by size (descending), then by smallest member.
  size = np.bincount(label, minlength=n_comm)
  smallest = np.full(n_comm, n, np.int64)
  np.minimum.at(smallest, label, np.arange(n))
  rank = np.empty(n_comm, np.int64)
  rank[np.lexsort((smallest, -size))] = np.arange(n_comm)
  domain[linked] = rank[label]
  # Modularity of the result on the undirected view (O(E)).
  dl = domain[lo]
  deg = np.bincount(lo_c, weights=w, minlength=n) + np.bincount(hi_c, weights=w, minlength=n)
  m = w.sum()
  inner = np.bincount(dl[dl == domain[hi]], weights=w[dl == domain[hi]], minlength=n_comm)
  tot = np.bincount(rank[label], weights=deg, minlength=n_comm)
  info["modularity"] = float(np.sum(inner / m - resolution * (tot / (2 * m)) ** 2))
  info["seconds"] = time.perf_counter() - t0
  return domain, info
