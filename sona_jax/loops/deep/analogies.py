"""Loop C phase 4: cross-domain transfer (docs/design.md, "Loop C"; seed `cross_domain_transfer`).

`transfer(graph, cfg)`: domains are Louvain communities of the non-synthetic graph
(`domains.communities`), written into the `DOMAIN` node column; concepts of two domains whose
offsets from their domain centroids align (`find_analogies`) become `ANALOGY` edges.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from sona_jax import graph as G
from sona_jax.config import SonaConfig
from sona_jax.loops.deep.domains import communities

__all__ = ["TransferReport", "find_analogies", "transfer"]

_EPS = 1e-12


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

  Examples:
    >>> import numpy as np
    >>> emb = np.zeros((8, 8), np.float32)
    >>> emb[:4, 0] = emb[4:, 1] = 1.0  # domain centres e0 (nodes 0-3) and e1 (nodes 4-7)
    >>> emb[:4, 2:4] = emb[4:, 2:4] = [[1, 0], [-1, 0], [0, 1], [0, -1]]  # the same four roles
    >>> domain, access = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.zeros(8, int)
    >>> pairs, conf, n = find_analogies(emb, domain, access)
    >>> pairs.tolist(), conf.tolist(), n  # each concept maps to the one in the same role
    ([[0, 4], [1, 5], [2, 6], [3, 7]], [1.0, 1.0, 1.0, 1.0], 8)
    >>> find_analogies(emb, domain, access, min_domain_size=5)[0].shape  # domains too small
    (0, 2)
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
    louvain_max_nodes: above this many linked nodes, Louvain runs on a coarsened graph (or igraph's
      Leiden runs, when igraph is installed; see `domains.communities`).

  Returns:
    `(graph, TransferReport)`.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, sona_jax as sona
    >>> from sona_jax import graph as G
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4)
    >>> emb = np.zeros((8, 8), np.float32)
    >>> emb[:4, 0] = emb[4:, 1] = 1.0  # domain centres e0 (nodes 0-3) and e1 (nodes 4-7)
    >>> emb[:4, 2:4] = emb[4:, 2:4] = [[1, 0], [-1, 0], [0, 1], [0, -1]]  # the same four roles
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.asarray(emb))
    >>> src, dst = np.nonzero(np.kron(np.eye(2), np.ones((4, 4))) - np.eye(8))  # two 4-cliques
    >>> g, _ = G.add_edges(g, src, dst, [0.5] * 24, G.HEBBIAN)
    >>> g, rep = transfer(g, cfg)
    >>> rep.n_domains, rep.domain_sizes, g.domain[:9].tolist()  # slot 8 is dead: no domain
    (2, (4, 4), [0, 0, 0, 0, 1, 1, 1, 1, -1])
    >>> rep.analogies.tolist(), len(rep.edges.inserted)  # ANALOGY edges, both directions
    ([[0, 4], [1, 5], [2, 6], [3, 7]], 8)
    >>> g.nbr[0].tolist(), [G.EDGE_KINDS[k] for k in g.kind[0].tolist()]
    ([1, 2, 3, 4], ['HEBBIAN', 'HEBBIAN', 'HEBBIAN', 'ANALOGY'])
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
