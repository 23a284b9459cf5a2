"""Loop C phase 5: compression (docs/design.md, "Loop C"; seed section 4, `compress_memory`).

Near-duplicates (cosine >= `dedup_threshold`) are merged into one survivor per group (single
linkage), their edges rewired to it, rounds repeat until no pair is left, then edges below
`prune_threshold` are pruned. Host-side NumPy bookkeeping; all-pairs candidates come from
`candidates.candidate_pairs` (exact up to `EXACT_MAX` rows, an inverted file above). Nothing is
removed silently: every merged node, absorbed, dropped or pruned edge is in the report.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from sona_jax import graph as graph_lib
from sona_jax import ivf
from sona_jax.config import SonaConfig
from sona_jax.graph import ACCESS, ALIVE, CREATED, LAST_ACCESS, QUALITY, STRENGTH, Graph
from sona_jax.loops.deep.candidates import EXACT_MAX, NO_PAIRS, candidate_pairs, pairs_array

__all__ = ["CompressionReport", "compress_memory"]

_I32_MAX = np.iinfo(np.int32).max


class CompressionReport(NamedTuple):
  """What Loop C's compression did (host NumPy values; ids are graph slots).

  Attributes:
    initial_nodes: live nodes before.
    initial_edges: edges before.
    final_nodes: live nodes after.
    final_edges: edges after.
    ratio: `initial_nodes / final_nodes` (seed's compression ratio; 1.0 for an empty graph).
    merged: i32[m, 2] `(removed, survivor)`: each removed node and the node it was merged into.
    absorbed: i32[a, 2] edges `(src, dst)` between nodes merged into the same survivor (they would
      have become self-loops).
    dropped: i32[d, 2] rewired edges `(survivor src, survivor dst)` lost because the united row had
      more than K edges (the K strongest are kept), and edges they displaced.
    pruned: i32[p, 2] edges `(src, dst)` removed for a weight below `prune_threshold`.
    candidate_pairs: near-duplicate pairs the first search found.
    rounds: merge rounds (a merged embedding can come within the threshold of another node; rounds
      repeat until no pair is left).
    method: `"exact"` or `"ivf"`, how the searches ran (later rounds re-check the survivors
      against the same inverted file).
    candidate_recall: recall of the first search against brute force on a sample (1.0 when exact;
      NaN when not measured or when the sample held no pair).
    seconds: wall time.
  """

  initial_nodes: int
  initial_edges: int
  final_nodes: int
  final_edges: int
  ratio: float
  merged: np.ndarray
  absorbed: np.ndarray
  dropped: np.ndarray
  pruned: np.ndarray
  candidate_pairs: int
  rounds: int
  method: str
  candidate_recall: float
  seconds: float


def _edge_count(edges: np.ndarray, k: int) -> int:
  return int(np.count_nonzero(edges[:, :k] >= 0))


def _groups(i: np.ndarray, j: np.ndarray, n: int, access: np.ndarray):
  """Connected components of the pair graph and their survivors.

  Returns `(members i64[m], survivor i64[m])`: every node of a component of >= 2 nodes and the
  survivor of its component, the member with the most accesses (ties: the lowest id).
  """
  adj = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n, n))
  _, label = connected_components(adj, directed=False)
  members = np.unique(np.concatenate([i, j])).astype(np.int64)
  comp = label[members]
  # Within each component, order by (-access, id): the first is the survivor.
  order = np.lexsort((members, -access[members], comp))
  members, comp = members[order], comp[order]
  first = np.ones(members.size, bool)
  first[1:] = comp[1:] != comp[:-1]
  head = np.flatnonzero(first)
  survivor = members[head][np.cumsum(first) - 1]
  return members, survivor


def _merge_round(emb, edges, node, members, survivor, k):
  """Merges each member into its survivor in place.

  Returns `(merged, absorbed, proposals, rep)`: `(removed, survivor)` pairs, the edges inside
  groups, the rewired edges `(src, dst, w, kind)` to add back, and each node's representative
  `i64[N]`.
  """
  # Statistics, per survivor, over its group (survivor included), groups laid out contiguously.
  order = np.argsort(survivor, kind="stable")
  members, survivor = members[order], survivor[order]
  start = np.flatnonzero(np.concatenate([[True], survivor[1:] != survivor[:-1]]))
  heads = survivor[start]
  access = node[members, ACCESS].astype(np.int64)
  weight = np.maximum(access, 1).astype(np.float64)
  wsum = np.add.reduceat(weight, start)
  e = np.add.reduceat(weight[:, None] * emb[members].astype(np.float64), start)
  e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  q = node[members, QUALITY].view(np.float32).astype(np.float64)
  quality = (np.add.reduceat(weight * q, start) / wsum).astype(np.float32)
  strength = np.maximum.reduceat(node[members, STRENGTH].view(np.float32), start)
  emb[heads] = e.astype(np.float32)
  node[heads, ACCESS] = np.minimum(np.add.reduceat(access, start), _I32_MAX).astype(np.int32)
  node[heads, CREATED] = np.minimum.reduceat(node[members, CREATED], start)
  node[heads, LAST_ACCESS] = np.maximum.reduceat(node[members, LAST_ACCESS], start)
  node[heads, QUALITY] = quality.view(np.int32)
  node[heads, STRENGTH] = strength.astype(np.float32).view(np.int32)
  # Rewiring: every edge with a removed end moves to the survivors (`rep`); edges inside a group
  # would be self-loops and are absorbed. The moved edges are cleared here and re-added by the
  # caller through `add_edges` (mode "max", kinds kept).
  gone = members != survivor
  removed, into = members[gone], survivor[gone]
  n = node.shape[0]
  rep = np.arange(n, dtype=np.int64)
  rep[removed] = into
  is_removed = np.zeros(n, bool)
  is_removed[removed] = True
  nbr = edges[:, :k]
  w = edges[:, k : 2 * k].view(np.float32)
  kind = edges[:, 2 * k :]
  rows, slots = np.nonzero(nbr >= 0)
  dst = nbr[rows, slots].astype(np.int64)
  hit = is_removed[rows] | is_removed[dst]
  rows, slots, dst = rows[hit], slots[hit], dst[hit]
  pw, pk = w[rows, slots].copy(), kind[rows, slots].copy()
  nbr[rows, slots] = -1
  w[rows, slots] = 0.0
  kind[rows, slots] = 0
  node[removed, ALIVE] = 0
  ru, rv = rep[rows], rep[dst]
  internal = ru == rv
  absorbed = pairs_array(rows[internal], dst[internal])
  keep = ~internal
  proposals = (ru[keep], rv[keep], pw[keep], pk[keep])
  return pairs_array(removed, into), absorbed, proposals, rep


def _recheck(emb, alive, heads, threshold, index):
  """Pairs `(i, j)` of moved survivors `heads` with live nodes at cosine >= threshold."""
  if index is None:
    r, c, _ = ivf.query_pairs(emb, alive, heads, threshold)
  else:
    # The index holds the embeddings from before the merge: recompute the cosines of what it
    # returns, and drop nodes merged away since.
    qi, c, _ = ivf.index_query(index, emb[heads], threshold)
    r = heads[qi]
    keep = alive[c] & (r != c)
    r, c = r[keep], c[keep]
    cos = np.einsum("ij,ij->i", emb[r], emb[c])
    keep = cos >= np.float32(threshold)
    r, c = r[keep], c[keep]
  return np.minimum(r, c), np.maximum(r, c)


def compress_memory(
  graph: Graph,
  cfg: SonaConfig,
  *,
  key,
  measure_recall: bool = True,
  exact_max: int = EXACT_MAX,
):
  """Loop C phase 5: merge near-duplicate memories, then prune weak edges.

  Seed section 4, `compress_memory`. Near-duplicates are live pairs with cosine `>=
  cfg.dedup_threshold`. Groups are the connected components of that pair graph (so `a ~ b ~ c` is
  one group even when `a` and `c` are further apart: single linkage, every member within the
  threshold of another), each merged into one survivor, the member with the most accesses (ties:
  the lowest id): accesses summed, embedding the access-weighted mean (weights `max(access, 1)`)
  re-normalised, quality access-weighted, `created` the minimum, `last_access` and `strength` the
  maximum; the survivor's domain and generation stay. Edges are rewired: every edge of a removed
  node, in or out, moves to its survivor (`graph.add_edges`, mode `"max"`, kinds kept; duplicates
  collapse to the strongest; edges inside a group are absorbed; a united row keeps its K strongest
  edges and reports the rest as dropped). A removed node is dead with no edge in or out, as after
  `graph.remove_node`. Since a merged embedding can come within the threshold of another node,
  the survivors are checked again (exactly, or against the same inverted file) and rounds repeat
  until no pair is left; then edges with weight below `cfg.prune_threshold` are pruned.

  Running it twice changes nothing the second time when the search is exact (up to `exact_max`
  live nodes); above, a pair the inverted file missed (see `candidate_recall`) can still be found
  by a later run.

  Args:
    graph: the memory graph.
    cfg: the config.
    key: PRNG key of the inverted-file search and of the recall sample.
    measure_recall: measure the inverted file's recall against brute force on 1,000 sampled rows.
    exact_max: search pairs exactly up to this many live nodes.

  Returns:
    `(graph, CompressionReport)`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import graph as G
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4)
    >>> xy = jnp.array([[1, 0], [1, 0.1], [0, 1], [-1, 0]], jnp.float32)  # cos(0, 1) = 0.995
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xy, ((0, 0), (0, 6))))
    >>> g = g._replace(node=g.node.at[:4, G.ACCESS].set(jnp.array([5, 1, 3, 3])))
    >>> g, _ = G.add_edges(g, [1, 2, 0], [2, 1, 3], [0.5, 0.6, 0.005], G.HEBBIAN)
    >>> g, rep = compress_memory(g, cfg, key=jax.random.key(0))
    >>> rep.merged.tolist(), g.alive[:4].tolist()  # the duplicate 1 is gone into 0 (more used)
    ([[1, 0]], [True, False, True, True])
    >>> g.nbr[0, :2].tolist(), int(g.nbr[2, 0])  # 1's edges now link 0 and 2 both ways
    ([-1, 2], 0)
    >>> rep.pruned.tolist(), rep.final_nodes, round(rep.ratio, 3)  # 0 -> 3 was below 0.01
    ([[0, 3]], 3, 1.333)
    >>> int(g.access_count[0])  # the survivor sums the accesses
    6
  """
  t0 = time.perf_counter()
  k = graph.degree
  emb = np.array(graph.emb)
  edges = np.array(graph.edges)
  node = np.array(graph.node)
  alive = node[:, ALIVE] != 0
  n = alive.size
  initial_nodes, initial_edges = int(np.count_nonzero(alive)), _edge_count(edges, k)
  thr = cfg.dedup_threshold
  i, j, _, method, recall, index = candidate_pairs(
    emb, alive, thr, cfg, key, exact_max=exact_max, measure_recall=measure_recall
  )
  n_candidates = int(i.size)
  final_rep = np.arange(n, dtype=np.int64)
  absorbed, dropped = [], []
  rounds = 0
  changed = False
  while i.size:
    rounds += 1
    changed = True
    access = node[:, ACCESS].astype(np.int64)
    members, survivor = _groups(i, j, n, access)
    _, round_absorbed, (pu, pv, pw, pk), rep = _merge_round(emb, edges, node, members, survivor, k)
    final_rep = rep[final_rep]
    g = Graph(emb=jnp.asarray(emb), edges=jnp.asarray(edges), node=jnp.asarray(node))
    g, upd = graph_lib.add_edges(g, pu, pv, pw, pk, mode="max")
    edges = np.array(g.edges)
    absorbed.append(round_absorbed)
    dropped += [upd.rejected, upd.displaced]
    alive = node[:, ALIVE] != 0
    # Survivors moved: check them again (exactly, or through the same inverted file).
    i, j = _recheck(emb, alive, np.unique(survivor), thr, index)
  removed = np.flatnonzero(final_rep != np.arange(n))
  merged = pairs_array(removed, final_rep[removed])
  # Prune weak edges.
  nbr = edges[:, :k]
  w = edges[:, k : 2 * k].view(np.float32)
  rows, slots = np.nonzero((nbr >= 0) & (w < np.float32(cfg.prune_threshold)))
  pruned = pairs_array(rows, nbr[rows, slots])
  if rows.size:
    changed = True
    nbr[rows, slots] = -1
    w[rows, slots] = 0.0
    edges[:, 2 * k :][rows, slots] = 0
  if changed:
    graph = Graph(emb=jnp.asarray(emb), edges=jnp.asarray(edges), node=jnp.asarray(node))
  final_nodes = int(np.count_nonzero(node[:, ALIVE] != 0))
  cat = lambda xs: np.concatenate(xs).astype(np.int32) if xs else NO_PAIRS
  report = CompressionReport(
    initial_nodes=initial_nodes,
    initial_edges=initial_edges,
    final_nodes=final_nodes,
    final_edges=_edge_count(edges, k),
    ratio=initial_nodes / final_nodes if final_nodes else 1.0,
    merged=merged,
    absorbed=cat(absorbed),
    dropped=cat(dropped),
    pruned=pruned,
    candidate_pairs=n_candidates,
    rounds=rounds,
    method=method,
    candidate_recall=recall,
    seconds=time.perf_counter() - t0,
  )
  return graph, report
