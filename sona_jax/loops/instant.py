"""Loop A: the per-request learning step, one fused, jitted, donated state transition.

`instant_step(state, interaction, cfg)` validates the interaction, records its trajectory, applies
the Hebbian edge updates, takes one micro-LoRA step and pushes the learning signal for Loop B, all
in one jitted call (DESIGN.md section 5, seed section 2).

Hot-path economy (DESIGN.md section 3): on CPU a per-request call costs mostly dispatch, 1-3 us per
array passed in. So the call takes only the sub-state Loop A changes (`LoopAState`: the micro-LoRA,
the packed edge and node arrays, the two ring buffers and the counters), donates it so every update
happens in place, reads the base LoRA and the embedding table without copying, receives the
interaction as ONE packed vector (`types.pack`), reads table rows with unrolled `dynamic_slice`
instead of XLA gathers, and never retraces after the first call.

Bad values never reach the state: an interaction with a non-finite or out-of-range value, an id
out of range, duplicated or pointing at a dead node, or a step that would come out non-finite, is
masked out. The state is then bit-identical to before except the `REJECTED` counter, and the report
says why (`InstantReport.reasons`, a bit mask of the `BAD_*` constants).

The input state is donated: use the returned state, never the one passed in (its Loop A arrays are
deleted). Copy it first (`jax.tree.map(jnp.copy, state)`) to keep it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sona_jax import buffer, graph, lora, types
from sona_jax.config import SonaConfig
from sona_jax.state import LAST_TIME, MICRO_UPDATES, PROCESSED, REJECTED, SonaState

__all__ = [
  "InstantReport",
  "LoopAState",
  "instant_step",
  "instant_scan",
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
  "REASONS",
]

BAD_QUERY = 1 << 0  # non-finite query
BAD_QUALITY = 1 << 1  # quality non-finite or outside [0, 1]
BAD_FEEDBACK = 1 << 2  # feedback neither NaN nor in [0, 1]
BAD_LATENCY = 1 << 3  # latency non-finite or < 0, or target non-finite or <= 0
BAD_TIER = 1 << 4  # tier outside [0, n_tiers)
BAD_CONTEXT = 1 << 5  # context_tokens < 0
BAD_TIME = 1 << 6  # time < 0
BAD_GRAD = 1 << 7  # has_grad with a non-finite gradient
BAD_IDS = 1 << 8  # used/unused id out of range, below -1, duplicated, or a dead node
BAD_ANCHOR = 1 << 9  # anchor out of range or a dead node
NONFINITE_STEP = 1 << 10  # the micro-LoRA step would not be finite (e.g. a 1e38 query)
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
    """Names of the rejection reasons of a single (unbatched) report; [] when accepted."""
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


def _step(sub: LoopAState, base: lora.LoRA, emb: jax.Array, packed: jax.Array, cfg: SonaConfig):
  """The Loop A transition on one packed interaction. Pure; jitted by the callers."""
  it = types.unpack(packed, cfg)
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  x = it.query
  node_tab = sub.node

  # --- validation: every check is a mask; nothing raises inside jit. The checks are laid out as
  # one int vector of reason bits and OR-reduced at once: on CPU each separate reduction is its own
  # kernel, and Loop A's latency is mostly kernel count.
  q, fb = it.quality, it.feedback
  fb_given = ~jnp.isnan(fb)
  ids = jnp.concatenate([it.used, it.unused])  # [2k]
  present = ids >= 0
  safe_ids = jnp.clip(ids, 0, n_nodes - 1)
  anchor = it.anchor
  safe_anchor = jnp.clip(anchor, 0, n_nodes - 1)
  # Every row this step reads from a table it also writes is read first, in one concatenation
  # fenced by an optimization barrier: otherwise XLA fuses the row reads into the later in-place
  # updates and must copy the whole table to keep them correct (measured: 4 full copies, 2x slower).
  node_w, edge_w = node_tab.shape[1], sub.edges.shape[1]
  reads = jnp.concatenate(
    [_row(node_tab, safe_ids[j]) for j in range(2 * k)]
    + [_row(node_tab, safe_anchor), _row(sub.edges, safe_anchor)]
  )
  reads = jax.lax.optimization_barrier(reads)
  id_nodes = reads[: 2 * k * node_w].reshape(2 * k, node_w)
  anchor_node = reads[2 * k * node_w : (2 * k + 1) * node_w]
  edge_row = reads[(2 * k + 1) * node_w : (2 * k + 1) * node_w + edge_w]
  same = (ids[:, None] == ids[None, :]) & present[:, None] & present[None, :]
  same = same & ~jnp.eye(2 * k, dtype=jnp.bool_)
  id_ok = (ids >= -1) & (ids < n_nodes) & (~present | (id_nodes[:, graph.ALIVE] != 0))
  anchor_ok = (anchor == -1) | (
    (anchor >= 0) & (anchor < n_nodes) & (anchor_node[graph.ALIVE] != 0)
  )
  lat, target = it.latency_ms, it.target_latency_ms
  scalar_checks = [
    (BAD_QUALITY, jnp.isfinite(q) & (q >= 0.0) & (q <= 1.0)),
    (BAD_FEEDBACK, ~fb_given | (jnp.isfinite(fb) & (fb >= 0.0) & (fb <= 1.0))),
    (BAD_LATENCY, jnp.isfinite(lat) & (lat >= 0.0) & jnp.isfinite(target) & (target > 0.0)),
    (BAD_TIER, (it.tier >= 0) & (it.tier < cfg.n_tiers)),
    (BAD_CONTEXT, it.context_tokens >= 0),
    (BAD_TIME, it.time >= 0),
    (BAD_ANCHOR, anchor_ok),
  ]
  # A query or gradient is bad when non-finite or so large that its squared norm overflows f32.
  # One dot product checks all its entries at once (a NaN or inf anywhere makes it non-finite).
  scalar_checks += [
    (BAD_QUERY, jnp.isfinite(jnp.dot(x, x))),
    (BAD_GRAD, ~it.has_grad | jnp.isfinite(jnp.dot(it.grad, it.grad))),
  ]
  bit = lambda ok, b: jnp.where(ok, 0, b).astype(jnp.int32)
  reason_bits = jnp.concatenate(
    [
      bit(id_ok, BAD_IDS),
      bit(~same, BAD_IDS).reshape(-1),
      jnp.stack([bit(ok, b) for b, ok in scalar_checks]),
    ]
  )
  reasons = jax.lax.reduce(reason_bits, jnp.int32(0), jax.lax.bitwise_or, (0,))

  # --- micro-LoRA step (DESIGN.md 4.1).
  q_eff = jnp.where(fb_given, fb, q)  # explicit feedback beats the estimate
  latency_ratio = it.latency_ms / it.target_latency_ms
  rows = [_row(emb, safe_ids[j]) for j in range(2 * k)]
  used_mask = present[:k].astype(jnp.float32)
  unused_mask = present[k:].astype(jnp.float32)
  n_used, n_unused = jnp.sum(used_mask), jnp.sum(unused_mask)
  sum_used = sum(rows[j] * used_mask[j] for j in range(k))
  sum_unused = sum(rows[k + j] * unused_mask[j] for j in range(k))
  mean_used = sum_used / jnp.maximum(n_used, 1.0)
  mean_unused = sum_unused / jnp.maximum(n_unused, 1.0)
  y_hat = lora.apply(
    sub.micro, x, lora.apply(base, x, x, scale=cfg.base_scale), scale=cfg.micro_scale
  )
  has_u, has_n = n_used > 0, n_unused > 0
  # Move the adapted query toward used memories and away from unused ones, more strongly the
  # worse the answer; never by a signed advantage (DESIGN.md 4.1 explains why).
  t = jnp.where(
    has_u & has_n,
    mean_used - mean_unused,
    jnp.where(has_u, mean_used - y_hat, jnp.where(has_n, y_hat - mean_unused, 0.0)),
  )
  t_norm = jnp.linalg.norm(t)
  g_feedback = -(1.0 - q_eff) * t / jnp.maximum(t_norm, 1e-12)
  gate = (jnp.abs(q_eff - 0.5) > cfg.gate_quality_margin) | (latency_ratio > cfg.gate_latency_ratio)
  feedback_active = (has_u | has_n) & (t_norm > 1e-12) & gate
  active = it.has_grad | feedback_active
  g = jnp.where(it.has_grad, it.grad, g_feedback)
  new_micro, step_norm = lora.micro_update_fast(
    sub.micro,
    x,
    g,
    cfg.micro_lr,
    active.astype(jnp.float32),
    scale=cfg.micro_scale,
    clip=cfg.micro_clip,
  )
  # A finite step norm bounds every entry of the step, so one scalar check covers both factors.
  step_finite = jnp.isfinite(step_norm)
  reasons = reasons | jnp.where(step_finite, 0, NONFINITE_STEP).astype(jnp.int32)
  ok = reasons == 0
  micro = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_micro, sub.micro)

  # --- Hebbian edge updates on the anchor's row (seed: +5% per use, -2% per skip).
  new_edge_row, edges_changed = graph.hebbian_row(
    edge_row,
    anchor,
    it.used,
    it.unused,
    strengthen_rate=cfg.hebbian_strengthen,
    weaken_rate=cfg.hebbian_weaken,
  )
  do_edges = ok & (anchor >= 0)
  edges = _put_row(sub.edges, jnp.where(do_edges, new_edge_row, edge_row), safe_anchor)
  edges_changed = jnp.where(do_edges, edges_changed, 0)

  # --- node statistics of used memories: access count, last access, quality EMA. A padded slot
  # writes the first used id's new row again (harmless), never a stale copy of row 0.
  ema = jnp.float32(cfg.node_quality_ema)
  used_rows = id_nodes[:k]
  old_q = jax.lax.bitcast_convert_type(used_rows[:, graph.QUALITY], jnp.float32)
  new_q = jax.lax.bitcast_convert_type((1.0 - ema) * old_q + ema * q_eff, jnp.int32)
  col = jnp.arange(node_w, dtype=jnp.int32)[None, :]  # column masks instead of scatters
  new_rows = jnp.where(col == graph.ACCESS, used_rows + 1, used_rows)
  new_rows = jnp.where(col == graph.LAST_ACCESS, it.time, new_rows)
  new_rows = jnp.where(col == graph.QUALITY, new_q[:, None], new_rows)
  new_rows = jnp.where(ok, new_rows, used_rows)
  first = jnp.argmax(present[:k])
  for j in range(k):
    target = jnp.where(present[j], safe_ids[j], safe_ids[first])
    row = jnp.where(present[j], new_rows[j], new_rows[first])
    node_tab = _put_row(node_tab, row, target)

  # --- records: the Loop A -> Loop B signal and the trajectory.
  signal_row = jnp.concatenate(
    [
      x,
      jnp.stack(
        [
          q_eff,
          q,
          latency_ratio,
          _bits(it.tier),
          _bits(it.context_tokens),
          fb,
          _bits(it.time),
          _bits(anchor),
        ]
      ),
    ]
  )
  n_ret = n_used + n_unused
  precision = jnp.where(n_ret > 0, n_used / jnp.maximum(n_ret, 1.0), 0.0)
  traj_row = jnp.concatenate(
    [
      x,
      _bits(it.used),
      _bits(it.unused),
      jnp.stack([precision, q_eff, _bits(it.time), _bits(anchor)]),
    ]
  )
  signals = buffer.push(sub.signals, signal_row, where=ok)
  trajectories = buffer.push(sub.trajectories, traj_row, where=ok)

  ok_i = ok.astype(jnp.int32)
  updated = ok & active
  c = sub.counters
  idx = jnp.arange(c.shape[0], dtype=jnp.int32)  # index masks instead of scatters
  delta = (
    jnp.where(idx == PROCESSED, ok_i, 0)
    + jnp.where(idx == REJECTED, 1 - ok_i, 0)
    + jnp.where(idx == MICRO_UPDATES, updated.astype(jnp.int32), 0)
  )
  last_time = jnp.where(ok, jnp.maximum(c, it.time), c)
  counters = jnp.where(idx == LAST_TIME, last_time, c + delta)
  report = jnp.stack(
    [
      ok.astype(jnp.float32),
      _bits(reasons),
      updated.astype(jnp.float32),
      jnp.where(ok, step_norm, 0.0),
      edges_changed.astype(jnp.float32),
    ]
  )
  new_sub = LoopAState(micro, edges, node_tab, signals, trajectories, counters)
  return new_sub, report


def _scan(sub: LoopAState, base: lora.LoRA, emb: jax.Array, packed: jax.Array, cfg: SonaConfig):
  return jax.lax.scan(lambda s, p: _step(s, base, emb, p, cfg), sub, packed)


_step_jit = jax.jit(_step, static_argnums=4, donate_argnums=0)
_scan_jit = jax.jit(_scan, static_argnums=4, donate_argnums=0)


def _split(state: SonaState) -> LoopAState:
  return LoopAState(
    micro=state.micro,
    edges=state.graph.edges,
    node=state.graph.node,
    signals=state.signals,
    trajectories=state.trajectories,
    counters=state.metrics.counters,
  )


def _merge(state: SonaState, sub: LoopAState) -> SonaState:
  return state._replace(
    micro=sub.micro,
    graph=state.graph._replace(edges=sub.edges, node=sub.node),
    signals=sub.signals,
    trajectories=sub.trajectories,
    metrics=state.metrics._replace(counters=sub.counters),
  )


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
  packed = types.pack(interaction, cfg)
  sub, report = _step_jit(_split(state), state.base, state.graph.emb, packed, cfg)
  return _merge(state, sub), InstantReport(report)


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
  """
  _check_state(state, cfg)
  packed = types.pack(interactions, cfg, batched=True)
  sub, report = _scan_jit(_split(state), state.base, state.graph.emb, packed, cfg)
  return _merge(state, sub), InstantReport(report)
