"""Integrated-information proxy: Phi_AR of a linear Gaussian VAR(1) model of the memory graph.

Exact IIT Phi is intractable past a handful of nodes, so this module computes a documented
*integrated-information proxy* (docs/design.md, "Integration proxy"), not Phi: the autoregressive
integrated information Phi_AR of Barrett & Seth (2011), "Practical measures of integrated
information for time-series data", PLoS Comput. Biol. 7(1): e1001052, in closed form for a linear
Gaussian model of the graph.

Model. `W[i, j]` is the weight of the directed edge `i -> j` (the edge lives in row `i` of the
graph): node `i` at time `t` drives node `j` at time `t + 1`. The system is the VAR(1)

    X_{t+1} = A X_t + e_t,   e_t ~ N(0, I),   A = s W^T,

with `s = spectral_radius / rho(W)` (0.9 by default, as the original design asks), lowered where
needed so that no node's stationary variance exceeds `MAX_VARIANCE` (see `scale_factor`): without
the cap a nearly feed-forward graph, whose spectral radius is tiny next to its path gains, gets
astronomically large gains, and a feed-forward graph (a DAG, `rho(W) = 0`) is scaled by the cap
alone. Only the direction of `W` matters: `W` and `c W` (`c > 0`) give the same value.

Closed form (derivation). The stationary covariance solves the discrete Lyapunov equation
`Sigma = A Sigma A^T + I`; the lag-1 covariance is `Gamma = Cov(X_{t+1}, X_t) = A Sigma`; the pair
`(X_{t+1}, X_t)` has covariance `J = [[Sigma, Gamma], [Gamma^T, Sigma]]`. For a set of nodes `M`,
the residual covariance of the regression of `M_{t+1}` on its own past is
`Sigma(M_{t+1} | M_t) = Sigma_M - Gamma_M Sigma_M^-1 Gamma_M^T` (`Gamma_M = Gamma[M, M]`), and by
the Schur complement `det Sigma(M_{t+1} | M_t) = det J_M / det Sigma_M`. Barrett & Seth's one-step
information of `M`, `I(M) = 1/2 log [det Sigma_M / det Sigma(M_{t+1} | M_t)]`, is therefore

    I(M) = log det Sigma_M - 1/2 log det J_M,   and for the whole   I(X) = 1/2 log det Sigma

(the whole's residual is the noise, `I`). Phi_AR across a bipartition `(M1, M2)` is

    phi(M1, M2) = I(X) - I(M1) - I(M2)                                    (measure="ar", default)

normalised, as Barrett & Seth do after Balduzzi & Tononi (2008), by `K = (m - 1) min_k H(M_k)` with
`m = 2` parts and the Gaussian entropy `H(M) = 1/2 log((2 pi e)^|M| det Sigma_M)`. As `Sigma >= I`,
`det Sigma_M >= 1` and `K >= 1/2 log(2 pi e) > 0`. The minimum-information bipartition (MIB)
minimises `phi / K`; the proxy is `phi` at the MIB. `tests/test_phi.py` checks the closed form
against least-squares estimates from a simulated series.

Phi_AR can be negative: `phi = SI - I(M1_t; M2_t)`, where the instantaneous mutual information of
the parts (shared, redundant information) is subtracted from the stochastic interaction

    SI(M1, M2) = sum_k H(M_k,t+1 | M_k,t) - H(X_{t+1} | X_t)
               = 1/2 sum_k (log det J_Mk - log det Sigma_Mk)                 (measure="si")

(Ay 2001/2015; "integrated stochastic interaction" in Mediano, Seth & Barrett 2019), which is never
negative. For weakly coupled recurrent modules the redundancy wins, Phi_AR is negative across the
module cut and the proxy reports 0 (see `test_phi_ar_is_zero_when_redundancy_dominates`); SI grows
with the coupling there. `measure="si"` selects it, with the same model, normalisation and search.

Search. Exhaustive over the `2^(n-1) - 1` bipartitions up to `exhaustive_max` nodes. Above, a
spectral search: sweep cuts along the Fiedler vectors of three affinities (the symmetrised `|W|`,
the stationary correlations, the lag-1 correlations), all cuts of an ordering priced at once from
one Cholesky factor of the reordered covariances (the leading minors are the prefixes); greedy
single-node moves from the best local minima of the sweeps; Fiduccia-Mattheyses passes from the
two best greedy minima; then randomised restarts (half the nodes of the best bipartition flipped,
greedy moves and one FM pass; a fixed seed, so results are deterministic): 20 up to 32 nodes,
`20 * 32^2 // n^2` above (none above 143 nodes), as each costs O(n^3). Moves are priced in O(n)
and applied in O(n^2) by block-inverse updates (`_Cut`).

Measured on seeded random graphs (directed, modular, symmetric and signed mixes), for each measure:
the spectral search reached the exhaustive MIB (normalised value within 1e-9 relative) on 537/537
graphs with 4-12 nodes, 160/160 with exactly 12 and 119/119 with 13-16 nodes; without the restarts
it missed 2.5-7.5% at 12 nodes. At 256 nodes it is a heuristic: against a search given ~10x more
CPU (more starts and passes, 20 restarts) its normalised value was equal on 5 of 8 random graphs
per measure and at most 1.5% ("ar") / 0.9% ("si") higher on the others.

Edge cases. A graph whose undirected support is disconnected has an MIB of value exactly 0 between
its components (`Sigma` and `J` are block diagonal there) and is reported as 0 without a search.
Values below `ZERO_TOL * max(1, I(X))` are snapped to 0 and negative values are reported as 0, so
the proxy is always finite and `>= 0`. The numerical work runs with single-threaded BLAS.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.sparse
import scipy.sparse.csgraph

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

MAX_VARIANCE = 1e4
"""Largest stationary variance of a node (the noise variance is 1) before the gain `s` is capped."""

ZERO_TOL = 1e-9
"""Values of the proxy below `ZERO_TOL * max(1, I(X))` are reported as exactly 0."""

_LOG_2PI_E = math.log(2.0 * math.pi * math.e)
_SWEEP_STARTS = 2  # greedy descents from the best local minima of each sweep profile
_FM_STARTS = 2  # FM descents from the best distinct greedy minima
_FM_PASSES = 5  # at most this many FM passes per descent (each must improve)
_FM_PATIENCE = 32  # an FM pass stops after this many moves without a new best
_KICK_WORK = 20 * 32**2  # randomised restarts: min(20, _KICK_WORK // n^2), so 20 up to n = 32
_KICK_FRACTION = 0.5  # a restart flips this fraction of the best bipartition's nodes
_KICK_PASSES = 1  # FM passes after a restart (0 missed MIBs that 1 and 5 both found)
_RESET_EVERY = 256  # recompute a cut's bookkeeping from scratch after this many moves
_REL_IMPROVE = 1e-12  # a move must improve the objective by this much (relative)


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


# --------------------------------------------------------------------------------------------------
# The VAR(1) model.


def _check_weights(weights) -> np.ndarray:
  w = np.asarray(weights)
  if w.ndim != 2 or w.shape[0] != w.shape[1]:
    raise ValueError(f"phi_ar: weights must be a square [n, n] matrix, got shape {w.shape}")
  if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)) and (
    w.dtype != np.bool_
  ):
    raise ValueError(f"phi_ar: weights must be real numbers, got dtype {w.dtype}")
  w = w.astype(np.float64)
  bad = ~np.isfinite(w)
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise ValueError(
      f"phi_ar: weights must be finite, got {w[i, j]!r} at [{i}, {j}] ({int(bad.sum())} entries)"
    )
  return w


def _spectral_radius(w: np.ndarray) -> float:
  """rho(W) from the strongly connected components (the block-triangular form of W).

  Exact 0 for a feed-forward (acyclic) support, where `eigvals` of the whole matrix would return
  rounding noise of order `eps^(1/L)` from its nilpotent Jordan blocks.
  """
  n_comp, label = scipy.sparse.csgraph.connected_components(
    scipy.sparse.csr_matrix(w != 0), directed=True, connection="strong"
  )
  rho = 0.0
  for c in range(n_comp):
    idx = np.flatnonzero(label == c)
    if idx.size == 1:
      rho = max(rho, abs(w[idx[0], idx[0]]))
    else:
      rho = max(rho, float(np.abs(np.linalg.eigvals(w[np.ix_(idx, idx)])).max()))
  return rho


def _lyapunov(a: np.ndarray) -> np.ndarray | None:
  """Solves `Sigma = A Sigma A^T + I` by doubling (Smith): `Sigma = sum_k A^k A^kT`.

  Returns None when the series does not converge to finite values (caller caps the gain).
  """
  n = a.shape[0]
  sigma = np.eye(n)
  ak = a.copy()
  for _ in range(64):
    if not np.isfinite(ak).all():
      return None
    step = ak @ sigma @ ak.T
    sigma = sigma + step
    if not np.isfinite(sigma).all():
      return None
    if np.abs(step).max() <= 1e-17 * np.abs(sigma).max():
      return 0.5 * (sigma + sigma.T)
    ak = ak @ ak
  return None


def _max_variance(w_t: np.ndarray, s: float) -> tuple[float, np.ndarray | None]:
  sigma = _lyapunov(s * w_t)
  if sigma is None:
    return math.inf, None
  return float(np.diag(sigma).max()), sigma


def _scaled(w: np.ndarray, spectral_radius: float) -> tuple[float, np.ndarray | None]:
  """`(s, Sigma)` for a max-normalised `w`; Sigma is None when `w` is zero."""
  if not w.any():
    return 0.0, None
  w_t = w.T
  rho = _spectral_radius(w)
  if rho > 0.0:
    s = spectral_radius / rho
    var, sigma = _max_variance(w_t, s)
    if var <= MAX_VARIANCE:
      return s, sigma
    s_hi = s
  else:
    s_hi = math.inf
  # Cap: the largest s with max variance <= MAX_VARIANCE. Sigma(s) = sum_k s^2k W^k W^kT grows with
  # s, and at s = spectral_radius / ||W||_2 every variance is <= 1 / (1 - spectral_radius^2).
  s_lo = spectral_radius / float(np.linalg.norm(w, 2))
  var_lo, sigma_lo = _max_variance(w_t, s_lo)
  if var_lo > MAX_VARIANCE:  # only for spectral_radius very close to 1
    return s_lo, sigma_lo
  if math.isinf(s_hi):
    s_hi = s_lo
    while True:  # unbounded growth (nilpotent part), so this ends
      s_hi *= 4.0
      var, _ = _max_variance(w_t, s_hi)
      if var > MAX_VARIANCE:
        break
      s_lo = s_hi
  for _ in range(24):  # bisection in log s to ~1e-5 relative
    if s_hi / s_lo < 1.0 + 1e-5:
      break
    mid = math.sqrt(s_lo * s_hi)
    var, sigma = _max_variance(w_t, mid)
    if var <= MAX_VARIANCE:
      s_lo, sigma_lo = mid, sigma
    else:
      s_hi = mid
  return s_lo, sigma_lo


def scale_factor(weights, *, spectral_radius: float = 0.9) -> float:
  """The gain `s` of `A = s W^T` used by `phi_ar` (0 for a zero matrix).

  `s = spectral_radius / rho(W)` (docs/design.md, "Integration proxy"), capped so that the
  stationary variance of every node stays `<= MAX_VARIANCE`: the largest such `s`, found by
  bisection (relative precision 1e-5). The cap binds only when `rho(W)` is small next to the path
  gains of `W` (nearly feed-forward graphs) and alone sets `s` for a DAG, where `rho(W) = 0`.

  Args:
    weights: f[n, n] weight matrix, `W[i, j]` the weight of edge `i -> j`.
    spectral_radius: target spectral radius of `A`, in (0, 1).

  Returns:
    `s` for the matrix as given (not max-normalised).
  """
  w = _check_weights(weights)
  _check_radius(spectral_radius)
  top = float(np.abs(w).max()) if w.size else 0.0
  if top == 0.0:
    return 0.0
  s, _ = _scaled(w / top, spectral_radius)
  return s / top


def _check_measure(measure) -> None:
  if measure not in _MEASURES:
    raise ValueError(f"phi_ar: measure must be one of {tuple(_MEASURES)}, got {measure!r}")


def _check_radius(spectral_radius) -> None:
  if not (isinstance(spectral_radius, (int, float)) and 0.0 < spectral_radius < 1.0):
    raise ValueError(f"phi_ar: spectral_radius must be in (0, 1), got {spectral_radius!r}")


class _System(NamedTuple):
  """The model's covariances and the measure's per-part term `T(M) = coef log det Sigma_M -
  1/2 log det J_M`, so that `phi(M1, M2) = T(X) - T(M1) - T(M2)` for both measures."""

  sigma: np.ndarray  # f64[n, n] stationary covariance
  joint: np.ndarray  # f64[2n, 2n] covariance of (X_{t+1}, X_t): present block, then past block
  coef: float  # 1 for "ar" (T = I(M)), 1/2 for "si" (T = -H(M_{t+1} | M_t) + const)
  i_whole: float  # T(X) = (coef - 1/2) log det Sigma, as log det J = log det Sigma
  scale: float  # max(1, I(X)): the scale of `ZERO_TOL`


_MEASURES = {"ar": 1.0, "si": 0.5}


def _system(w: np.ndarray, spectral_radius: float, measure: str) -> _System | None:
  top = float(np.abs(w).max()) if w.size else 0.0
  if top == 0.0:
    return None
  s, sigma = _scaled(w / top, spectral_radius)
  if sigma is None:
    return None
  a = s * (w / top).T
  gamma = a @ sigma
  joint = np.block([[sigma, gamma], [gamma.T, sigma]])
  coef = _MEASURES[measure]
  ld = _logdet(sigma)
  return _System(sigma, joint, coef, (coef - 0.5) * ld, max(1.0, 0.5 * ld))


def _logdet(m: np.ndarray) -> float:
  """log det of a symmetric positive-definite matrix (here all are >= the noise, so well posed)."""
  if m.shape[0] == 0:
    return 0.0
  try:
    return 2.0 * float(np.log(np.diag(np.linalg.cholesky(m))).sum())
  except np.linalg.LinAlgError:  # rounding made it indefinite: fall back to the eigenvalues
    ev = np.linalg.eigvalsh(m)
    return float(np.log(np.clip(ev, np.finfo(np.float64).tiny, None)).sum())


def _part(sys: _System, idx: np.ndarray) -> tuple[float, float]:
  """`(T(M), H(M))` of the nodes `idx` (`T(M) = I(M)` for "ar", see `_System`)."""
  n = sys.sigma.shape[0]
  ld_s = _logdet(sys.sigma[np.ix_(idx, idx)])
  idx2 = np.concatenate([idx, idx + n])
  ld_j = _logdet(sys.joint[np.ix_(idx2, idx2)])
  return sys.coef * ld_s - 0.5 * ld_j, 0.5 * (idx.size * _LOG_2PI_E + ld_s)


def _evaluate(sys: _System, side: np.ndarray) -> tuple[float, float]:
  """Raw `(phi, phi / K)` of the bipartition `side` (both sides non-empty)."""
  i1, h1 = _part(sys, np.flatnonzero(side))
  i2, h2 = _part(sys, np.flatnonzero(~side))
  phi = sys.i_whole - i1 - i2
  return phi, phi / min(h1, h2)


# --------------------------------------------------------------------------------------------------
# Exhaustive search.


def _exhaustive(sys: _System) -> np.ndarray:
  """The MIB over all `2^(n-1) - 1` bipartitions (node `n - 1` always on side M2)."""
  n = sys.sigma.shape[0]
  full = (1 << n) - 1
  info = np.zeros(full + 1)
  ent = np.zeros(full + 1)
  for k in range(1, n):
    combos = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)  # [C, k]
    for start in range(0, len(combos), 4096):  # batched log-dets, bounded memory
      idx = combos[start : start + 4096]
      masks = (1 << idx).sum(axis=1)
      idx2 = np.concatenate([idx, idx + n], axis=1)
      ld_s = np.linalg.slogdet(sys.sigma[idx[:, :, None], idx[:, None, :]])[1]
      ld_j = np.linalg.slogdet(sys.joint[idx2[:, :, None], idx2[:, None, :]])[1]
      info[masks] = sys.coef * ld_s - 0.5 * ld_j
      ent[masks] = 0.5 * (k * _LOG_2PI_E + ld_s)
  m1 = np.arange(1, 1 << (n - 1))
  m2 = full ^ m1
  phi = sys.i_whole - info[m1] - info[m2]
  norm = phi / np.minimum(ent[m1], ent[m2])
  best = int(m1[np.argmin(norm)])
  return ((best >> np.arange(n)) & 1).astype(bool)


# --------------------------------------------------------------------------------------------------
# Spectral search.


def _fiedler(affinity: np.ndarray) -> np.ndarray:
  """Fiedler vector of the normalised Laplacian of a symmetric non-negative affinity."""
  deg = affinity.sum(axis=1)
  d = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
  lap = np.eye(affinity.shape[0]) - d[:, None] * affinity * d[None, :]
  _, vec = np.linalg.eigh(lap)
  return vec[:, 1] * d


def _sweep(sys: _System, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Raw `(phi, phi / K)` of the `n - 1` cuts `order[:k] | order[k:]`, `k = 1..n-1`.

  The leading principal minors of a Cholesky factor are the log-dets of every prefix, so one factor
  of the reordered Sigma and J (and of the reversed orders, for the suffixes) prices all cuts.
  """
  n = order.size

  def prefix_terms(o):
    ls = np.log(np.diag(np.linalg.cholesky(sys.sigma[np.ix_(o, o)])))
    o2 = np.stack([o, o + n], axis=1).reshape(-1)  # node by node: present, past
    lj = np.log(np.diag(np.linalg.cholesky(sys.joint[np.ix_(o2, o2)])))
    ld_s = 2.0 * np.cumsum(ls)
    ld_j = 2.0 * np.cumsum(lj)[1::2]
    k = np.arange(1, n + 1)
    return sys.coef * ld_s - 0.5 * ld_j, 0.5 * (k * _LOG_2PI_E + ld_s)  # [k - 1]: first k nodes

  i_pre, h_pre = prefix_terms(order)
  i_suf, h_suf = prefix_terms(order[::-1])
  k = np.arange(1, n)
  phi = sys.i_whole - i_pre[k - 1] - i_suf[n - k - 1]
  return phi, phi / np.minimum(h_pre[k - 1], h_suf[n - k - 1])


