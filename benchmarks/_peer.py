"""Run the peer implementation ``@ruvector/sona`` (npm, native Rust) from Python benchmarks.

The peer is driven by small Node scripts in ``benchmarks/peer/``; each reads one JSON
payload on stdin and prints one JSON object on stdout (see ``benchmarks/peer/common.js``
and ``benchmarks/peer/NOTES.md``). The npm package is installed under ``benchmarks/``
(``benchmarks/node_modules``, git-ignored).

Every public function here reports failure as a value and never raises, so a benchmark
can record "peer unavailable: <reason>" and carry on without Node.

Example::

  ok, info = ensure_peer()
  if ok:
    result, note = run_peer_instant([256, 768], n=2000)

Command line: ``python benchmarks/_peer.py --dims 256 768 4096 --n 2000``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PEER_PACKAGE = "@ruvector/sona"
BENCH_DIR = Path(__file__).resolve().parent
PEER_DIR = BENCH_DIR / "peer"
PACKAGE_DIR = BENCH_DIR / "node_modules" / "@ruvector" / "sona"
INSTALL_TIMEOUT_S = 180.0
_LOAD_CHECK = (
  "const m=require('@ruvector/sona');if(typeof m.SonaEngine!=='function')process.exit(3)"
)


def _tail(text: str | bytes | None, limit: int = 600) -> str:
  """Return the last ``limit`` characters of a process output, stripped."""
  if text is None:
    return ""
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  text = text.strip()
  return text if len(text) <= limit else "..." + text[-limit:]


def _package_version() -> str | None:
  """Version string from the installed package.json, or None if not installed."""
  try:
    return json.loads((PACKAGE_DIR / "package.json").read_text())["version"]
  except (OSError, ValueError, KeyError):
    return None


def peer_available() -> tuple[bool, str]:
  """Check that Node and the installed peer package (with its native binary) load.

  Returns:
    ``(True, version)`` when ``node`` is on PATH and ``require('@ruvector/sona')``
    succeeds from ``benchmarks/``; otherwise ``(False, reason)``.
  """
  node = shutil.which("node")
  if node is None:
    return False, "node not found on PATH"
  version = _package_version()
  if version is None:
    return False, f"{PEER_PACKAGE} not installed under {BENCH_DIR / 'node_modules'}"
  try:
    proc = subprocess.run(
      [node, "-e", _LOAD_CHECK],
      cwd=BENCH_DIR,
      capture_output=True,
      text=True,
      timeout=30,
      check=False,
    )
  except (OSError, subprocess.SubprocessError) as exc:
    return False, f"could not run node: {exc}"
  if proc.returncode != 0:
    return False, f"{PEER_PACKAGE} {version} failed to load: {_tail(proc.stderr, 300)}"
  return True, version


def ensure_peer(install: bool = True, spec: str = PEER_PACKAGE) -> tuple[bool, str]:
  """Make the peer available, installing it with npm when allowed.

  Args:
    install: run ``npm install --no-audit --no-fund <spec>`` in ``benchmarks/`` when
      the package is missing or does not load.
    spec: npm package spec, e.g. ``"@ruvector/sona@0.1.8"`` to pin a version.

  Returns:
    Same as :func:`peer_available`, after the install attempt; on a failed install
    ``(False, reason)``. Never raises.
  """
  ok, info = peer_available()
  if ok or not install:
    return ok, info
  if shutil.which("node") is None:
    return False, info
  npm = shutil.which("npm")
  if npm is None:
    return False, f"{info}; npm not found on PATH, cannot install"
  cmd = [npm, "install", "--no-audit", "--no-fund", spec]
  try:
    proc = subprocess.run(
      cmd,
      cwd=BENCH_DIR,
      capture_output=True,
      text=True,
      timeout=INSTALL_TIMEOUT_S,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return False, f"npm install timed out after {INSTALL_TIMEOUT_S:.0f} s"
  except (OSError, subprocess.SubprocessError) as exc:
    return False, f"npm install could not run: {exc}"
  if proc.returncode != 0:
    return False, f"npm install failed (rc {proc.returncode}): {_tail(proc.stderr or proc.stdout)}"
  return peer_available()


def _parse_output(stdout: str) -> dict | None:
  """Parse the JSON object a peer script prints (whole stdout, else its last line)."""
  text = stdout.strip()
  candidates = [text] + [line for line in reversed(text.splitlines()) if line.strip()]
  for candidate in candidates:
    try:
      value = json.loads(candidate)
    except ValueError:
      continue
    if isinstance(value, dict):
      return value
  return None


def run_peer_script(
  script_name: str, payload: dict, timeout: float = 600.0
) -> tuple[dict | None, str]:
  """Run ``benchmarks/peer/<script_name>`` with ``payload`` as JSON on stdin.

  Node runs with ``--expose-gc`` (scripts collect garbage before timed loops) and
  ``benchmarks/`` as working directory.

  Args:
    script_name: file name in ``benchmarks/peer/`` (``.js`` is appended if missing).
    payload: JSON-serialisable dict passed on stdin.
    timeout: wall-clock limit in seconds.

  Returns:
    ``(result, note)``: the parsed JSON object and a short note on success, or
    ``(None, reason)`` on any failure (peer missing, timeout, non-zero exit, e.g. a
    native abort with rc 134, or unparsable output). Never raises.
  """
  ok, info = peer_available()
  if not ok:
    return None, f"peer unavailable: {info}"
  name = script_name if script_name.endswith(".js") else script_name + ".js"
  script = PEER_DIR / name
  if not script.is_file():
    return None, f"peer script not found: {script}"
  try:
    stdin = json.dumps(payload)
  except (TypeError, ValueError) as exc:
    return None, f"payload is not JSON-serialisable: {exc}"
  node = shutil.which("node")
  start = time.perf_counter()
  try:
    proc = subprocess.run(
      [node, "--expose-gc", str(script)],
      cwd=BENCH_DIR,
      input=stdin,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  except subprocess.TimeoutExpired as exc:
    return None, f"{name} timed out after {timeout:.0f} s: {_tail(exc.stderr, 300)}"
  except (OSError, subprocess.SubprocessError) as exc:
    return None, f"{name} could not run: {exc}"
  elapsed = time.perf_counter() - start
  if proc.returncode != 0:
    return None, f"{name} failed (rc {proc.returncode}): {_tail(proc.stderr or proc.stdout)}"
  result = _parse_output(proc.stdout)
  if result is None:
    return None, f"{name} printed no JSON object: {_tail(proc.stdout, 300)}"
  note = f"{PEER_PACKAGE} {result.get('version', info)}, node {result.get('node', '?')}"
  return result, f"ok: {note}, {name} took {elapsed:.1f} s"


def run_peer_instant(
  dims: list[int] | tuple[int, ...],
  n: int = 2000,
  warmup: int = 200,
  micro_lora_rank: int = 2,
  base_lora_rank: int = 8,
  timeout: float = 600.0,
  **extra,
) -> tuple[dict | None, str]:
  """Time the peer's per-request learning cycle and ``applyMicroLora`` per dim.

  One request is ``beginTrajectory + addTrajectoryStep + endTrajectory + flush``.

  Args:
    dims: hidden dimensions to measure (one fresh engine each).
    n: timed requests (and timed ``applyMicroLora`` calls) per dim.
    warmup: untimed requests before timing.
    micro_lora_rank: 1 or 2 (the peer aborts on anything else, so it is checked here).
    base_lora_rank: base LoRA rank passed to the engine config.
    timeout: wall-clock limit for the whole run, seconds.
    **extra: further payload keys for ``instant.js`` (``seed``, ``pool``, ``applyN``,
      ``breakdown``, ``trajectoryCapacity``, ``engineConfig``, ``attentionDim`` --
      0 sends an empty attention array, which is much faster for the peer; see NOTES.md).

  Returns:
    ``(result, note)`` as in :func:`run_peer_script`; ``result["results"]`` holds one
    dict per dim with ``p50_us``, ``p99_us``, ``mean_us``, ``throughput_rps``,
    ``apply_p50_us`` and more.
  """
  if micro_lora_rank not in (1, 2):
    return None, f"micro_lora_rank must be 1 or 2 for the peer, got {micro_lora_rank}"
  payload = {
    "dims": [int(d) for d in dims],
    "n": int(n),
    "warmup": int(warmup),
    "microLoraRank": int(micro_lora_rank),
    "baseLoraRank": int(base_lora_rank),
    **extra,
  }
  return run_peer_script("instant.js", payload, timeout=timeout)


def format_instant_table(result: dict) -> str:
  """Render a :func:`run_peer_instant` result as a small fixed-width text table.

  ``cpu us`` is process CPU time per request; a value well below ``mean us`` means the
  run shared the CPUs with other work.
  """
  head = (
    f"{'dim':>6} {'p50 us':>9} {'p99 us':>9} {'mean us':>9} {'cpu us':>8} {'req/s':>9}"
    f" {'apply p50':>10}"
  )
  lines = [head]
  for row in result.get("results", []):
    cpu = row.get("cpu_mean_us")
    cpu_text = f"{cpu:>8.1f}" if isinstance(cpu, int | float) else f"{'-':>8}"
    lines.append(
      f"{row['dim']:>6} {row['p50_us']:>9.1f} {row['p99_us']:>9.1f} {row['mean_us']:>9.1f}"
      f" {cpu_text} {row['throughput_rps']:>9.0f} {row['apply_p50_us']:>10.1f}"
    )
  load = (result.get("loadavg_start"), result.get("loadavg_end"))
  if load != (None, None):
    lines.append(f"load average (1 min) start/end: {load[0]} / {load[1]}")
  return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
  """Command-line entry: install if needed, run the instant benchmark, print results."""
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dims", type=int, nargs="+", default=[256, 768, 4096])
  parser.add_argument("--n", type=int, default=2000)
  parser.add_argument("--warmup", type=int, default=200)
  parser.add_argument("--no-install", action="store_true")
  parser.add_argument("--json", action="store_true", help="print the raw JSON result")
  args = parser.parse_args(argv)
  ok, info = ensure_peer(install=not args.no_install)
  if not ok:
    print(f"peer unavailable: {info}", file=sys.stderr)
    return 1
  result, note = run_peer_instant(args.dims, n=args.n, warmup=args.warmup)
  print(note, file=sys.stderr)
  if result is None:
    return 1
  print(json.dumps(result, indent=2) if args.json else format_instant_table(result))
  return 0


if __name__ == "__main__":
  sys.exit(_main())
