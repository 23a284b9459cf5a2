"""Fast versions of the learning benchmarks (`benchmarks/bench_learning.py`) on real data: each
scenario runs at a small size and must show that learning happens. The two longest (memory past
capacity, the router's cost/quality trade) are marked `slow` in `conftest.py`: `pytest -m slow`."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import sona_jax as sona

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_learning", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_metric_definitions(bench):
  # Chaudhry et al. 2018 forgetting and average accuracy on a hand-made accuracy matrix.
  acc = np.array([[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.4, 0.6, 0.7]])
  assert bench.average_accuracy(acc) == pytest.approx((0.4 + 0.6 + 0.7) / 3)
  assert bench.forgetting(acc) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
  # APGR: a router equal to always-weak scores 0, one at the strong quality from the weak cost 1.
  assert bench.apgr([], 0.8, 0.9, 1.0, 10.0) == pytest.approx(0.5, abs=1e-3)  # the random mix
  assert bench.apgr([(1.0, 0.9)], 0.8, 0.9, 1.0, 10.0) == pytest.approx(1.0)
  assert bench.apgr([(5.5, 0.85)], 0.8, 0.9, 1.0, 10.0) == pytest.approx(0.5, abs=1e-3)
  # The routing rule's sweep reaches always-cheapest (threshold 0) and follows the probabilities.
  probs = np.array([[0.9, 0.5, 0.99], [0.2, 0.95, 0.99]])
  correct = np.array([[True, True, True], [False, True, True]])
  pts = bench.threshold_sweep(probs, correct, (1.0, 3.0, 10.0))
  assert pts[0] == (1.0, 0.5)
  assert (2.0, 1.0) in pts  # threshold 0.9: tier 0 for the first, tier 1 for the second


def test_ewcpp_reduces_forgetting_on_permuted_digits(bench):
  # Domain-incremental Permuted Digits, 3 tasks, 2 seeds, 100 Adam steps a task.
  data = bench.digits_splits()
  tr = bench.make_setting("permuted", "domain", n_tasks=3, n_seeds=2, data=data)
  configs = [(bench.NAIVE, 0.0, 0.0), (bench.EWCPP, 1000.0, sona.SonaConfig(dim=8).ewc_alpha)]
  (run,) = bench.run_continual(tr, [tr], configs, n_seeds=2, steps=100)
  acc = 100 * bench.average_accuracy(run.acc)
  fgt = 100 * bench.forgetting(run.acc)
  naive_acc, ewc_acc = acc[:2].mean(), acc[2:].mean()
  naive_fgt, ewc_fgt = fgt[:2].mean(), fgt[2:].mean()
  print(f"naive {naive_acc:.1f}/{naive_fgt:.1f}, EWC++ {ewc_acc:.1f}/{ewc_fgt:.1f}")
  # Measured (CPU): naive ACC 57.1, forgetting 49.5 points; EWC++ (lambda 1000) 69.2, 5.5.
  assert naive_fgt > 30  # the setting forgets without EWC
  assert ewc_fgt < 0.5 * naive_fgt
  assert ewc_acc > naive_acc + 5
  # Without a penalty every task is learnt while it is trained (the diagonal of the matrix).
  assert np.all(np.diagonal(run.acc[:2], axis1=1, axis2=2) > 0.85)


def test_feedback_repairs_drift_and_keeps_clean_retrieval(bench):
  # 100 clean then 500 drifted requests, Loop B every 300 requests on the simulated clock.
  res = bench.run_drift(seed=0, n_pre=100, n_post=500, every=250)
  rec = bench.recovery(res, at=500)
  print(f"frozen {res['frozen']:.3f} clean {res['clean']:.3f} recovery {rec:.2f}", end=" ")
  print(f"end: drifted {res['final_drift']:.3f} clean {res['final_clean']:.3f}")
  # Measured: frozen 0.602, clean ceiling 0.901; after 500 drifted requests and the last Loop B
  # held-out drifted 0.793 (64% of the loss recovered), clean 0.895.
  assert res["clean"] - res["frozen"] > 0.2  # the drift hurts
  assert rec >= 0.35
  assert res["final_drift"] >= res["frozen"] + 0.1  # still there after the last consolidation
  assert res["final_clean"] >= res["clean"] - 0.02
  assert res["loop_b_runs"] >= 2
  # The served stream improves too: the last 200 drifted requests beat the first 100.
  preq = res["prequential"][100:]
  assert preq[-200:].mean() > preq[:100].mean() + 0.05


@pytest.mark.filterwarnings("ignore:self.within_class_std_dev_:UserWarning")
def test_router_learns_to_trade_cost_for_quality(bench):
  res = bench.run_routing(seed=0, n_requests=600)
  # run_routing also measures the same router before any Loop B on the same held-out images.
  print(f"APGR before {res['apgr_untrained']:.3f} after {res['apgr']:.3f}", end=" ")
  print(f"(best random mix of tiers {res['apgr_random_mix']:.3f})")
  # Measured (600 requests, 2 Loop B cycles): APGR 0.835 after, 0.514 untrained (the best
  # random mix of tiers: 0.722; with 2,700 requests the benchmark measures 0.88-0.95). The
  # learned router must beat every non-contextual mix of tiers (margin 0.09 at this seed).
  assert res["loop_b_runs"] >= 2
  assert res["apgr"] >= res["apgr_random_mix"]
  assert res["ece"] <= 0.05  # calibrated estimates (measured 0.02-0.03)
  assert res["apgr"] >= res["apgr_untrained"] + 0.1


def test_drift_baselines_shift_rotation_encoder(bench):
  # Issue 16's baselines on 100 clean + 500 drifted requests (no serving: `drift_stream`).
  shift = bench.drift_stream(seed=0, n_pre=100, n_post=500)
  rot = bench.drift_stream(seed=0, n_pre=100, n_post=500, kind="rotation-16")
  enc = bench.drift_stream(seed=0, n_pre=100, n_post=500, kind="encoder")
  b_shift, b_rot, b_enc = bench.baselines(shift), bench.baselines(rot), bench.baselines(enc)
  rec = {
    (kind, name[:14]): bench.recovery(arm, at=500)
    for kind, b in (("shift", b_shift), ("rot", b_rot), ("enc", b_enc))
    for name, arm in b.items()
  }
  print({k: round(v, 2) for k, v in rec.items()})
  # Measured (seed 0): frozen / clean 0.602 / 0.901 (shift), 0.611 (rotation-16), 0.319 (encoder).
  for s in (shift, rot, enc):
    assert s["clean"] - s["frozen"] > 0.25  # every drift hurts
  # Re-centering (no feedback) fixes a pure shift (measured 99%) but not a rotation (-1%) or the
  # encoder change (-1%); on the shift it costs clean queries: 0.594 against 0.901.
  assert rec["shift", "re-centering ("] >= 0.8
  assert abs(rec["rot", "re-centering ("]) <= 0.1
  assert abs(rec["enc", "re-centering ("]) <= 0.1
  assert b_shift["re-centering (no feedback)"]["final_clean"] < shift["clean"] - 0.2
  # The oracle refits are ceilings above the frozen model: rank 8 and full rank recover >= 90% of
  # every drift (measured 94-104%); rank 2 falls short on the rank-16 rotation (83%, rank 8: 104%)
  # and on the encoder change (60%, rank 8: 94%).
  for kind in ("shift", "rot", "enc"):
    assert rec[kind, "oracle rank-8 "] >= 0.9
    assert rec[kind, "oracle full-ra"] >= 0.9
  assert rec["rot", "oracle rank-2 "] <= rec["rot", "oracle rank-8 "] - 0.1
  assert rec["enc", "oracle rank-2 "] <= rec["enc", "oracle rank-8 "] - 0.2
  # A rotation keeps norms, so the frozen model loses only what the rotated subspace carried.
  q = rot["drifted"](rot["held"], 0)
  assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)


def test_moving_drift_turns_and_recentering_follows_with_lag(bench):
  # The moving drift: a shift of length 2 whose direction turns 180 degrees over the stream.
  s = bench.drift_stream(seed=0, n_pre=100, n_post=500, kind="moving")
  held = s["held"][:5]
  d0 = s["drifted"](held, 0) - s["task"].clean_queries[held]
  d_end = s["drifted"](held, 500) - s["task"].clean_queries[held]
  assert np.allclose(np.linalg.norm(d0, axis=1), 2.0, atol=1e-5)
  assert np.allclose(d_end, -d0, atol=1e-5)  # half a turn
  rc = bench.baselines(s, ranks=(2,))["re-centering (no feedback)"]
  r250, r500 = bench.recovery(rc, at=250), bench.recovery(rc, at=500)
  print(f"re-centering on the moving drift: {r250:.2f} at 250, {r500:.2f} at 500")
  # Measured: the EMA (time constant 100 requests) lags a direction that turns 0.36 degrees a
  # request: 0.24 of the loss recovered at 500 requests (0.92 at 2,000 when it turns 4x slower).
  assert r500 < 0.6


def test_memory_past_capacity_keeps_recent_knowledge(bench):
  # A graph of capacity 30 receives 120 memories over a simulated week (ten topics of 12), one
  # query about a recent topic after each arrival. Loop C's weekly slot is moved out of the week
  # (Monday 00:00, the start) only to keep the test fast; the benchmark runs it.
  task = bench.capacity_task(seed=0, capacity=30)
  kw = dict(deep_weekday=0, deep_hour_utc=0)
  win = bench.run_capacity(task, "window", **kw)
  raw = bench.run_capacity(task, "no window", **kw)
  fifo = bench.run_capacity(task, "fifo")
  full = slice(30, None)  # from the 30th arrival on the graph is full
  p = {k: r["precision"][full].mean() for k, r in (("win", win), ("raw", raw), ("fifo", fifo))}
  held = {k: r["recent_held"][full].mean() for k, r in (("win", win), ("raw", raw))}
  print({k: round(float(v), 3) for k, v in (p | {f"held {k}": v for k, v in held.items()}).items()})
  # Every arm evicts exactly the overflow: 120 - 30 memories.
  for r in (win, raw, fifo):
    assert (r["evicted_at"] >= 0).sum() == 90
  # Measured: with the admission window the store keeps 100% of the last day's memories and
  # recent precision@5 is 0.789 once full (FIFO 0.824); without it the newest memory, which has
  # not earned accesses yet, is evicted first: 18% kept, precision 0.247.
  assert held["win"] >= 0.95
  assert held["raw"] <= 0.5
  assert p["win"] >= p["raw"] + 0.3
  assert p["win"] >= p["fifo"] - 0.1
  # Ids are stable: the store follows the eviction events, so every id it reports names a live
  # memory and Loop A accepts every interaction (none rejected as stale).
  assert win["rejected"] == 0 and raw["rejected"] == 0
