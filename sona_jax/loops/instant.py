"""Loop A: the per-request learning step, one fused, jitted, donated state transition.

`instant_step(state, interaction, cfg)` validates the interaction, records its trajectory, applies
the Hebbian edge updates, takes one micro-LoRA step and pushes the learning signal for Loop B, all
in one jitted call (docs/design.md, "Loop A"; seed section 2).

Hot-path economy (docs/design.md, "Hot path"): on CPU a per-request call costs mostly dispatch,
1-3 us per array passed in. So the call takes only the sub-state Loop A changes (`LoopAState`: the
micro-LoRA, the packed edge and node arrays, the two ring buffers and the counters), donates it so
every update happens in place, reads the base LoRA and the embedding table without copying,
receives the interaction as ONE packed vector (`types.pack`), reads embedding rows with unrolled
`dynamic_slice` (an XLA:CPU gather on the large table costs more) and node rows with one small
gather, and never retraces after the first call.

XLA:CPU runs the ~50 small kernels of a call as a dataflow graph and hands independent ones to
its thread pool; on a small idle machine waking a pool thread costs more than the arithmetic. The
step is therefore compiled with the memory-optimised scheduler (`_COMPILER_OPTIONS`, per-function
options), whose buffer reuse chains the kernels so that they run inline in the calling thread
(dim 768 on 2 cores: ~150-200 us p50 before, ~50-75 us after).

Each kernel costs ~1 us on XLA:CPU's thunk runtime whatever it computes, so the step is written
for few kernels (`benchmarks/bench_instant.py` counts them in the optimised HLO: 79 before this
layout, 46 at `max_ids=4` and 51 at the default 10): the inner products over `dim` that do not
depend on each other share one multiply-and-sum, validation is one elementwise pass and one
reduction, the Hebbian row update is elementwise, and everything read from an array that is
updated in place is read first, behind one barrier (`_read_rows`), so XLA copies nothing.

`instant_scan` gives a batch sequential semantics but runs sequentially only what must be: the
micro-LoRA chain (each step reads the adapter the previous one wrote) is a lean `lax.scan`;
validation, feedback inputs and records are vectorised, Hebbian updates run in rounds (the r-th
update of every anchor at once) and node statistics in closed form.

On CPU the whole transition is one native custom call (`sona_jax.native`, built on first use with
the system C++ compiler): per interaction, in order, everything above in a few passes over `dim`,
in place. A single step is one kernel instead of ~50, and a batch runs at the speed of its memory
reads rather than ~50 kernels per interaction. `jax.lax.platform_dependent` keeps the JAX rule
above for GPU and TPU, and where the native library is unavailable (no compiler,
`SONA_JAX_NATIVE=0`). Both paths make the same decisions and write the same records and integers;
adapter floats agree to rounding (tests/test_native.py).

Bad values never reach the state: an interaction with a non-finite or out-of-range value, an id
out of range, duplicated or pointing at a dead node, or a step that would come out non-finite, is
masked out. The state is then bit-identical to before except the `REJECTED` counter, and the report
says why (`InstantReport.reasons`, a bit mask of the `BAD_*` constants).

The input state is donated: use the returned state, never the one passed in (its Loop A arrays are
deleted). Copy it first (`jax.tree.map(jnp.copy, state)`) to keep it.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import buffer, graph, lora, native, types
from sona_jax.config import SonaConfig
from sona_jax.state import LAST_TIME, MICRO_UPDATES, PROCESSED, REJECTED, SonaState

__all__ = [
  "InstantReport",
  "LoopAState",
  "instant_step",
  "instant_scan",
  "step_packed",
  "scan_packed",
  "BAD_QUERY",
  "BAD_QUALITY",
  "BAD_FEEDBACK",
  "BAD_LATENCY",
  "BAD_TIER",
  "BAD_CONTEXT",
  "BAD_TIME",
  "BAD_GRAD",
  "BAD_IDS",
  "BAD_ANCHOR",
  "NONFINITE_STEP",
  "BAD_STALE",
  "REASONS",
]

BAD_QUERY = 1 << 0  # non-finite query
BAD_QUALITY = 1 << 1  # quality non-finite or outside [0, 1]
BAD_FEEDBACK = 1 << 2  # feedback neither NaN nor in [0, 1]
BAD_LATENCY = 1 << 3  # latency non-finite or < 0, target non-finite or <= 0, or ratio overflows
BAD_TIER = 1 << 4  # tier outside [0, n_tiers)
BAD_CONTEXT = 1 << 5  # context_tokens < 0
BAD_TIME = 1 << 6  # time < 0
BAD_GRAD = 1 << 7  # has_grad with a non-finite gradient
BAD_IDS = 1 << 8  # used/unused id below -1 or duplicated
BAD_ANCHOR = 1 << 9  # anchor below -1
NONFINITE_STEP = 1 << 10  # the micro-LoRA step would not be finite (e.g. a 1e38 query)
BAD_STALE = 1 << 11  # an id or the anchor names no live memory: evicted, merged, never issued
_PADDING = 1 << 30  # a padding row of a bucketed batch: never applied, never counted
REASONS = {
  "BAD_QUERY": BAD_QUERY,
  "BAD_QUALITY": BAD_QUALITY,
  "BAD_FEEDBACK": BAD_FEEDBACK,
  "BAD_LATENCY": BAD_LATENCY,
  "BAD_TIER": BAD_TIER,
  "BAD_CONTEXT": BAD_CONTEXT,
  "BAD_TIME": BAD_TIME,
  "BAD_GRAD": BAD_GRAD,
  "BAD_IDS": BAD_IDS,
  "BAD_ANCHOR": BAD_ANCHOR,
  "NONFINITE_STEP": NONFINITE_STEP,
  "BAD_STALE": BAD_STALE,
}

# Columns of `InstantReport.values`.
R_ACCEPTED, R_REASONS, R_MICRO_UPDATED, R_STEP_NORM, R_EDGES_CHANGED = range(5)
N_REPORT = 5


class InstantReport(NamedTuple):
  """What one Loop A step did, packed into one array (one output leaf instead of five).

  Attributes:
    values: f32[..., 5]: accepted (0/1), rejection reasons (int32 bits of the `BAD_*` mask),
      micro_updated (0/1), step_norm (unclipped micro-LoRA step norm), edges_changed (count).
  """

  values: jax.Array

  @property
  def accepted(self) -> jax.Array:
    return self.values[..., R_ACCEPTED] > 0

  @property
  def reasons(self) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(self.values[..., R_REASONS]), jnp.int32)

  @property
  def micro_updated(self) -> jax.Array:
    return self.values[..., R_MICRO_UPDATED] > 0

  @property
  def step_norm(self) -> jax.Array:
    return self.values[..., R_STEP_NORM]

  @property
  def edges_changed(self) -> jax.Array:
    return self.values[..., R_EDGES_CHANGED].astype(jnp.int32)

  def reason_names(self) -> list[str]:
    """Names of the rejection reasons of a single (unbatched) report; [] when accepted.

    Examples:
      >>> import numpy as np
      >>> bits = np.array([BAD_QUALITY | BAD_IDS], np.int32).view(np.float32)[0]
      >>> InstantReport(np.array([0.0, bits, 0.0, 0.0, 0.0], np.float32)).reason_names()
      ['BAD_QUALITY', 'BAD_IDS']
      >>> InstantReport(np.array([1.0, 0.0, 1.0, 0.5, 2.0], np.float32)).reason_names()
      []
    """
    bits = int(np.asarray(self.values).view(np.int32)[R_REASONS])
    return [name for name, bit in REASONS.items() if bits & bit]


class LoopAState(NamedTuple):
  """The part of `SonaState` Loop A changes: passed into the jitted step and donated."""

  micro: lora.LoRA
  edges: jax.Array
  node: jax.Array
  signals: buffer.RingBuffer
  trajectories: buffer.RingBuffer
  counters: jax.Array


def _bits(x) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.float32)


def _row(table: jax.Array, i) -> jax.Array:
  """`table[i]` as a dynamic slice (an XLA:CPU gather on a large table costs ~80 us)."""
  return jax.lax.dynamic_index_in_dim(table, i, axis=0, keepdims=False)


def _put_row(table: jax.Array, row: jax.Array, i) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(table, row, i, axis=0)


def _slot_ids(it: types.Interaction, n_nodes: int) -> types.Interaction:
  """`it` with its memory ids replaced by their slots (-1 padding kept): the graph's arrays and
  edges are indexed by slot. Validation has already rejected ids that name no live memory."""
  k = it.used.shape[-1]
  ids = jnp.concatenate([it.used, it.unused, it.anchor[..., None]], axis=-1)
  slots = jnp.where(ids >= 0, ids % jnp.int32(n_nodes), ids)  # one (costly) remainder for all
  return it._replace(used=slots[..., :k], unused=slots[..., k : 2 * k], anchor=slots[..., 2 * k])


def _read_rows(node_tab, edges, slots: types.Interaction, small=()):
  """Reads the node rows of the ids and the anchor, the anchor's edge row and the `small` int32
  arrays (counters, ring-buffer meta) before anything is written.

  Everything read from an array that is written later is read here, in one concatenation behind
  an optimization barrier: otherwise XLA fuses the row reads into the in-place updates and must
  copy the whole table to keep them correct (measured: 4 full-table copies, 2x slower), and it
  copies each small array it reads and updates in place (a kernel each). The node rows come from
  one small gather (one kernel, where 9 dynamic slices were 9).

  Returns:
    `(nodes, edge_row, small)`: i32[2k + 1, node width] rows of the used and unused ids and of
    the anchor (slot 0 for padding), i32[3K] the anchor's edge row, and copies of `small`.
  """
  ids = jnp.concatenate([slots.used, slots.unused, slots.anchor[None]])
  safe = jnp.maximum(ids, 0)
  node_w, edge_w = node_tab.shape[1], edges.shape[1]
  reads = jnp.concatenate([node_tab[safe].reshape(-1), _row(edges, safe[-1]), *small])
  reads = jax.lax.optimization_barrier(reads)
  n = ids.shape[0] * node_w
  out, at = [], n + edge_w
  for x in small:
    out.append(reads[at : at + x.shape[0]])
    at += x.shape[0]
  return reads[:n].reshape(ids.shape[0], node_w), reads[n : n + edge_w], tuple(out)


def _validate(nodes9, it: types.Interaction, sq_x, sq_grad, cfg: SonaConfig):
  """Checks every value of an interaction (one reason bit each).

  `nodes9` are the node rows of its 2k ids and its anchor (`_read_rows`); `sq_x`, `sq_grad` the
  squared norms of its query and gradient."""
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  q, fb = it.quality, it.feedback
  fb_given = ~jnp.isnan(fb)
  ids = jnp.concatenate([it.used, it.unused])  # [2k]
  present = ids >= 0
  anchor = it.anchor
  # Duplicates as shifted comparisons: elementwise, so they fuse with the other checks (a [2k, 2k]
  # match matrix needs a reduction, a kernel of its own).
  dup = jnp.zeros(ids.shape, jnp.bool_)
  for shift in range(1, 2 * k):
    dup = dup | ((jnp.roll(ids, shift) == ids) & jnp.roll(present, shift))
  dup = dup & present
  # An id names a live memory when its slot is alive and its tag matches the slot's generation
  # (`graph.memory_id`): an evicted or merged memory's id stays stale after its slot is reused.
  ids9 = jnp.concatenate([ids, anchor[None]])  # the 2k ids, then the anchor
  live9 = (nodes9[:, graph.ALIVE] != 0) & (
    ids9 // jnp.int32(n_nodes) == graph.id_tag(nodes9[:, graph.GENERATION], n_nodes)
  )
  lat, target = it.latency_ms, it.target_latency_ms
  scalar_checks = [
    (BAD_QUALITY, jnp.isfinite(q) & (q >= 0.0) & (q <= 1.0)),
    (BAD_FEEDBACK, ~fb_given | (jnp.isfinite(fb) & (fb >= 0.0) & (fb <= 1.0))),
    (
      BAD_LATENCY,
      jnp.isfinite(lat)
      & (lat >= 0.0)
      & jnp.isfinite(target)
      & (target > 0.0)
      & jnp.isfinite(lat / target),
    ),
    (BAD_TIER, (it.tier >= 0) & (it.tier < cfg.n_tiers)),
    (BAD_CONTEXT, it.context_tokens >= 0),
    (BAD_TIME, it.time >= 0),
    (BAD_ANCHOR, anchor >= -1),
    # A query or gradient is bad when non-finite or so large that its squared norm overflows
    # f32: one dot product checks every entry at once.
    (BAD_QUERY, jnp.isfinite(sq_x)),
    (BAD_GRAD, ~it.has_grad | jnp.isfinite(sq_grad)),
  ]
  # The checks are laid out as one vector of reason bits, one entry per id and one for the anchor
  # and the scalars, built elementwise and OR-reduced at once: each reduction is a kernel (and
  # XLA splits a reduction of a concatenation into one per part).
  bit = lambda bad, b: jnp.where(bad, b, 0).astype(jnp.int32)
  scalar_bits = functools.reduce(jnp.bitwise_or, [bit(~ok, b) for b, ok in scalar_checks])
  pos = jnp.arange(2 * k + 1, dtype=jnp.int32)
  reason_bits = (
    bit((pos < 2 * k) & (ids9 < -1), BAD_IDS)
    | bit(jnp.concatenate([dup, jnp.zeros((1,), jnp.bool_)]), BAD_IDS)
    | bit((ids9 >= 0) & ~live9, BAD_STALE)
    | jnp.where(pos == 2 * k, scalar_bits, 0)
  )
  reasons = jax.lax.reduce(reason_bits, jnp.int32(0), jax.lax.bitwise_or, (0,))
  return reasons


_ROWS_PER_KERNEL = 8


def _weighted_rows(emb, ids, wts):
  """`sum_j wts[j] emb[ids[j]]`, the rows read with unrolled dynamic slices (an XLA:CPU gather on
  the large table costs more) in groups of `_ROWS_PER_KERNEL`: XLA fuses up to about that many
  row reads into one kernel, and more (top-10 retrieval has 20 ids) into one kernel each."""
  total = None
  for g in range(0, ids.shape[0], _ROWS_PER_KERNEL):
    j = range(g, min(g + _ROWS_PER_KERNEL, ids.shape[0]))
    rows = jnp.stack([_row(emb, ids[i]) for i in j])
    part = jnp.sum(wts[g : g + len(j), None] * rows, axis=0)
    total = part if total is None else total + part
  return total


class _Feedback(NamedTuple):
  """What the feedback direction needs that does not depend on the micro-LoRA."""

  x: jax.Array  # f32[dim] query
  y_base: jax.Array  # f32[dim] query through the base LoRA
  diff: jax.Array  # f32[dim] mean(used) - mean(unused) embeddings (0 for an empty side)
  q_eff: jax.Array  # f32 learning quality (explicit feedback when given)
  open_gate: jax.Array  # bool: has ids to learn from and passes the seed's gate
  grad: jax.Array  # f32[dim] supervised gradient
  has_grad: jax.Array  # bool
  sq_x: jax.Array  # f32 |x|^2
  sq_grad: jax.Array  # f32 |grad|^2
  lr: jax.Array  # f32 micro-LoRA learning rate (the live knob, or `cfg.micro_lr`)


def _feedback(base, micro_a, emb, it: types.Interaction, lr, cfg: SonaConfig):
  """Reads the memory embeddings of the ids and everything else the direction needs; `it` has
  slots for ids (`_slot_ids`).

  Returns `(feedback, xa, counts)`: `xa = x A` of the micro-LoRA, which the micro step needs
  first, and `counts = [n_used, n_unused]` (f32), which the records need.
  """
  k = cfg.max_ids
  x, q, fb = it.query, it.quality, it.feedback
  q_eff = jnp.where(jnp.isnan(fb), q, fb)  # explicit feedback beats the estimate
  ids = jnp.concatenate([it.used, it.unused])
  present = ids >= 0
  safe_ids = jnp.maximum(ids, 0)
  counts = jnp.sum(present.reshape(2, k).astype(jnp.float32), axis=1)  # one reduction for both
  n_used, n_unused = counts[0], counts[1]
  # Weights of the mean of used minus the mean of unused memories, in one matrix product.
  sign = jnp.asarray([1.0, -1.0], jnp.float32)
  wts = present.astype(jnp.float32) * jnp.repeat(sign / jnp.maximum(counts, 1.0), k)
  latency_ratio = it.latency_ms / it.target_latency_ms
  gate = (jnp.abs(q_eff - 0.5) > cfg.gate_quality_margin) | (latency_ratio > cfg.gate_latency_ratio)
  # Every inner product over `dim` that does not depend on the micro step, in ONE multiply-and-sum:
  # x A, x A_base, |x|^2, |grad|^2. On XLA:CPU each reduction over `dim` costs three kernels
  # (product, partial sums, total) and a matrix-vector product is a library call (~10-20 us at
  # dim 4096), so four separate reductions were twelve kernels and this is three.
  r_m, r_b = micro_a.shape[1], base.a.shape[1]
  lhs = jnp.concatenate(
    [jnp.broadcast_to(x[:, None], (x.shape[0], r_m + r_b + 1)), it.grad[:, None]], 1
  )
  rhs = jnp.concatenate([micro_a, base.a, x[:, None], it.grad[:, None]], axis=1)
  sums = jnp.sum(lhs * rhs, axis=0)
  xa, xa_base = sums[:r_m], sums[r_m : r_m + r_b]
  y_base = x + jnp.float32(cfg.base_scale) * jnp.sum(xa_base[:, None] * base.b, axis=0)
  fbk = _Feedback(
    x=x,
    y_base=y_base,
    diff=_weighted_rows(emb, safe_ids, wts),
    q_eff=q_eff,
    open_gate=(n_used + n_unused > 0) & gate,
    grad=it.grad,
    has_grad=it.has_grad,
    sq_x=sums[r_m + r_b],
    sq_grad=sums[r_m + r_b + 1],
    lr=lr,
  )
  return fbk, xa, counts


def _feedback_batch(base, emb, its: types.Interaction, lr, cfg: SonaConfig) -> _Feedback:
  """`_feedback` for a batch (leading axis on every field), with the same values.

  The embedding rows are read as one gather per id slot and accumulated with their weights: on
  XLA:CPU that is ~15x faster than gathering a [B, 2k, dim] block and contracting it.
  """
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  x, q, fb = its.query, its.quality, its.feedback
  q_eff = jnp.where(jnp.isnan(fb), q, fb)
  ids = jnp.concatenate([its.used, its.unused], axis=1)  # [B, 2k], slots
  present = (ids >= 0).astype(jnp.float32)
  safe_ids = jnp.clip(ids, 0, n_nodes - 1)
  n_used = jnp.sum(present[:, :k], axis=1, keepdims=True)
  n_unused = jnp.sum(present[:, k:], axis=1, keepdims=True)
  wts = jnp.concatenate(
    [present[:, :k] / jnp.maximum(n_used, 1.0), -present[:, k:] / jnp.maximum(n_unused, 1.0)],
    axis=1,
  )
  diff = sum(wts[:, j : j + 1] * jnp.take(emb, safe_ids[:, j], axis=0) for j in range(2 * k))
  latency_ratio = its.latency_ms / its.target_latency_ms
  gate = (jnp.abs(q_eff - 0.5) > cfg.gate_quality_margin) | (latency_ratio > cfg.gate_latency_ratio)
  return _Feedback(
    x=x,
    y_base=lora.apply(base, x, x, scale=cfg.base_scale),
    diff=diff,
    q_eff=q_eff,
    open_gate=(n_used[:, 0] + n_unused[:, 0] > 0) & gate,
    grad=its.grad,
    has_grad=its.has_grad,
    sq_x=jnp.sum(x * x, axis=1),
    sq_grad=jnp.sum(its.grad * its.grad, axis=1),
    lr=lr,
  )


def _learn(micro, f: _Feedback, reasons, cfg: SonaConfig, xa=None):
  """The micro-LoRA step of one interaction, applied only when it is accepted.

  See docs/design.md, "Micro-LoRA step", and "The feedback rule's tangent space" for the change
  from the original rule. The gradient at the adapted query `y_hat` is the caller's `grad`
  (supervised), or from feedback `g = -(1 - q) t / |t|`: move the adapted query toward used
  memories and away from unused ones, more strongly the worse the answer; never by a signed
  advantage (the design document says why). The original rule's cases (used - unused,
  used - y_hat, y_hat - unused) are taken in the tangent space of y_hat, `t = diff - (diff . u) u`
  with `u = y_hat / |y_hat|`: retrieval is by cosine, and the radial part only rescales y_hat.
  Left in, it is harmful: with only unused memories, `y_hat - mean(unused)` pushes y_hat along
  itself, drift included, and on the load_digits drift stream the adapter learnt to amplify the
  drift (precision@5 0.63 -> 0.10). Projected, every case is the cosine gradient of used minus
  unused memories.

  The step itself is `lora.micro_update_fast`, given the inner products computed here: all the
  reductions over `dim` come from two multiply-and-sums after `x A` (each reduction is a kernel
  of its own on CPU, and this chain is the sequential part of `instant_scan`). `xa = x A` may come
  precomputed (`_feedback` computes it with the other products). Returns
  `(micro, step_norm, reasons, active)`.
  """
  a, b = micro.a, micro.b  # [d, r], [r, d]
  s = jnp.float32(cfg.micro_scale)
  # Products as multiply-and-sum: XLA:CPU sends tiny matrix products to a library call that
  # costs ~10 us each, while a multiply-sum fuses into one cheap kernel.
  if xa is None:
    xa = jnp.sum(f.x[:, None] * a, axis=0)  # [r]: x A
  y = f.y_base + s * jnp.sum(xa[:, None] * b, axis=0)  # y_hat
  m1 = jnp.sum(jnp.stack([y, f.diff]) * y[None, :], axis=1)  # |y|^2, diff . y
  t = f.diff - (m1[1] / jnp.maximum(m1[0], 1e-30)) * y
  r = b.shape[0]
  m2 = jnp.sum(jnp.concatenate([(t * t)[None, :], b * t[None, :], b * f.grad[None, :]]), axis=1)
  sq_t, bt, b_grad = m2[0], m2[1 : 1 + r], m2[1 + r :]  # |t|^2, B t, B grad
  t_norm = jnp.sqrt(sq_t)
  fb_scale = -(1.0 - f.q_eff) / jnp.maximum(t_norm, 1e-12)
  active = f.has_grad | (f.open_gate & (t_norm > 1e-12))
  g = jnp.where(f.has_grad, f.grad, fb_scale * t)
  new, step_norm = lora.micro_update_fast(
    micro,
    f.x,
    g,
    f.lr,
    active.astype(jnp.float32),
    scale=s,
    clip=cfg.micro_clip,
    xa=xa,
    gb=jnp.where(f.has_grad, b_grad, fb_scale * bt),  # B g
    sq_x=f.sq_x,
    sq_g=jnp.where(f.has_grad, f.sq_grad, fb_scale * fb_scale * sq_t),
  )
  # A finite step norm bounds every entry of the step: one scalar check covers both factors.
  reasons = reasons | jnp.where(jnp.isfinite(step_norm), 0, NONFINITE_STEP).astype(jnp.int32)
  ok = reasons == 0
  micro = lora.LoRA(a=jnp.where(ok, new.a, a), b=jnp.where(ok, new.b, b))
  return micro, jnp.where(ok, step_norm, 0.0), reasons, active


def _edges(edges, edge_row, it: types.Interaction, reasons, cfg: SonaConfig):
  """Hebbian update of the anchor's edge row (seed: +5% per use, -2% per skip); `it` has slots."""
  anchor = it.anchor
  new_row, changed = graph.hebbian_row(
    edge_row,
    anchor,
    it.used,
    it.unused,
    strengthen_rate=cfg.hebbian_strengthen,
    weaken_rate=cfg.hebbian_weaken,
  )
  do = (reasons == 0) & (anchor >= 0)
  safe_anchor = jnp.clip(anchor, 0, cfg.graph_capacity - 1)
  edges = _put_row(edges, jnp.where(do, new_row, edge_row), safe_anchor)
  return edges, jnp.where(do, changed, 0)


