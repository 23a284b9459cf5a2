"""Daily bins, retention probes and ImprovementMetrics."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import sona_jax as sona
from sona_jax import metrics

CFG = sona.SonaConfig(
  dim=16,
  base_rank=4,
  graph_capacity=64,
  graph_degree=4,
  signal_capacity=512,
  trajectory_capacity=64,
  min_samples=20,
  pattern_clusters=4,
  bank_capacity=16,
  router_steps=100,
  router_batch=64,
  fisher_samples=32,
  probe_capacity=64,
  probe_per_cycle=16,
  # No EWC penalty: learning the opposite task must forget the old one (the retention test), and
  # every test of the file then runs Loop B on this one config (one compile).
  ewc_lambda=0.0,
)
# Loop A runs in scans of this many interactions: every batch below is a multiple of it, so
# `instant_scan` compiles once for the file (each batch size is a compile of its own).
SCAN = 20


def _loop_a(state, its):
  """`state` after Loop A over `its` in order: consecutive scans of `SCAN` interactions, the same
  as one scan of all (sequential semantics) at one batch size."""
  assert len(its) % SCAN == 0, len(its)
  for i in range(0, len(its), SCAN):
    state, _ = sona.instant_scan(state, sona.stack_interactions(its[i : i + SCAN]), CFG)
  return state


def _signal_rows(times, quality, tier, latency_ratio, seed=0):
  n = len(times)
  rng = np.random.default_rng(seed)
  its = [
    sona.make_interaction(
      CFG,
      query=rng.normal(size=CFG.dim).astype(np.float32),
      quality=float(quality[i]),
      tier=int(tier[i]),
      latency_ms=float(latency_ratio[i] * CFG.target_latency_ms),
      time=int(times[i]),
    )
    for i in range(n)
  ]
  state = _loop_a(sona.init_state(CFG, jax.random.key(0)), its)
  _, rows, mask = sona.buffer.consume(state.signals)
  return rows, mask


def _reference(batches):
  """Sequential reference of the rolling bins: slot -> (day, sums), stale records ignored."""
  table = {}
  for times, q, tier, lat in batches:
    days = [t // metrics.DAY_S for t in times]
    newest = {}
    for d in days:
      newest[d % 30] = max(newest.get(d % 30, -1), d)
    for slot, d in newest.items():
      if slot not in table or table[slot][0] < d:
        table[slot] = (d, np.zeros(5), np.zeros(CFG.n_tiers))
    for d, qi, ti, li in zip(days, q, tier, lat, strict=True):
      day, sums, tiers = table[d % 30]
      if day != d:
        continue
      cost = CFG.tier_costs[ti]
      sums += [1, qi, li, cost, float(qi >= CFG.success_threshold)]
      tiers[ti] += 1
  return table


def test_record_signals_matches_sequential_reference():
  rng = np.random.default_rng(1)
  daily = metrics.init_daily(CFG.n_tiers)
  batches = []
  # Three drains: days 0-9, then 5-44 (rows of days 0-14 recycled), then a late batch of old days.
  for lo, hi, n in ((0, 10, 60), (5, 45, 120), (0, 20, 40)):
    times = np.sort(rng.integers(lo * 86_400, hi * 86_400, n))
    q = rng.uniform(size=n).astype(np.float32)
    tier = rng.integers(0, CFG.n_tiers, n)
    lat = rng.uniform(0.2, 3.0, n).astype(np.float32)
    rows, mask = _signal_rows(times, q, tier, lat, seed=lo + hi)
    daily = metrics.record_signals(daily, rows, mask, CFG)
    batches.append((times.tolist(), q, tier, lat))
  ref = _reference(batches)
  day = np.asarray(daily.day)
  bins = np.asarray(daily.bins)
  assert sorted(d for d in day if d >= 0) == sorted(v[0] for v in ref.values())
  for slot, (d, sums, tiers) in ref.items():
    assert day[slot] == d
    np.testing.assert_allclose(bins[slot, :5], sums, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(bins[slot, len(metrics.COLUMNS) :], tiers)
    assert math.isnan(bins[slot, metrics.PHI]) and math.isnan(bins[slot, metrics.RETENTION])
  # The window holds the 30 newest days only; each recycled row starts from zero.
  assert day.max() == 44 and day[day >= 0].min() >= 15
  table = metrics.daily_table(daily)
  assert [r["day"] for r in table] == sorted(day[day >= 0].tolist())


def test_record_event_adds_counts_and_sets_last_values():
  d = metrics.init_daily(2)
  d = metrics.record_event(d, 100, metrics.NOVEL, 3.0)
  d = metrics.record_event(d, 200, metrics.NOVEL, 2.0)
  d = metrics.record_event(d, 300, metrics.PHI, 0.5)
  d = metrics.record_event(d, 400, metrics.PHI, 0.25)
  d = metrics.record_event(d, 86_400 + 5, metrics.NOVEL, 1.0)
  rows = metrics.daily_table(d)
  assert [(r["day"], r["novel_connections"], r["phi"]) for r in rows[:1]] == [(0, 5, 0.25)]
  assert rows[1]["day"] == 1 and rows[1]["novel_connections"] == 1 and math.isnan(rows[1]["phi"])
  # A record 30+ days older than the row's day is ignored, not mixed into another day.
  d2 = metrics.record_event(d, 5, metrics.NOVEL, 7.0)
  assert metrics.daily_table(d2)[0]["novel_connections"] == 12
  d3 = metrics.record_event(d, 31 * 86_400, metrics.NOVEL, 1.0)
  d3 = metrics.record_event(d3, 5, metrics.NOVEL, 7.0)
  assert [(r["day"], r["novel_connections"]) for r in metrics.daily_table(d3)] == [(31, 1)]
  assert float(d3.bins[0, metrics.NOVEL]) == 5.0  # the stale day-0 row was not touched


def _task_state(n, flip, seed, state=None, t0=0):
  """Signals whose success on tier 0 depends on the sign of the query's first coordinate."""
  rng = np.random.default_rng(seed)
  if state is None:
    state = sona.init_state(CFG, jax.random.key(0))
  its = []
  for i in range(n):
    q = rng.normal(size=CFG.dim).astype(np.float32)
    ok = (q[0] > 0) != flip
    its.append(sona.make_interaction(CFG, query=q, quality=0.9 if ok else 0.1, tier=0, time=t0 + i))
  return _loop_a(state, its)


