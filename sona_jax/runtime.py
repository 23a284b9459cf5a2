"""Opt-in runtime settings. Nothing here runs on import: the user calls it at start-up."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings

__all__ = ["configure_cpu_low_latency", "LOW_LATENCY_XLA_FLAG", "CompileCounter", "count_compiles"]

LOW_LATENCY_XLA_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
_log = logging.getLogger("sona_jax")


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge

    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # a private API: if it moves, assume the worst and let the warning say so
    return True


def configure_cpu_low_latency(*, pin_cpu: int | None = None) -> dict:
  """Configures JAX on CPU for per-request latency; call once at start-up, before any computation.

  On CPU a per-request Loop A call is dominated by dispatch, not arithmetic. This turns off two
  throughput features that cost latency on small machines:

  - CPU async dispatch (`jax_cpu_enable_async_dispatch = False`): results are computed on the
    calling thread instead of being handed to a worker thread;
  - XLA:CPU's concurrency-optimised scheduler (`LOW_LATENCY_XLA_FLAG` appended to `XLA_FLAGS`),
    which must be set before JAX starts its backend.

  Measured on a 2-core machine: a full Loop A prototype at dim 768 went from 116 us to 35 us p50
  (docs/design.md, "Hot path", says why dispatch dominates). Both settings are process-wide, so
  the library never changes them on import. On GPU/TPU they change nothing that matters.

  `pin_cpu` additionally pins the calling thread, and every thread started after it (XLA's
  intra-op pool included, when called before JAX starts), to one CPU. XLA:CPU runs independent
  kernels of one call on its thread pool; on an otherwise idle machine waking a pool thread on
  another core costs more than Loop A's arithmetic, and on one core it is a cheap switch
  (`benchmarks/bench_instant.py` reports the mode as `pinned`). The price: everything JAX does in
  this process, Loop B and C included, then runs on that one CPU. Linux only.

  Args:
    pin_cpu: a CPU index to pin to, or None (default) to leave affinity alone.

  Returns:
    A dict of what was applied:
    `{"async_dispatch": False, "xla_flag": bool, "backend_started": bool, "pinned_cpu": int|None}`;
    `xla_flag` is False when the backend had already started (a `RuntimeWarning` says so).
  """
  import jax

  if pin_cpu is not None:
    if not hasattr(os, "sched_setaffinity"):
      raise ValueError("configure_cpu_low_latency(pin_cpu=...) needs Linux (os.sched_setaffinity)")
    allowed = os.sched_getaffinity(0)
    if pin_cpu not in allowed:
      raise ValueError(f"pin_cpu={pin_cpu} is not one of this process's CPUs {sorted(allowed)}")
  started = _backend_started()
  flags = os.environ.get("XLA_FLAGS", "")
  flag_set = LOW_LATENCY_XLA_FLAG in flags
  if not flag_set:
    if started:
      warnings.warn(
        "configure_cpu_low_latency(): the JAX backend has already started, so "
        f"{LOW_LATENCY_XLA_FLAG} in XLA_FLAGS cannot take effect in this process; call it before "
        "any JAX computation (or set XLA_FLAGS in the environment). Async dispatch is still off.",
        RuntimeWarning,
        stacklevel=2,
      )
    else:
      os.environ["XLA_FLAGS"] = (flags + " " + LOW_LATENCY_XLA_FLAG).strip()
      flag_set = True
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  pinned = None
  if pin_cpu is not None:
    if started:
      warnings.warn(
        "configure_cpu_low_latency(pin_cpu=...): the JAX backend has already started, so its "
        "thread pool keeps its CPUs; only the calling thread is pinned.",
        RuntimeWarning,
        stacklevel=2,
      )
    os.sched_setaffinity(0, {pin_cpu})
    pinned = pin_cpu
  _log.info("sona_jax: CPU low-latency mode (async dispatch off, xla flag %s)", flag_set)
  return {
    "async_dispatch": False,
    "xla_flag": flag_set,
    "backend_started": started,
    "pinned_cpu": pinned,
  }


class CompileCounter:
  """How many XLA compilations ran while `count_compiles()` was open (all threads)."""

  def __init__(self):
    self.compiles = 0
    self._lock = threading.Lock()

  def _listener(self, event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      with self._lock:
        self.compiles += 1


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations inside the block, through JAX's public monitoring events.

  A serving path that never retraces compiles nothing once warm: tests and benchmarks check that
  changing a live knob or a batch size keeps `compiles == 0`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from sona_jax.runtime import count_compiles
    >>> f = jax.jit(lambda x: x * 2)
    >>> _ = f(jnp.float32(1))
    >>> with count_compiles() as counter:
    ...   _ = f(jnp.float32(2))
    >>> counter.compiles
    0
  """
  import jax.monitoring

  counter = CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter._listener)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(counter._listener)