def _nodes(node_tab, id_nodes, it: types.Interaction, q_eff, reasons, cfg: SonaConfig):
  """Access count, last access and quality EMA of the used memories (one scatter of k rows);
  `it` has slots."""
  k = cfg.max_ids
  present = it.used >= 0
  safe_ids = jnp.clip(it.used, 0, cfg.graph_capacity - 1)
  ema = jnp.float32(cfg.node_quality_ema)
  used_rows = id_nodes[:k]
  old_q = jax.lax.bitcast_convert_type(used_rows[:, graph.QUALITY], jnp.float32)
  new_q = jax.lax.bitcast_convert_type((1.0 - ema) * old_q + ema * q_eff, jnp.int32)
  col = jnp.arange(used_rows.shape[1], dtype=jnp.int32)[None, :]  # masks instead of scatters
  new_rows = jnp.where(col == graph.ACCESS, used_rows + 1, used_rows)
  new_rows = jnp.where(col == graph.LAST_ACCESS, it.time, new_rows)
  new_rows = jnp.where(col == graph.QUALITY, new_q[:, None], new_rows)
  new_rows = jnp.where(reasons == 0, new_rows, used_rows)
  # One scatter of the k rows (ids are distinct); padded slots point past the table and drop.
  targets = jnp.where(present, safe_ids, cfg.graph_capacity)
  return node_tab.at[targets].set(new_rows, mode="drop", unique_indices=True)


