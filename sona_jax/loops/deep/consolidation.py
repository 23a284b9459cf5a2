"""Loop C phase 1: consolidation (docs/design.md, "Loop C"; seed section 4, `consolidate_memories`).

Edges between high-value memories (access > `consolidate_min_access`, quality >
`consolidate_min_quality`) whose cosine is above `consolidate_min_cosine` gain `consolidate_rate *
cos` in both directions (`graph.add_edges`, `mode="add"`: an existing edge keeps its kind, a missing
one is inserted as `CONSOLIDATED`); low-value old memories (access < `decay_max_access`, age >
`decay_min_age_days`) have their strength multiplied by `decay_factor`. Host-side NumPy bookkeeping
around the jitted blocked matmuls of `candidates.candidate_pairs`.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import graph as graph_lib
from sona_jax.config import SonaConfig
from sona_jax.graph import ACCESS, ALIVE, CONSOLIDATED, CREATED, QUALITY, STRENGTH, Graph
from sona_jax.loops.deep.candidates import EXACT_MAX, NO_PAIRS, candidate_pairs, pairs_array

__all__ = ["ConsolidationReport", "consolidate_memories"]

_DAY_S = 86_400


class ConsolidationReport(NamedTuple):
  """What Loop C's consolidation did (host NumPy values).

  Attributes:
    high_value: number of high-value nodes (access and quality above their thresholds).
    strengthened: i32[m, 2] the qualifying pairs `(i, j)`, `i < j`, cosine above
      `consolidate_min_cosine`; each was proposed in both directions.
    cosine: f32[m] their cosines (the edges gained `consolidate_rate * cosine`).
    updated: i32[u, 2] directed edges `(src, dst)` that existed and gained weight.
    inserted: i32[e, 2] directed edges inserted as `CONSOLIDATED`.
    rejected: i32[r, 2] proposed directed edges that found no slot (their row's K edges were all
      stronger).
    displaced: i32[d, 2] existing edges that lost their slot to a stronger inserted one.
    decayed: i32[k] nodes whose strength was multiplied by `decay_factor`.
    method: `"exact"` or `"ivf"`, how the candidate pairs were searched.
    candidate_recall: recall of the candidate search against brute force on a sample (1.0 when
      exact; NaN when not measured or when the sample held no pair).
    seconds: wall time.
  """

  high_value: int
  strengthened: np.ndarray
  cosine: np.ndarray
  updated: np.ndarray
  inserted: np.ndarray
  rejected: np.ndarray
  displaced: np.ndarray
  decayed: np.ndarray
  method: str
  candidate_recall: float
  seconds: float


def consolidate_memories(
  graph: Graph,
  cfg: SonaConfig,
  now,
  *,
  key=None,
  measure_recall: bool = False,
  exact_max: int = EXACT_MAX,
):
  """Loop C phase 1: strengthen edges between high-value memories, decay low-value old ones.

  Seed section 4, `consolidate_memories`. A node is high-value when `access >
  cfg.consolidate_min_access` and `quality > cfg.consolidate_min_quality`; every pair of high-value
  nodes with cosine `> cfg.consolidate_min_cosine` gets `cfg.consolidate_rate * cos` added to its
  edge in both directions (`graph.add_edges(..., kind=CONSOLIDATED, mode="add")`: an existing edge
  keeps its kind, a missing one is inserted as `CONSOLIDATED` if its row has room or a weaker
  edge). A node is low-value when `access < cfg.decay_max_access` and `now - created >
  cfg.decay_min_age_days` days; its strength is multiplied by `cfg.decay_factor`.

  Args:
    graph: the memory graph.
    cfg: the config.
    now: int seconds since the time origin.
    key: PRNG key of the inverted-file search (used only above `exact_max` high-value nodes;
      None = `jax.random.key(0)`).
    measure_recall: measure the inverted file's recall on a sample (when it is used).
    exact_max: search pairs exactly up to this many high-value nodes.

  Returns:
    `(graph, ConsolidationReport)`.

  Examples:
    >>> import jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import graph as G
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4)
    >>> xy = jnp.array([[1, 0], [0.8, 0.6], [0, 1], [1, 1]], jnp.float32)  # cos(0, 1) = 0.8
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.pad(xy, ((0, 0), (0, 6))), quality=0.9)
    >>> g = g._replace(node=g.node.at[:4, G.ACCESS].set(jnp.array([9, 9, 9, 0])))  # made at t 0
    >>> g, rep = consolidate_memories(g, cfg, now=40 * 86_400)  # 40 days later
    >>> rep.high_value, rep.strengthened.tolist()  # 0-2: access > 5, quality > 0.7; cos > 0.7
    (3, [[0, 1]])
    >>> rep.inserted.tolist(), G.EDGE_KINDS[int(g.kind[0, 0])]  # new edges, both directions
    ([[0, 1], [1, 0]], 'CONSOLIDATED')
    >>> round(float(g.w[0, 0]), 4)  # consolidate_rate 0.1 * cos 0.8
    0.08
    >>> rep.decayed.tolist(), g.strength[:4].tolist()  # node 3: never accessed, 40 days old
    ([3], [1.0, 1.0, 1.0, 0.5])
  """
  t0 = time.perf_counter()
  key = jax.random.key(0) if key is None else key
  node = np.array(graph.node)
  alive = node[:, ALIVE] != 0
  access = node[:, ACCESS].astype(np.int64)
  quality = node[:, QUALITY].view(np.float32)
  high = alive & (access > cfg.consolidate_min_access) & (quality > cfg.consolidate_min_quality)
  i, j, cos, method, recall, _ = candidate_pairs(
    graph.emb,
    high,
    cfg.consolidate_min_cosine,
    cfg,
    key,
    exact_max=exact_max,
    measure_recall=measure_recall,
  )
  strict = cos > np.float32(cfg.consolidate_min_cosine)  # the search is inclusive, the seed is not
  i, j, cos = i[strict], j[strict], cos[strict]
  upd = graph_lib.EdgeUpdate(NO_PAIRS, NO_PAIRS, NO_PAIRS, NO_PAIRS)
  if i.size:
    w = (np.float32(cfg.consolidate_rate) * cos).astype(np.float32)
    graph, upd = graph_lib.add_edges(
      graph,
      np.concatenate([i, j]),
      np.concatenate([j, i]),
      np.concatenate([w, w]),
      CONSOLIDATED,
      mode="add",
    )
  age = np.int64(now) - node[:, CREATED].astype(np.int64)
  low = alive & (access < cfg.decay_max_access) & (age > cfg.decay_min_age_days * _DAY_S)
  decayed = np.flatnonzero(low).astype(np.int32)
  if decayed.size:
    strength = node[:, STRENGTH].view(np.float32)
    strength[low] = strength[low] * np.float32(cfg.decay_factor)
    graph = graph._replace(node=jnp.asarray(node))
  report = ConsolidationReport(
    high_value=int(np.count_nonzero(high)),
    strengthened=pairs_array(i, j),
    cosine=cos.astype(np.float32),
    updated=upd.updated,
    inserted=upd.inserted,
    rejected=upd.rejected,
    displaced=upd.displaced,
    decayed=decayed,
    method=method,
    candidate_recall=recall,
    seconds=time.perf_counter() - t0,
  )
  return graph, report