def _orderings(sys: _System, w: np.ndarray) -> list[np.ndarray]:
  """Node orderings to sweep: Fiedler vectors of structural and statistical affinities."""
  n = w.shape[0]
  sd = np.sqrt(np.diag(sys.sigma))
  corr = np.abs(sys.sigma) / sd[:, None] / sd[None, :]
  lag = np.abs(sys.joint[:n, n:]) / sd[:, None] / sd[None, :]
  affinities = [np.abs(w) + np.abs(w).T, corr, lag + lag.T]
  orders = []
  for aff in affinities:
    aff = aff.copy()
    np.fill_diagonal(aff, 0.0)
    vec = _fiedler(aff)
    orders.append(np.argsort(vec, kind="stable"))
  return orders


def _det2(a, b, c):
  """Determinants of the symmetric 2x2 blocks `[[a, b], [b, c]]` (vectorised)."""
  return a * c - b * b


class _Side:
  """Bookkeeping of one side `S` of a bipartition (see `_Cut`)."""

  def __init__(self, sys: _System, mask: np.ndarray):
    n = mask.size
    s_idx = np.flatnonzero(mask)
    s2 = np.concatenate([s_idx, s_idx + n])
    diags = []
    for cov, idx in ((sys.sigma, s_idx), (sys.joint, s2)):
      low = np.linalg.cholesky(cov[np.ix_(idx, idx)])
      ld = 2.0 * float(np.log(np.diag(low)).sum())
      # With V = L^-1 Cov[idx, :], the covariance of everything given `idx` is Cov - V^T V.
      v = scipy.linalg.solve_triangular(low, cov[idx, :], lower=True, check_finite=False)
      l_inv = scipy.linalg.solve_triangular(low, np.eye(idx.size), lower=True, check_finite=False)
      inv = np.zeros_like(cov)
      inv[np.ix_(idx, idx)] = l_inv.T @ l_inv
      diags.append((ld, inv, v))
    (self.ld_s, self.p, v_s), (self.ld_j, self.pj, v_j) = diags
    self.cd = np.diag(sys.sigma) - np.einsum("ij,ij->j", v_s, v_s)
    self.cd[s_idx] = 0.0
    self.c00 = np.diag(sys.sigma) - np.einsum("ij,ij->j", v_j[:, :n], v_j[:, :n])
    self.c11 = np.diag(sys.sigma) - np.einsum("ij,ij->j", v_j[:, n:], v_j[:, n:])
    self.c01 = np.diag(sys.joint[:n, n:]) - np.einsum("ij,ij->j", v_j[:, :n], v_j[:, n:])
    for c in (self.c00, self.c01, self.c11):
      c[s_idx] = 0.0

  def remove(self, sys: _System, v: int) -> None:
    """`S <- S - {v}`: rank-1 (Sigma) and rank-2 (J) downdates of the inverses; the conditional
    covariances gain `(Sigma p)(Sigma p)^T / p_v` (resp. its 2x2-block analogue)."""
    n = self.cd.size
    b2 = [v, v + n]
    pv = self.p[:, v].copy()
    _ger(self.p, pv, pv, -1.0 / pv[v])
    self.p[v, :] = self.p[:, v] = 0.0
    d = sys.sigma @ pv
    self.cd += d * d / pv[v]
    self.ld_s += math.log(pv[v])
    pb = self.pj[:, b2].copy()
    blk = pb[b2]
    blk_inv = _inv2(blk)
    _ger2(self.pj, pb, blk_inv, -1.0)
    self.pj[b2, :] = 0.0
    self.pj[:, b2] = 0.0
    self._block_update(sys.joint @ pb, blk_inv, 1.0)
    self.ld_j += math.log(_det2(blk[0, 0], blk[0, 1], blk[1, 1]))

  def add(self, sys: _System, v: int) -> None:
    """`S <- S + {v}`: conditioning on `x_v` (rank-1 / rank-2 downdates of the conditional
    covariances) and the block-inverse update `P += z z^T / c_v`, `z = e_v - P Sigma[:, v]`."""
    n = self.cd.size
    b2 = [v, v + n]
    cv = self.cd[v]
    zs = self.p @ sys.sigma[:, v]
    c = sys.sigma[:, v] - sys.sigma @ zs
    self.cd -= c * c / cv
    self.cd[v] = 0.0
    zs = -zs
    zs[v] = 1.0
    _ger(self.p, zs, zs, 1.0 / cv)
    self.ld_s += math.log(cv)
    zj = self.pj @ sys.joint[:, b2]
    cb = sys.joint[:, b2] - sys.joint @ zj
    blk = np.array([[self.c00[v], self.c01[v]], [self.c01[v], self.c11[v]]])
    blk_inv = _inv2(blk)
    self._block_update(cb, blk_inv, -1.0)
    for c in (self.c00, self.c01, self.c11):
      c[v] = 0.0
    zj = -zj
    zj[b2] += np.eye(2)
    _ger2(self.pj, zj, blk_inv, 1.0)
    self.ld_j += math.log(_det2(blk[0, 0], blk[0, 1], blk[1, 1]))

  def _block_update(self, x: np.ndarray, m: np.ndarray, alpha: float) -> None:
    """The 2x2 diagonal blocks of `CJ += alpha x m x^T` (`x: [2n, 2]`)."""
    n = self.cd.size
    y = x[:, :1] * m[0] + x[:, 1:] * m[1]
    self.c00 += alpha * np.einsum("ij,ij->i", y[:n], x[:n])
    self.c01 += alpha * np.einsum("ij,ij->i", y[:n], x[n:])
    self.c11 += alpha * np.einsum("ij,ij->i", y[n:], x[n:])