def _record_rows(it: types.Interaction, q_eff, cfg: SonaConfig, counts=None):
  """The packed signal row (Loop A -> Loop B) and trajectory row of one interaction; `counts`
  (`[n_used, n_unused]`) when the caller has them."""
  k = cfg.max_ids
  signal_row = jnp.concatenate(
    [
      it.query,
      jnp.stack(
        [
          q_eff,
          it.quality,
          it.latency_ms / it.target_latency_ms,
          _bits(it.tier),
          _bits(it.context_tokens),
          it.feedback,
          _bits(it.time),
          _bits(it.anchor),
        ]
      ),
    ]
  )
  if counts is None:
    present = jnp.concatenate([it.used, it.unused]) >= 0
    counts = jnp.sum(present.reshape(2, k).astype(jnp.float32), axis=1)
  n_used, n_ret = counts[0], counts[0] + counts[1]
  precision = jnp.where(n_ret > 0, n_used / jnp.maximum(n_ret, 1.0), 0.0)
  traj_row = jnp.concatenate(
    [
      it.query,
      _bits(it.used),
      _bits(it.unused),
      jnp.stack([precision, q_eff, _bits(it.time), _bits(it.anchor)]),
    ]
  )
  return signal_row, traj_row


def _counters(counters, time, ok, updated, valid=True):
  """Adds the outcome of one interaction (scalars) or a batch (vectors) to the counters; rows
  that are not `valid` (padding) count nowhere."""
  ok_i = ok.astype(jnp.int32)
  rejected = (valid & ~ok).astype(jnp.int32)
  idx = jnp.arange(counters.shape[0], dtype=jnp.int32)  # index masks instead of scatters
  delta = (
    jnp.where(idx == PROCESSED, jnp.sum(ok_i), 0)
    + jnp.where(idx == REJECTED, jnp.sum(rejected), 0)
    + jnp.where(idx == MICRO_UPDATES, jnp.sum(updated.astype(jnp.int32)), 0)
  )
  newest = jnp.max(jnp.where(ok, time, counters[LAST_TIME]))
  last_time = jnp.maximum(counters, newest)
  return jnp.where(idx == LAST_TIME, last_time, counters + delta)


