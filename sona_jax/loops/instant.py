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

What is left on CPU is XLA:CPU's runtime: the step compiles to ~85 small thunks, which the runtime
schedules concurrently on its intra-op thread pool, and waking a pool thread costs more than the
arithmetic (measured at dim 768 on 2 cores: 150 us p50, 84 us with the process pinned to one
core). Wrapping phases in conditionals copies the tables they update; once-run while loops keep
them in place but their bodies stay above the 8-thunk limit under which XLA:CPU runs inline.

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


def _validate(node_tab, edges, packed, cfg: SonaConfig):
  """Reads the rows of the ids and the anchor, and checks every value (one reason bit each)."""
  it = types.unpack(packed, cfg)
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  x, q, fb = it.query, it.quality, it.feedback
  fb_given = ~jnp.isnan(fb)
  ids = jnp.concatenate([it.used, it.unused])  # [2k]
  present = ids >= 0
  safe_ids = jnp.clip(ids, 0, n_nodes - 1)
  anchor = it.anchor
  safe_anchor = jnp.clip(anchor, 0, n_nodes - 1)
  # Every row read from a table that is written later is read here, in one concatenation:
  # otherwise XLA fuses the row reads into the in-place updates and must copy the whole table to
  # keep them correct (measured: 4 full-table copies, 2x slower).
  node_w, edge_w = node_tab.shape[1], edges.shape[1]
  reads = jnp.concatenate(
    [_row(node_tab, safe_ids[j]) for j in range(2 * k)]
    + [_row(node_tab, safe_anchor), _row(edges, safe_anchor)]
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
    # A query or gradient is bad when non-finite or so large that its squared norm overflows
    # f32: one dot product checks every entry at once.
    (BAD_QUERY, jnp.isfinite(jnp.dot(x, x))),
    (BAD_GRAD, ~it.has_grad | jnp.isfinite(jnp.dot(it.grad, it.grad))),
  ]
  # The checks are laid out as one vector of reason bits and OR-reduced at once: each separate
  # reduction would be its own kernel.
  bit = lambda ok, b: jnp.where(ok, 0, b).astype(jnp.int32)
  reason_bits = jnp.concatenate(
    [
      bit(id_ok, BAD_IDS),
      bit(~same, BAD_IDS).reshape(-1),
      jnp.stack([bit(ok, b) for b, ok in scalar_checks]),
    ]
  )
  reasons = jax.lax.reduce(reason_bits, jnp.int32(0), jax.lax.bitwise_or, (0,))
  return reasons, id_nodes, edge_row


def _direction(micro, base, emb, packed, cfg: SonaConfig):
  """The feedback gradient `g = dL/dy` at the adapted query (DESIGN.md 4.1), and whether to step.

  Returns `(g, active, q_eff)`.
  """
  it = types.unpack(packed, cfg)
  n_nodes, k = cfg.graph_capacity, cfg.max_ids
  x, q, fb = it.query, it.quality, it.feedback
  q_eff = jnp.where(jnp.isnan(fb), q, fb)  # explicit feedback beats the estimate
  ids = jnp.concatenate([it.used, it.unused])
  present = ids >= 0
  safe_ids = jnp.clip(ids, 0, n_nodes - 1)
  rows = jnp.stack([_row(emb, safe_ids[j]) for j in range(2 * k)])  # [2k, dim]
  n_used = jnp.sum(present[:k].astype(jnp.float32))
  n_unused = jnp.sum(present[k:].astype(jnp.float32))
  # Weights of the mean of used minus the mean of unused memories, in one matrix product.
  wts = jnp.concatenate(
    [
      present[:k].astype(jnp.float32) / jnp.maximum(n_used, 1.0),
      -present[k:].astype(jnp.float32) / jnp.maximum(n_unused, 1.0),
    ]
  )
  diff = wts @ rows
  y_hat = lora.apply(micro, x, lora.apply(base, x, x, scale=cfg.base_scale), scale=cfg.micro_scale)
  # Move the adapted query toward used memories and away from unused ones, more strongly the
  # worse the answer; never by a signed advantage (DESIGN.md 4.1 explains why). DESIGN.md's
  # cases (used - unused, used - y_hat, y_hat - unused) are taken in the tangent space of y_hat:
  # retrieval is by cosine, and the radial part only rescales y_hat. Left in, it is harmful:
  # with only unused memories, `y_hat - mean(unused)` pushes y_hat along itself, drift included,
  # and on the load_digits drift stream the adapter learnt to amplify the drift (precision@5
  # 0.63 -> 0.10). Projected, every case is the cosine gradient of used minus unused memories.
  y_unit = y_hat / jnp.maximum(jnp.sqrt(jnp.dot(y_hat, y_hat)), 1e-12)
  t = diff - jnp.dot(diff, y_unit) * y_unit
  t_norm = jnp.sqrt(jnp.dot(t, t))
  g_feedback = -(1.0 - q_eff) * t / jnp.maximum(t_norm, 1e-12)
  latency_ratio = it.latency_ms / it.target_latency_ms
  gate = (jnp.abs(q_eff - 0.5) > cfg.gate_quality_margin) | (latency_ratio > cfg.gate_latency_ratio)
  feedback_active = (n_used + n_unused > 0) & (t_norm > 1e-12) & gate
  active = it.has_grad | feedback_active
  g = jnp.where(it.has_grad, it.grad, g_feedback)
  return g, active, q_eff