class _Cut:
  """A bipartition with the bookkeeping that prices every single-node move in O(n) and applies
  one in O(n^2) (block-inverse updates).

  Per side `S` (`_Side`): the log-dets of `Sigma_S` and `J_S`, the inverses `P = Sigma_S^-1` and
  `PJ = J_S^-1` embedded in zero matrices, and the diagonal (2x2-block diagonal for `J`) of the
  covariance of everything given `S`, `C = Sigma - Sigma P Sigma` and `CJ = J - J PJ J`. Removing
  `v` from `S` changes `log det Sigma_S` by `log P[v, v]` and `log det J_S` by the log-det of the
  2x2 block of `PJ` at `(v, v + n)` (present, past); adding `u` changes them by `log C[u, u]` and
  the log-det of the 2x2 block of `CJ` at `u` (Schur complements).
  """

  def __init__(self, sys: _System, side: np.ndarray):
    self.sys = sys
    self.n = side.size
    self.reset(side)

  def reset(self, side: np.ndarray) -> None:
    self.side = side.copy()
    self.parts = [_Side(self.sys, side), _Side(self.sys, ~side)]
    self.moves_since_reset = 0

  def value(self) -> float:
    """Raw `phi / K` of the current bipartition."""
    s1, s2 = self.parts
    n1 = int(self.side.sum())
    a = self.sys.coef
    phi = self.sys.i_whole - (a * s1.ld_s - 0.5 * s1.ld_j) - (a * s2.ld_s - 0.5 * s2.ld_j)
    h = 0.5 * min(n1 * _LOG_2PI_E + s1.ld_s, (self.n - n1) * _LOG_2PI_E + s2.ld_s)
    return phi / h

  def objective(self) -> np.ndarray:
    """Raw `phi / K` after moving each node to the other side (inf where a side would empty)."""
    n, side = self.n, self.side
    i = np.arange(n)
    tiny = np.finfo(np.float64).tiny
    terms = []
    for s in self.parts:
      pj = s.pj
      rm_s = s.ld_s + np.log(np.maximum(np.diag(s.p), tiny))
      rm_j = s.ld_j + np.log(np.maximum(_det2(pj[i, i], pj[i, i + n], pj[i + n, i + n]), tiny))
      add_s = s.ld_s + np.log(np.maximum(s.cd, tiny))
      add_j = s.ld_j + np.log(np.maximum(_det2(s.c00, s.c01, s.c11), tiny))
      terms.append((rm_s, rm_j, add_s, add_j))
    (rm_s1, rm_j1, add_s1, add_j1), (rm_s2, rm_j2, add_s2, add_j2) = terms
    n1 = int(side.sum())
    # Node v on side 1 moves to side 2 (and vice versa): the new log-dets of both sides.
    ls_a = np.where(side, rm_s1, add_s1)
    lj_a = np.where(side, rm_j1, add_j1)
    ls_b = np.where(side, add_s2, rm_s2)
    lj_b = np.where(side, add_j2, rm_j2)
    size_a = np.where(side, n1 - 1, n1 + 1)
    a = self.sys.coef
    phi = self.sys.i_whole - (a * ls_a - 0.5 * lj_a) - (a * ls_b - 0.5 * lj_b)
    h = 0.5 * np.minimum(size_a * _LOG_2PI_E + ls_a, (n - size_a) * _LOG_2PI_E + ls_b)
    out = np.full(n, np.inf)
    ok = (size_a >= 1) & (size_a <= n - 1)
    out[ok] = phi[ok] / h[ok]  # h >= 1/2 log(2 pi e) on a non-empty side
    return np.where(np.isfinite(out), out, np.inf)

  def move(self, v: int) -> None:
    """Moves node `v` to the other side (O(n^2))."""
    src, dst = (0, 1) if self.side[v] else (1, 0)
    self.parts[src].remove(self.sys, v)
    self.parts[dst].add(self.sys, v)
    self.side[v] = ~self.side[v]
    self.moves_since_reset += 1
    if self.moves_since_reset >= _RESET_EVERY:  # bound the drift of the updates
      self.reset(self.side)