def _report(ok, reasons, updated, step_norm, edges_changed):
  return jnp.stack(
    [
      ok.astype(jnp.float32),
      _bits(reasons),
      updated.astype(jnp.float32),
      step_norm,
      edges_changed.astype(jnp.float32),
    ],
    axis=-1,
  )


def _step(
  sub: LoopAState,
  base: lora.LoRA,
  emb: jax.Array,
  packed: jax.Array,
  cfg: SonaConfig,
  use_native: bool = False,
):
  """The Loop A transition on one packed interaction. Pure; jitted by the callers.

  Phases: validate and read rows; feedback direction; micro-LoRA step; Hebbian edges; node
  statistics; records; counters. Every write is masked by the acceptance decision. `use_native`:
  on CPU the whole transition is the native custom call (`sona_jax.native.loop_a`; it must be
  loaded), the JAX rule below on other platforms.
  """
  if use_native:  # one custom call on CPU; the JAX rule below elsewhere

    def on_cpu(sub):
      sub, report = native.loop_a(sub, base.a, base.b, emb, packed[None], 1, cfg)
      return sub, report[0]

    return jax.lax.platform_dependent(
      sub, cpu=on_cpu, default=lambda sub: _step(sub, base, emb, packed, cfg)
    )
  it = types.unpack(packed, cfg)
  slots = _slot_ids(it, cfg.graph_capacity)
  sig, traj = sub.signals, sub.trajectories
  nodes9, edge_row, (counters, sig_meta, traj_meta) = _read_rows(
    sub.node, sub.edges, slots, (sub.counters, sig.meta, traj.meta)
  )
  # An unset time takes the newest time the state saw (read as a scalar: writing it into `packed`
  # would copy the whole vector first).
  time = jnp.where(it.time == types.TIME_UNSET, counters[LAST_TIME], it.time)
  it, slots = it._replace(time=time), slots._replace(time=time)
  fbk, xa, counts = _feedback(base, sub.micro.a, emb, slots, types.packed_lr(packed, cfg), cfg)
  reasons = _validate(nodes9, it, fbk.sq_x, fbk.sq_grad, cfg)
  micro, step_norm, reasons, active = _learn(sub.micro, fbk, reasons, cfg, xa=xa)
  ok = reasons == 0
  edges, edges_changed = _edges(sub.edges, edge_row, slots, reasons, cfg)
  node_tab = _nodes(sub.node, nodes9[: 2 * cfg.max_ids], slots, fbk.q_eff, reasons, cfg)
  signal_row, traj_row = _record_rows(it, fbk.q_eff, cfg, counts)
  signals = buffer.push(sig._replace(meta=sig_meta), signal_row, where=ok)
  trajectories = buffer.push(traj._replace(meta=traj_meta), traj_row, where=ok)
  updated = ok & active
  counters = _counters(counters, it.time, ok, updated)
  report = _report(ok, reasons, updated, step_norm, edges_changed)
  return LoopAState(micro, edges, node_tab, signals, trajectories, counters), report