def _micro(micro, packed, g, active, reasons, cfg: SonaConfig):
  """The micro-LoRA step, applied only when the interaction is accepted."""
  x = types.unpack(packed, cfg).query
  new_micro, step_norm = lora.micro_update_fast(
    micro,
    x,
    g,
    cfg.micro_lr,
    active.astype(jnp.float32),
    scale=cfg.micro_scale,
    clip=cfg.micro_clip,
  )
  # A finite step norm bounds every entry of the step: one scalar check covers both factors.
  reasons = reasons | jnp.where(jnp.isfinite(step_norm), 0, NONFINITE_STEP).astype(jnp.int32)
  ok = reasons == 0
  micro = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_micro, micro)
  return micro, jnp.where(ok, step_norm, 0.0), reasons


def _edges(edges, edge_row, packed, reasons, cfg: SonaConfig):
  """Hebbian update of the anchor's edge row (seed: +5% per use, -2% per skip)."""
  it = types.unpack(packed, cfg)
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


def _nodes(node_tab, id_nodes, packed, q_eff, reasons, cfg: SonaConfig):
  """Access count, last access and quality EMA of the used memories.

  A padded slot writes the first used id's new row again (harmless), never a stale row 0.
  """
  it = types.unpack(packed, cfg)
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
  first = jnp.argmax(present)
  for j in range(k):
    target = jnp.where(present[j], safe_ids[j], safe_ids[first])
    row = jnp.where(present[j], new_rows[j], new_rows[first])
    node_tab = _put_row(node_tab, row, target)
  return node_tab


def _records(signals, trajectories, packed, q_eff, reasons, cfg: SonaConfig):
  """Pushes the Loop A -> Loop B signal and the trajectory record (only when accepted)."""
  it = types.unpack(packed, cfg)
  k = cfg.max_ids
  x, q = it.query, it.quality
  ok = reasons == 0
  signal_row = jnp.concatenate(
    [
      x,
      jnp.stack(
        [
          q_eff,
          q,
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
  present = jnp.concatenate([it.used, it.unused]) >= 0
  n_used = jnp.sum(present[:k].astype(jnp.float32))
  n_ret = jnp.sum(present.astype(jnp.float32))
  precision = jnp.where(n_ret > 0, n_used / jnp.maximum(n_ret, 1.0), 0.0)
  traj_row = jnp.concatenate(
    [
      x,
      _bits(it.used),
      _bits(it.unused),
      jnp.stack([precision, q_eff, _bits(it.time), _bits(it.anchor)]),
    ]
  )
  signals = buffer.push(signals, signal_row, where=ok)
  trajectories = buffer.push(trajectories, traj_row, where=ok)
  return signals, trajectories


def _counters(counters, packed, reasons, active, step_norm, edges_changed, cfg: SonaConfig):
  """Counters and the packed report."""
  time = types.unpack(packed, cfg).time
  ok = reasons == 0
  ok_i = ok.astype(jnp.int32)
  updated = ok & active
  idx = jnp.arange(counters.shape[0], dtype=jnp.int32)  # index masks instead of scatters
  delta = (
    jnp.where(idx == PROCESSED, ok_i, 0)
    + jnp.where(idx == REJECTED, 1 - ok_i, 0)
    + jnp.where(idx == MICRO_UPDATES, updated.astype(jnp.int32), 0)
  )
  last_time = jnp.where(ok, jnp.maximum(counters, time), counters)
  counters = jnp.where(idx == LAST_TIME, last_time, counters + delta)
  report = jnp.stack(
    [
      ok.astype(jnp.float32),
      _bits(reasons),
      updated.astype(jnp.float32),
      step_norm,
      edges_changed.astype(jnp.float32),
    ]
  )
  return counters, report


def _step(sub: LoopAState, base: lora.LoRA, emb: jax.Array, packed: jax.Array, cfg: SonaConfig):
  """The Loop A transition on one packed interaction. Pure; jitted by the callers.

  Phases: validate and read rows; feedback direction; micro-LoRA step; Hebbian edges; node
  statistics; records; counters. Every write is masked by the acceptance decision.
  """
  reasons, id_nodes, edge_row = _validate(sub.node, sub.edges, packed, cfg)
  g, active, q_eff = _direction(sub.micro, base, emb, packed, cfg)
  micro, step_norm, reasons = _micro(sub.micro, packed, g, active, reasons, cfg)
  edges, edges_changed = _edges(sub.edges, edge_row, packed, reasons, cfg)
  node_tab = _nodes(sub.node, id_nodes, packed, q_eff, reasons, cfg)
  signals, trajectories = _records(sub.signals, sub.trajectories, packed, q_eff, reasons, cfg)
  counters, report = _counters(sub.counters, packed, reasons, active, step_norm, edges_changed, cfg)
  return LoopAState(micro, edges, node_tab, signals, trajectories, counters), report


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
