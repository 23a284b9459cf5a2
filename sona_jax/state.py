"""`SonaState`: the whole learning state as one pytree of arrays (docs/design.md, "SonaState").

No Python scalars and no hyperparameters live in the state: counters are `int32` arrays, time is
`int32` seconds since an origin that the driver keeps in checkpoint metadata, and the config travels
separately as a static argument. The PRNG key is stored as raw `uint32` key data so that every leaf
is a plain array that checkpoints and restores exactly.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sona_jax import buffer, ewc, graph, lora, metrics, patterns, router, types
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
  """Counters and rolling metrics.

  Attributes:
    counters: Loop A counters, `i32[4]` indexed by `PROCESSED`, `REJECTED`, `MICRO_UPDATES`,
      `LAST_TIME` (the only part Loop A touches). Counters are int32 and wrap after 2**31 events;
      read them often enough (the driver does) to keep exact totals on the host.
    daily: `metrics.DailyBins`, rolling daily sums that Loop B and Loop C fill.
    probe: ring buffer of retention probes (`metrics.Probe` rows) that Loop B fills.
  """

  counters: jax.Array
  daily: metrics.DailyBins
  probe: buffer.RingBuffer

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
    router: the FastGRNN tier router and its optimiser state (`router.RouterState`).
    ewc: EWC++ Fisher and anchor of the router parameters (`ewc.EWCState`).
    bank: the ReasoningBank of patterns (`patterns.Bank`).
    router_proj: f32[dim, router_proj_dim] fixed random projection of queries into the router's
      features (not learnt; kept in the state so a restored learner routes the same way).
  """

  micro: lora.LoRA
  base: lora.LoRA
  signals: buffer.RingBuffer
  trajectories: buffer.RingBuffer
  graph: graph.Graph
  metrics: Metrics
  key: jax.Array
  router: router.RouterState
  ewc: ewc.EWCState
  bank: patterns.Bank
  router_proj: jax.Array

  @property
  def step(self) -> jax.Array:
    """Number of interactions Loop A has processed (accepted)."""
    return self.metrics.counters[..., PROCESSED]


def router_features_width(cfg: SonaConfig) -> int:
  """Width of the router's feature vector (`router.router_features`)."""
  return cfg.router_proj_dim + 2 + cfg.n_tiers


@functools.cache
def router_optimizer(cfg: SonaConfig) -> optax.GradientTransformation:
  """The router's optimiser: the EWC++ penalty gradient, then Adam (docs/design.md, "EWC++",
  "Router training")."""
  return optax.chain(ewc.ewc_regularize(cfg.ewc_lambda), optax.adam(cfg.router_lr))


@functools.cache
def router_apply(cfg: SonaConfig):
  """`apply_fn(params, f32[T, F]) -> f32[n_tiers]` success logits of the router."""
  return router.router_apply_fn(cfg.n_tiers, hidden=cfg.router_hidden)


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
  k_micro, k_base, k_state, k_router, k_proj = jax.random.split(key, 5)
  d = cfg.dim
  micro = lora.init_lora(k_micro, d, d, cfg.micro_rank)
  base = lora.init_lora(k_base, d, d, cfg.base_rank)
  signals = buffer.init_buffer(
    jax.ShapeDtypeStruct((types.signal_width(cfg),), jnp.float32), cfg.signal_capacity
  )
  trajectories = buffer.init_buffer(
    jax.ShapeDtypeStruct((types.trajectory_width(cfg),), jnp.float32), cfg.trajectory_capacity
  )
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam state mixes int and float scalars
    rstate = router.init_router(
      k_router,
      router_features_width(cfg),
      cfg.n_tiers,
      router_optimizer(cfg),
      hidden=cfg.router_hidden,
    )
  return SonaState(
    micro=micro,
    base=base,
    signals=signals,
    trajectories=trajectories,
    graph=graph.init_graph(cfg.graph_capacity, d, cfg.graph_degree),
    metrics=Metrics(
      counters=jnp.zeros((N_COUNTERS,), jnp.int32),
      daily=metrics.init_daily(cfg.n_tiers),
      probe=metrics.init_probe(router_features_width(cfg), cfg.probe_capacity),
    ),
    key=jax.random.key_data(k_state),
    router=rstate,
    ewc=ewc.init_ewc(rstate.params),
    bank=patterns.init_bank(cfg.bank_capacity, d, cfg.n_tiers),
    router_proj=jax.random.normal(k_proj, (d, cfg.router_proj_dim), jnp.float32) / d**0.5,
  )