def test_retention_is_measured_on_older_probes_and_falls_when_the_task_flips():
  state = _task_state(200, False, 0)
  state, rep = sona.background_step(state, CFG, 1_000)
  assert rep.n_probes == 0 and math.isnan(rep.retention)  # nothing older to measure yet
  assert int(state.metrics.probe.meta[sona.buffer.SIZE]) == CFG.probe_per_cycle
  state = _task_state(200, False, 1, state, 2_000)
  state, same = sona.background_step(state, CFG, 3_000)
  assert same.n_probes == CFG.probe_per_cycle
  assert same.retention >= 0.9  # the same task: the probes are still classified right
  state = _task_state(400, True, 2, state, 4_000)
  state, flipped = sona.background_step(state, CFG, 5_000)
  assert flipped.retention < 0.5  # learning the opposite task forgets the old one
  row = metrics.daily_table(state.metrics.daily)[-1]
  assert row["retention"] == np.float32(flipped.retention)
  assert row["requests"] == 800 and row["patterns"] >= 1


def test_probe_pack_round_trip():
  rng = np.random.default_rng(0)
  p = metrics.Probe(
    features=jnp.asarray(rng.normal(size=(5, 7)), jnp.float32),
    tier=jnp.arange(5, dtype=jnp.int32),
    success=jnp.asarray([1, 0, 1, 0, 1], jnp.float32),
    correct_then=jnp.asarray([0, 1, 1, 0, 1], jnp.float32),
    cycle=jnp.asarray([0, 3_000_000_000 % 2**31, 86_400 * 200, 7, 1], jnp.int32),
  )
  back = metrics.unpack_probe(metrics.pack_probe(p))
  for a, b in zip(p, back, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_improvement_metrics_and_overall_score_from_a_driver_run():
  t = [0.0]
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=lambda: t[0])
  rng = np.random.default_rng(0)
  day_quality = [0.4, 0.55, 0.7]
  day_latency = [2.0, 1.5, 1.0]
  for day, (qm, lm) in enumerate(zip(day_quality, day_latency, strict=True)):
    for i in range(60):
      t[0] = day * 86_400 + i * 600
      q = float(np.clip(qm + rng.normal(scale=0.05), 0, 1))
      engine.observe(
        sona.make_interaction(
          CFG,
          query=rng.normal(size=CFG.dim).astype(np.float32),
          quality=q,
          latency_ms=lm * CFG.target_latency_ms,
          tier=i % 3,
          time=int(t[0]),
        )
      )
      engine.tick()
  engine.run_background()
  m = engine.metrics()
  rows = metrics.daily_table(engine.state.metrics.daily)
  assert [r["day"] for r in rows] == [0, 1, 2] and all(r["requests"] == 60 for r in rows)
  np.testing.assert_allclose(m.quality_delta_7d, rows[2]["quality"] - rows[0]["quality"], 1e-6)
  assert 0.25 < m.quality_delta_7d < 0.35
  np.testing.assert_allclose(m.latency_delta_7d, 1.0 / 2.0 - 1.0, rtol=1e-5)
  assert m.cost_delta_7d == 0.0 or abs(m.cost_delta_7d) < 1e-6  # the same tier mix every day
  assert m.patterns_learned_7d == sum(r["patterns"] for r in rows) > 0
  assert math.isnan(m.phi_current) and m.novel_connections_7d == 0
  expected = (
    0.3 * m.quality_delta_7d
    + 0.2 * 0.5
    + 0.2 * min(m.patterns_learned_7d / 100, 1.0)
    + 0.15 * min(max(m.retention_rate_7d, 0.0), 1.0)
  )
  np.testing.assert_allclose(m.overall_score(), expected, rtol=1e-6)
  d = m.to_dict()
  assert d["phi_current"] is None and d["overall_score"] == m.overall_score()
  stats = engine.stats()
  import json

  json.dumps(stats)
  assert stats["requests"]["processed"] == 180 and stats["signals"]["waiting"] == 0
  assert stats["schedule"]["cycles"]["background"] >= 3
