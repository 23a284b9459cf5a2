"""The `sona-jax` console script runs the real demo end to end."""

import json
import shutil
import subprocess
import sys


def test_demo_runs_and_reports_learning(tmp_path):
  exe = shutil.which("sona-jax")
  cmd = [exe] if exe else [sys.executable, "-m", "sona_jax.cli"]
  out_json = tmp_path / "demo.json"
  proc = subprocess.run(
    [*cmd, "demo", "--requests", "600", "--json", str(out_json)],
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
