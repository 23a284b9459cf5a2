"""Shared by the learning benchmark's scenarios: the peer harness, the simulated clock, table and
markdown helpers, and JSON cleaning."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
RESULTS = HERE / "results"

# Monday 2026-11-23 00:00 UTC: a stream of a few simulated hours never reaches Loop C's weekly slot.
CLOCK_START = 1_795_392_000.0
SECONDS_PER_REQUEST = 12.0  # 300 requests an hour: Loop B (hourly) every 300 requests


def _peer_module():
  """`benchmarks/_peer.py` (the peer harness), imported from that folder."""
  if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
  import _peer

  return _peer


def pyplot():
  """matplotlib's pyplot on the Agg backend, or None without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt


def _fmt_pm(m, s):
  return f"{m:5.1f}±{s:3.1f}"


def _window_means(x: np.ndarray, w: int = 100) -> list[float]:
  n = len(x) // w
  return [float(v) for v in np.asarray(x[: n * w], np.float64).reshape(n, w).mean(1)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def _finite(x) -> bool:
  return x is not None and bool(np.isfinite(x))


def _at(arm: dict, n: int) -> float:
  return next((c["drift"] for c in arm["curve"] if c["n"] == n), float("nan"))


def _json_default(v):
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, np.integer | np.bool_):
    return v.item()
  if isinstance(v, np.floating):
    return None if not np.isfinite(v) else float(v)
  raise TypeError(type(v).__name__)


_DROPPED = (
  "task",
  "stream_x",
  "stream_y",
  "prequential",
  "prequential_frozen",
  "held",
  "sweep",
  "drifted",
)


def _clean(obj):
  """Drops non-JSON payloads (tasks, raw streams) and NaNs from the report."""
  if isinstance(obj, dict):
    return {
      k: _clean(v)
      for k, v in obj.items()
      if k not in _DROPPED or (k == "task" and isinstance(v, str))  # a routing task's name stays
    }
  if isinstance(obj, list | tuple):
    return [_clean(v) for v in obj]
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj
