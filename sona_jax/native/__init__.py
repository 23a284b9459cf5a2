"""Loop A on CPU as one native XLA custom call (`jax.ffi`).

Written in JAX, Loop A is ~50 small kernels per interaction, and XLA:CPU's runtime costs about
1 us per kernel whatever it computes; its micro-LoRA chain is sequential (each request's step reads
the adapter the previous one wrote), so it bounds both the per-request latency and the throughput
of `instant_scan`. `loop_a.cc`, beside this file, runs the whole transition of n interactions in
order (`loop_a`), in place: a few passes over `dim` per interaction, one kernel per call.

The pure-JAX rule (`loops.instant`) stays the reference: it is what GPU and TPU run (Loop A selects
the native call with `jax.lax.platform_dependent`, so other platforms never see it), and the tests
compare the two. They make the same decisions and write the same records and integers; adapter
floats agree to rounding (~1e-6 relative: the sums over `dim` are added in a different order).

The library is compiled on first use from the source beside this file with the system C++
compiler (`$CXX`, else `c++`) against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), into a cache directory (`$SONA_JAX_CACHE`, else
`$XDG_CACHE_HOME/sona_jax`, else `~/.cache/sona_jax`), keyed by the source, the jaxlib version and
the compiler; later processes load it from there. `build()` does it ahead of time (e.g. in a
container build). Without a compiler, or when the build fails, Loop A runs the pure-JAX rule and
says so once in the `sona_jax` log.

`SONA_JAX_NATIVE` selects: `auto` (the default: native when it builds), `0` (never), `1` (always:
a failed build raises). `set_enabled` overrides it in-process (tests compare both paths with it).
Loop A reads the choice on every call; each choice compiles once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "build",
  "enabled",
  "set_enabled",
  "loop_a",
  "loop_a_tenants",
  "TARGET",
  "TENANTS_TARGET",
]

TARGET = "sona_loop_a"  # the FFI targets registered for the CPU platform
TENANTS_TARGET = "sona_loop_a_tenants"
_SOURCE = Path(__file__).with_name("loop_a.cc")
# No FMA contraction: the graph writes are bit-identical to the JAX rule only in plain f32 steps.
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]


@functools.cache
def _flags() -> list[str]:
  """`_FLAGS`, plus `-mavx2` on an x86-64 CPU that has AVX2 (Loop A's passes over `dim` run in
  256-bit vectors: measured 1.3-1.5x the batch throughput of the baseline SSE2 build at dims 256
  and 768; `-march=native`, which also turns on AVX-512 here, was slower than both). The flags are
  part of the cache key, so a cache shared by machines of different CPUs holds a build for each.
  The results do not depend on the vector width: every sum is in a fixed order of 8 partial sums."""
  flags = list(_FLAGS)
  if platform.machine().lower() in ("x86_64", "amd64"):
    try:
      cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
    cpu_flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "").split()
    if "avx2" in cpu_flags:
      flags.append("-mavx2")
  return flags


_log = logging.getLogger("sona_jax")
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet
_override: bool | None = None
_WINDOWS = sys.platform == "win32"


def _compiler() -> str | None:
  named = shutil.which(os.environ.get("CXX", "c++"))
  return named or shutil.which("g++") or shutil.which("clang++")


def _cache_dir() -> Path:
  if os.environ.get("SONA_JAX_CACHE"):
    return Path(os.environ["SONA_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "sona_jax"


def _library_path(cxx: str) -> Path:
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256()
  for part in (
    _SOURCE.read_bytes(),
    importlib.metadata.version("jaxlib").encode(),  # the FFI headers and ABI
    version.encode(),
    " ".join(_flags()).encode(),
    platform.machine().encode(),
  ):
    key.update(part)
  return _cache_dir() / f"loop_a-{key.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
  """Compiles the native chain into the cache directory (once; `force` rebuilds).

  Returns:
    The path of the shared library.

  Raises:
    RuntimeError: no C++ compiler, or the compilation failed (its output is in the message).

  Examples:
    >>> from sona_jax import native
    >>> native.build().suffix
    '.so'
  """
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("sona_jax.native: no C++ compiler found (set CXX, or install g++)")
  path = _library_path(cxx)
  if path.exists() and not force:
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent builders (test workers, server processes) never
  # see a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [cxx, *_flags(), f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
      raise RuntimeError(f"sona_jax.native: build failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.lru_cache(maxsize=8)
def _parse_mode(raw: str) -> str:
  value = raw.strip().lower()
  if value in ("0", "off", "false", "no"):
    return "off"
  if value in ("1", "on", "true", "yes"):
    return "on"
  if value != "auto":
    raise ValueError(f"SONA_JAX_NATIVE must be auto, 0 or 1, got {value!r}")
  return "auto"


def _mode() -> str:
  """`SONA_JAX_NATIVE`, read on every call (cheap: Loop A asks once per request)."""
  return _parse_mode(os.environ.get("SONA_JAX_NATIVE", "auto"))


def _load() -> bool:
  """Builds (if needed), loads and registers the library once per process; False on failure."""
  global _loaded
  with _lock:
    if _loaded is None:
      try:
        try:
          lib = ctypes.CDLL(str(build()))
        except OSError:  # a damaged cached library (e.g. a full disk mid-copy): build it again
          lib = ctypes.CDLL(str(build(force=True)))
        _check_layouts()
        for name, symbol in ((TARGET, lib.SonaLoopA), (TENANTS_TARGET, lib.SonaLoopATenants)):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        _loaded = True
      except Exception as e:
        if _mode() == "on":
          raise
        _log.warning("sona_jax.native unavailable, Loop A runs its pure-JAX rule: %s", e)
        _loaded = False
    return _loaded


def _check_layouts():
  """The layouts `loop_a.cc` hard-codes, against the Python constants they mirror."""
  from sona_jax import buffer, graph, state, types
  from sona_jax.loops import instant

  scalars = (types.S_ANCHOR, types.S_QUALITY, types.S_LATENCY, types.S_TARGET, types.S_TIER)
  scalars += (types.S_CONTEXT, types.S_FEEDBACK, types.S_HAS_GRAD, types.S_TIME, types.S_LR)
  widths = (types.N_SCALARS, types.TIME_UNSET, types.N_SIGNAL_SCALARS, types.N_TRAJ_SCALARS)
  node = (graph.ACCESS, graph.LAST_ACCESS, graph.QUALITY, graph.ALIVE, graph.GENERATION)
  report = (instant.N_REPORT, instant.R_ACCEPTED, instant.R_REASONS, instant.R_MICRO_UPDATED)
  report += (instant.R_STEP_NORM, instant.R_EDGES_CHANGED)
  expected = [
    (scalars, tuple(range(10))),
    (widths, (10, -(2**31), 8, 4)),
    ((state.PROCESSED, state.REJECTED, state.MICRO_UPDATES, state.LAST_TIME), (0, 1, 2, 3)),
    ((buffer.HEAD, buffer.SIZE, buffer.WRITTEN, buffer.READ, buffer.DROPPED), (0, 1, 2, 3, 4)),
    (node + (graph.HEBBIAN,), (0, 1, 3, 5, 7, 0)),
    (report, (5, 0, 1, 2, 3, 4)),
    ((*instant.REASONS.values(), instant.PADDING), (*(1 << b for b in range(12)), 1 << 30)),
  ]
  for got, want in expected:
    if tuple(got) != tuple(want):
      raise RuntimeError(f"sona_jax.native: loop_a.cc's layouts are stale: {got} != {want}")


def enabled() -> bool:
  """Whether Loop A uses the native chain on CPU: `set_enabled`'s override, else
  `SONA_JAX_NATIVE` (building and loading the library on the first call that needs it).

  Examples:
    >>> from sona_jax import native
    >>> previous = native.set_enabled(False)
    >>> native.enabled()
    False
    >>> _ = native.set_enabled(previous)
  """
  if _override is not None:
    return _override and (_loaded or _load())
  if _WINDOWS or _mode() == "off":
    return False
  return _loaded or _load()


def set_enabled(value: bool | None) -> bool | None:
  """Overrides `SONA_JAX_NATIVE` in this process (None: back to the environment); returns the
  previous override. Loop A reads the choice when it compiles, per choice: a change applies to the
  next call.

  Examples:
    >>> from sona_jax import native
    >>> native.set_enabled(False) is None  # no override before
    True
    >>> native.set_enabled(None)
    False
  """
  global _override
  previous, _override = _override, value
  return previous


def loop_a(sub, base_a, base_b, emb, packed, n_valid, cfg):
  """Loop A's whole transition of `n` packed interactions, in order, as one custom call (CPU
  only): `loops.instant._step` on each of the first `n_valid` rows (the rest is padding: never
  applied, never counted), in place.

  Args:
    sub: the Loop A sub-state (`loops.instant.LoopAState`), updated in place when donated.
    base_a, base_b: the base LoRA; emb: f32[N, dim] the memory embeddings (read only).
    packed: f32[n, width] packed interactions (`types.pack`).
    n_valid: i32[], how many leading rows are real.
    cfg: the `SonaConfig` (its rates and thresholds become the call's attributes).

  Returns:
    `(sub, report)`: the sub-state after the n interactions and f32[n, 5] report rows
    (`loops.instant.InstantReport`). Under vmap, each learner runs in turn.

  Examples:
    >>> import jax, sona_jax as sona
    >>> from sona_jax import native, types
    >>> from sona_jax.loops import instant
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> state = sona.init_state(cfg, jax.random.key(0))
    >>> packed = types.pack(sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9, time=3), cfg)
    >>> sub, report = native.loop_a(instant.split_state(state), state.base.a, state.base.b,
    ...                             state.graph.emb, packed[None], 1, cfg)
    >>> report.shape, bool(report[0, instant.R_ACCEPTED]), sub.counters.tolist()
    ((1, 5), True, [1, 0, 0, 3])
  """
  return _call(TARGET, sub, base_a, base_b, emb, packed, jnp.asarray(n_valid, jnp.int32), cfg)


def loop_a_tenants(sub, base_a, base_b, emb, packed, tenant_ids, cfg):
  """`loop_a` on stacked tenants (`sona_jax.tenants`: every array with a leading tenant axis):
  row `i` of `packed` is applied to tenant `tenant_ids[i]`, in batch order, as `loop_a` on that
  tenant alone; a row whose id is outside `[0, n_tenants)` is skipped (a report row of zeros).
  Tenants no row addresses keep every array bit-identical.

  Examples:
    >>> import jax, sona_jax as sona
    >>> from sona_jax import native, tenants, types
    >>> from sona_jax.loops import instant
    >>> cfg = sona.SonaConfig(dim=8, graph_capacity=16, signal_capacity=8, trajectory_capacity=8)
    >>> states = tenants.init_tenants(cfg, jax.random.key(0), 3)
    >>> it = sona.make_interaction(cfg, query=[1.0] * 8, quality=0.9, time=3)
    >>> packed = types.pack(sona.stack_interactions([it, it]), cfg, batched=True)
    >>> sub, report = native.loop_a_tenants(instant.split_state(states), states.base.a,
    ...                                     states.base.b, states.graph.emb, packed, [2, -1], cfg)
    >>> report[:, instant.R_ACCEPTED].tolist(), sub.counters[:, 0].tolist()
    ([1.0, 0.0], [0, 0, 1])
  """
  tids = jnp.asarray(tenant_ids, jnp.int32)
  return _call(TENANTS_TARGET, sub, base_a, base_b, emb, packed, tids, cfg)


def _call(target, sub, base_a, base_b, emb, packed, rows, cfg):
  if not _load():
    raise RuntimeError("sona_jax.native: the native library is unavailable (see the log)")
  leaves, tree = jax.tree.flatten(sub)
  if len(leaves) != 9:  # the operand order loop_a.cc reads
    raise ValueError(f"sona_jax.native: a LoopAState has 9 arrays, got {len(leaves)}")
  out_types = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  out_types.append(jax.ShapeDtypeStruct((packed.shape[-2], 5), jnp.float32))
  call = jax.ffi.ffi_call(
    target,
    out_types,
    input_output_aliases={i: i for i in range(len(leaves))},
    vmap_method="sequential",
  )
  out = call(
    *leaves,
    base_a,
    base_b,
    emb,
    packed,
    rows,
    micro_scale=np.float32(cfg.micro_scale),
    clip=np.float32(-1.0 if cfg.micro_clip is None else cfg.micro_clip),
    base_scale=np.float32(cfg.base_scale),
    micro_lr=np.float32(cfg.micro_lr),
    gate_margin=np.float32(cfg.gate_quality_margin),
    gate_ratio=np.float32(cfg.gate_latency_ratio),
    strengthen=np.float32(cfg.hebbian_strengthen),
    weaken=np.float32(cfg.hebbian_weaken),
    ema=np.float32(cfg.node_quality_ema),
    n_tiers=np.int32(cfg.n_tiers),
  )
  return jax.tree.unflatten(tree, out[:-1]), out[-1]
