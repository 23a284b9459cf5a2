"""The schedule: a pure `due`, and a simulated two weeks of serving on an injected clock."""

import datetime as dt

import jax
import numpy as np

import sona_jax as sona
from sona_jax.driver import due, last_deep_slot

CFG = sona.SonaConfig(
  dim=8,
  base_rank=4,
  graph_capacity=16,
  signal_capacity=64,
  trajectory_capacity=16,
  min_samples=5,
  pattern_clusters=2,
  bank_capacity=8,
  router_steps=2,
  router_batch=8,
  fisher_samples=4,
)
# Monday 2026-11-02 00:00 UTC.
START = dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp()


def test_last_deep_slot_is_sunday_0300_utc():
  for now in (START, START + 5.5 * 86400, START + 13 * 86400 + 7200):
    slot = dt.datetime.fromtimestamp(last_deep_slot(now, CFG), dt.UTC)
    assert (slot.weekday(), slot.hour, slot.minute, slot.second) == (6, 3, 0, 0)
    assert 0 <= now - slot.timestamp() < 7 * 86400
  other = CFG.replace(deep_weekday=2, deep_hour_utc=17)
  slot = dt.datetime.fromtimestamp(last_deep_slot(START + 10 * 86400, other), dt.UTC)
  assert (slot.weekday(), slot.hour) == (2, 17)


def test_due_is_pure_and_follows_the_rules():
  d = due(START + 3599, START, START, CFG)
  assert d == (False, False)
  assert due(START + 3600, START, START, CFG).background
  sunday_3am = START + 6 * 86400 + 3 * 3600
  assert not due(sunday_3am - 1, START, START, CFG).deep
  assert due(sunday_3am, START, START, CFG).deep
  assert not due(sunday_3am + 60, START, sunday_3am, CFG).deep  # already ran this week


class Clock:
  def __init__(self, t):
    self.t = t

  def __call__(self):
    return self.t


def test_two_simulated_weeks_run_loop_b_hourly_and_loop_c_twice():
  clock = Clock(START)
  engine = sona.Sona(CFG, key=jax.random.key(0), clock=clock)
  ids = engine.add_memories(np.eye(8)[:4] + 0.1)
  rng = np.random.default_rng(0)
  skipped = 0
  for minute in range(0, 14 * 24 * 60, 20):  # a tick every 20 simulated minutes
    clock.t = START + minute * 60
    quiet = 3 * 24 * 60 <= minute < 3 * 24 * 60 + 180  # 3 hours without traffic on day 4
    if not quiet:
      for _ in range(2):
        engine.observe(
          sona.make_interaction(
            CFG,
            query=rng.normal(size=8),
            quality=float(rng.uniform()),
            used=[int(ids[rng.integers(4)])],
            tier=int(rng.integers(3)),
            time=engine.now(),
          )
        )
    out = engine.tick()
    if out["background"] is not None and not out["background"].ran:
      skipped += 1
  runs = [t for loop, t in engine.history if loop == "background"]
  deeps = [t for loop, t in engine.history if loop == "deep"]
  # Loop B hourly: 14 * 24 = 336 slots, minus the hours the quiet spell left below min_samples.
  gaps = np.diff([START, *runs])
  assert 320 <= len(runs) <= 336, len(runs)
  assert np.all(gaps >= CFG.background_interval_s)
  assert skipped >= 1
  # Loop C exactly twice, at the first tick at or after each Sunday 03:00 UTC.
  assert len(deeps) == 2
  for t, week in zip(deeps, (0, 1), strict=True):
    slot = START + (6 + 7 * week) * 86400 + 3 * 3600
    assert slot <= t < slot + 20 * 60
