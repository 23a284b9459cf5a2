"""The `sona-jax` console script: the week-long demo, the drift run, inspect, bench."""

import json
import shutil
import subprocess
import sys


def _cmd():
  exe = shutil.which("sona-jax")
  return [exe] if exe else [sys.executable, "-m", "sona_jax.cli"]


def test_week_demo_writes_report_plots_and_checkpoint_and_shows_learning(tmp_path):
  out = tmp_path / "demo"
  proc = subprocess.run(
    [*_cmd(), "demo", "--out", str(out), "--requests", "1400"],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr
  for line in ("retrieval precision@5", "cost per request", "router savings", "Phi_AR"):
    assert line in proc.stdout
  report = json.loads((out / "report.json").read_text())
  days = report["per_day"]
  assert [d["day"] for d in days] == list(range(1, 8))
  assert sum(d["requests"] for d in days) == 1400 == report["stats"]["requests"]["processed"]
  assert report["stats"]["requests"]["rejected"] == 0  # retrieval follows Loop C's merges
  assert report["improvement"]["phi_current"] is not None  # Loop C measured the proxy
  first, last = days[0], days[-1]
  # The numbers come from the run: the day rows agree with the hourly series they summarise.
  hourly = report["hourly"]
  day1 = [p for h, p in zip(hourly["hour"], hourly["precision"], strict=True) if h < 24]
  assert min(day1) <= first["precision"] <= max(day1)
  # Learning shows: the last day is better in quality, or cheaper at no lower quality.
  assert last["quality"] > first["quality"] or (
    last["cost"] < first["cost"] and last["success"] >= first["success"]
  ), (first, last)
  held = report["held_out"]
  assert held["precision_adapted"] > held["precision_frozen"] + 0.1, held
  # Loop B hourly (when 50 signals wait: 1400 requests a week is ~8 an hour), Loop C once.
  assert 20 <= report["loop_b_cycles"] <= 40 and len(report["deep_hours"]) == 1
  assert 6 * 24 + 3 <= report["deep_hours"][0] < 6 * 24 + 4  # Sunday 03:00 UTC
  for name in ("quality.png", "tiers.png", "cost.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The checkpoint restores, and `inspect` summarises it.
  ins = subprocess.run(
    [*_cmd(), "inspect", str(out / "checkpoint"), "--json"], capture_output=True, text=True
  )
  assert ins.returncode == 0, ins.stderr
  info = json.loads(ins.stdout)
  assert info["stats"]["requests"]["processed"] == 1400
  assert info["stats"]["graph"]["nodes"] == report["stats"]["graph"]["nodes"]


def test_inspect_and_bench_reject_bad_arguments(tmp_path):
  proc = subprocess.run([*_cmd(), "inspect", str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode == 2 and "no checkpoint" in proc.stderr
  proc = subprocess.run([*_cmd(), "bench", "nope"], capture_output=True, text=True)
  assert proc.returncode == 2 and "unknown" in proc.stderr


def test_demo_runs_and_reports_learning(tmp_path):
  exe = shutil.which("sona-jax")
  cmd = [exe] if exe else [sys.executable, "-m", "sona_jax.cli"]
  out_json = tmp_path / "demo.json"
  proc = subprocess.run(
    [*cmd, "drift", "--requests", "600", "--json", str(out_json)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  assert "held-out precision@5, drifted, after learning" in proc.stdout
  result = json.loads(out_json.read_text())
  assert result["accepted"] == 600 and len(result["prequential"]) == 600
  # Even a short stream moves the held-out precision up from the frozen model.
  assert result["adapted"] > result["frozen"] + 0.05, result
  assert result["loop_a_p50_us"] > 0


def test_cli_rejects_bad_arguments():
  proc = subprocess.run(
    [sys.executable, "-m", "sona_jax.cli", "demo", "--requests", "0"],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2 and "--requests must be >= 1" in proc.stderr


def _fake_report():
  """A report with the keys `demo._print_table` reads (values as a run would give them)."""
  day = lambda d, p: {  # noqa: E731
    "day": d,
    "precision": p,
    "success": 0.94,
    "quality": 0.85,
    "cost": 2.5,
    "tier_share": [0.5, 0.3, 0.2],
  }
  return {
    "days": 7,
    "requests": 1400,
    "drift": 2.0,
    "wall_seconds": 12.5,
    "per_day": [day(1, 0.72), day(7, 0.807)],
    "held_out": {
      "precision_frozen": 0.609,
      "precision_adapted": 0.81,
      "precision_clean": 0.909,
      "router_success": 0.93,
      "router_cost": 3.0,
      "always_best_success": 0.973,
    },
    "stats": {
      "graph": {"nodes": 760, "edges": {"hebbian": 1000, "analogy": 906}},
      "bank": {"patterns": 49},
    },
    "improvement": {"phi_current": None, "retention_rate_7d": 0.942, "overall_score": 0.417},
    "loop_b_cycles": 29,
    "loop_c": [{}],
    "plots": [],
    "checkpoint": None,
  }


def test_demo_table_plain_text_and_rich_show_the_same_rows(capsys):
  from sona_jax import demo

  lines = []
  demo._print_table(_fake_report(), "out", plots=False, log=lines.append)
  text = "\n".join(lines)
  assert "  retrieval precision@5        0.720       0.807" in lines
  assert "  tier mix % (NC/LR/SVM)    50/30/20    50/30/20" in lines
  assert "  memory graph: nodes / edges                     760 / 1906" in lines
  assert "  router savings vs always-SVM (held-out)         70% of the cost" in lines
  assert "  integration proxy (Phi_AR)                      n/a" in lines
  assert "1400 requests" in text and "29 Loop B cycles, 1 Loop C, 12.5 s wall" in text
  assert lines[-1] == f"  report: {'out/report.json'}"
  # Not a terminal (pytest captures stdout): the default `print` gives the same plain text.
  demo._print_table(_fake_report(), "out", plots=False)
  assert capsys.readouterr().out.splitlines() == text.splitlines()
  # The rich tables hold the same cells.
  demo._print_rich("title", [("answer success", "0.940", "0.935")], [("patterns", "49")], 7, [])
  out = capsys.readouterr().out
  assert "answer success" in out and "0.940" in out and "0.935" in out and "day 7" in out
  assert "patterns" in out and "49" in out


def test_demo_progress_bar_is_silent_when_disabled(capsys):
  from sona_jax import demo

  with demo._progress_bar(3, False) as update:
    for i in range(3):
      update(f"step {i}")
  assert capsys.readouterr() == ("", "")
