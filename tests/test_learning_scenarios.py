"""Fast versions of the learning benchmarks (`benchmarks/bench_learning.py`) on real data: each
scenario runs at a small size and must show that learning happens."""

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