def _occurrence(keys, valid, sentinel):
  """For each item, how many earlier valid items share its key, and how many later ones do.

  Args:
    keys: i32[n]; valid: bool[n]; sentinel: a key no valid item has.

  Returns:
    `(before, after)`, i32[n] each (meaningless for invalid items).
  """
  n = keys.shape[0]
  key = jnp.where(valid, keys, sentinel)
  order = jnp.argsort(key, stable=True)  # groups equal keys, batch order inside a group
  sk = key[order]
  pos = jnp.arange(n, dtype=jnp.int32)
  is_start = jnp.concatenate([jnp.ones((1,), jnp.bool_), sk[1:] != sk[:-1]])
  is_end = jnp.concatenate([sk[1:] != sk[:-1], jnp.ones((1,), jnp.bool_)])
  start = jax.lax.cummax(jnp.where(is_start, pos, 0))
  end = jax.lax.cummin(jnp.where(is_end, pos, n - 1), reverse=True)
  before = jnp.zeros((n,), jnp.int32).at[order].set(pos - start)
  after = jnp.zeros((n,), jnp.int32).at[order].set(end - pos)
  return before, after


def _edges_batch(edges, its: types.Interaction, ok, cfg: SonaConfig):
  """Hebbian updates of a batch with sequential semantics.

  Rows of different anchors are independent, so the batch runs in rounds: round r applies, at
  once, the r-th update of every anchor (typically one or two rounds).
  """
  n_nodes = cfg.graph_capacity
  do = ok & (its.anchor >= 0)
  occ, _ = _occurrence(its.anchor, do, n_nodes)
  rounds = jnp.max(jnp.where(do, occ, -1)) + 1
  safe = jnp.clip(its.anchor, 0, n_nodes - 1)
  hebbian = jax.vmap(
    lambda row, a, u, v: graph.hebbian_row(
      row, a, u, v, strengthen_rate=cfg.hebbian_strengthen, weaken_rate=cfg.hebbian_weaken
    )
  )

  def one_round(r, carry):
    e, changed = carry
    new_rows, ch = hebbian(e[safe], its.anchor, its.used, its.unused)
    sel = do & (occ == r)
    e = e.at[jnp.where(sel, safe, n_nodes)].set(new_rows, mode="drop")
    return e, changed + jnp.where(sel, ch, 0)

  return jax.lax.fori_loop(0, rounds, one_round, (edges, jnp.zeros(ok.shape, jnp.int32)))


