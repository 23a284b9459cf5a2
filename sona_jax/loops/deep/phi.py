"""Loop C phase 6: the integrated-information proxy, Phi_AR of a VAR(1) model of the memory graph.

Exact IIT Phi is intractable past a handful of nodes, so this module computes a documented
*integrated-information proxy* (docs/design.md, "Integration proxy"), not Phi: the autoregressive
integrated information Phi_AR of Barrett & Seth (2011), "Practical measures of integrated
information for time-series data", PLoS Comput. Biol. 7(1): e1001052, in closed form for a linear
Gaussian model of the graph. The model and its formulas (VAR(1), Lyapunov equation, the measures
"ar" and "si") are in `phi_model`; the search of the minimum-information bipartition (exhaustive,
then spectral with local search) is in `phi_search`.

Edge cases. A graph whose undirected support is disconnected has an MIB of value exactly 0 between
its components (`Sigma` and `J` are block diagonal there) and is reported as 0 without a search.
Values below `ZERO_TOL * max(1, I(X))` are snapped to 0 and negative values are reported as 0, so
the proxy is always finite and `>= 0`. The numerical work runs with single-threaded BLAS.
"""

from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from sona_jax.loops.deep.phi_model import (
  MAX_VARIANCE,
  System,
  check_measure,
  check_radius,
  check_weights,
  evaluate,
  make_system,
  scale_factor,
)
from sona_jax.loops.deep.phi_search import canonical, exhaustive_mib, spectral_mib

try:  # installed with scikit-learn
  import threadpoolctl
except ImportError:  # pragma: no cover
  threadpoolctl = None

__all__ = [
  "MAX_VARIANCE",
  "ZERO_TOL",
  "PhiResult",
  "PhiReport",
  "phi_ar",
  "bipartition_phi",
  "scale_factor",
  "graph_phi",
]

ZERO_TOL = 1e-9
"""Values of the proxy below `ZERO_TOL * max(1, I(X))` are reported as exactly 0."""


class PhiResult(NamedTuple):
  """The integrated-information proxy of a weight matrix (see `phi_ar`).

  Attributes:
    phi: Phi_AR across the minimum-information bipartition (unnormalised), `>= 0`, finite.
    partition: bool[n], True for side `M1` of the MIB.
    method: `"exhaustive"`, `"spectral"` or `"trivial"` (no search needed: fewer than 2 nodes, no
      edges, or a disconnected graph).
    normalized: `phi / K`, the value the MIB minimised, reported as 0 when `phi` is (a negative raw
      value shows in `bipartition_phi`).
  """

  phi: float
  partition: np.ndarray
  method: str
  normalized: float


class PhiReport(NamedTuple):
  """The integrated-information proxy of the memory graph (see `graph_phi`).

  Attributes:
    phi: Phi_AR across the MIB of the sub-graph of the most accessed nodes, `>= 0`.
    n_nodes: number of nodes used.
    node_ids: graph ids of the nodes used, most accessed first (ties by id).
    partition: graph ids on side `M1` of the MIB, ascending.
    method: search method of `phi_ar`.
    seconds: wall time of the computation.
  """

  phi: float
  n_nodes: int
  node_ids: tuple[int, ...]
  partition: tuple[int, ...]
  method: str
  seconds: float


_CONTROLLER = []  # a threadpoolctl.ThreadpoolController, created on first use


def _one_blas_thread():
  """Single-threaded BLAS for the duration (process-wide, as threadpoolctl works).

  The matrices here are at most 512 x 512, too small to gain from threads, and on a loaded 2-core
  machine OpenBLAS's spinning threads made a 512 x 512 Cholesky 30x slower (264 ms vs 8 ms) and the
  small-graph searches ~10x slower. A cached controller makes the switch cost ~25 us.
  """
  if threadpoolctl is None:
    return contextlib.nullcontext()
  if not _CONTROLLER:
    _CONTROLLER.append(threadpoolctl.ThreadpoolController())
  return _CONTROLLER[0].limit(limits=1, user_api="blas")


def _snap(phi: float, norm: float, sys: System) -> tuple[float, float]:
  if not phi > ZERO_TOL * sys.scale:
    return 0.0, 0.0
  return float(phi), float(norm)


