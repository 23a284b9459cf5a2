"""Loop C: the weekly deep cycle (docs/design.md, "Loop C"; seed section 4).

`deep_step(state, cfg, now)` (`cycle.py`) runs the seed's six phases in order, each a function of
its own module with its own report, and times each:

1. consolidation (`consolidation.consolidate_memories`): edges between high-value memories gain
   weight, low-value old memories decay;
2. abstraction (`abstraction.abstract_patterns`): a Ward hierarchy of meta-patterns over the
   ReasoningBank's patterns;
3. dreams (`dreams.dream`): random walks over the memory graph propose weak `CREATIVE` edges;
4. cross-domain transfer (`analogies.transfer`): Louvain domains (`domains.communities`) and
   `ANALOGY` edges between concepts of two domains whose offsets align;
5. compression (`compression.compress_memory`): near-duplicates are merged, then weak edges pruned;
6. the integrated-information proxy (`phi.graph_phi`): Phi_AR of a VAR(1) model of the graph
   (formulas in `phi_model`, the bipartition search in `phi_search`).

Phases 1 and 5 are host-side (NumPy bookkeeping around jitted blocked matmuls): Loop C runs once a
week off the serving path, on a snapshot. All-pairs candidates come from `candidates.py` over
`sona_jax.ivf`: exact (blocked brute force) up to `EXACT_MAX` rows, an inverted file above, with its
recall against brute force measured on a sample and reported. Nothing is removed silently: every
decayed node, merged node, absorbed, dropped or pruned edge, and every edge a full row could not
take is in a report. Scikit-learn, SciPy and networkx are imported here, so `import sona_jax` does
not import this package (it is loaded on first use).
"""

from sona_jax.loops.deep import abstraction as abstraction
from sona_jax.loops.deep import analogies as analogies
from sona_jax.loops.deep import candidates as candidates
from sona_jax.loops.deep import compression as compression
from sona_jax.loops.deep import consolidation as consolidation
from sona_jax.loops.deep import cycle as cycle
from sona_jax.loops.deep import domains as domains
from sona_jax.loops.deep import dreams as dreams
from sona_jax.loops.deep import phi as phi
from sona_jax.loops.deep import phi_model as phi_model
from sona_jax.loops.deep import phi_search as phi_search
from sona_jax.loops.deep.abstraction import AbstractionReport as AbstractionReport
from sona_jax.loops.deep.abstraction import abstract_patterns as abstract_patterns
from sona_jax.loops.deep.abstraction import ward_levels as ward_levels
from sona_jax.loops.deep.analogies import TransferReport as TransferReport
from sona_jax.loops.deep.analogies import find_analogies as find_analogies
from sona_jax.loops.deep.analogies import transfer as transfer
from sona_jax.loops.deep.candidates import EXACT_MAX as EXACT_MAX
from sona_jax.loops.deep.compression import CompressionReport as CompressionReport
from sona_jax.loops.deep.compression import compress_memory as compress_memory
from sona_jax.loops.deep.consolidation import ConsolidationReport as ConsolidationReport
from sona_jax.loops.deep.consolidation import consolidate_memories as consolidate_memories
from sona_jax.loops.deep.cycle import DeepReport as DeepReport
from sona_jax.loops.deep.cycle import deep_step as deep_step
from sona_jax.loops.deep.domains import communities as communities
from sona_jax.loops.deep.dreams import DreamReport as DreamReport
from sona_jax.loops.deep.dreams import WalkStats as WalkStats
from sona_jax.loops.deep.dreams import dream as dream
from sona_jax.loops.deep.dreams import dream_starts as dream_starts
from sona_jax.loops.deep.dreams import dream_walks as dream_walks
from sona_jax.loops.deep.dreams import walk_stats as walk_stats
from sona_jax.loops.deep.phi import PhiReport as PhiReport
from sona_jax.loops.deep.phi import PhiResult as PhiResult
from sona_jax.loops.deep.phi import bipartition_phi as bipartition_phi
from sona_jax.loops.deep.phi import graph_phi as graph_phi
from sona_jax.loops.deep.phi import phi_ar as phi_ar
