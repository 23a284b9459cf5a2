"""Loop A's micro-LoRA chain on CPU as one native XLA custom call (`jax.ffi`).

The micro-LoRA chain of Loop A is sequential: each request's step reads the adapter the previous
one wrote. Written in JAX, one step is ~18 small kernels, and XLA:CPU's runtime costs about 1 us
per kernel whatever it computes, so the chain bounds both the per-request latency and the
throughput of `instant_scan` (about 30 us per interaction at dim 768). `micro_chain.cc`, beside
this file, runs the same rule over a whole batch in one custom call: a few passes over `dim` per
interaction.

The pure-JAX rule (`loops.instant._learn` with `lora.micro_update_fast`) stays the reference: it
is what GPU and TPU run (Loop A selects the native call with `jax.lax.platform_dependent`, so other
platforms never see it), and the tests compare the two (they agree to float rounding, ~1e-6
relative: the sums over `dim` are added in a different order).

The library is compiled on first use from the source beside this file with the system C++
compiler (`$CXX`, else `c++`) against the XLA FFI headers that jaxlib ships
(`jax.ffi.include_dir()`), into a cache directory (`$SONA_JAX_CACHE`, else
`$XDG_CACHE_HOME/sona_jax`, else `~/.cache/sona_jax`), keyed by the source, the jaxlib version and
the compiler; later processes load it from there. `build()` does it ahead of time (e.g. in a
container build). Without a compiler, or when the build fails, Loop A runs the pure-JAX chain and
says so once in the `sona_jax` log.

`SONA_JAX_NATIVE` selects: `auto` (the default: native when it builds), `0` (never), `1` (always:
a failed build raises). `set_enabled` overrides it in-process (tests compare both paths with it).
Loop A reads the choice when it first compiles.
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
  "micro_chain",
  "graph_writes",
  "TARGET",
  "GRAPH_TARGET",
]

TARGET = "sona_micro_chain"  # the FFI target names registered for the CPU platform
GRAPH_TARGET = "sona_graph_writes"
_SOURCE = Path(__file__).with_name("loop_a.cc")
# No FMA contraction: the graph writes are bit-identical to the JAX rule only in plain f32 steps.
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off"]
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
    " ".join(_FLAGS).encode(),
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
  cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
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
        for name, symbol in ((TARGET, lib.SonaMicroChain), (GRAPH_TARGET, lib.SonaGraphWrites)):
          jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
        _loaded = True
      except Exception as e:
        if _mode() == "on":
          raise
        _log.warning("sona_jax.native unavailable, Loop A runs its pure-JAX rule: %s", e)
        _loaded = False
    return _loaded


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


def micro_chain(a, b, vecs, scalars, newest, *, scale: float, clip: float | None):
  """The micro-LoRA chain of `n` interactions as one custom call (CPU only; see the module doc).

  Args:
    a: f32[d, r] micro-LoRA A; b: f32[r, d] micro-LoRA B.
    vecs: f32[n, 4, d]: per interaction the query, the query through the base LoRA, the weighted
      difference of used and unused memory embeddings, the supervised gradient.
    scalars: f32[n, 8]: learning quality, gate open (0/1), has gradient (0/1), `|x|^2`, `|grad|^2`,
      rejection reasons (int32 bits), learning rate, time (int32 bits; < 0 unset).
    newest: i32[] the newest accepted time before the chain.
    scale: the micro-LoRA scale `alpha / r`; clip: the per-factor step clip, or None.

  Returns:
    `(a, b, out, newest)`: the adapter after the chain, f32[n, 4] per interaction (reasons as
    bits, active, step norm (0 when rejected), time as bits with unset times resolved), and the
    newest accepted time. Leading batch axes (vmap) are looped over.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sona_jax import native
    >>> a, b = jnp.full((4, 1), 0.1), jnp.zeros((1, 4))
    >>> vecs = jnp.stack([jnp.ones(4), jnp.ones(4), jnp.zeros(4), jnp.ones(4)])[None]
    >>> scalars = np.array([[0.9, 0, 1, 4, 4, 0, 0.5, 0]], np.float32)  # supervised, lr 0.5
    >>> a2, b2, out, _ = native.micro_chain(a, b, vecs, scalars, jnp.int32(0), scale=1.0,
    ...                                     clip=None)
    >>> [round(float(v), 3) for v in b2[0]], bool(out[0, 1])  # b -= lr (x . a) grad
    ([-0.2, -0.2, -0.2, -0.2], True)
    >>> bool(jnp.all(a2 == a))  # a moves along B grad, and B was 0
    True
  """
  if not _load():
    raise RuntimeError("sona_jax.native: the native chain is unavailable (see the log)")
  n = vecs.shape[-3]
  out_types = (
    jax.ShapeDtypeStruct(a.shape, jnp.float32),
    jax.ShapeDtypeStruct(b.shape, jnp.float32),
    jax.ShapeDtypeStruct(vecs.shape[:-3] + (n, 4), jnp.float32),
    jax.ShapeDtypeStruct(jnp.shape(newest), jnp.int32),
  )
  call = jax.ffi.ffi_call(
    TARGET, out_types, input_output_aliases={0: 0, 1: 1}, vmap_method="broadcast_all"
  )
  return call(
    a,
    b,
    vecs,
    scalars,
    jnp.asarray(newest, jnp.int32),
    scale=np.float32(scale),
    clip=np.float32(-1.0 if clip is None else clip),
  )


def graph_writes(edges, node, ids, info, *, strengthen: float, weaken: float, ema: float):
  """Loop A's graph writes of `n` interactions in order, as one custom call (CPU only).

  Per accepted interaction: `graph.hebbian_row` on the anchor's edge row, then the access count,
  last access and quality EMA of each used memory (`loops.instant._edges`, `_nodes`; bit-identical
  to them). Slots outside the table are skipped, never written.

  Args:
    edges: i32[N, 3K] packed edge rows; node: i32[N, fields] node statistics.
    ids: i32[n, 2k + 1]: per interaction its used slots, unused slots (-1 padded), anchor slot.
    info: i32[n, 3]: per interaction accepted (0/1), learning quality (f32 bits), time.
    strengthen, weaken: the Hebbian rates; ema: the node quality EMA rate.

  Returns:
    `(edges, node, changed)`, `changed: i32[n]` the ids per interaction that changed an edge.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from sona_jax import graph, native
    >>> g = graph.init_graph(4, 2, 2)
    >>> ids = jnp.array([[1, 2, -1, -1, 0]], jnp.int32)  # node 0 used 1 and 2
    >>> info = jnp.array([[1, np.float32(0.9).view(np.int32), 7]], jnp.int32)
    >>> edges, node, changed = native.graph_writes(g.edges, g.node, ids, info, strengthen=0.05,
    ...                                            weaken=0.02, ema=0.1)
    >>> edges[0, :2].tolist(), int(changed[0]), node[1, graph.ACCESS].tolist()
    ([1, 2], 2, 1)
  """
  if not _load():
    raise RuntimeError("sona_jax.native: the native library is unavailable (see the log)")
  out_types = (
    jax.ShapeDtypeStruct(edges.shape, jnp.int32),
    jax.ShapeDtypeStruct(node.shape, jnp.int32),
    jax.ShapeDtypeStruct(ids.shape[:-1], jnp.int32),
  )
  call = jax.ffi.ffi_call(
    GRAPH_TARGET, out_types, input_output_aliases={0: 0, 1: 1}, vmap_method="broadcast_all"
  )
  return call(
    edges,
    node,
    jnp.asarray(ids, jnp.int32),
    jnp.asarray(info, jnp.int32),
    strengthen=np.float32(strengthen),
    weaken=np.float32(weaken),
    ema=np.float32(ema),
  )
