"""sona_jax: continual self-improvement for served models, on JAX.

Loop A (per request) adapts a micro-LoRA and a memory graph from feedback; Loop B (hourly)
consolidates; Loop C (weekly) restructures memory. Every step is a pure, jitted function of pytrees.
"""

from sona_jax import buffer as buffer
from sona_jax import evaluation as evaluation
from sona_jax import ewc as ewc
from sona_jax import graph as graph
from sona_jax import lora as lora
from sona_jax import metrics as metrics
from sona_jax import patterns as patterns
from sona_jax import router as router
from sona_jax import types as types
from sona_jax.config import SonaConfig as SonaConfig
from sona_jax.driver import Knobs as Knobs
from sona_jax.driver import MemoryEvent as MemoryEvent
from sona_jax.driver import Routing as Routing
from sona_jax.driver import Sona as Sona
from sona_jax.driver import adapt as adapt
from sona_jax.driver import due as due
from sona_jax.driver import route as route
from sona_jax.driver import tier_success as tier_success
from sona_jax.loops.background import BackgroundReport as BackgroundReport
from sona_jax.loops.background import background_step as background_step
from sona_jax.loops.instant import InstantReport as InstantReport
from sona_jax.loops.instant import instant_scan as instant_scan
from sona_jax.loops.instant import instant_step as instant_step
from sona_jax.runtime import configure_cpu_low_latency as configure_cpu_low_latency
from sona_jax.state import SonaState as SonaState
from sona_jax.state import init_state as init_state
from sona_jax.types import Interaction as Interaction
from sona_jax.types import make_interaction as make_interaction
from sona_jax.types import stack_interactions as stack_interactions

__version__ = "0.1.0"

# Loaded on first use, not at import (Loop C pulls in scikit-learn, SciPy and networkx).
_LAZY = {
  "deep_step": ("sona_jax.loops.deep", "deep_step"),
  "DeepReport": ("sona_jax.loops.deep", "DeepReport"),
  "deep": ("sona_jax.loops.deep", None),
  "phi": ("sona_jax.loops.deep.phi", None),
  "ivf": ("sona_jax.ivf", None),
  "tenants": ("sona_jax.tenants", None),
  "sharding": ("sona_jax.sharding", None),
  "init_tenants": ("sona_jax.tenants", "init_tenants"),
  "instant_step_tenants": ("sona_jax.tenants", "instant_step_tenants"),
  "background_step_tenants": ("sona_jax.tenants", "background_step_tenants"),
  "background_step_sharded": ("sona_jax.sharding", "background_step_sharded"),
  "make_mesh": ("sona_jax.sharding", "make_mesh"),
  "TenantCheckpointer": ("sona_jax.checkpoint", "TenantCheckpointer"),
}


def __getattr__(name):
  if name in _LAZY:
    import importlib

    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
  raise AttributeError(f"module 'sona_jax' has no attribute {name!r}")
