"""The VAR(1) model behind the integrated-information proxy, and its closed-form Phi_AR terms.

Phi_AR is the autoregressive integrated information of Barrett & Seth (2011), "Practical measures
of integrated information for time-series data", PLoS Comput. Biol. 7(1): e1001052, in closed form
for a linear Gaussian model of the graph (docs/design.md, "Integration proxy"). This module holds
the model and the formulas; `phi_search` searches the minimum-information bipartition and `phi`
is the public entry point.

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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

__all__ = [
  "LOG_2PI_E",
  "MAX_VARIANCE",
  "MEASURES",
  "System",
  "check_measure",
  "check_radius",
  "check_weights",
  "evaluate",
  "logdet",
  "make_system",
  "part_terms",
  "scale_factor",
]

MAX_VARIANCE = 1e4
"""Largest stationary variance of a node (the noise variance is 1) before the gain `s` is capped."""

LOG_2PI_E = math.log(2.0 * math.pi * math.e)
"""`log(2 pi e)`, the per-dimension constant of the Gaussian entropy."""

MEASURES = {"ar": 1.0, "si": 0.5}
"""Measure name -> `System.coef`: `"ar"` Phi_AR, `"si"` the stochastic interaction."""


def check_weights(weights) -> np.ndarray:
  """`weights` as a finite float64 `[n, n]` matrix; `ValueError` naming the problem otherwise.

  Examples:
    >>> w = check_weights([[0, 1], [1, 0]])  # ints and nested lists are accepted
    >>> w.dtype.name, w.shape
    ('float64', (2, 2))
    >>> check_weights([[0.0, float("nan")], [1.0, 0.0]])
    Traceback (most recent call last):
    ...
    ValueError: phi_ar: weights must be finite, got nan at [0, 1] (1 entries)
  """
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
    value = float(w[i, j])  # a Python float: the message reads `nan`, not `np.float64(nan)`
    raise ValueError(
      f"phi_ar: weights must be finite, got {value!r} at [{i}, {j}] ({int(bad.sum())} entries)"
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

  Examples:
    >>> import numpy as np
    >>> two_cycle = np.array([[0.0, 1.0], [1.0, 0.0]])  # rho(W) = 1
    >>> scale_factor(two_cycle), scale_factor(2 * two_cycle)  # 0.9 / rho(W): the same A = s W^T
    (0.9, 0.45)
    >>> s = scale_factor(np.array([[0.0, 1.0], [0.0, 0.0]]))  # a DAG: rho(W) = 0, the cap sets s
    >>> round(1 + s**2)  # node 1's stationary variance 1 + s^2 reaches MAX_VARIANCE
    10000
  """
  w = check_weights(weights)
  check_radius(spectral_radius)
  top = float(np.abs(w).max()) if w.size else 0.0
  if top == 0.0:
    return 0.0
  s, _ = _scaled(w / top, spectral_radius)
  return s / top


def check_measure(measure) -> None:
  """`ValueError` unless `measure` is a key of `MEASURES`.

  Examples:
    >>> check_measure("si")  # a known measure: nothing happens
    >>> check_measure("iit")
    Traceback (most recent call last):
    ...
    ValueError: phi_ar: measure must be one of ('ar', 'si'), got 'iit'
  """
  if measure not in MEASURES:
    raise ValueError(f"phi_ar: measure must be one of {tuple(MEASURES)}, got {measure!r}")


def check_radius(spectral_radius) -> None:
  """`ValueError` unless `spectral_radius` is a number in (0, 1).

  Examples:
    >>> check_radius(0.9)  # in (0, 1): nothing happens
    >>> check_radius(1.0)  # the VAR(1) model would not be stationary
    Traceback (most recent call last):
    ...
    ValueError: phi_ar: spectral_radius must be in (0, 1), got 1.0
  """
  if not (isinstance(spectral_radius, (int, float)) and 0.0 < spectral_radius < 1.0):
    raise ValueError(f"phi_ar: spectral_radius must be in (0, 1), got {spectral_radius!r}")


class System(NamedTuple):
  """The model's covariances and the measure's per-part term `T(M) = coef log det Sigma_M -
  1/2 log det J_M`, so that `phi(M1, M2) = T(X) - T(M1) - T(M2)` for both measures."""

  sigma: np.ndarray  # f64[n, n] stationary covariance
  joint: np.ndarray  # f64[2n, 2n] covariance of (X_{t+1}, X_t): present block, then past block
  coef: float  # 1 for "ar" (T = I(M)), 1/2 for "si" (T = -H(M_{t+1} | M_t) + const)
  i_whole: float  # T(X) = (coef - 1/2) log det Sigma, as log det J = log det Sigma
  scale: float  # max(1, I(X)): the scale of `phi.ZERO_TOL`