def _nodes_batch(node_tab, its: types.Interaction, q_eff, ok, cfg: SonaConfig):
  """Node statistics of a batch with sequential semantics, in closed form.

  For a node used m times in the batch with learning qualities q_1..q_m (in order), the quality
  EMA after the batch is `(1-e)^m q_0 + sum_j e (1-e)^(m-j) q_j`; access counts add up; the last
  access is the time of the last use.
  """
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  ids = its.used.reshape(-1)
  valid = (ok[:, None] & (its.used >= 0)).reshape(-1)
  times = jnp.repeat(its.time, k)
  q = jnp.repeat(q_eff, k)
  _, after = _occurrence(ids, valid, n_nodes)
  safe = jnp.where(valid, ids, n_nodes)  # invalid entries are dropped by the scatters
  ema = jnp.float32(cfg.node_quality_ema)
  keep = 1.0 - ema
  uses = jnp.zeros((n_nodes + 1,), jnp.int32).at[safe].add(1)[:n_nodes]
  weight = ema * keep ** after.astype(jnp.float32)
  mixed = jnp.zeros((n_nodes + 1,), jnp.float32).at[safe].add(weight * q)[:n_nodes]
  last = jnp.where(valid & (after == 0), ids, n_nodes)  # one entry per used node
  old_q = jax.lax.bitcast_convert_type(node_tab[:, graph.QUALITY], jnp.float32)
  new_q = keep ** uses.astype(jnp.float32) * old_q + mixed
  rows = node_tab[jnp.clip(last, 0, n_nodes - 1)]
  col = jnp.arange(node_tab.shape[1], dtype=jnp.int32)[None, :]
  lid = jnp.clip(last, 0, n_nodes - 1)
  rows = jnp.where(col == graph.ACCESS, rows + uses[lid][:, None], rows)
  rows = jnp.where(col == graph.LAST_ACCESS, times[:, None], rows)
  q_bits = jax.lax.bitcast_convert_type(new_q[lid], jnp.int32)
  rows = jnp.where(col == graph.QUALITY, q_bits[:, None], rows)
  return node_tab.at[last].set(rows, mode="drop")


# Micro-LoRA steps per iteration of the sequential scan (`lax.scan(unroll=...)`): fewer loop
# iterations, each with its per-iteration slicing and bookkeeping kernels. Measured side by side
# at dim 768, batches of 256 on a loaded 2-core machine: 1 -> 8 raised instant_scan 1.5-1.8x
# (16 and 32 gained nothing more).
_SCAN_UNROLL = 8


def _chain_inputs(f: _Feedback, reasons, time):
  """The chain's inputs of one interaction: f32[4, dim] vectors (query, query through the base
  LoRA, feedback difference, gradient) and f32[8] scalars (learning quality, gate, has gradient,
  |x|^2, |grad|^2, reasons as bits, learning rate, time as bits, < 0 when unset)."""
  f32 = lambda v: jnp.asarray(v).astype(jnp.float32)
  vecs = jnp.stack([f.x, f.y_base, f.diff, f.grad])
  scalars = jnp.stack(
    [
      f.q_eff,
      f32(f.open_gate),
      f32(f.has_grad),
      f.sq_x,
      f.sq_grad,
      _bits(reasons),
      f32(f.lr),
      _bits(time),
    ]
  )
  return vecs, scalars


def _chain(micro, vecs, scalars, newest, cfg: SonaConfig):
  """The micro-LoRA chain of a batch in JAX (`lax.scan` of `_learn`), the sequential part of
  `_scan`. Returns `(micro, out)`, `out: f32[B, 4]` per interaction:
  reasons (bits), active, step norm, time (bits; unset times take the newest accepted before)."""

  def body(carry, xs):
    micro, newest = carry
    v, sc = xs
    f = _Feedback(
      x=v[0],
      y_base=v[1],
      diff=v[2],
      grad=v[3],
      q_eff=sc[0],
      open_gate=sc[1] > 0,
      has_grad=sc[2] > 0,
      sq_x=sc[3],
      sq_grad=sc[4],
      lr=sc[6],
    )
    r = jax.lax.bitcast_convert_type(sc[5], jnp.int32)
    micro, step_norm, r, active = _learn(micro, f, r, cfg)
    t = jax.lax.bitcast_convert_type(sc[7], jnp.int32)
    t = jnp.where(t < 0, newest, t)  # an unset time: the newest accepted so far
    newest = jnp.where(r == 0, jnp.maximum(newest, t), newest)
    out = jnp.stack([_bits(r), active.astype(jnp.float32), step_norm, _bits(t)])  # one output
    return (micro, newest), out

  (micro, _), out = jax.lax.scan(body, (micro, newest), (vecs, scalars), unroll=_SCAN_UNROLL)
  return micro, out


