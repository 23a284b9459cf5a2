"""All-pairs cosine search at scale: an inverted file (IVF) and its exact reference
(docs/design.md, "Candidate pairs").

Loop C needs every pair of memories above a cosine threshold (near-duplicates at >= 0.95 for
compression, high-value pairs at > 0.7 for consolidation). Exact all-pairs over 100,000 x 384 is
~59 s alone on 2 cores, so candidates come from an inverted file (the IVF of Jegou et al. 2011,
"Product quantization for nearest neighbor search", without the quantisation):

1. coarse cells: spherical k-means (`patterns.kmeans_pp` seeding on a sample of 8 rows a cell,
   then `patterns.lloyd` on 32 rows a cell), about `sqrt(n)` cells by default (`build_index`);
2. every row is listed in its nearest cell (the cell's *members*) and probes its `probe` nearest
   cells;
3. every row that probes a cell is compared exactly with the cell's members, in fixed-shape tiles
   of a jitted batched matmul; pairs at or above the threshold are kept, as `(i, j)` with `i < j`,
   each once (`index_pairs`, `ivf_pairs`). New vectors can be searched against the same index
   (`index_query`).

A pair `(a, b)` is found when `b`'s cell is among `a`'s `probe` nearest cells or the other way
round, so recall is 1 when `probe >= cells` and falls only for pairs that straddle distant cells.
The work is about `probe * n^2 / cells` dot products against `n^2 / 2` for brute force.
`brute_force_pairs` is the exact reference (blocked, upper triangle, never an `n x n` matrix in
memory) and `pair_recall` measures the recall of a pair list against it on a sample of query rows.

The matmuls run under `jax.jit` with fixed block shapes (padding masked out) and count their hits
on the device, so the host reads only blocks that hold a pair; the bookkeeping (cell lists, tiles,
pair de-duplication) is NumPy. A pair list costs 12 bytes a pair (`i32, i32, f32`), plus an `int64`
key a pair while it is de-duplicated.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import patterns

__all__ = [
  "IVFIndex",
  "build_index",
  "index_pairs",
  "index_query",
  "ivf_pairs",
  "brute_force_pairs",
  "query_pairs",
  "pair_recall",
  "default_cells",
]

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 on GPUs: thresholds at 0.95 need full f32
_TILE_Q = 256  # rows of a query tile (rows probing a cell)
_TILE_K = 128  # rows of a member tile (rows listed in a cell)
_TILES_PER_CALL = 16
_CHUNK_ROUND = 256
_KMEANS_ITERS = 10  # coarse cells need not be converged, only reasonable
_SAMPLE_PER_CELL = 32  # Lloyd sample: 32 rows a cell (at least 4,096)
_SEED_PER_CELL = 8  # k-means++ seeding (sequential over cells) on the first 8 rows a cell of it


def _empty():
  return np.zeros((0,), np.int32), np.zeros((0,), np.int32), np.zeros((0,), np.float32)


def _block_size(n: int, block: int) -> int:
  """A power of two >= 128 and <= `block`, no larger than needed for `n` rows (few shapes)."""
  if not isinstance(block, int) or block < 1:
    raise ValueError(f"block must be a positive int, got {block!r}")
  b = 128
  while b < n and b < block:
    b *= 2
  return max(1, min(b, block))


@jax.jit
def _gather_unit(emb, idx, n_valid):
  """Rows `emb[idx]` unit-normalised, rows at positions `>= n_valid` zeroed (padding)."""
  x = emb[idx]
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), jnp.float32(1e-12))
  return jnp.where((jnp.arange(idx.shape[0]) < n_valid)[:, None], x, 0.0)


def _emb(emb) -> jax.Array:
  e = jnp.asarray(emb, jnp.float32)
  if e.ndim != 2:
    raise ValueError(f"emb must be f32[N, dim], got shape {e.shape}")
  return e


def _live(emb: jax.Array, mask) -> np.ndarray:
  if mask is None:
    return np.arange(emb.shape[0])
  mask = np.asarray(mask, bool).reshape(-1)
  if mask.shape[0] != emb.shape[0]:
    raise ValueError(f"mask has {mask.shape[0]} rows, emb has {emb.shape[0]}")
  return np.flatnonzero(mask)


def _unit_rows(emb: jax.Array, rows: np.ndarray, multiple: int) -> jax.Array:
  """Unit rows `emb[rows]` on the device, zero-padded to a multiple of `multiple` (at least one)."""
  m = max(multiple, -(-rows.size // multiple) * multiple)
  idx = np.zeros(m, np.int32)
  idx[: rows.size] = rows
  return _gather_unit(emb, jnp.asarray(idx), rows.size)


def _rng(key) -> np.random.Generator:
  """A NumPy generator seeded from a JAX key (host-side sampling compiles nothing)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).reshape(-1))


