"""Candidate pairs of Loop C phases 1 and 5: all pairs of rows above a cosine threshold.

Exact (blocked brute force, `ivf.brute_force_pairs`) up to `EXACT_MAX` rows, an inverted file
(`ivf.build_index`) above, with its recall against brute force measured on a sample when asked
(docs/design.md, "Loop C").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from sona_jax import ivf
from sona_jax.config import SonaConfig

__all__ = ["EXACT_MAX", "NO_PAIRS", "Candidates", "candidate_pairs", "pairs_array"]

# Up to this many candidate rows, pairs are searched exactly (one 4,096 x 4,096 block: 13 GFLOP
# at dim 384, a fraction of a second); above, with the inverted file of `sona_jax.ivf`.
EXACT_MAX = 4096

NO_PAIRS = np.zeros((0, 2), np.int32)
"""An empty `i32[0, 2]` list of pairs."""


def pairs_array(a, b) -> np.ndarray:
  """`i32[m, 2]` pairs `(a[k], b[k])`.

  Examples:
    >>> p = pairs_array([0, 2], [1, 3])
    >>> p.dtype.name, p.tolist()
    ('int32', [[0, 1], [2, 3]])
    >>> pairs_array([], []).shape  # no pair: still two columns
    (0, 2)
  """
  return np.stack([np.asarray(a, np.int32), np.asarray(b, np.int32)], axis=1).reshape(-1, 2)


class Candidates(NamedTuple):
  """Pairs `(i, j)` of masked rows at cosine >= a threshold (see `candidate_pairs`).

  Attributes:
    i: i64[m] first rows, `i < j`.
    j: i64[m] second rows.
    cos: f32[m] their cosines.
    method: `"exact"` or `"ivf"`.
    recall: recall against brute force on a sample (1.0 when exact, NaN when not measured).
    index: the inverted file (`ivf.build_index`) when one was built, for later searches; else None.
  """

  i: np.ndarray
  j: np.ndarray
  cos: np.ndarray
  method: str
  recall: float
  index: object


def candidate_pairs(
  emb, mask, threshold, cfg: SonaConfig, key, *, exact_max: int, measure_recall: bool
) -> Candidates:
  """Pairs of masked rows of `emb` at cosine >= `threshold`.

  Exact up to `exact_max` rows (`index` None), else through an inverted file of `cfg.ivf_cells`
  cells probed `cfg.ivf_probe` at a time (`index` returned for later searches).

  Args:
    emb: f32[N, d] unit rows.
    mask: bool[N] rows searched.
    threshold: cosine threshold (inclusive).
    cfg: the config (`ivf_cells`, `ivf_probe`).
    key: PRNG key of the inverted file and of the recall sample.
    exact_max: search exactly up to this many masked rows.
    measure_recall: measure the inverted file's recall against brute force on a sample.

  Returns:
    `Candidates`.

  Examples:
    >>> import jax, numpy as np, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8)
    >>> emb = np.zeros((4, 8), np.float32)
    >>> emb[:, :2] = [[1, 0], [0.8, 0.6], [0.6, 0.8], [1, 0]]
    >>> mask = np.array([True, True, True, False])  # row 3 (a copy of row 0) is not searched
    >>> c = candidate_pairs(emb, mask, 0.9, cfg, jax.random.key(0), exact_max=4096,
    ...                     measure_recall=False)
    >>> c.i.tolist(), c.j.tolist(), c.cos.astype(float).round(2).tolist()  # cos(0, 1) = 0.8 < 0.9
    ([1], [2], [0.96])
    >>> c.method, c.recall, c.index  # 3 rows <= exact_max: brute force, no inverted file
    ('exact', 1.0, None)
  """
  n = int(np.count_nonzero(mask))
  if n <= exact_max:
    i, j, c = ivf.brute_force_pairs(emb, mask, threshold)
    return Candidates(i, j, c, "exact", 1.0, None)
  k_ivf, k_recall = jax.random.split(key)
  index = ivf.build_index(emb, mask, cells=cfg.ivf_cells, probe=cfg.ivf_probe, key=k_ivf)
  i, j, c = ivf.index_pairs(index, threshold)
  recall = float("nan")
  if measure_recall:
    recall = ivf.pair_recall((i, j), emb, mask, threshold, key=k_recall)
  return Candidates(i, j, c, "ivf", recall, index)