def phi_ar(
  weights, *, spectral_radius: float = 0.9, exhaustive_max: int = 12, measure: str = "ar"
) -> PhiResult:
  """Integrated-information proxy Phi_AR (Barrett & Seth 2011) of a weighted directed graph.

  Not IIT's Phi: the closed-form Phi_AR of the VAR(1) model `X_{t+1} = s W^T X_t + e` across the
  minimum-information bipartition (see `phi_model` for the model, the formulas and the
  normalisation, `phi_search` for the search).

  Args:
    weights: f[n, n] weight matrix, `W[i, j]` the weight of edge `i -> j`. Any real values; only
      the direction of `W` matters (it is rescaled). Non-finite entries raise `ValueError`.
    spectral_radius: spectral radius of the model's `A`, in (0, 1) (0.9: docs/design.md,
      "Integration proxy").
    exhaustive_max: search all bipartitions up to this many nodes (0-20), spectrally above.
    measure: `"ar"`, Phi_AR (whole minus sum of the parts' one-step mutual information, the
      measure of docs/design.md, "Integration proxy"), or `"si"`, the stochastic-interaction
      variant (the parts' one-step conditional entropies minus the whole's; never negative). See
      `phi_model`.

  Returns:
    A `PhiResult`; `phi >= 0` and finite. Fewer than 2 nodes, no edges, or a disconnected graph
    give `phi = 0` with `method = "trivial"` (for a disconnected graph the partition separates the
    component of node 0 from the rest).

  Examples:
    >>> import numpy as np
    >>> two_cycles = np.zeros((6, 6))
    >>> for i in range(3):
    ...   two_cycles[i, (i + 1) % 3] = two_cycles[3 + i, 3 + (i + 1) % 3] = 1.0
    >>> phi_ar(two_cycles).phi  # disconnected
    0.0
    >>> two_cycles[0, 3] = 2.0  # the first cycle drives the second
    >>> r = phi_ar(two_cycles)
    >>> round(r.phi, 3), r.partition.tolist(), r.method
    (0.453, [True, True, True, False, False, False], 'exhaustive')
  """
  w = check_weights(weights)
  check_radius(spectral_radius)
  check_measure(measure)
  if isinstance(exhaustive_max, bool) or not isinstance(exhaustive_max, int):
    raise ValueError(f"phi_ar: exhaustive_max must be an int, got {exhaustive_max!r}")
  if not 0 <= exhaustive_max <= 20:
    raise ValueError(f"phi_ar: exhaustive_max={exhaustive_max} is out of range; allowed [0, 20]")
  n = w.shape[0]
  if n < 2:
    return PhiResult(0.0, np.ones(n, bool), "trivial", 0.0)
  # Disconnected support: the cut between components has phi = 0 exactly (Sigma and J are block
  # diagonal, so I(X) = I(M1) + I(M2)), and the proxy is never below 0.
  off = w != 0
  np.fill_diagonal(off, False)
  n_comp, label = scipy.sparse.csgraph.connected_components(
    scipy.sparse.csr_matrix(off), directed=True, connection="weak"
  )
  if n_comp > 1:
    return PhiResult(0.0, label == label[0], "trivial", 0.0)
  with _one_blas_thread():
    sys = make_system(w, spectral_radius, measure)
    if sys is None:
      return PhiResult(0.0, np.arange(n) == 0, "trivial", 0.0)
    if n <= exhaustive_max:
      side, method = exhaustive_mib(sys), "exhaustive"
    else:
      side, method = spectral_mib(sys, w), "spectral"
    side = canonical(side)
    phi, norm = _snap(*evaluate(sys, side), sys)
  return PhiResult(phi, side, method, norm)


