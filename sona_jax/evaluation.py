"""How learning is measured: routing quality per cost, calibration, forgetting (host NumPy).

The benchmarks and the tests share these; they take plain arrays and return floats or arrays, so
a user can score their own router or continual learner the same way.

- **Routing.** A router's operating points `(mean cost, success rate)` (e.g. one per threshold or
  per cost weight, `threshold_sweep` / `cost_weight_sweep`) give a quality-for-budget curve
  (`pareto_curve`: the upper concave hull, since a budget between two points is met by a random
  mix of them); `apgr` is the average performance gap recovered (RouteLLM, Ong et al. 2024,
  arXiv 2406.18665) over budgets from the weak tier's cost to the strong tier's.
- **Calibration.** `calibration_error`: the expected calibration error (Guo et al. 2017), the
  bin-size-weighted mean gap between predicted probability and observed frequency.
- **Continual learning.** `average_accuracy` and `forgetting` (Chaudhry et al. 2018, RWalk) of
  an accuracy matrix `a[l, j]` (accuracy on task `j` after training task `l`).

  >>> import numpy as np
  >>> from sona_jax import evaluation
  >>> evaluation.apgr([(2.0, 0.8)], q_weak=0.5, q_strong=1.0, c_weak=1.0, c_strong=3.0, n=5)
  0.54
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
  "apgr",
  "average_accuracy",
  "calibration_error",
  "cost_weight_sweep",
  "forgetting",
  "pareto_curve",
  "pareto_points",
  "routing_baselines",
  "threshold_sweep",
]


def pareto_points(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
  """The vertices of the upper concave hull of `(cost, quality)` points, by increasing cost.

  >>> pareto_points([(1, 0.5), (2, 0.6), (3, 0.9), (2.5, 0.5)])
  [(1.0, 0.5), (3.0, 0.9)]
  """
  pts = sorted(set((float(c), float(q)) for c, q in points))
  hull: list[tuple[float, float]] = []
  for p in pts:
    while len(hull) >= 2:
      (x1, y1), (x2, y2) = hull[-2], hull[-1]
      if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
        hull.pop()
      else:
        break
    hull.append(p)
  return hull


def pareto_curve(points: Iterable[tuple[float, float]], grid: np.ndarray) -> np.ndarray:
  """Best expected quality at each cost budget of `grid`, given operating points `(cost, quality)`.

  The upper concave hull of the points, made non-decreasing: a budget between two operating points
  is met by serving each request with one of them at random, which gets the linear interpolation
  in expectation. Below the cheapest point the curve is that point's quality.

  >>> pareto_curve([(1, 0.5), (3, 0.9)], np.array([1.0, 2.0, 4.0])).round(3).tolist()
  [0.5, 0.7, 0.9]
  """
  hull = pareto_points(points)
  xs = np.array([h[0] for h in hull])
  ys = np.maximum.accumulate(np.array([h[1] for h in hull]))
  return np.interp(np.asarray(grid, np.float64), xs, ys)


def apgr(
  points: Iterable[tuple[float, float]],
  q_weak: float,
  q_strong: float,
  c_weak: float,
  c_strong: float,
  n: int = 1001,
) -> float:
  """Average performance gap recovered (RouteLLM, Ong et al. 2024), for a router with many tiers.

  `PGR(c) = (q(c) - q_weak) / (q_strong - q_weak)`, averaged over `n` cost budgets spaced evenly
  from the weak tier's cost to the strong tier's; `q(c)` is `pareto_curve` of the router's operating
  points plus the two trivial policies (always weak, always strong). 0.5 is what random mixes of
  the two tiers get; 1 recovers the whole gap at the weak tier's cost.

  >>> apgr([(2.0, 0.8)], q_weak=0.5, q_strong=1.0, c_weak=1.0, c_strong=3.0, n=5)
  0.54
  """
  if not q_strong > q_weak:
    raise ValueError(f"apgr: q_strong ({q_strong}) must exceed q_weak ({q_weak})")
  grid = np.linspace(c_weak, c_strong, n)
  pts = list(points) + [(c_weak, q_weak), (c_strong, q_strong)]
  return round(float(np.mean((pareto_curve(pts, grid) - q_weak) / (q_strong - q_weak))), 12)


def threshold_sweep(probs: np.ndarray, correct: np.ndarray, costs) -> list[tuple[float, float]]:
  """Operating points `(mean cost, success rate)` of the threshold rule at every threshold.

  The rule (`router.route`, greedy): the cheapest tier whose predicted success probability is
  >= the threshold, else the most likely. Thresholds: 0, every distinct predicted probability, and
  above 1, which is every decision the rule can make. Tiers are ordered by cost.

  Args:
    probs: f[n, T] predicted success probabilities.
    correct: bool[n, T] whether each tier would have succeeded.
    costs: [T] tier costs, increasing.
  """
  probs, correct = np.asarray(probs), np.asarray(correct)
  costs = np.asarray(costs, np.float64)
  rows = np.arange(len(probs))
  pts = []
  for tau in np.concatenate([[0.0], np.unique(probs), [1.01]]):
    ok = probs >= tau
    choice = np.where(ok.any(1), np.argmax(ok, 1), np.argmax(probs, 1))
    pts.append((float(costs[choice].mean()), float(correct[rows, choice].mean())))
  return pts


def cost_weight_sweep(
  probs: np.ndarray, correct: np.ndarray, costs, weights: Sequence[float] | None = None
) -> list[tuple[float, float]]:
  """Operating points `(mean cost, success rate)` of the cost rule `argmax_k p_k - w * c_k`.

  Args:
    probs: f[n, T] predicted success probabilities.
    correct: bool[n, T] whether each tier would have succeeded.
    costs: [T] tier costs.
    weights: the cost weights `w`; None: 0 and every weight at which some request's choice
      changes (the breakpoints `(p_j - p_i) / (c_j - c_i)`, capped at 2001 by quantiles), and one
      past the largest, which is every decision the rule can make.
  """
  probs, correct = np.asarray(probs, np.float64), np.asarray(correct)
  costs = np.asarray(costs, np.float64)
  if weights is None:
    dp = probs[:, :, None] - probs[:, None, :]
    dc = costs[:, None] - costs[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
      w = dp / dc
    w = np.unique(w[np.isfinite(w) & (w > 0)])
    if w.size > 2001:
      w = np.quantile(w, np.linspace(0, 1, 2001))
    weights = np.concatenate([[0.0], w, [w.max() * 1.01 + 1e-9 if w.size else 1.0]])
  rows = np.arange(len(probs))
  pts = []
  for wt in weights:
    choice = np.argmax(probs - wt * costs, 1)
    pts.append((float(costs[choice].mean()), float(correct[rows, choice].mean())))
  return pts


def routing_baselines(correct: np.ndarray, costs) -> dict[str, tuple[float, float]]:
  """`(mean cost, success rate)` of always-one-tier, uniform random, and the oracle (the cheapest
  tier that succeeds, or tier 0 when none does)."""
  correct = np.asarray(correct)
  costs = np.asarray(costs, np.float64)
  q = correct.mean(0)
  first_ok = np.where(correct.any(1), np.argmax(correct, 1), 0)
  out = {f"always tier {i}": (float(costs[i]), float(q[i])) for i in range(len(costs))}
  out["random (uniform)"] = (float(costs.mean()), float(q.mean()))
  out["oracle"] = (float(costs[first_ok].mean()), float(correct.any(1).mean()))
  return out


def calibration_error(probs: np.ndarray, outcomes: np.ndarray, n_bins: int = 10) -> float:
  """Expected calibration error (Guo et al. 2017): `sum_b (n_b / n) |mean p_b - mean y_b|`.

  Probabilities fall into `n_bins` equal-width bins of [0, 1] (1.0 in the last). Every
  `(probability, outcome)` pair counts once: for a router, all tiers of every held-out query.

  >>> calibration_error(np.array([0.1, 0.9, 0.9]), np.array([0, 1, 0]), n_bins=2)
  0.3
  """
  p = np.asarray(probs, np.float64).ravel()
  y = np.asarray(outcomes, np.float64).ravel()
  if p.shape != y.shape:
    raise ValueError(f"calibration_error: {p.size} probabilities for {y.size} outcomes")
  if p.size == 0:
    raise ValueError("calibration_error: no probabilities")
  bins = np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)
  err = 0.0
  for b in np.unique(bins):
    m = bins == b
    err += m.mean() * abs(p[m].mean() - y[m].mean())
  return round(float(err), 12)


def average_accuracy(acc: np.ndarray) -> np.ndarray:
  """Mean accuracy over all tasks after the last one: `mean_j a[T-1, j]`; `acc` is `[..., T, T]`.

  >>> average_accuracy(np.array([[0.9, 0.1], [0.5, 0.8]])).round(3)
  np.float64(0.65)
  """
  return np.asarray(acc)[..., -1, :].mean(-1)


def forgetting(acc: np.ndarray) -> np.ndarray:
  """Chaudhry et al. 2018 (RWalk, eq. 9): `mean_{j < T-1} max_{l < T-1} a[l, j] - a[T-1, j]`.

  >>> forgetting(np.array([[0.9, 0.1], [0.5, 0.8]])).round(3)
  np.float64(0.4)
  """
  acc = np.asarray(acc)
  best = acc[..., :-1, :-1].max(-2)
  return (best - acc[..., -1, :-1]).mean(-1)