def _inv2(m: np.ndarray) -> np.ndarray:
  det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
  return np.array([[m[1, 1], -m[0, 1]], [-m[1, 0], m[0, 0]]]) / det


def _ger(a: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float) -> None:
  """In place `a += alpha x y^T` (BLAS dger on the Fortran-ordered view of a C-ordered `a`)."""
  out = scipy.linalg.blas.dger(alpha, y, x, a=a.T, overwrite_a=True)
  if not np.shares_memory(out, a):  # not contiguous: BLAS worked on a copy
    a[...] = out.T


def _ger2(a: np.ndarray, x: np.ndarray, m: np.ndarray, alpha: float) -> None:
  """In place `a += alpha x m x^T` for `x: [N, 2]` and a symmetric 2x2 `m`."""
  y = x[:, :1] * m[0] + x[:, 1:] * m[1]  # x @ m without a k=2 GEMM (slow in OpenBLAS)
  _ger(a, y[:, 0], x[:, 0], alpha)
  _ger(a, y[:, 1], x[:, 1], alpha)


def _greedy(cut: _Cut) -> float:
  """Best-improvement single-node moves to a local minimum of `phi / K`; returns the raw value."""
  cur = cut.value()
  for _ in range(4 * cut.n):
    scores = cut.objective()
    v = int(np.argmin(scores))
    if not scores[v] < cur - _REL_IMPROVE * max(1.0, abs(cur)):
      break
    cut.move(v)
    cur = cut.value()
  return cur


