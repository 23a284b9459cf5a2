"""The Loop C sequencer: `deep_step` runs the six phases in order (docs/design.md, "Loop C").

Each phase lives in its own module of `sona_jax.loops.deep` and returns its own report; this module
only sequences them, splits the keys, times each phase and records what the cycle created in the
daily metrics.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax

from sona_jax import metrics
from sona_jax.config import SonaConfig
from sona_jax.loops.deep import abstraction, analogies, compression, consolidation, dreams, phi
from sona_jax.state import SonaState

__all__ = ["DeepReport", "deep_step"]


class DeepReport(NamedTuple):
  """What a Loop C cycle did: each phase's report and wall times.

  Attributes:
    consolidation: phase 1, `consolidation.ConsolidationReport`.
    abstraction: phase 2, `abstraction.AbstractionReport`.
    dreams: phase 3, `dreams.DreamReport`.
    transfer: phase 4, `analogies.TransferReport`.
    compression: phase 5, `compression.CompressionReport`.
    phi: phase 6, `phi.PhiReport`.
    seconds: wall time per phase (`consolidation`, `abstraction`, `dreams`, `transfer`,
      `compression`, `phi`) and `total`.
  """

  consolidation: consolidation.ConsolidationReport
  abstraction: abstraction.AbstractionReport
  dreams: dreams.DreamReport
  transfer: analogies.TransferReport
  compression: compression.CompressionReport
  phi: phi.PhiReport
  seconds: dict[str, float]


def deep_step(state: SonaState, cfg: SonaConfig, now, *, measure_recall: bool = True):
  """Loop C: one weekly deep cycle (see `sona_jax.loops.deep`).

  Args:
    state: the learner's state (not donated: the driver may still serve from it).
    cfg: the config.
    now: int seconds since the time origin.
    measure_recall: measure the recall of the approximate pair searches against brute force on a
      sample (about a second at 100,000 nodes).

  Returns:
    `(state, DeepReport)`: the state with a new graph, bank and key.

  Examples:
    >>> import jax, jax.numpy as jnp, sona_jax as sona
    >>> from sona_jax import graph as G, metrics
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, graph_degree=4, signal_capacity=8,
    ...                       trajectory_capacity=8, n_dreams=8, dream_length=3)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> g, _, _ = G.add_nodes(state.graph, jnp.eye(8)[jnp.array([0, 0, 1, 2])])  # 1 copies 0
    >>> g, _ = G.add_edges(g, [0, 1, 2, 3], [2, 3, 3, 0], [0.5] * 4, G.HEBBIAN)
    >>> state, report = deep_step(state._replace(graph=g), cfg, now=86_400)
    >>> list(report.seconds)  # the six phases, in order
    ['consolidation', 'abstraction', 'dreams', 'transfer', 'compression', 'phi', 'total']
    >>> report.compression.merged.tolist(), int(state.graph.alive.sum())  # 1 merged into 0
    ([[1, 0]], 3)
    >>> report.phi.n_nodes, round(report.phi.phi, 3)  # Phi_AR of the compressed graph
    (3, 0.519)
    >>> day = metrics.daily_table(state.metrics.daily)[-1]  # recorded in today's metrics
    >>> day["day"], round(day["phi"], 3)
    (1, 0.519)
  """
  seconds: dict[str, float] = {}
  t_start = t = time.perf_counter()

  def lap(name):
    nonlocal t
    now_t = time.perf_counter()
    seconds[name] = now_t - t
    t = now_t

  key = jax.random.wrap_key_data(state.key)
  key, k_cons, k_dream, k_comp = jax.random.split(key, 4)
  now = int(now)

  graph, consolidated = consolidation.consolidate_memories(
    state.graph, cfg, now, key=k_cons, measure_recall=measure_recall
  )
  lap("consolidation")
  bank, abstracted = abstraction.abstract_patterns(state.bank, cfg, now)
  lap("abstraction")
  graph, dreamt = dreams.dream(graph, cfg, k_dream)
  lap("dreams")
  graph, transferred = analogies.transfer(graph, cfg)
  lap("transfer")
  graph, compressed = compression.compress_memory(
    graph, cfg, key=k_comp, measure_recall=measure_recall
  )
  lap("compression")
  phi_report = phi.graph_phi(graph, cfg)
  lap("phi")
  # What the cycle created goes into today's metrics bins (ImprovementMetrics).
  daily = state.metrics.daily
  for column, value in (
    (metrics.ABSTRACTIONS, len(abstracted.meta_ids)),
    (metrics.NOVEL, len(dreamt.edges.inserted)),
    (metrics.TRANSFERS, len(transferred.edges.inserted)),
    (metrics.PHI, phi_report.phi),
  ):
    daily = metrics.record_event(daily, now, column, value)
  seconds["total"] = time.perf_counter() - t_start
  new_state = state._replace(
    graph=graph,
    bank=bank,
    key=jax.random.key_data(key),
    metrics=state.metrics._replace(daily=daily),
  )
  report = DeepReport(
    consolidation=consolidated,
    abstraction=abstracted,
    dreams=dreamt,
    transfer=transferred,
    compression=compressed,
    phi=phi_report,
    seconds=seconds,
  )
  return new_state, report