def _scan(
  sub: LoopAState,
  base: lora.LoRA,
  emb: jax.Array,
  packed: jax.Array,
  n_valid,
  cfg,
  use_native: bool = False,
):
  """Loop A over a batch `packed: f32[B, width]`, equal to B sequential `_step`s on its first
  `n_valid` rows (the rest is padding: never applied, never counted).

  Only the micro-LoRA chain is inherently sequential (each step reads the adapter the previous
  one wrote), so only it runs in a `lax.scan`; validation, feedback inputs, records, Hebbian
  updates (in rounds) and node statistics (in closed form) are vectorised over the batch.
  Interactions without a time take the newest time accepted before them, as one by one.
  On CPU (`use_native`) the whole batch is one custom call that runs `_step` row by row.
  """
  if use_native:
    return jax.lax.platform_dependent(
      sub,
      cpu=lambda sub: native.loop_a(sub, base.a, base.b, emb, packed, n_valid, cfg),
      default=lambda sub: _scan(sub, base, emb, packed, n_valid, cfg),
    )
  its = jax.vmap(lambda p: types.unpack(p, cfg))(packed)
  unset = its.time == types.TIME_UNSET
  # Validation only asks whether a time is negative: any stamp >= 0 gives the same reasons.
  # It reads only the ALIVE and GENERATION columns, which Loop A never changes: vectorised is
  # exact.
  slots = _slot_ids(its, cfg.graph_capacity)
  fbk = _feedback_batch(base, emb, slots, types.packed_lr(packed, cfg), cfg)
  stamped = its._replace(time=jnp.where(unset, sub.counters[LAST_TIME], its.time))
  nodes9, _, _ = jax.vmap(lambda sl: _read_rows(sub.node, sub.edges, sl))(slots)
  reasons = jax.vmap(lambda *a: _validate(*a, cfg))(nodes9, stamped, fbk.sq_x, fbk.sq_grad)
  valid = jnp.arange(packed.shape[0], dtype=jnp.int32) < n_valid
  reasons = jnp.where(valid, reasons, reasons | _PADDING)

  vecs, scalars = jax.vmap(_chain_inputs)(fbk, reasons, jnp.where(unset, -1, its.time))
  micro, out = _chain(sub.micro, vecs, scalars, sub.counters[LAST_TIME], cfg)
  reasons = jax.lax.bitcast_convert_type(out[:, 0], jnp.int32)
  active, step_norm = out[:, 1] > 0, out[:, 2]
  times = jnp.where(unset, jax.lax.bitcast_convert_type(out[:, 3], jnp.int32), its.time)
  its = its._replace(time=times)
  slots = slots._replace(time=times)
  ok = reasons == 0
  updated = ok & active
  edges, edges_changed = _edges_batch(sub.edges, slots, ok, cfg)
  node_tab = _nodes_batch(sub.node, slots, fbk.q_eff, ok, cfg)
  signal_rows, traj_rows = jax.vmap(lambda i, q: _record_rows(i, q, cfg))(its, fbk.q_eff)
  signals = buffer.push_many(sub.signals, signal_rows, where=ok)
  trajectories = buffer.push_many(sub.trajectories, traj_rows, where=ok)
  counters = _counters(sub.counters, its.time, ok, updated, valid)
  report = _report(ok, reasons, updated, step_norm, edges_changed)
  return LoopAState(micro, edges, node_tab, signals, trajectories, counters), report


# Per-function XLA:CPU options (no global setting changes; other backends ignore xla_cpu_*):
# - the memory-optimised scheduler: XLA:CPU runs a program as a dataflow graph of small kernels
#   and hands independent ones to its thread pool; for Loop A's ~50 tiny kernels, waking pool
#   threads costs more than the arithmetic. Buffer reuse chains the kernels so that the runtime
#   runs them inline: dim 768 on 2 cores, ~50 us p50 against 150-200 us with the default;
# - no YNNPACK fusions: they route Loop A's small matrix-vector products to a library call costing
#   10-50 us each at dim 4096 (single step 170 -> 120 us; instant_scan 79k -> 109k/s at 768).
_COMPILER_OPTIONS = {
  "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
  "xla_cpu_experimental_ynn_fusion_type": "",
}


@functools.cache
def _options() -> dict:
  """`_COMPILER_OPTIONS`, or none on an XLA that lacks them."""
  options = dict(_COMPILER_OPTIONS)
  try:
    jax.jit(lambda v: v + 1, compiler_options=options).lower(jnp.float32(0)).compile()
  except Exception as e:  # an option this XLA does not know: compile plainly, and say so
    logging.getLogger("sona_jax").warning("Loop A compiles without %s: %s", options, e)
    options = {}
  return options


@functools.cache
def _jitted(use_native: bool = False):
  """`(step, scan)` jitted with `_options()`; `use_native`: with the native chain on CPU."""
  options = _options()
  step = functools.partial(_step, use_native=use_native)
  scan = functools.partial(_scan, use_native=use_native)
  step = jax.jit(step, static_argnums=4, donate_argnums=0, compiler_options=options)
  scan = jax.jit(scan, static_argnums=5, donate_argnums=0, compiler_options=options)
  return step, scan


_Tracer = jax.core.Tracer


def _traced(packed, state: SonaState) -> bool:
  """Whether we are inside a user's transformation (then the step is inlined, not jitted: a
  nested jit may not carry compiler options)."""
  return isinstance(packed, _Tracer) or isinstance(state.micro.a, _Tracer)


_new = tuple.__new__  # NamedTuple construction without keyword handling (~3x faster)
# `_merge` builds the state positionally: the field order it relies on.
assert SonaState._fields[:6] == ("micro", "base", "signals", "trajectories", "graph", "metrics")
assert graph.Graph._fields == ("emb", "edges", "node")


def _split(state: SonaState) -> LoopAState:
  g = state.graph
  return _new(
    LoopAState,
    (state.micro, g.edges, g.node, state.signals, state.trajectories, state.metrics.counters),
  )


def _merge(state: SonaState, sub: LoopAState) -> SonaState:
  # Field by field as `state._replace(micro=..., graph=..., ...)`, built directly: the request
  # path pays it on every call (0.9 us against 2.3 us).
  micro, base, _, _, g, metrics, *rest = state
  graph_ = _new(type(g), (g.emb, sub.edges, sub.node))
  metrics = _new(type(metrics), (sub.counters, *metrics[1:]))
  return _new(type(state), (sub.micro, base, sub.signals, sub.trajectories, graph_, metrics, *rest))


def _check_state(state: SonaState, cfg: SonaConfig):
  if not isinstance(cfg, SonaConfig):
    raise TypeError(f"cfg must be a SonaConfig, got {type(cfg).__name__}")
  if not isinstance(state, SonaState):
    raise TypeError(f"state must be a SonaState, got {type(state).__name__}")
  emb_shape = state.graph.emb.shape
  if emb_shape != (cfg.graph_capacity, cfg.dim) or state.micro.a.shape != (
    cfg.dim,
    cfg.micro_rank,
  ):
    raise ValueError(
      f"state does not match cfg: graph.emb {emb_shape}, micro.a {state.micro.a.shape}; "
      f"cfg has dim={cfg.dim}, graph_capacity={cfg.graph_capacity}, micro_rank={cfg.micro_rank}"
    )