def _padded(x: jax.Array, rows: np.ndarray, multiple: int = 1024):
  """Rows `x[rows]` zero-padded to a multiple of `multiple`, and weights (0 on the padding)."""
  m = -(-rows.size // multiple) * multiple
  idx = np.zeros(m, np.int32)
  idx[: rows.size] = rows
  w = np.zeros(m, np.float32)
  w[: rows.size] = 1.0
  return x[jnp.asarray(idx)], jnp.asarray(w)


def _dedup(i: np.ndarray, j: np.ndarray, cos: np.ndarray, n: int):
  """Orders each pair as `i < j`, drops self pairs and repeats; sorted by `(i, j)`."""
  keep = i != j
  i, j, cos = i[keep], j[keep], cos[keep]
  a, b = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
  key, first = np.unique(a * n + b, return_index=True)
  return (key // n).astype(np.int32), (key % n).astype(np.int32), cos[first].astype(np.float32)


def _hits(s: np.ndarray, threshold: float):
  return np.nonzero(s >= np.float32(threshold))


# ------------------------------------------------------------------------------- exact search


@functools.partial(jax.jit, static_argnames=("size",))
def _block_pair_sims(x, n_valid, bi, bj, threshold, *, size: int):
  """Cosines of row blocks `bi`, `bj` of `x`, f32[size, size] (`-inf` off the strict upper
  triangle and on padding), and their number of hits `>= threshold`."""
  d = x.shape[1]
  a = jax.lax.dynamic_slice(x, (bi * size, 0), (size, d))
  b = jax.lax.dynamic_slice(x, (bj * size, 0), (size, d))
  s = jnp.matmul(a, b.T, precision=_HIGHEST)
  ia = bi * size + jnp.arange(size)
  ib = bj * size + jnp.arange(size)
  ok = (ia[:, None] < ib[None, :]) & (ib < n_valid)[None, :]
  s = jnp.where(ok, s, -jnp.inf)
  return s, jnp.sum(s >= threshold, dtype=jnp.int32)


def brute_force_pairs(emb, mask, threshold: float, *, block: int = 4096):
  """Every pair of live rows with cosine `>= threshold`, exactly (blocked chunked matmul).

  The upper triangle of blocks is computed one `block x block` matmul at a time, so memory stays
  `O(block^2)` (never an `n x n` matrix).

  Args:
    emb: f32[N, dim] embeddings (normalised here).
    mask: bool[N] live rows (None = all).
    threshold: cosine threshold (inclusive).
    block: rows per block (a power of two up to this is used).

  Returns:
    `(i i32[m], j i32[m], cos f32[m])` with `i < j` row ids of `emb`, sorted by `(i, j)`.
  """
  emb = _emb(emb)
  live = _live(emb, mask)
  n = live.size
  if n < 2:
    return _empty()
  b = _block_size(n, block)
  x = _unit_rows(emb, live, b)
  thr = jnp.float32(threshold)
  ii, jj, cc = [], [], []
  for bi in range(x.shape[0] // b):
    for bj in range(bi, x.shape[0] // b):
      s, count = _block_pair_sims(x, n, bi, bj, thr, size=b)
      if int(count):
        s = np.asarray(s)
        a, c = _hits(s, threshold)
        ii.append(a + bi * b)
        jj.append(c + bj * b)
        cc.append(s[a, c])
  if not ii:
    return _empty()
  a, c, cos = np.concatenate(ii), np.concatenate(jj), np.concatenate(cc)
  order = np.lexsort((c, a))
  return live[a[order]].astype(np.int32), live[c[order]].astype(np.int32), cos[order]


@functools.partial(jax.jit, static_argnames=("size",))
def _query_vs_block(q, n_q, x, n_valid, bj, threshold, *, size: int):
  """Cosines of query rows `q f32[Bq, d]` against row block `bj` of `x`, f32[Bq, size]
  (`-inf` on padding), and their number of hits `>= threshold`."""
  d = x.shape[1]
  b = jax.lax.dynamic_slice(x, (bj * size, 0), (size, d))
  s = jnp.matmul(q, b.T, precision=_HIGHEST)
  ok = (jnp.arange(q.shape[0]) < n_q)[:, None] & ((bj * size + jnp.arange(size)) < n_valid)[None, :]
  s = jnp.where(ok, s, -jnp.inf)
  return s, jnp.sum(s >= threshold, dtype=jnp.int32)


def query_pairs(emb, mask, rows, threshold: float, *, block: int = 4096):
  """Exact pairs `(r, j)` for the given query rows against every live row, `j != r`.

  Costs `len(rows) x n` dot products, blocked (`block` key rows, up to `block` query rows at a
  time). Used to measure recall on a sample and to re-check merged rows.

  Args:
    emb: f32[N, dim] embeddings (normalised here).
    mask: bool[N] live rows (None = all); query rows need not be live.
    rows: i32[q] query row ids.
    threshold: cosine threshold (inclusive).
    block: rows per block.

  Returns:
    `(r i32[m], j i32[m], cos f32[m])`, `r` from `rows`, sorted by `(r, j)`; a pair with both ends
    in `rows` appears once per end.
  """
  emb = _emb(emb)
  rows = np.unique(np.asarray(rows, np.int64).reshape(-1))
  live = _live(emb, mask)
  if rows.size == 0 or live.size == 0:
    return _empty()
  bk = _block_size(live.size, block)
  bq = _block_size(rows.size, block)
  xk = _unit_rows(emb, live, bk)
  qp = _unit_rows(emb, rows, bq)
  thr = jnp.float32(threshold)
  rr, jj, cc = [], [], []
  for qi in range(qp.shape[0] // bq):
    qb = jax.lax.dynamic_slice_in_dim(qp, qi * bq, bq)
    n_q = min(bq, rows.size - qi * bq)
    for bj in range(xk.shape[0] // bk):
      s, count = _query_vs_block(qb, n_q, xk, live.size, bj, thr, size=bk)
      if int(count):
        s = np.asarray(s)
        a, c = _hits(s, threshold)
        r, j = rows[a + qi * bq], live[c + bj * bk]
        keep = r != j
        rr.append(r[keep])
        jj.append(j[keep])
        cc.append(s[a[keep], c[keep]])
  if not rr:
    return _empty()
  r, j, c = np.concatenate(rr), np.concatenate(jj), np.concatenate(cc)
  order = np.lexsort((j, r))
  return r[order].astype(np.int32), j[order].astype(np.int32), c[order].astype(np.float32)


# ------------------------------------------------------------------------------ inverted file


def default_cells(n: int) -> int:
  """The power of two nearest `sqrt(n)` (at least 1).

  About `sqrt(n)` cells balance the tile work (`probe * n^2 / cells`) against the k-means work
  (`cells * sample`); a power of two keeps the compiled shapes the same from one run to the next
  while the number of live rows drifts.
  """
  if n < 2:
    return 1
  return 1 << int(round(math.log2(math.sqrt(n))))


class IVFIndex(NamedTuple):
  """An inverted file over the live rows of an embedding matrix (`build_index`).

  Attributes:
    live: i64[n] row ids of the indexed rows (indexed row `r` is `emb[live[r]]`).
    x: f32[n_pad, d] their unit embeddings on the device (zero padding rows at the end).
    centroids: f32[cells, d] unit cell centroids.
    near: i32[n, probe] each indexed row's nearest cells, nearest first (its cell is `near[:, 0]`).
    k_chunks: i32[>= c + 1, 128] the cells' member lists cut into chunks (indexed rows, -1
      padding; the chunks from `c` on are all padding).
    k_cell: i32[c] the cell of each chunk (chunks of a cell are contiguous).
    probe: cells a query probes.
  """

  live: np.ndarray
  x: jax.Array
  centroids: jax.Array
  near: np.ndarray
  k_chunks: np.ndarray
  k_cell: np.ndarray
  probe: int

  @property
  def cells(self) -> int:
    return self.centroids.shape[0]


@functools.partial(jax.jit, static_argnames=("probe", "block"))
def _nearest_cells(x, centroids, *, probe: int, block: int):
  """Each row's `probe` nearest centroids, best first: i32[n, probe] (rows in blocks)."""
  xb = x.reshape(-1, block, x.shape[1])
  near = jax.lax.map(
    lambda b: jax.lax.top_k(jnp.matmul(b, centroids.T, precision=_HIGHEST), probe)[1], xb
  )
  return near.reshape(-1, probe).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("same",))
def _tile_sims(xq, xk, q_chunks, k_chunks, qc, kc, threshold, *, same: bool):
  """Cosines of the tiles `(xq[q_chunks[qc[t]]], xk[k_chunks[kc[t]]])`: f32[T, TQ, TK] (`-inf` on
  padding, and on the diagonal when `same`: `xq` is `xk`), and the number of hits `>= threshold`
  of each tile, i32[T].
  """
  qi = q_chunks[qc]  # [T, TQ] row ids, -1 = padding
  ki = k_chunks[kc]  # [T, TK]
  s = jnp.einsum("tqd,tkd->tqk", xq[qi], xk[ki], precision=_HIGHEST)
  ok = (qi >= 0)[:, :, None] & (ki >= 0)[:, None, :]
  if same:
    ok = ok & (qi[:, :, None] != ki[:, None, :])
  s = jnp.where(ok, s, -jnp.inf)
  return s, jnp.sum(s >= threshold, axis=(1, 2), dtype=jnp.int32)


def _chunk_lists(cell: np.ndarray, rows: np.ndarray, n_cells: int, size: int):
  """Splits per-cell row lists into fixed-size chunks.

  Returns `(chunks i32[>= c + 1, size]` (-1 padded; chunks from `c` on are all padding),
  `chunk_cell i32[c])`.
  """
  order = np.argsort(cell, kind="stable")
  cell, rows = cell[order], rows[order]
  count = np.bincount(cell, minlength=n_cells)
  n_chunks = -(-count // size)
  start = np.concatenate([[0], np.cumsum(count)[:-1]])
  chunk_start = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
  pos = np.arange(cell.size) - start[cell]  # position inside its cell's list
  flat = (chunk_start[cell] + pos // size) * size + pos % size
  total = int(n_chunks.sum())
  # Padded to a multiple of 256 chunks (at least one all-padding chunk at the end) so that the
  # jitted tile kernel sees few distinct shapes.
  rows_out = -(-(total + 1) // _CHUNK_ROUND) * _CHUNK_ROUND
  chunks = np.full((rows_out * size,), -1, np.int32)
  chunks[flat] = rows
  chunk_cell = np.repeat(np.arange(n_cells), n_chunks).astype(np.int32)
  return chunks.reshape(rows_out, size), chunk_cell


def build_index(emb, mask, *, cells: int = 0, probe: int = 4, key, block: int = 4096) -> IVFIndex:
  """Builds the inverted file of the live rows of `emb` (module docstring, steps 1-2).

  Args:
    emb: f32[N, dim] embeddings (normalised here).
    mask: bool[N] live rows (None = all); dead rows are not indexed.
    cells: number of k-means cells, at most `n`; 0 = `default_cells(n)` (a power of two near
      `sqrt(n)`).
    probe: cells each query probes (its nearest ones); `probe >= cells` makes searches exact.
    key: PRNG key of the k-means sample and its k-means++ seeding.
    block: rows per block when assigning rows to cells.

  Returns:
    An `IVFIndex`.
  """
  if not isinstance(probe, int) or probe < 1:
    raise ValueError(f"build_index: probe must be a positive int, got {probe!r}")
  if not isinstance(cells, int) or cells < 0:
    raise ValueError(f"build_index: cells must be an int >= 0, got {cells!r}")
  emb = _emb(emb)
  live = _live(emb, mask)
  n = live.size
  n_cells = max(1, min(cells or default_cells(n), n))
  probe = min(probe, n_cells)
  b = _block_size(n, block)
  x = _unit_rows(emb, live, b)
  if n == 0:
    centroids = jnp.zeros((1, emb.shape[1]), jnp.float32)
    near = np.zeros((0, probe), np.int32)
  else:
    # Seeding is sequential over the cells, so it runs on a smaller random subsample; Lloyd
    # iterations then refine the seeds on the larger one. Both samples are padded with rows of
    # weight 0 to a multiple of 1,024 rows, so their compiled shapes repeat as `n` drifts.
    k_sample, k_means = jax.random.split(key)
    n_sample = min(n, max(_SAMPLE_PER_CELL * n_cells, 4096))
    n_seed = min(n_sample, max(_SEED_PER_CELL * n_cells, 1024))
    pick = _rng(k_sample).permutation(n)[:n_sample]
    sample, w = _padded(x, pick)
    seed_rows, seed_w = _padded(x, pick[:n_seed])
    seeds = patterns.kmeans_pp(k_means, seed_rows, n_cells, n_iter=0, weights=seed_w).centroids
    centroids = patterns.lloyd(sample, seeds, n_iter=_KMEANS_ITERS, weights=w).centroids
    near = np.asarray(_nearest_cells(x, centroids, probe=probe, block=b))[:n]
  k_chunks, k_cell = _chunk_lists(near[:, 0], np.arange(n, dtype=np.int32), n_cells, _TILE_K)
  return IVFIndex(live, x, centroids, near, k_chunks, k_cell, probe)


def _search(index: IVFIndex, xq: jax.Array, q_near: np.ndarray, threshold: float, same: bool):
  """Compares each query with the members of its probed cells: raw `(q, member, cos)` hits.

  `same`: the queries are the indexed rows themselves (self pairs are skipped).
  """
  n_cells = index.cells
  nq, probe = q_near.shape
  q_rows = np.repeat(np.arange(nq, dtype=np.int32), probe)
  q_chunks, q_cell = _chunk_lists(q_near.reshape(-1), q_rows, n_cells, _TILE_Q)
  # Tiles: every query chunk of a cell against every member chunk of the same cell.
  k_first = np.searchsorted(index.k_cell, np.arange(n_cells))
  per_q = np.bincount(index.k_cell, minlength=n_cells)[q_cell]
  qc = np.repeat(np.arange(q_cell.size), per_q)
  kc = np.arange(qc.size) - np.repeat(np.cumsum(per_q) - per_q, per_q)
  kc += np.repeat(k_first[q_cell], per_q)
  t = _TILES_PER_CALL
  m = -(-qc.size // t) * t
  pad_q, pad_k = q_chunks.shape[0] - 1, index.k_chunks.shape[0] - 1  # all-padding chunks
  qc = np.concatenate([qc, np.full(m - qc.size, pad_q)]).astype(np.int32)
  kc = np.concatenate([kc, np.full(m - kc.size, pad_k)]).astype(np.int32)
  qd, kd = jnp.asarray(q_chunks), jnp.asarray(index.k_chunks)
  thr = jnp.float32(threshold)
  ii, jj, cc = [], [], []
  for s in range(0, m, t):
    sims, count = _tile_sims(
      xq, index.x, qd, kd, jnp.asarray(qc[s : s + t]), jnp.asarray(kc[s : s + t]), thr, same=same
    )
    sel = np.flatnonzero(np.asarray(count))
    if sel.size:
      sub = np.asarray(sims)[sel]
      tt, a, c = _hits(sub, threshold)
      ii.append(q_chunks[qc[s + sel[tt]], a])
      jj.append(index.k_chunks[kc[s + sel[tt]], c])
      cc.append(sub[tt, a, c])
  if not ii:
    return _empty()
  return np.concatenate(ii), np.concatenate(jj), np.concatenate(cc)


def index_pairs(index: IVFIndex, threshold: float):
  """Every pair of indexed rows with cosine `>= threshold` the index finds (module docstring).

  Returns:
    `(i i32[m], j i32[m], cos f32[m])` with `i < j` row ids of `emb`, sorted by `(i, j)`; every pair
    once; each cosine exact (float32, as in `brute_force_pairs`).
  """
  n = index.live.size
  if n < 2:
    return _empty()
  a, b, c = _search(index, index.x, index.near, threshold, same=True)
  i, j, c = _dedup(a, b, c, n)
  return index.live[i].astype(np.int32), index.live[j].astype(np.int32), c


def index_query(index: IVFIndex, queries, threshold: float):
  """Searches new vectors against the index: each probes its `index.probe` nearest cells.

  Args:
    index: the index.
    queries: f32[q, d] query embeddings (normalised here).
    threshold: cosine threshold (inclusive).

  Returns:
    `(qi i32[m], j i32[m], cos f32[m])`: query position, row id of `emb`, cosine; sorted by
    `(qi, j)`. Indexed rows hold the embeddings they had when the index was built.
  """
  q = _emb(queries)
  if q.shape[0] == 0 or index.live.size == 0:
    return _empty()
  b = _block_size(q.shape[0], 4096)
  xq = _unit_rows(q, np.arange(q.shape[0]), b)
  near = np.asarray(_nearest_cells(xq, index.centroids, probe=index.probe, block=b))
  qi, r, c = _search(index, xq, near[: q.shape[0]], threshold, same=False)
  order = np.lexsort((r, qi))
  return qi[order].astype(np.int32), index.live[r[order]].astype(np.int32), c[order]


def ivf_pairs(
  emb,
  mask,
  threshold: float,
  *,
  cells: int = 0,
  probe: int = 4,
  key,
  block: int = 4096,
):
  """Pairs of live rows with cosine `>= threshold`, found with an inverted file (module docstring).

  `build_index` then `index_pairs`.

  Args:
    emb: f32[N, dim] embeddings (normalised here).
    mask: bool[N] live rows (None = all); dead rows never appear.
    threshold: cosine threshold (inclusive).
    cells: number of k-means cells, at most `n`; 0 = `default_cells(n)` (a power of two near
      `sqrt(n)`).
    probe: cells each row probes (its nearest ones, its own included); `probe >= cells` is exact.
    key: PRNG key of the k-means++ seeding and of the sample it is fitted on.
    block: rows per block when assigning rows to cells.

  Returns:
    `(i i32[m], j i32[m], cos f32[m])` with `i < j` row ids of `emb`, sorted by `(i, j)`; every
    pair once. Each pair's cosine is exact (computed in float32 like `brute_force_pairs`).
  """
  index = build_index(emb, mask, cells=cells, probe=probe, key=key, block=block)
  return index_pairs(index, threshold)


def pair_recall(pairs, emb, mask, threshold: float, *, sample: int = 1000, key) -> float:
  """Recall of a pair list against the exact pairs of a sample of query rows.

  `sample` live rows are drawn without replacement; every exact pair `(r, j)` of a sampled row `r`
  (`query_pairs`, each row against all live rows) counts as found when `pairs` holds it in either
  order. An unbiased estimate of the recall over all pairs, weighted by pairs per row.

  Args:
    pairs: `(i, j, ...)` arrays or an i32[m, 2] array of found pairs.
    emb: f32[N, dim] embeddings.
    mask: bool[N] live rows (None = all).
    threshold: the cosine threshold the pairs were searched at.
    sample: query rows to check (all live rows when fewer).
    key: PRNG key of the sample.

  Returns:
    Found / exact over the sampled rows; NaN when the sample has no exact pair (nothing to recall).
  """
  if isinstance(pairs, tuple | list):
    pi, pj = np.asarray(pairs[0], np.int64), np.asarray(pairs[1], np.int64)
  else:
    p = np.asarray(pairs, np.int64).reshape(-1, 2)
    pi, pj = p[:, 0], p[:, 1]
  emb = _emb(emb)
  n_rows = emb.shape[0]
  live = _live(emb, mask)
  if live.size == 0:
    return float("nan")
  take = min(sample, live.size)
  rows = live[_rng(key).choice(live.size, take, replace=False)]
  r, j, _ = query_pairs(emb, mask, rows, threshold)
  if r.size == 0:
    return float("nan")
  found = np.unique(np.minimum(pi, pj) * n_rows + np.maximum(pi, pj))
  want = np.minimum(r, j).astype(np.int64) * n_rows + np.maximum(r, j)
  return float(np.mean(np.isin(want, found)))
