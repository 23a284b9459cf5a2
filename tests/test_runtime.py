"""configure_cpu_low_latency: opt-in only, warns when too late, works before JAX starts."""

import os
import subprocess
import sys

import pytest

import sona_jax as sona
from sona_jax import runtime


def _run_fresh(code: str) -> str:
  """Runs `code` in a fresh interpreter (JAX not started, no inherited XLA_FLAGS); its stdout."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip()


def test_import_changes_no_global_setting():
  code = (
    "import os, jax, sona_jax\n"
    "assert 'concurrency_optimized' not in os.environ.get('XLA_FLAGS', '')\n"
    "assert jax.config.read('jax_cpu_enable_async_dispatch') is True\n"
    "print('ok')\n"
  )
  assert _run_fresh(code) == "ok"


def test_configure_before_backend_sets_both():
  code = (
    "import os, jax, sona_jax\n"
    "r = sona_jax.configure_cpu_low_latency()\n"
    "assert r == {'async_dispatch': False, 'xla_flag': True, 'backend_started': False,"
    " 'pinned_cpu': None}, r\n"
    "assert sona_jax.runtime.LOW_LATENCY_XLA_FLAG in os.environ['XLA_FLAGS']\n"
    "assert jax.config.read('jax_cpu_enable_async_dispatch') is False\n"
    "assert float(jax.numpy.ones(2).sum()) == 2.0\n"
    "print('ok')\n"
  )
  assert _run_fresh(code) == "ok"


def test_configure_after_backend_started_warns(monkeypatch):
  import jax

  jax.numpy.ones(1).block_until_ready()  # the backend is running in this test process
  monkeypatch.setenv("XLA_FLAGS", "")
  before = jax.config.read("jax_cpu_enable_async_dispatch")
  try:
    with pytest.warns(RuntimeWarning, match="already started"):
      result = sona.configure_cpu_low_latency()
    assert result["xla_flag"] is False and result["backend_started"] is True
    assert runtime.LOW_LATENCY_XLA_FLAG not in os.environ["XLA_FLAGS"]
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", before)


def test_pin_cpu_pins_the_process_threads():
  code = (
    "import os, jax, sona_jax\n"
    "cpu = sorted(os.sched_getaffinity(0))[0]\n"
    "r = sona_jax.configure_cpu_low_latency(pin_cpu=cpu)\n"
    "assert r['pinned_cpu'] == cpu and os.sched_getaffinity(0) == {cpu}, r\n"
    "assert float(jax.numpy.ones(3).sum()) == 3.0\n"
    "print('ok')\n"
  )
  assert _run_fresh(code) == "ok"


def test_pin_cpu_rejects_unknown_cpu():
  with pytest.raises(ValueError, match="pin_cpu=100000"):
    sona.configure_cpu_low_latency(pin_cpu=100_000)
