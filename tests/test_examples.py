"""The examples run as shipped (with a small size)."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quickstart_learns_and_accounts_for_every_interaction():
  out = _load("quickstart").main(requests=400)
  assert out["processed"] + out["rejected"] == 400 + 64
  assert out["batch_accepted"] == 64
  assert out["last"] > out["first"], out


def test_flax_adaptation_recovers_accuracy_lost_to_drift():
  out = _load("flax_adaptation").main(requests=200)
  # Measured: clean 0.967, drifted 0.663, after 200 supervised requests 0.898 (600: 0.917).
  assert out["before"] < out["clean"] - 0.2  # the drift really hurts the frozen model
  assert out["after"] > out["before"] + 0.15, out


def test_routing_example_routes_cheaper_than_the_best_tier_at_near_its_success():
  out = _load("routing").main(requests=900)
  assert out["cycles"] == 3  # Loop B hourly on the simulated clock (300 requests an hour)
  assert out["success"] >= out["cheapest_success"], out
  assert out["cost"] < 0.6 * 10.0, out
  assert sum(s > 0 for s in out["tier_share"]) >= 2, out
