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
