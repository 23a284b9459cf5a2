"""`SonaConfig`: the frozen, hashable, validated configuration of every loop.

The config is passed to jitted functions as a static argument, so it must be hashable and must not
change after construction. It validates itself: a bad value raises `ValueError` naming the field,
the value and the allowed range, before any JAX computation runs.

Defaults follow the seed document (`shared/seed`, sections 2-5) except where docs/design.md
("Departures from the original design") says otherwise; the micro-LoRA learning rate is set by
measurement (see `micro_lr`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["SonaConfig"]


def _check_range(name: str, value: Any, lo: float | None, hi: float | None, *, integer: bool):
  if integer:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"SonaConfig.{name} must be an int, got {value!r}")
  else:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"SonaConfig.{name} must be a finite number, got {value!r}")
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    lo_s = "-inf" if lo is None else lo
    hi_s = "inf" if hi is None else hi
    raise ValueError(f"SonaConfig.{name}={value!r} is out of range; allowed [{lo_s}, {hi_s}]")


@dataclasses.dataclass(frozen=True)
class SonaConfig:
  """Configuration of a SONA learner (docs/design.md, "SonaConfig").

  Attributes:
    dim: embedding width of queries and memories (LoRA `d_in = d_out = dim`).
    micro_rank: rank of the per-request micro-LoRA, 1-2 (seed: "rank 1-2").
    base_rank: rank of the consolidated base LoRA, 4-16 (seed).
    micro_alpha: LoRA alpha of the micro adapter; scale `alpha / rank` (PEFT). None means
      `alpha = rank` (scale 1).
    base_alpha: LoRA alpha of the base adapter; None means `alpha = rank`.
    micro_lr: SGD learning rate of `micro_update`. Gradients in feedback mode have norm <= 1, so the
      seed's 0.002 learns too little to matter within thousands of requests. The default was set on
      the `load_digits` drift stream (`datasets.digits_drift`, 1,000 requests, rank 2): held-out
      precision@5 0.633 -> 0.845 at drift 2 and 0.405 -> 0.72 at drift 3; 0.2-1.0 learnt faster at
      first but ended lower and noisier.
    micro_clip: maximum norm of each factor's step (A and B separately; docs/design.md,
      "Micro-LoRA step"): unclipped SGD diverged at lr >= 0.1 in the prototype; 0.25 was stable
      at lr 0.2.
    gate_quality_margin: Loop A updates the micro-LoRA only when `|quality - 0.5| > margin` ...
    gate_latency_ratio: ... or when `latency_ms / target_latency_ms > ratio` (seed section 2).
    n_tiers: number of model tiers the router chooses between.
    tier_costs: relative cost of each tier, cheapest first; length `n_tiers`.
    target_latency_ms: default latency target of `make_interaction`.
    max_ids: fixed length `k` of the `used` / `unused` memory id lists of an interaction. The
      default 10 takes the feedback of a top-10 retrieval (any split into used and unused);
      Loop A reads the 2k embedding rows, so a shorter list is a little cheaper (bench_instant).
    graph_capacity: number of memory nodes `N` (fixed; a full graph evicts the lowest-value
      established node, see `admission_window_s`).
    graph_degree: edge slots per node `K` (ELL layout).
    hebbian_strengthen: Hebbian rate for used memories, `w <- w + rate (1 - w)` (seed: +5%).
    hebbian_weaken: Hebbian rate for retrieved-but-unused memories, `w <- w (1 - rate)` (seed: -2%).
    node_quality_ema: weight of a new quality observation in a used node's quality EMA.
    recency_half_life_s: half-life of the recency factor in a node's eviction value.
    admission_window_s: a full graph never evicts a memory younger than this (seconds since its
      creation) while an older one is alive, so a new memory can earn accesses before it competes
      on value (W-TinyLFU's admission window); 0 turns the window off. A day spans 24 Loop B
      cycles, and is short beside the 7-day recency half-life.
    signal_capacity: capacity of the Loop A -> Loop B signal ring buffer.
    trajectory_capacity: capacity of the trajectory ring buffer (seed: 10,000).
    pattern_clusters: k of the Loop B k-means++ pattern extraction (seed: 50).
    min_samples: Loop B skips a scheduled cycle with fewer waiting signals (seed).
    background_interval_s: Loop B period in seconds (seed: hourly).
    success_threshold: a served request succeeded when its learning quality is >= this (router
      labels, pattern tier statistics).
    router_hidden: FastGRNN hidden width.
    router_proj_dim: width of the fixed random projection of the query in the router features.
    router_lr: Adam learning rate of the router.
    router_steps: router mini-batch steps per Loop B cycle.
    router_batch: router mini-batch size.
    router_threshold: `route` picks the cheapest tier estimated to succeed with this probability.
      Set on the digits routing stream (benchmarks/bench_learning.py, 3 data seeds, calibrated
      estimates with Thompson sampling): 0.93 keeps 97.9% of the always-SVM success at 30% of its
      cost on held-out images; in the development sweep 0.9 kept 96.5% at 21%, 0.95 98.4% at 33%.
    router_epsilon: uniform exploration rate of `route`, on top of Thompson sampling (a floor on
      every tier's propensity).
    router_neighbours: `route`'s success estimates read, per tier, this many recorded outcomes of
      that tier nearest to the query among the recent learning signals
      (`patterns.neighbour_estimates`).
    router_memory: how many of the newest learning-signal slots those neighbours are searched in
      (`buffer.recent`); None: `min(signal_capacity, max(256, 2**20 // dim))`, at most about 4 MB
      of queries read per route (1,365 signals at dim 768, 256 at 4096, the whole default ring
      at dim <= 104); 0: no memory, the router head alone. A route reads `router_memory x dim`
      floats: raise it for better estimates where route latency allows.
    router_bank_temperature: proximity temperature of the neighbours' weights,
      `exp((cos - cos_max) / temperature)` (the name is kept from when the estimates read
      ReasoningBank patterns, so saved configs still load).
    router_prior_strength: pseudo-trials of the router head's prediction in the estimates: a tier
      with fewer weighted trials than this near the query mostly follows the head. (On the digits
      and breast-cancer routing streams, 3 seeds each, 20 neighbours / 0.1 / 8 was the best
      measured of neighbours 10-40, temperature 0.03-0.2, strength 4-8.)
    router_thompson: explore by Thompson sampling from the estimates' Beta posteriors.
    router_cost_weight: None routes by `router_threshold`; a number routes by the cost rule
      `argmax_k p_k - router_cost_weight * cost_k`.
    router_budget_rate: step size of `Sona.route(budget=...)`'s controller of the cost weight
      (in units of 1 / max cost, per request).
    ewc_lambda: EWC++ penalty strength on the router (a permuted-digits sweep in
      tests/test_ewc.py found 100 keeps most of the old task at ~1 point of the new one).
    ewc_alpha: EWC++ weight of the NEW Fisher estimate (Chaudhry et al. 2018).
    fisher_samples: signals used for the per-sample gradients of the Fisher estimate.
    bank_capacity: number of patterns the ReasoningBank holds.
    pattern_merge_threshold: a new pattern merges into its nearest one at this cosine or above.
    probe_capacity: size of the retention probe set (signals kept from earlier Loop B cycles).
    probe_per_cycle: signals each Loop B cycle adds to the probe set (2 per hourly cycle keep about
      a week of probes at the default capacity).
    deep_weekday: weekday of the weekly Loop C, 0 = Monday ... 6 = Sunday (seed: Sunday).
    deep_hour_utc: hour (UTC) of the weekly Loop C (seed: 03:00).
    consolidate_min_access: Loop C consolidation: a node is high-value when its access count is
      above this (seed: > 5) ...
    consolidate_min_quality: ... and its quality above this (seed: > 0.7).
    consolidate_min_cosine: high-value pairs above this cosine are strengthened (seed: > 0.7) ...
    consolidate_rate: ... by `rate * cosine` (seed: 0.1).
    decay_max_access: a node is low-value when its access count is below this (seed: < 2) ...
    decay_min_age_days: ... and it is older than this many days (seed: > 30) ...
    decay_factor: ... and its strength is multiplied by this (seed: 0.5).
    abstraction_min_cluster: Loop C abstraction makes a meta-pattern only for clusters larger than
      this (seed: > 3).
    n_dreams: random walks per Loop C dream phase.
    dream_length: steps of each dream walk.
    dream_temperature: softmax temperature over edge weights of a dream walk (0 = heaviest edge).
    dream_min_novelty: a dream proposes links only when its novelty is above this (seed: 0.5) ...
    dream_min_coherence: ... and its coherence above this (seed: 0.3).
    dream_edge_scale: a proposed CREATIVE edge gets weight `scale * strength` (seed: 0.1).
    analogy_min_confidence: an ANALOGY edge needs offset cosine above this (seed: 0.6).
    louvain_seed: seed of the Louvain community detection that defines domains.
    dedup_threshold: Loop C compression merges nodes at or above this cosine (seed: 0.95).
    prune_threshold: Loop C compression prunes edges below this weight (seed: 0.01).
    ivf_cells: cells of the inverted-file partition for approximate all-pairs candidate search
      (0 = about `sqrt(N)`).
    ivf_probe: nearest cells searched per query cell.
    phi_max_nodes: the Phi proxy uses at most this many most-accessed nodes (docs/design.md,
      "Integration proxy").
    phi_exhaustive_max: the minimum-information bipartition is searched exhaustively up to this many
      nodes, spectrally above.
  """

  dim: int
  micro_rank: int = 2
  base_rank: int = 8
  micro_alpha: float | None = None
  base_alpha: float | None = None
  micro_lr: float = 0.05
  micro_clip: float = 0.25
  gate_quality_margin: float = 0.1
  gate_latency_ratio: float = 1.2
  n_tiers: int = 3
  tier_costs: tuple[float, ...] = (1.0, 3.0, 10.0)
  target_latency_ms: float = 200.0
  max_ids: int = 10
  graph_capacity: int = 10_000
  graph_degree: int = 16
  hebbian_strengthen: float = 0.05
  hebbian_weaken: float = 0.02
  node_quality_ema: float = 0.1
  recency_half_life_s: float = 7 * 86_400.0
  admission_window_s: int = 86_400
  signal_capacity: int = 10_000
  trajectory_capacity: int = 10_000
  pattern_clusters: int = 50
  min_samples: int = 100
  background_interval_s: int = 3600
  success_threshold: float = 0.5
  router_hidden: int = 16
  router_proj_dim: int = 16
  router_lr: float = 1e-2
  router_steps: int = 100
  router_batch: int = 128
  router_threshold: float = 0.93
  router_epsilon: float = 0.05
  router_neighbours: int = 20
  router_memory: int | None = None
  router_bank_temperature: float = 0.1
  router_prior_strength: float = 8.0
  router_thompson: bool = True
  router_cost_weight: float | None = None
  router_budget_rate: float = 0.05
  ewc_lambda: float = 100.0
  ewc_alpha: float = 0.3
  fisher_samples: int = 256
  bank_capacity: int = 1000
  pattern_merge_threshold: float = 0.9
  probe_capacity: int = 336
  probe_per_cycle: int = 2
  deep_weekday: int = 6
  deep_hour_utc: int = 3
  consolidate_min_access: int = 5
  consolidate_min_quality: float = 0.7
  consolidate_min_cosine: float = 0.7
  consolidate_rate: float = 0.1
  decay_max_access: int = 2
  decay_min_age_days: float = 30.0
  decay_factor: float = 0.5
  abstraction_min_cluster: int = 3
  n_dreams: int = 256
  dream_length: int = 8
  dream_temperature: float = 0.5
  dream_min_novelty: float = 0.5
  dream_min_coherence: float = 0.3
  dream_edge_scale: float = 0.1
  analogy_min_confidence: float = 0.6
  louvain_seed: int = 0
  dedup_threshold: float = 0.95
  prune_threshold: float = 0.01
  ivf_cells: int = 0
  ivf_probe: int = 4
  phi_max_nodes: int = 256
  phi_exhaustive_max: int = 12

  def __post_init__(self):
    _check_range("dim", self.dim, 1, 1 << 16, integer=True)
    _check_range("micro_rank", self.micro_rank, 1, 2, integer=True)
    _check_range("base_rank", self.base_rank, 4, 16, integer=True)
    if self.base_rank > self.dim:
      raise ValueError(f"SonaConfig.base_rank={self.base_rank} must be <= dim={self.dim}")
    for name in ("micro_alpha", "base_alpha"):
      value = getattr(self, name)
      if value is not None:
        _check_range(name, value, 1e-6, None, integer=False)
    _check_range("micro_lr", self.micro_lr, 0.0, 100.0, integer=False)
    _check_range("micro_clip", self.micro_clip, 1e-9, None, integer=False)
    _check_range("gate_quality_margin", self.gate_quality_margin, 0.0, 0.5, integer=False)
    _check_range("gate_latency_ratio", self.gate_latency_ratio, 0.0, None, integer=False)
    _check_range("n_tiers", self.n_tiers, 1, 64, integer=True)
    if not isinstance(self.tier_costs, tuple):
      # Lists are accepted for convenience but stored as a tuple so the config stays hashable.
      try:
        object.__setattr__(self, "tier_costs", tuple(float(c) for c in self.tier_costs))
      except TypeError as e:
        raise ValueError(
          f"SonaConfig.tier_costs must be a sequence of numbers, got {self.tier_costs!r}"
        ) from e
    if len(self.tier_costs) != self.n_tiers:
      raise ValueError(
        f"SonaConfig.tier_costs has {len(self.tier_costs)} entries; expected n_tiers={self.n_tiers}"
      )
    for i, c in enumerate(self.tier_costs):
      _check_range(f"tier_costs[{i}]", c, 0.0, None, integer=False)
    _check_range("target_latency_ms", self.target_latency_ms, 1e-6, None, integer=False)
    _check_range("max_ids", self.max_ids, 1, 64, integer=True)
    _check_range("graph_capacity", self.graph_capacity, 1, 1 << 24, integer=True)
    _check_range("graph_degree", self.graph_degree, 1, 256, integer=True)
    _check_range("hebbian_strengthen", self.hebbian_strengthen, 0.0, 1.0, integer=False)
    _check_range("hebbian_weaken", self.hebbian_weaken, 0.0, 1.0, integer=False)
    _check_range("node_quality_ema", self.node_quality_ema, 0.0, 1.0, integer=False)
    _check_range("recency_half_life_s", self.recency_half_life_s, 1.0, None, integer=False)
    _check_range("admission_window_s", self.admission_window_s, 0, None, integer=True)
    _check_range("signal_capacity", self.signal_capacity, 1, 1 << 24, integer=True)
    _check_range("trajectory_capacity", self.trajectory_capacity, 1, 1 << 24, integer=True)
    _check_range("pattern_clusters", self.pattern_clusters, 1, 4096, integer=True)
    _check_range("min_samples", self.min_samples, 1, None, integer=True)
    _check_range("background_interval_s", self.background_interval_s, 1, None, integer=True)
    _check_range("success_threshold", self.success_threshold, 0.0, 1.0, integer=False)
    _check_range("router_hidden", self.router_hidden, 1, 1024, integer=True)
    _check_range("router_proj_dim", self.router_proj_dim, 1, 1024, integer=True)
    _check_range("router_lr", self.router_lr, 0.0, 10.0, integer=False)
    _check_range("router_steps", self.router_steps, 0, 100_000, integer=True)
    _check_range("router_batch", self.router_batch, 1, 1 << 16, integer=True)
    _check_range("router_threshold", self.router_threshold, 0.0, 1.0, integer=False)
    _check_range("router_epsilon", self.router_epsilon, 0.0, 1.0, integer=False)
    _check_range("router_neighbours", self.router_neighbours, 1, 4096, integer=True)
    if self.router_memory is not None:
      _check_range("router_memory", self.router_memory, 0, 1 << 24, integer=True)
    _check_range("router_bank_temperature", self.router_bank_temperature, 1e-6, None, integer=False)
    _check_range("router_prior_strength", self.router_prior_strength, 1e-6, None, integer=False)
    if not isinstance(self.router_thompson, bool):
      raise ValueError(f"SonaConfig.router_thompson must be a bool, got {self.router_thompson!r}")
    if self.router_cost_weight is not None:
      _check_range("router_cost_weight", self.router_cost_weight, 0.0, None, integer=False)
    _check_range("router_budget_rate", self.router_budget_rate, 0.0, 1.0, integer=False)
    _check_range("ewc_lambda", self.ewc_lambda, 0.0, None, integer=False)
    _check_range("ewc_alpha", self.ewc_alpha, 0.0, 1.0, integer=False)
    _check_range("fisher_samples", self.fisher_samples, 1, 1 << 16, integer=True)
    _check_range("bank_capacity", self.bank_capacity, 1, 1 << 20, integer=True)
    _check_range("pattern_merge_threshold", self.pattern_merge_threshold, -1.0, 1.0, integer=False)
    _check_range("probe_capacity", self.probe_capacity, 1, 1 << 20, integer=True)
    _check_range("probe_per_cycle", self.probe_per_cycle, 0, 1 << 16, integer=True)
    _check_range("deep_weekday", self.deep_weekday, 0, 6, integer=True)
    _check_range("deep_hour_utc", self.deep_hour_utc, 0, 23, integer=True)
    _check_range("consolidate_min_access", self.consolidate_min_access, 0, None, integer=True)
    _check_range("consolidate_min_quality", self.consolidate_min_quality, 0.0, 1.0, integer=False)
    _check_range("consolidate_min_cosine", self.consolidate_min_cosine, -1.0, 1.0, integer=False)
    _check_range("consolidate_rate", self.consolidate_rate, 0.0, 1.0, integer=False)
    _check_range("decay_max_access", self.decay_max_access, 0, None, integer=True)
    _check_range("decay_min_age_days", self.decay_min_age_days, 0.0, None, integer=False)
    _check_range("decay_factor", self.decay_factor, 0.0, 1.0, integer=False)
    _check_range("abstraction_min_cluster", self.abstraction_min_cluster, 1, None, integer=True)
    _check_range("n_dreams", self.n_dreams, 0, 1 << 20, integer=True)
    _check_range("dream_length", self.dream_length, 2, 1024, integer=True)
    _check_range("dream_temperature", self.dream_temperature, 0.0, None, integer=False)
    _check_range("dream_min_novelty", self.dream_min_novelty, 0.0, 1.0, integer=False)
    _check_range("dream_min_coherence", self.dream_min_coherence, -1.0, 1.0, integer=False)
    _check_range("dream_edge_scale", self.dream_edge_scale, 0.0, 1.0, integer=False)
    _check_range("analogy_min_confidence", self.analogy_min_confidence, -1.0, 1.0, integer=False)
    _check_range("louvain_seed", self.louvain_seed, 0, None, integer=True)
    _check_range("dedup_threshold", self.dedup_threshold, -1.0, 1.0, integer=False)
    _check_range("prune_threshold", self.prune_threshold, 0.0, 1.0, integer=False)
    _check_range("ivf_cells", self.ivf_cells, 0, 1 << 20, integer=True)
    _check_range("ivf_probe", self.ivf_probe, 1, 1 << 20, integer=True)
    _check_range("phi_max_nodes", self.phi_max_nodes, 2, 4096, integer=True)
    _check_range("phi_exhaustive_max", self.phi_exhaustive_max, 2, 20, integer=True)

  @property
  def micro_scale(self) -> float:
    """LoRA scale `alpha / rank` of the micro adapter (PEFT convention)."""
    alpha = self.micro_rank if self.micro_alpha is None else self.micro_alpha
    return float(alpha) / self.micro_rank

  @property
  def base_scale(self) -> float:
    """LoRA scale `alpha / rank` of the base adapter (PEFT convention)."""
    alpha = self.base_rank if self.base_alpha is None else self.base_alpha
    return float(alpha) / self.base_rank

  def __hash__(self) -> int:
    # jit hashes its static config on every call: hashing ~70 fields cost ~5 us per request, so
    # the hash is computed once (the config is frozen).
    h = self.__dict__.get("_hash")
    if h is None:
      h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
      object.__setattr__(self, "_hash", h)
    return h

  def __eq__(self, other) -> bool:
    # jit compares its static config with the cached key on every call; the generated comparison
    # of ~70 fields costs ~2 us per request, and the key is usually this very object.
    if self is other:
      return True
    if other.__class__ is not self.__class__:
      return NotImplemented
    values = lambda c: tuple(getattr(c, f.name) for f in dataclasses.fields(c))
    return hash(self) == hash(other) and values(self) == values(other)

  def replace(self, **changes) -> SonaConfig:
    """Returns a copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """A JSON-serialisable dict of every field (checkpoint metadata)."""
    d = dataclasses.asdict(self)
    d["tier_costs"] = list(self.tier_costs)
    return d

  @property
  def router_memory_rows(self) -> int:
    """How many signal slots `route` searches for neighbours (`router_memory` resolved).

    >>> cfg = SonaConfig(dim=768)
    >>> cfg.router_memory_rows, cfg.replace(router_memory=0).router_memory_rows
    (1365, 0)
    """
    if self.router_memory is not None:
      return min(self.router_memory, self.signal_capacity)
    return min(self.signal_capacity, max(256, (1 << 20) // self.dim))

  @classmethod
  def from_dict(cls, d: dict) -> SonaConfig:
    """Inverse of `to_dict`; unknown keys raise `ValueError`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"SonaConfig.from_dict: unknown fields {unknown}")
    d = dict(d)
    if "tier_costs" in d:
      d["tier_costs"] = tuple(d["tier_costs"])
    return cls(**d)