def bipartition_phi(
  weights, partition, *, spectral_radius: float = 0.9, measure: str = "ar"
) -> tuple[float, float]:
  """Raw integrated-information proxy (Phi_AR) of one given bipartition, and its normalised value.

  Unlike `phi_ar`, neither snapped nor clamped at 0 (rounding noise and negative values show), and
  not minimised over bipartitions: this is `phi(M1, M2)` and `phi / K` of `phi_model`.

  Args:
    weights: f[n, n] weight matrix, `W[i, j]` the weight of edge `i -> j`.
    partition: bool[n], True for side M1; both sides non-empty.
    spectral_radius: spectral radius of the model's `A`, in (0, 1).
    measure: `"ar"` or `"si"` (see `phi_ar`).

  Returns:
    `(phi, phi / K)`; `(0.0, 0.0)` for a zero matrix.

  Examples:
    >>> import numpy as np
    >>> w = np.zeros((6, 6))  # two 3-cycles
    >>> for i in range(3):
    ...   w[i, (i + 1) % 3] = w[3 + i, 3 + (i + 1) % 3] = 1.0
    >>> cycles = [True, True, True, False, False, False]
    >>> phi, _ = bipartition_phi(w, cycles)  # disconnected: 0 up to rounding, not snapped
    >>> abs(phi) < 1e-12
    True
    >>> w[0, 3] = 2.0  # the first cycle drives the second
    >>> round(bipartition_phi(w, cycles)[0], 3), round(phi_ar(w).phi, 3)  # this cut is the MIB
    (0.453, 0.453)
    >>> phi, norm = bipartition_phi(w, [True, False] * 3)  # a cut through both cycles
    >>> round(phi, 3), round(norm, 3)
    (6.262, 0.786)
  """
  w = check_weights(weights)
  check_radius(spectral_radius)
  check_measure(measure)
  side = np.asarray(partition, bool).reshape(-1)
  if side.size != w.shape[0] or side.all() or not side.any():
    raise ValueError(
      f"bipartition_phi: partition must be bool[{w.shape[0]}] with both sides non-empty, "
      f"got {np.asarray(partition)!r}"
    )
  with _one_blas_thread():
    sys = make_system(w, spectral_radius, measure)
    if sys is None:
      return 0.0, 0.0
    phi, norm = evaluate(sys, side)
  return float(phi), float(norm)


def graph_phi(graph, cfg, *, measure: str = "ar") -> PhiReport:
  """Integrated-information proxy (Phi_AR, see `phi_ar`) of the memory graph.

  See docs/design.md, "Integration proxy".

  Uses the `cfg.phi_max_nodes` most-accessed alive nodes (ties by id) and the edges among them (all
  kinds), with `W[i, j]` the weight of the edge `i -> j` held in row `i`. Host NumPy float64.

  Args:
    graph: a `sona_jax.graph.Graph`.
    cfg: a `SonaConfig` (`phi_max_nodes`, `phi_exhaustive_max`).
    measure: `"ar"` or `"si"` (see `phi_ar`).

  Returns:
    A `PhiReport`.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, sona_jax as sona
    >>> from sona_jax import graph as G
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4)
    >>> g, _, _ = G.add_nodes(G.init_graph(16, 8, 4), jnp.eye(8)[:4])  # nodes 0-3
    >>> g, _ = G.add_edges(g, [0, 1, 2, 3], [1, 0, 3, 2], [0.5] * 4, G.HEBBIAN)
    >>> r = graph_phi(g, cfg)  # two 2-cycles (the 12 dead slots are left out)
    >>> r.n_nodes, r.phi, r.method, r.partition  # disconnected: 0, no search needed
    (4, 0.0, 'trivial', (0, 1))
    >>> g, _ = G.add_edges(g, [0], [2], [1.0], G.HEBBIAN)  # the first cycle drives the second
    >>> r = graph_phi(g, cfg)
    >>> w = np.array([[0, 0.5, 1, 0], [0.5, 0, 0, 0], [0, 0, 0, 0.5], [0, 0, 0.5, 0]])
    >>> round(r.phi, 4), round(phi_ar(w).phi, 4), r.method, r.partition  # phi_ar of its weights
    (0.6509, 0.6509, 'exhaustive', (0, 1))
  """
  t0 = time.perf_counter()
  alive = np.asarray(graph.alive)
  access = np.asarray(graph.access_count).astype(np.int64)
  ids = np.flatnonzero(alive)
  ids = ids[np.lexsort((ids, -access[ids]))][: cfg.phi_max_nodes]
  n = ids.size
  pos = np.full(alive.size, -1, np.int64)
  pos[ids] = np.arange(n)
  nbr = np.asarray(graph.nbr)[ids]
  wts = np.asarray(graph.w)[ids].astype(np.float64)
  keep = nbr >= 0
  keep[keep] = pos[nbr[keep]] >= 0
  rows, cols = np.nonzero(keep)
  w = np.zeros((n, n))
  w[rows, pos[nbr[rows, cols]]] = wts[rows, cols]
  res = phi_ar(w, exhaustive_max=cfg.phi_exhaustive_max, measure=measure)
  return PhiReport(
    phi=res.phi,
    n_nodes=int(n),
    node_ids=tuple(int(i) for i in ids),
    partition=tuple(sorted(int(i) for i in ids[res.partition])),
    method=res.method,
    seconds=time.perf_counter() - t0,
  )