def _fm_pass(cut: _Cut, cur: float) -> float:
  """One Fiduccia-Mattheyses pass from a local minimum: move the best unmoved node each step, even
  uphill, stop after `_FM_PATIENCE` moves without a new best, then undo the moves after
  the best prefix. Leaves `cut` at the best bipartition seen and returns its (updated) value."""
  best = cur
  moved = np.zeros(cut.n, bool)
  trail = []
  n_best = 0
  for _ in range(cut.n):
    scores = cut.objective()
    scores[moved] = np.inf
    v = int(np.argmin(scores))
    if not np.isfinite(scores[v]):
      break
    cut.move(v)
    moved[v] = True
    trail.append(v)
    if scores[v] < best - _REL_IMPROVE * max(1.0, abs(best)):
      best, n_best = float(scores[v]), len(trail)
    elif len(trail) - n_best >= _FM_PATIENCE:
      break
  for v in reversed(trail[n_best:]):
    cut.move(v)
  return best


def _spectral(sys: _System, w: np.ndarray) -> np.ndarray:
  """Spectral MIB search: sweep cuts along Fiedler orderings, greedy descents from the sweeps' best
  local minima, then Fiduccia-Mattheyses passes from the best distinct greedy minima."""
  n = w.shape[0]
  starts = []
  for order in _orderings(sys, w):
    _, norm = _sweep(sys, order)
    k = np.arange(n - 1)
    lo = (k == 0) | (norm <= np.roll(norm, 1))
    hi = (k == n - 2) | (norm <= np.roll(norm, -1))
    cand = k[lo & hi]
    cand = cand[np.argsort(norm[cand], kind="stable")][:_SWEEP_STARTS]
    for kk in cand:
      side = np.zeros(n, bool)
      side[order[: kk + 1]] = True
      starts.append(side)
  cut = None
  minima = {}
  for side in starts:
    if cut is None:
      cut = _Cut(sys, side)
    else:
      cut.reset(side)
    val = _greedy(cut)
    minima.setdefault(_canonical(cut.side).tobytes(), (val, cut.side.copy()))
  ranked = sorted(minima.values(), key=lambda t: t[0])[:_FM_STARTS]
  best, best_side = ranked[0]
  for val, side in ranked:
    cut.reset(side)
    val = _fm_descent(cut, val)
    if val < best:
      best, best_side = val, cut.side.copy()
  # Iterated local search: kick the best bipartition (flip a seeded random subset), descend again.
  rng = np.random.default_rng(0)
  for _ in range(min(20, _KICK_WORK // n**2)):
    side = best_side.copy()
    flip = rng.choice(n, size=max(2, int(_KICK_FRACTION * n)), replace=False)
    side[flip] = ~side[flip]
    if side.all() or not side.any():
      continue
    cut.reset(side)
    val = _fm_descent(cut, _greedy(cut), _KICK_PASSES)
    if val < best - _REL_IMPROVE * max(1.0, abs(best)):
      best, best_side = val, cut.side.copy()
  return best_side


def _fm_descent(cut: _Cut, val: float, passes: int | None = None) -> float:
  """FM passes, each followed by greedy moves, while they improve (at most `_FM_PASSES`)."""
  for _ in range(_FM_PASSES if passes is None else passes):
    new = _fm_pass(cut, val)
    if not new < val - _REL_IMPROVE * max(1.0, abs(val)):
      break
    val = _greedy(cut)
  return val


# --------------------------------------------------------------------------------------------------
# Public API.


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


def _snap(phi: float, norm: float, sys: _System) -> tuple[float, float]:
  if not phi > ZERO_TOL * sys.scale:
    return 0.0, 0.0
  return float(phi), float(norm)


def _canonical(side: np.ndarray) -> np.ndarray:
  """Bipartitions are unordered: put node 0 on side M1."""
  return side if side[0] else ~side


def phi_ar(
  weights, *, spectral_radius: float = 0.9, exhaustive_max: int = 12, measure: str = "ar"
) -> PhiResult:
  """Integrated-information proxy Phi_AR (Barrett & Seth 2011) of a weighted directed graph.

  Not IIT's Phi: the closed-form Phi_AR of the VAR(1) model `X_{t+1} = s W^T X_t + e` across the
  minimum-information bipartition (see the module docstring for the model, the formulas and the
  normalisation).

  Args:
    weights: f[n, n] weight matrix, `W[i, j]` the weight of edge `i -> j`. Any real values; only
      the direction of `W` matters (it is rescaled). Non-finite entries raise `ValueError`.
    spectral_radius: spectral radius of the model's `A`, in (0, 1) (0.9: docs/design.md,
      "Integration proxy").
    exhaustive_max: search all bipartitions up to this many nodes (0-20), spectrally above.
    measure: `"ar"`, Phi_AR (whole minus sum of the parts' one-step mutual information, the
      measure of docs/design.md, "Integration proxy"), or `"si"`, the stochastic-interaction
      variant (the parts' one-step conditional entropies minus the whole's; never negative). See
      the module docstring.

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
  w = _check_weights(weights)
  _check_radius(spectral_radius)
  _check_measure(measure)
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
    sys = _system(w, spectral_radius, measure)
    if sys is None:
      return PhiResult(0.0, np.arange(n) == 0, "trivial", 0.0)
    if n <= exhaustive_max:
      side, method = _exhaustive(sys), "exhaustive"
    else:
      side, method = _spectral(sys, w), "spectral"
    side = _canonical(side)
    phi, norm = _snap(*_evaluate(sys, side), sys)
  return PhiResult(phi, side, method, norm)


def bipartition_phi(
  weights, partition, *, spectral_radius: float = 0.9, measure: str = "ar"
) -> tuple[float, float]:
  """Raw integrated-information proxy (Phi_AR) of one given bipartition, and its normalised value.

  Unlike `phi_ar`, neither snapped nor clamped at 0 (rounding noise and negative values show), and
  not minimised over bipartitions: this is `phi(M1, M2)` and `phi / K` of the module docstring.

  Args:
    weights: f[n, n] weight matrix, `W[i, j]` the weight of edge `i -> j`.
    partition: bool[n], True for side M1; both sides non-empty.
    spectral_radius: spectral radius of the model's `A`, in (0, 1).
    measure: `"ar"` or `"si"` (see `phi_ar`).

  Returns:
    `(phi, phi / K)`; `(0.0, 0.0)` for a zero matrix.
  """
  w = _check_weights(weights)
  _check_radius(spectral_radius)
  _check_measure(measure)
  side = np.asarray(partition, bool).reshape(-1)
  if side.size != w.shape[0] or side.all() or not side.any():
    raise ValueError(
      f"bipartition_phi: partition must be bool[{w.shape[0]}] with both sides non-empty, "
      f"got {np.asarray(partition)!r}"
    )
  with _one_blas_thread():
    sys = _system(w, spectral_radius, measure)
    if sys is None:
      return 0.0, 0.0
    phi, norm = _evaluate(sys, side)
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
