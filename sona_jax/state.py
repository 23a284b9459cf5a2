"""`SonaState`: the whole learning state as one pytree of arrays (DESIGN.md section 3).

No Python scalars and no hyperparameters live in the state: counters are `int32` arrays, time is
`int32` seconds since an origin that the driver keeps in checkpoint metadata, and the config travels
separately as a static argument. The PRNG key is stored as raw `uint32` key data so that every leaf
is a plain array that checkpoints and restores exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sona_jax import buffer, graph, lora, types
from sona_jax.config import SonaConfig

__all__ = [
  "Metrics",
  "SonaState",
  "init_state",
  "PROCESSED",
  "REJECTED",
  "MICRO_UPDATES",
  "LAST_TIME",
]

# Columns of `Metrics.counters`. `received = processed + rejected` (never stored: it would be a
# third counter to keep consistent).
PROCESSED, REJECTED, MICRO_UPDATES, LAST_TIME = range(4)
N_COUNTERS = 4


class Metrics(NamedTuple):
  """Loop A counters, `i32[4]` indexed by `PROCESSED`, `REJECTED`, `MICRO_UPDATES`, `LAST_TIME`.

  Counters are int32 and wrap after 2**31 events; read them often enough (the driver does) to keep
  exact totals on the host.
  """

  counters: jax.Array

  @property
  def processed(self) -> jax.Array:
    return self.counters[..., PROCESSED]

  @property
  def rejected(self) -> jax.Array:
    return self.counters[..., REJECTED]

  @property
  def micro_updates(self) -> jax.Array:
    return self.counters[..., MICRO_UPDATES]

  @property
  def last_time(self) -> jax.Array:
    return self.counters[..., LAST_TIME]


class SonaState(NamedTuple):
  """Everything a SONA learner learns, as nested NamedTuples of arrays.

  Attributes:
    micro: the per-request micro-LoRA (`lora.LoRA`, rank `cfg.micro_rank`).
    base: the consolidated base LoRA (`lora.LoRA`, rank `cfg.base_rank`).
    signals: ring buffer of packed signal rows, the Loop A -> Loop B channel (`types.Signal`).
    trajectories: ring buffer of packed trajectory rows (`types.Trajectory`).
    graph: the memory graph (`graph.Graph`).
    metrics: Loop A counters (`Metrics`).
    key: u32[2] raw PRNG key data (`jax.random.wrap_key_data` turns it back into a key).
  """

  micro: lora.LoRA
  base: lora.LoRA
  signals: buffer.RingBuffer
  trajectories: buffer.RingBuffer
  graph: graph.Graph
  metrics: Metrics
  key: jax.Array

  @property
  def step(self) -> jax.Array:
    """Number of interactions Loop A has processed (accepted)."""
    return self.metrics.counters[..., PROCESSED]


def init_state(cfg: SonaConfig, key: jax.Array) -> SonaState:
  """A fresh state for `cfg`: zero-initialised `B` factors (the adapted model equals the base),
  an empty graph and empty buffers.

  Args:
    cfg: the config.
    key: a PRNG key (`jax.random.key(seed)`, or a raw `uint32` key from `jax.random.PRNGKey`).

  Returns:
    A `SonaState`.
  """
  if not isinstance(cfg, SonaConfig):
    raise TypeError(f"init_state: cfg must be a SonaConfig, got {type(cfg).__name__}")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  k_micro, k_base, k_state = jax.random.split(key, 3)
  d = cfg.dim
  micro = lora.init_lora(k_micro, d, d, cfg.micro_rank)
  base = lora.init_lora(k_base, d, d, cfg.base_rank)
  signals = buffer.init_buffer(
    jax.ShapeDtypeStruct((types.signal_width(cfg),), jnp.float32), cfg.signal_capacity
  )
  trajectories = buffer.init_buffer(
    jax.ShapeDtypeStruct((types.trajectory_width(cfg),), jnp.float32), cfg.trajectory_capacity
  )
  return SonaState(
    micro=micro,
    base=base,
    signals=signals,
    trajectories=trajectories,
    graph=graph.init_graph(cfg.graph_capacity, d, cfg.graph_degree),
    metrics=Metrics(counters=jnp.zeros((N_COUNTERS,), jnp.int32)),
    key=jax.random.key_data(k_state),
  )