def make_system(w: np.ndarray, spectral_radius: float, measure: str) -> System | None:
  """The model of the weights `w` (`check_weights`) for `measure`; None for a zero matrix.

  Examples:
    >>> import math, numpy as np
    >>> sys = make_system(np.array([[0.0, 1.0], [1.0, 0.0]]), 0.9, "ar")  # A = 0.9 W^T
    >>> sys.sigma.round(3).tolist()  # Sigma = A Sigma A^T + I = I / (1 - 0.81)
    [[5.263, 0.0], [0.0, 5.263]]
    >>> sys.joint.shape, sys.joint[:2, 2:].round(3).tolist()  # Gamma = A Sigma
    ((4, 4), [[0.0, 4.737], [4.737, 0.0]])
    >>> round(sys.i_whole, 4), round(math.log(1 / 0.19), 4)  # I(X) = 1/2 log det Sigma
    (1.6607, 1.6607)
    >>> make_system(np.zeros((2, 2)), 0.9, "ar") is None
    True
  """
  top = float(np.abs(w).max()) if w.size else 0.0
  if top == 0.0:
    return None
  s, sigma = _scaled(w / top, spectral_radius)
  if sigma is None:
    return None
  a = s * (w / top).T
  gamma = a @ sigma
  joint = np.block([[sigma, gamma], [gamma.T, sigma]])
  coef = MEASURES[measure]
  ld = logdet(sigma)
  return System(sigma, joint, coef, (coef - 0.5) * ld, max(1.0, 0.5 * ld))


def logdet(m: np.ndarray) -> float:
  """log det of a symmetric positive-definite matrix (here all are >= the noise, so well posed).

  Examples:
    >>> import numpy as np
    >>> round(logdet(np.diag([2.0, 3.0])), 6), round(float(np.log(6.0)), 6)
    (1.791759, 1.791759)
    >>> logdet(np.zeros((0, 0)))  # the empty part
    0.0
  """
  if m.shape[0] == 0:
    return 0.0
  try:
    return 2.0 * float(np.log(np.diag(np.linalg.cholesky(m))).sum())
  except np.linalg.LinAlgError:  # rounding made it indefinite: fall back to the eigenvalues
    ev = np.linalg.eigvalsh(m)
    return float(np.log(np.clip(ev, np.finfo(np.float64).tiny, None)).sum())


def part_terms(sys: System, idx: np.ndarray) -> tuple[float, float]:
  """`(T(M), H(M))` of the nodes `idx` (`T(M) = I(M)` for "ar", see `System`).

  Examples:
    >>> import math, numpy as np
    >>> sys = make_system(np.array([[0.0, 1.0], [1.0, 0.0]]), 0.9, "ar")
    >>> info, ent = part_terms(sys, np.array([0]))
    >>> abs(info) < 1e-12  # in a 2-cycle a node's own past says nothing about its next value
    True
    >>> round(ent, 4), round(0.5 * (LOG_2PI_E + math.log(1 / 0.19)), 4)  # Gaussian entropy
    (2.2493, 2.2493)
    >>> round(part_terms(sys, np.array([0, 1]))[0], 4) == round(sys.i_whole, 4)  # the whole: I(X)
    True
  """
  n = sys.sigma.shape[0]
  ld_s = logdet(sys.sigma[np.ix_(idx, idx)])
  idx2 = np.concatenate([idx, idx + n])
  ld_j = logdet(sys.joint[np.ix_(idx2, idx2)])
  return sys.coef * ld_s - 0.5 * ld_j, 0.5 * (idx.size * LOG_2PI_E + ld_s)


def evaluate(sys: System, side: np.ndarray) -> tuple[float, float]:
  """Raw `(phi, phi / K)` of the bipartition `side` (both sides non-empty).

  Examples:
    >>> import numpy as np
    >>> sys = make_system(np.array([[0.0, 1.0], [1.0, 0.0]]), 0.9, "ar")
    >>> phi, norm = evaluate(sys, np.array([True, False]))
    >>> round(phi, 4), round(sys.i_whole, 4)  # the parts predict nothing alone: phi = I(X)
    (1.6607, 1.6607)
    >>> round(norm, 4)  # phi / K, K = (2 - 1) * min_k H(M_k)
    0.7383
  """
  i1, h1 = part_terms(sys, np.flatnonzero(side))
  i2, h2 = part_terms(sys, np.flatnonzero(~side))
  phi = sys.i_whole - i1 - i2
  return phi, phi / min(h1, h2)