def instant_step(state: SonaState, interaction: types.Interaction, cfg: SonaConfig):
  """Loop A: one request's learning as one jitted, donated state transition.

  Args:
    state: the current `SonaState`. Its Loop A part is donated: use the returned state.
    interaction: an `Interaction` (`make_interaction`), unbatched.
    cfg: the config (static).

  Returns:
    `(state, report)`: the new state and an `InstantReport`.

  Raises:
    ValueError: the interaction's shapes or dtypes, or the state's shapes, do not match `cfg`.
      Bad *values* never raise: they are masked and counted (see the module docstring).

  Examples:
    >>> import jax, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> it = sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9)
    >>> state, report = sona.instant_step(state, it, cfg)
    >>> bool(report.accepted), int(state.step)
    (True, 1)
  """
  _check_state(state, cfg)
  return step_packed(state, types.pack(interaction, cfg), cfg)


def step_packed(state: SonaState, packed, cfg: SonaConfig):
  """`instant_step` on an interaction already packed (`types.pack`, then e.g. `types.stamp`).

  Args:
    state: the current `SonaState` (Loop A part donated).
    packed: f32[packed_width(cfg)].
    cfg: the config (static).

  Examples:
    >>> import jax, sona_jax as sona
    >>> from sona_jax import types
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> packed = types.pack(sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9), cfg)
    >>> packed.shape == (types.packed_width(cfg),)
    True
    >>> state, report = step_packed(state, types.stamp(packed, cfg, now=60), cfg)
    >>> bool(report.accepted), int(state.step), int(state.metrics.last_time)
    (True, 1, 60)
    >>> bad = types.pack(sona.make_interaction(cfg, query=[1.0] * 8, quality=float("nan")), cfg)
    >>> state, report = step_packed(state, bad, cfg)  # masked and counted, never applied
    >>> bool(report.accepted), "BAD_QUALITY" in report.reason_names(), int(state.step)
    (False, True, 1)
  """
  use_native = native.enabled()
  if _traced(packed, state):  # inside a user's jit: inline
    step = functools.partial(_step, use_native=use_native)
  else:
    step = _jitted(use_native)[0]
  sub, report = step(_split(state), state.base, state.graph.emb, packed, cfg)
  return _merge(state, sub), _new(InstantReport, (report,))


def instant_scan(state: SonaState, interactions: types.Interaction, cfg: SonaConfig):
  """Loop A over a batch of interactions with sequential semantics (`lax.scan`).

  Equivalent to calling `instant_step` on each interaction in order, in one call: the way to serve
  high request rates. Each distinct batch size compiles once.

  Args:
    state: the current `SonaState` (Loop A part donated).
    interactions: an `Interaction` with a leading batch axis (`stack_interactions`).
    cfg: the config (static).

  Returns:
    `(state, report)` with `report.values` of shape `[batch, 5]`.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> q, g = [[i + 1.0] * 8 for i in range(4)], [0.5, -0.5] * 4  # supervised: dL/dy given
    >>> its = [sona.make_interaction(cfg, query=x, quality=0.9, grad=g, time=0) for x in q]
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> state, report = instant_scan(state, sona.stack_interactions(its), cfg)
    >>> report.values.shape, report.micro_updated.tolist(), int(state.step)
    ((4, 5), [True, True, True, True], 4)
    >>> one_by_one = sona.init_state(cfg, jax.random.key(0))  # the same as instant_step in order
    >>> for it in its:
    ...   one_by_one, _ = sona.instant_step(one_by_one, it, cfg)
    >>> bool(jnp.allclose(state.micro.a, one_by_one.micro.a) & jnp.allclose(state.micro.b,
    ...                                                                     one_by_one.micro.b))
    True
  """
  _check_state(state, cfg)
  return scan_packed(state, types.pack(interactions, cfg, batched=True), cfg)


def scan_packed(state: SonaState, packed, cfg: SonaConfig, *, n_valid=None):
  """`instant_scan` on packed interactions `f32[B, width]`, of which only the first `n_valid`
  are applied and counted (the rest is padding): a caller that pads batches to a few fixed sizes
  compiles each size once (the driver's dynamic batching does).

  Args:
    state: the current `SonaState` (Loop A part donated).
    packed: f32[B, packed_width(cfg)].
    cfg: the config (static).
    n_valid: how many leading rows are real (all when None); traced, so it never recompiles.

  Examples:
    >>> import jax, sona_jax as sona
    >>> from sona_jax import types
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> its = [sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9, time=i) for i in range(4)]
    >>> packed = types.pack(sona.stack_interactions(its), cfg, batched=True)  # f32[4, width]
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> state, report = scan_packed(state, packed, cfg, n_valid=3)  # the last row is padding
    >>> int(state.step), report.accepted.tolist()
    (3, [True, True, True, False])
  """
  n = packed.shape[0] if n_valid is None else n_valid
  n = jnp.asarray(n, jnp.int32)
  use_native = native.enabled()
  if _traced(packed, state):
    scan = functools.partial(_scan, use_native=use_native)
  else:
    scan = _jitted(use_native)[1]
  sub, report = scan(_split(state), state.base, state.graph.emb, packed, n, cfg)
  return _merge(state, sub), InstantReport(report)


# Public names for the front ends that compose Loop A's transition (`sona_jax.tenants` vmaps it
# over stacked tenants), so that no other module reaches into this one's private names; the
# definitions above stay where they are.
transition = _step  # the pure per-request transition on the Loop A sub-state (`LoopAState`)
occurrence = _occurrence  # per item: earlier valid items with the same key, and later ones
reason_bits = _bits  # int32 reason bits as the float32 report column that carries them
in_user_transform = _traced  # inside a user's jit/vmap: inline the step, do not jit it
split_state = _split  # the Loop A part of a `SonaState` (the part Loop A donates)
merge_state = _merge  # a `SonaState` with its Loop A part replaced
COMPILER_OPTIONS = _COMPILER_OPTIONS  # Loop A's per-function XLA:CPU options (see `_jitted`)
PADDING = _PADDING  # the reason bit of a padding row of a batch (`scan_packed`'s n_valid)
