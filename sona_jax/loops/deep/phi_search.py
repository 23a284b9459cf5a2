"""The minimum-information bipartition (MIB) search of the integrated-information proxy.

Given the model of `phi_model` (`System`), finds the bipartition `(M1, M2)` that minimises the
normalised `phi / K` (docs/design.md, "Integration proxy"); `phi.phi_ar` is the public entry point.

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
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from sona_jax.loops.deep.phi_model import LOG_2PI_E, System

__all__ = ["canonical", "exhaustive_mib", "spectral_mib"]

_SWEEP_STARTS = 2  # greedy descents from the best local minima of each sweep profile
_FM_STARTS = 2  # FM descents from the best distinct greedy minima
_FM_PASSES = 5  # at most this many FM passes per descent (each must improve)
_FM_PATIENCE = 32  # an FM pass stops after this many moves without a new best
_KICK_WORK = 20 * 32**2  # randomised restarts: min(20, _KICK_WORK // n^2), so 20 up to n = 32
_KICK_FRACTION = 0.5  # a restart flips this fraction of the best bipartition's nodes
_KICK_PASSES = 1  # FM passes after a restart (0 missed MIBs that 1 and 5 both found)
_RESET_EVERY = 256  # recompute a cut's bookkeeping from scratch after this many moves
_REL_IMPROVE = 1e-12  # a move must improve the objective by this much (relative)


def exhaustive_mib(sys: System) -> np.ndarray:
  """The MIB over all `2^(n-1) - 1` bipartitions (node `n - 1` always on side M2).

  Examples:
    >>> import numpy as np
    >>> from sona_jax.loops.deep.phi_model import make_system
    >>> w = np.zeros((6, 6))  # two 3-cycles, the first driving the second through 0 -> 3
    >>> for i in range(3):
    ...   w[i, (i + 1) % 3] = w[3 + i, 3 + (i + 1) % 3] = 1.0
    >>> w[0, 3] = 2.0
    >>> exhaustive_mib(make_system(w, 0.9, "ar")).tolist()  # the cut between the cycles
    [True, True, True, False, False, False]
  """
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
      ent[masks] = 0.5 * (k * LOG_2PI_E + ld_s)
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


def _sweep(sys: System, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    return sys.coef * ld_s - 0.5 * ld_j, 0.5 * (k * LOG_2PI_E + ld_s)  # [k - 1]: first k nodes

  i_pre, h_pre = prefix_terms(order)
  i_suf, h_suf = prefix_terms(order[::-1])
  k = np.arange(1, n)
  phi = sys.i_whole - i_pre[k - 1] - i_suf[n - k - 1]
  return phi, phi / np.minimum(h_pre[k - 1], h_suf[n - k - 1])


def _orderings(sys: System, w: np.ndarray) -> list[np.ndarray]:
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

  def __init__(self, sys: System, mask: np.ndarray):
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

  def remove(self, sys: System, v: int) -> None:
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

  def add(self, sys: System, v: int) -> None:
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

  def __init__(self, sys: System, side: np.ndarray):
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
    h = 0.5 * min(n1 * LOG_2PI_E + s1.ld_s, (self.n - n1) * LOG_2PI_E + s2.ld_s)
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
    h = 0.5 * np.minimum(size_a * LOG_2PI_E + ls_a, (n - size_a) * LOG_2PI_E + ls_b)
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


def spectral_mib(sys: System, w: np.ndarray) -> np.ndarray:
  """Spectral MIB search: sweep cuts along Fiedler orderings, greedy descents from the sweeps' best
  local minima, then Fiduccia-Mattheyses passes from the best distinct greedy minima.

  Examples:
    >>> import numpy as np
    >>> from sona_jax.loops.deep.phi_model import make_system
    >>> w = np.zeros((6, 6))  # two 3-cycles, the first driving the second through 0 -> 3
    >>> for i in range(3):
    ...   w[i, (i + 1) % 3] = w[3 + i, 3 + (i + 1) % 3] = 1.0
    >>> w[0, 3] = 2.0
    >>> sys = make_system(w, 0.9, "ar")
    >>> side = canonical(spectral_mib(sys, w))
    >>> side.tolist()  # the cut between the cycles
    [True, True, True, False, False, False]
    >>> side.tolist() == canonical(exhaustive_mib(sys)).tolist()  # the exhaustive MIB
    True
  """
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
    minima.setdefault(canonical(cut.side).tobytes(), (val, cut.side.copy()))
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


def canonical(side: np.ndarray) -> np.ndarray:
  """Bipartitions are unordered: put node 0 on side M1.

  Examples:
    >>> import numpy as np
    >>> canonical(np.array([False, True, True])).tolist()  # the same bipartition, node 0 in M1
    [True, False, False]
    >>> canonical(np.array([True, False, True])).tolist()  # already canonical
    [True, False, True]
  """
  return side if side[0] else ~side
