"""Memory graph: fixed-capacity nodes, fixed-degree ELL edges, Hebbian updates (docs/design.md,
"Memory graph").

Capacity `N` and degree `K` are fixed so every update is jittable and O(K). The layout is packed for
Loop A, which changes one edge row and a few node rows per request and pays 1-3 us per array passed
into a jitted call:

- `emb: f32[N, dim]` unit-norm node embeddings (read-only on the per-request path);
- `edges: i32[N, 3K]`: per row, neighbour ids `[0, K)` (-1 empty), weights `[K, 2K)` as float32 bit
  patterns, kinds `[2K, 3K)`. Ids, weights and kinds change together, so one buffer keeps the update
  in place;
- `node: i32[N, 8]`: per node the columns `ACCESS`, `LAST_ACCESS`, `CREATED`, `QUALITY` (f32 bits),
  `STRENGTH` (f32 bits), `ALIVE`, `DOMAIN`, `GENERATION`.

The named views (`graph.nbr`, `graph.w`, `graph.quality`, ...) decode them. Edge kinds: `HEBBIAN`
(learned from use), `CONSOLIDATED` (Loop C), and the synthetic `CREATIVE` (dreams) and `ANALOGY`
(cross-domain transfer), which retrieval can exclude with `exclude_synthetic=True`.

Invariant: a dead node has no edges in or out, so a recycled slot never inherits stale edges
(`add_node` clears the in-edges of a node it evicts; `remove_node` clears them on removal).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # networkx is imported by `to_networkx` only, when called
  import networkx as nx

__all__ = [
  "HEBBIAN",
  "CONSOLIDATED",
  "CREATIVE",
  "ANALOGY",
  "EDGE_KINDS",
  "Graph",
  "init_graph",
  "add_node",
  "add_nodes",
  "remove_node",
  "node_value",
  "strengthen",
  "weaken",
  "hebbian_row",
  "hebbian_update",
  "neighbors",
  "EdgeUpdate",
  "add_edges",
  "make_edges",
  "make_node",
  "to_networkx",
  "max_tag",
  "id_tag",
  "memory_id",
  "memory_ids",
  "slot_of",
  "resolve_ids",
  "place_node",
]

HEBBIAN, CONSOLIDATED, CREATIVE, ANALOGY = 0, 1, 2, 3
EDGE_KINDS = ("HEBBIAN", "CONSOLIDATED", "CREATIVE", "ANALOGY")

# Columns of `Graph.node`.
ACCESS, LAST_ACCESS, CREATED, QUALITY, STRENGTH, ALIVE, DOMAIN, GENERATION = range(8)
NODE_FIELDS = 8


def _f2i(x):
  return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def _i2f(x):
  return jax.lax.bitcast_convert_type(x, jnp.float32)


class Graph(NamedTuple):
  """The memory graph (see the module docstring for the packed layout).

  Attributes:
    emb: f32[N, dim] unit-norm node embeddings.
    edges: i32[N, 3K] neighbour ids, weight bits and kinds.
    node: i32[N, 8] per-node statistics.
  """

  emb: jax.Array
  edges: jax.Array
  node: jax.Array

  @property
  def capacity(self) -> int:
    return self.emb.shape[-2]

  @property
  def degree(self) -> int:
    return self.edges.shape[-1] // 3

  @property
  def nbr(self) -> jax.Array:
    """i32[N, K] neighbour ids, -1 for an empty slot."""
    return self.edges[..., : self.degree]

  @property
  def w(self) -> jax.Array:
    """f32[N, K] edge weights in [0, 1] (0 for an empty slot)."""
    k = self.degree
    return _i2f(self.edges[..., k : 2 * k])

  @property
  def kind(self) -> jax.Array:
    """i32[N, K] edge kinds (`HEBBIAN`, `CONSOLIDATED`, `CREATIVE`, `ANALOGY`)."""
    return self.edges[..., 2 * self.degree :]

  @property
  def access_count(self) -> jax.Array:
    return self.node[..., ACCESS]

  @property
  def last_access(self) -> jax.Array:
    return self.node[..., LAST_ACCESS]

  @property
  def created(self) -> jax.Array:
    return self.node[..., CREATED]

  @property
  def quality(self) -> jax.Array:
    """f32[N] quality EMA of each node."""
    return _i2f(self.node[..., QUALITY])

  @property
  def strength(self) -> jax.Array:
    """f32[N] memory strength (Loop C decays it)."""
    return _i2f(self.node[..., STRENGTH])

  @property
  def alive(self) -> jax.Array:
    return self.node[..., ALIVE] != 0

  @property
  def domain(self) -> jax.Array:
    return self.node[..., DOMAIN]

  @property
  def generation(self) -> jax.Array:
    """i32[N] times the slot was (re)used: ids held outside the graph can be checked against it."""
    return self.node[..., GENERATION]


def make_edges(nbr, w, kind) -> jax.Array:
  """Packs `nbr i32[..., K]`, `w f32[..., K]`, `kind i32[..., K]` into an `edges` array.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> kinds = jnp.array([[CONSOLIDATED, 0]])
    >>> e = make_edges(jnp.array([[3, -1]]), jnp.array([[0.5, 0.0]]), kinds)
    >>> e.shape, e[0, :2].tolist(), e[0, 4:].tolist()  # ids, then weight bits, then kinds
    ((1, 6), [3, -1], [1, 0])
    >>> jax.lax.bitcast_convert_type(e[0, 2:4], jnp.float32).tolist()
    [0.5, 0.0]
  """
  return jnp.concatenate(
    [jnp.asarray(nbr, jnp.int32), _f2i(w), jnp.asarray(kind, jnp.int32)], axis=-1
  )


def make_node(access, last_access, created, quality, strength, alive, domain, generation):
  """Packs per-node columns (each `[..., N]` or scalars) into a `node i32[..., 8]` array.

  Examples:
    >>> row = make_node(2, 5, 1, 0.75, 1.0, 1, 0, 1)  # access, last access, created, quality, ...
    >>> row.shape, row[:3].tolist()
    ((8,), [2, 5, 1])
    >>> g = init_graph(1, 2, 1)._replace(node=row[None])
    >>> g.quality.tolist(), g.access_count.tolist(), g.alive.tolist()  # the named views decode it
    ([0.75], [2], [True])
  """
  i32 = lambda x: jnp.asarray(x, jnp.int32)
  cols = [
    i32(access),
    i32(last_access),
    i32(created),
    _f2i(quality),
    _f2i(strength),
    i32(alive),
    i32(domain),
    i32(generation),
  ]
  cols = jnp.broadcast_arrays(*cols)
  return jnp.stack(cols, axis=-1)


def init_graph(capacity: int, dim: int, degree: int) -> Graph:
  """An empty graph: all nodes dead, all edge slots empty.

  Examples:
    >>> g = init_graph(4, 3, 2)
    >>> g.capacity, g.degree, g.emb.shape, g.edges.shape, g.node.shape
    (4, 2, (4, 3), (4, 6), (4, 8))
    >>> g.nbr[0].tolist(), bool(g.alive.any())
    ([-1, -1], False)
  """
  for name, v in (("capacity", capacity), ("dim", dim), ("degree", degree)):
    if not isinstance(v, int) or v < 1:
      raise ValueError(f"init_graph: {name} must be a positive int, got {v!r}")
  nbr = jnp.full((capacity, degree), -1, jnp.int32)
  zeros = jnp.zeros((capacity, degree), jnp.float32)
  edges = make_edges(nbr, zeros, jnp.zeros((capacity, degree), jnp.int32))
  return Graph(
    emb=jnp.zeros((capacity, dim), jnp.float32),
    edges=edges,
    node=jnp.zeros((capacity, NODE_FIELDS), jnp.int32),
  )


def node_value(graph: Graph, now, half_life_s: float) -> jax.Array:
  """f32[N] eviction value: `quality * (1 + log1p(access)) * strength * 0.5^(idle / half_life)`.

  Dead nodes get -1, below any live node (values are >= 0), so free slots are taken first.
  `add_node` evicts by this value only among nodes older than its admission window.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_node(init_graph(2, 2, 1), jnp.array([1.0, 0.0]), quality=0.5, time=0)
    >>> node_value(g, 3600, 3600.0).tolist()  # 0.5 * (1 + log1p(0)) * 1 * 0.5^1; a dead node: -1
    [0.25, -1.0]
  """
  idle = jnp.maximum(jnp.asarray(now, jnp.int32) - graph.last_access, 0).astype(jnp.float32)
  recency = jnp.exp2(-idle / jnp.float32(half_life_s))
  access = graph.access_count.astype(jnp.float32)
  value = jnp.clip(graph.quality, 0.0, None) * (1.0 + jnp.log1p(access)) * graph.strength * recency
  return jnp.where(graph.alive, value, jnp.float32(-1.0))


def _clear_in_edges(edges: jax.Array, node_id, degree: int) -> jax.Array:
  """Clears every edge pointing at `node_id` (O(N K), off the per-request path)."""
  nbr = edges[:, :degree]
  hit = nbr == node_id
  empty = jnp.concatenate(
    [
      jnp.full_like(nbr, -1),
      jnp.zeros_like(nbr),  # bits of 0.0f
      jnp.zeros_like(nbr),
    ],
    axis=-1,
  )
  hit3 = jnp.concatenate([hit, hit, hit], axis=-1)
  return jnp.where(hit3, empty, edges)


def _empty_row(degree: int) -> jax.Array:
  return jnp.concatenate([jnp.full((degree,), -1, jnp.int32), jnp.zeros((2 * degree,), jnp.int32)])


_I32_MAX = 2**31 - 1
# The default admission window, the same as `SonaConfig.admission_window_s` (one day).
_DEFAULT_WINDOW_S = 86_400


def _order_bits(x: jax.Array) -> jax.Array:
  """i32 keys that sort like the f32 `x`, so one integer argmin orders values and times alike."""
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)  # a corrupt value goes first rather than never
  bits = _f2i(x)
  # Non-negative floats sort as their bit patterns; negative ones sort reversed.
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _check_window(admission_window_s) -> int:
  if isinstance(admission_window_s, bool) or not isinstance(admission_window_s, (int, float)):
    raise ValueError(f"admission_window_s must be a number, got {admission_window_s!r}")
  if not admission_window_s >= 0:
    raise ValueError(f"admission_window_s={admission_window_s!r} is out of range; allowed [0, inf]")
  return min(int(admission_window_s), _I32_MAX)


def _eviction_slot(graph: Graph, time, half_life_s: float, window: int, batch_order=None):
  """The slot a new memory takes at `time` (the rule is in `_add_node`'s docstring); O(N).

  `batch_order` (i32[N], -1 for slots not taken yet) is the position in the current batch of the
  memory each slot got from it; those slots come last, earliest batch member first.
  """
  alive = graph.alive
  created = graph.created
  if window > 0:
    young = alive & (time - created < jnp.int32(window))
  else:
    young = jnp.zeros_like(alive)
  # Tiers, taken in order: 0 free, 1 established, 2 young, 3 taken earlier in this batch.
  tier = jnp.where(alive, jnp.where(young, 2, 1), 0)
  if batch_order is not None:
    tier = jnp.where(batch_order >= 0, 3, tier)
  best = jnp.min(tier)
  value = _order_bits(node_value(graph, time, half_life_s))
  fifo = best == 2
  first = jnp.where(fifo, created, value)
  if batch_order is not None:
    first = jnp.where(best == 3, batch_order, first)
  # Lexicographic argmin, one masked min per key (O(N), no sort). The generation key keeps ties
  # from piling onto one slot: the slot a newcomer took has just had its generation raised.
  keys = (first, jnp.where(fifo, value, created), graph.last_access, graph.generation)
  cand = tier == best
  for key in keys:
    key = jnp.where(cand & alive, key, jnp.where(cand, 0, _I32_MAX))  # free slots: lowest first
    cand = cand & (key == jnp.min(key))
  return jnp.argmax(cand).astype(jnp.int32)


def _write_node(graph: Graph, slot, embedding, quality, time, domain):
  """Puts a new memory in `slot`, clearing an evicted occupant's edges.

  Returns:
    `(graph, new_id, evicted_id)` as memory ids (`memory_id`): the slot's generation grows by one,
    so the new id differs from the evicted one (-1 when the slot was free).
  """
  was_alive = graph.node[slot, ALIVE] != 0
  k = graph.degree
  edges = jax.lax.cond(was_alive, lambda e: _clear_in_edges(e, slot, k), lambda e: e, graph.edges)
  edges = edges.at[slot].set(_empty_row(k))
  e = jnp.asarray(embedding, jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e), 1e-12)
  gen = graph.node[slot, GENERATION] + 1
  row = make_node(0, time, time, jnp.clip(quality, 0.0, 1.0), 1.0, 1, domain, gen)
  graph = Graph(emb=graph.emb.at[slot].set(e), edges=edges, node=graph.node.at[slot].set(row))
  n = jnp.int32(graph.capacity)
  new_id = slot + n * id_tag(gen, graph.capacity)
  evicted_id = slot + n * id_tag(gen - 1, graph.capacity)
  return graph, new_id, jnp.where(was_alive, evicted_id, -1)


def _add_node(
  graph: Graph,
  embedding: jax.Array,
  *,
  quality=0.5,
  time=0,
  domain=0,
  half_life_s: float = 7 * 86_400.0,
  admission_window_s: int = _DEFAULT_WINDOW_S,
):
  """Adds a memory node: takes a free slot, or evicts an established node of lowest value.

  Which slot, in order:

  1. a free (dead) slot, the lowest first;
  2. else the *established* live node (created at least `admission_window_s` before `time`) of
     lowest `node_value`; equal values go to the earliest created, then the least recently
     accessed, then the slot reused least (lowest generation), then the lowest slot;
  3. else (every live node is younger than the window) the earliest created, then by the same keys
     (value, last access, generation, slot): FIFO among the young.

  A node younger than the window is thus never evicted while an older live node exists. Without
  the window a newcomer, with no accesses yet, is usually the lowest-value node and the next
  newcomer evicts it: a full graph kept one new memory at a time. The window is the probation
  segment of SLRU (Karedla, Love & Wherry 1994) and the admission window of W-TinyLFU (Einziger,
  Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission Policy", ACM ToS 2017): a
  newcomer is protected long enough to earn accesses before it competes on value. Ties do not
  pile onto one slot: a just-filled slot holds the latest created node, and among nodes equal in
  every other key the slot reused least goes first, which moves successive evictions round them.

  The embedding is stored unit-normalised. When a live node is evicted, its own edges and every
  edge pointing at it are cleared, so the new occupant inherits nothing; the slot's generation
  grows by one. The input graph is donated.

  Args:
    graph: the graph (donated).
    embedding: f32[dim].
    quality: initial quality EMA in [0, 1].
    time: creation time, int seconds since the origin.
    domain: domain label.
    half_life_s: recency half-life of the eviction value.
    admission_window_s: seconds a new node is protected from eviction (static); 0 turns the window
      off (every live node competes on value). The default, one day, is `SonaConfig`'s.

  Returns:
    `(graph, node_id, evicted_id)`: the new memory's id and the evicted memory's id (-1 if the slot
    was free), as stable memory ids (`memory_id`: the slot plus its generation; equal to the slot
    the first time a slot is used). `slot_of`/`resolve_ids` map ids back to rows.

  Examples:
    >>> import jax.numpy as jnp
    >>> g = init_graph(2, 2, 1)
    >>> g, a, evicted = add_node(g, jnp.array([0.0, 2.0]), quality=0.9, time=10)
    >>> int(a), int(evicted), g.emb[0].tolist()  # the first free slot; stored unit-norm
    (0, -1, [0.0, 1.0])
    >>> g, b, _ = add_node(g, jnp.array([1.0, 0.0]), quality=0.2, time=10)
    >>> g, c, evicted = add_node(g, jnp.array([1.0, 1.0]), time=10 + 2 * 86_400)  # full
    >>> int(evicted), int(c), int(slot_of(c, 2))  # the lower-value node's slot, a new id
    (1, 3, 1)
  """
  window = _check_window(admission_window_s)
  time = jnp.asarray(time, jnp.int32)
  slot = _eviction_slot(graph, time, half_life_s, window)
  return _write_node(graph, slot, embedding, quality, time, domain)


add_node = jax.jit(
  _add_node, static_argnames=("half_life_s", "admission_window_s"), donate_argnums=0
)
add_node.__doc__ = _add_node.__doc__


@functools.partial(jax.jit, static_argnames=("half_life_s", "admission_window_s"), donate_argnums=0)
def add_nodes(
  graph: Graph,
  embeddings,
  *,
  quality=0.5,
  time=0,
  domain=0,
  half_life_s=7 * 86_400.0,
  admission_window_s=_DEFAULT_WINDOW_S,
):
  """Adds a batch of nodes in order by the rule of `add_node`; returns `(graph, ids, evicted)`.

  A node of the batch is never evicted by a later one of the same batch, so `n <= N` nodes get `n`
  distinct slots. A batch larger than the capacity keeps its last `N` nodes: node `i >= N` takes
  the slot of node `i - N` (`evicted[i] == ids[i - N]`).

  `quality`, `time` and `domain` may be scalars or per-node arrays of length `n`.

  Examples:
    >>> import jax.numpy as jnp
    >>> emb = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
    >>> g, ids, evicted = add_nodes(init_graph(3, 2, 1), emb, quality=0.5, time=0)
    >>> ids.tolist(), evicted.tolist()  # 4 nodes, capacity 3: the last takes the first's slot
    ([0, 1, 2, 3], [-1, -1, -1, 0])
  """
  window = _check_window(admission_window_s)
  n = embeddings.shape[0]
  quality = jnp.broadcast_to(jnp.asarray(quality, jnp.float32), (n,))
  time = jnp.broadcast_to(jnp.asarray(time, jnp.int32), (n,))
  domain = jnp.broadcast_to(jnp.asarray(domain, jnp.int32), (n,))
  order = jnp.full((graph.capacity,), -1, jnp.int32)

  def body(carry, xs):
    g, order = carry
    idx, e, q, t, dm = xs
    slot = _eviction_slot(g, t, half_life_s, window, order)
    g, new_id, ev = _write_node(g, slot, e, q, t, dm)
    return (g, order.at[slot].set(idx)), (new_id, ev)

  xs = (jnp.arange(n, dtype=jnp.int32), embeddings, quality, time, domain)
  (graph, _), (ids, evicted) = jax.lax.scan(body, (graph, order), xs)
  return graph, ids, evicted


@jax.jit
def remove_node(graph: Graph, node_id) -> Graph:
  """Marks a node dead and clears its edges in and out (keeps the invariant of the module).

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 2), jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> g, _ = add_edges(g, [0, 1], [2, 2], [0.5, 0.5], HEBBIAN)  # 0 -> 2 and 1 -> 2
    >>> g = remove_node(g, 2)
    >>> bool(g.alive[2]), g.nbr.tolist()  # dead, and no edge points at it any more
    (False, [[-1, -1], [-1, -1], [-1, -1]])
  """
  node_id = jnp.asarray(node_id, jnp.int32)
  k = graph.degree
  edges = _clear_in_edges(graph.edges, node_id, k).at[node_id].set(_empty_row(k))
  node = graph.node.at[node_id, ALIVE].set(0)
  return graph._replace(edges=edges, node=node)


def strengthen(w, rate):
  """Hebbian strengthening `w + rate (1 - w)` (seed: +5% per use); stays in [0, 1].

  Examples:
    >>> round(strengthen(0.5, 0.1), 6), strengthen(1.0, 0.1)  # 0.5 + 0.1 * 0.5; 1 stays 1
    (0.55, 1.0)
  """
  return w + rate * (1.0 - w)


def weaken(w, rate):
  """Hebbian weakening `w (1 - rate)` (seed: -2% per skip); stays in [0, 1].

  Examples:
    >>> round(weaken(0.5, 0.1), 6), weaken(0.0, 0.1)  # 0.5 * 0.9; 0 stays 0
    (0.45, 0.0)
  """
  return w * (1.0 - rate)


def hebbian_row(row: jax.Array, anchor, used, unused, *, strengthen_rate, weaken_rate):
  """Applies the Hebbian rule to one packed edge row `i32[3K]` of node `anchor`.

  Semantics, in three passes: (1) every existing edge to a used id is strengthened (and becomes
  `HEBBIAN`: real use now supports it, even if a dream proposed it); (2) the used ids without an
  edge, in order, each get a new `HEBBIAN` edge of weight `strengthen_rate` in the first empty
  slot, or over the weakest slot if that slot is weaker than the new edge (a just-strengthened
  edge never is); (3) every remaining edge to an unused id is weakened. Ids of -1 and self-loops
  are skipped; ids are assumed distinct (Loop A rejects duplicates).

  Written as elementwise operations on the K slots or the k ids, unrolled over the other axis
  (k ids, K <= 64 slots): on CPU each reduction, sort or gather is a kernel of its own, and Loop
  A's latency is mostly kernel count, while elementwise work fuses into a few kernels.

  Args:
    row: i32[3K] packed edge row.
    anchor: the row's node id (self-loops are skipped).
    used: i32[k] used ids, -1 padded.
    unused: i32[k] unused ids, -1 padded.
    strengthen_rate: Hebbian rate for used ids.
    weaken_rate: Hebbian rate for unused ids.

  Returns:
    `(row, n_changed)`: the new row and the number of ids that changed an edge.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> row = make_edges(jnp.array([1, 2, -1]), jnp.array([0.5, 0.5, 0.0]), jnp.zeros(3, jnp.int32))
    >>> used, unused = jnp.array([1, 3]), jnp.array([2, -1])
    >>> new, n = hebbian_row(row, 0, used, unused, strengthen_rate=0.5, weaken_rate=0.5)
    >>> new[:3].tolist(), int(n)  # 3 gets the empty slot
    ([1, 2, 3], 3)
    >>> jax.lax.bitcast_convert_type(new[3:6], jnp.float32).tolist()  # .5 + .5 * .5, .5 / 2, new
    [0.75, 0.25, 0.5]
  """
  k = row.shape[-1] // 3
  k_u, k_v = used.shape[-1], unused.shape[-1]
  nbr, w, kind = row[:k], _i2f(row[k : 2 * k]), row[2 * k :]
  s = jnp.float32(strengthen_rate)
  any_of = lambda xs: functools.reduce(jnp.logical_or, xs)
  u_valid = (used >= 0) & (used != anchor)
  v_valid = (unused >= 0) & (unused != anchor)
  u_match = [(used[j] == nbr) & u_valid[j] for j in range(k_u)]  # per id: [K] slots it matches
  v_match = [(unused[j] == nbr) & v_valid[j] for j in range(k_v)]
  strengthened = any_of(u_match)  # [K]
  weakened = any_of(v_match)
  u_has = u_valid & any_of([used == nbr[m] for m in range(k)])  # [k_u]: used ids with an edge
  u_new = u_valid & ~u_has  # used ids that need a new edge
  # Slots in the order sequential insertion would take them: empty slots by index, then the
  # weakest first (ties to the lower index, like argmin): a slot's position counts the slots
  # before it.
  empty = nbr < 0
  w = jnp.where(strengthened, strengthen(w, s), w)
  key = jnp.where(empty, -1.0, w)
  slots = jnp.arange(k, dtype=jnp.int32)
  position = sum(
    ((key[i] < key) | ((key[i] == key) & (i < slots))).astype(jnp.int32) for i in range(k)
  )
  # The r-th new id (in order) takes the slot at position r.
  new_i = u_new.astype(jnp.int32)
  ids_at = jnp.arange(k_u, dtype=jnp.int32)
  rank = sum(jnp.where(ids_at >= i, new_i[i], 0) for i in range(k_u)) - 1  # cumsum, elementwise
  target = sum(jnp.where(position[m] == rank, m, 0) for m in range(k))  # [k_u]
  free = empty | (w < s)
  target_free = any_of([(target == m) & free[m] for m in range(k)])
  u_ins = u_new & (rank < k) & target_free
  ins = [(slots == target[j]) & u_ins[j] for j in range(k_u)]  # per id: [K] the slot it takes
  inserted = any_of(ins)
  new_id = functools.reduce(jnp.maximum, [jnp.where(ins[j], used[j], -1) for j in range(k_u)])
  w = jnp.where(inserted, s, w)
  weakened = weakened & ~inserted  # an unused id whose slot a new edge just took is gone
  w = jnp.where(weakened, weaken(w, jnp.float32(weaken_rate)), w)
  nbr = jnp.where(inserted, new_id, nbr)
  kind = jnp.where(strengthened | inserted, HEBBIAN, kind)
  changed_u = (u_has | u_ins).astype(jnp.int32)
  # An unused id changed an edge when it matched a slot that no new edge took.
  v_hit = [
    v_valid[j] & any_of([(unused[j] == row[m]) & ~inserted[m] for m in range(k)])
    for j in range(k_v)
  ]
  changed = sum(changed_u[j] for j in range(k_u)) + sum(h.astype(jnp.int32) for h in v_hit)
  return jnp.concatenate([nbr, _f2i(w), kind]), jnp.asarray(changed, jnp.int32)


@functools.partial(jax.jit, static_argnames=("strengthen_rate", "weaken_rate"))
def hebbian_update(graph: Graph, anchor, used, unused, *, strengthen_rate=0.05, weaken_rate=0.02):
  """Hebbian update of `anchor`'s edges (see `hebbian_row`); no-op when `anchor < 0`.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 2), jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> g = hebbian_update(g, 0, jnp.array([1, -1]), jnp.array([-1, -1]))
    >>> g.nbr[0].tolist(), round(float(g.w[0, 0]), 4), int(g.kind[0, 0]) == HEBBIAN
    ([1, -1], 0.05, True)
    >>> same = hebbian_update(g, -1, jnp.array([2, -1]), jnp.array([-1, -1]))  # anchor -1: no-op
    >>> bool((same.edges == g.edges).all())
    True
  """
  anchor = jnp.asarray(anchor, jnp.int32)
  safe = jnp.clip(anchor, 0, graph.capacity - 1)
  row = jax.lax.dynamic_index_in_dim(graph.edges, safe, keepdims=False)
  new_row, _ = hebbian_row(
    row,
    anchor,
    jnp.asarray(used, jnp.int32),
    jnp.asarray(unused, jnp.int32),
    strengthen_rate=strengthen_rate,
    weaken_rate=weaken_rate,
  )
  new_row = jnp.where(anchor >= 0, new_row, row)
  return graph._replace(edges=jax.lax.dynamic_update_index_in_dim(graph.edges, new_row, safe, 0))


def neighbors(graph: Graph, node_id, *, exclude_synthetic: bool = False):
  """Neighbours of one node: `(ids i32[K], w f32[K], kind i32[K], mask bool[K])`.

  With `exclude_synthetic`, `CREATIVE` and `ANALOGY` edges are masked out (docs/design.md,
  "Memory graph": synthetic edges are always marked so retrieval can exclude them).

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 2), jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> g, _ = add_edges(g, [0, 0], [1, 2], [0.5, 0.25], [HEBBIAN, CREATIVE])
    >>> ids, w, kind, mask = neighbors(g, 0)
    >>> ids.tolist(), w.tolist(), mask.tolist()
    ([1, 2], [0.5, 0.25], [True, True])
    >>> neighbors(g, 0, exclude_synthetic=True)[0].tolist()  # the dream's CREATIVE edge is masked
    [1, -1]
  """
  ids, w, kind = graph.nbr[node_id], graph.w[node_id], graph.kind[node_id]
  mask = ids >= 0
  if exclude_synthetic:
    mask = mask & (kind != CREATIVE) & (kind != ANALOGY)
  return jnp.where(mask, ids, -1), jnp.where(mask, w, 0.0), kind, mask


class EdgeUpdate(NamedTuple):
  """What `add_edges` did (host NumPy arrays).

  Attributes:
    updated: i32[m, 2] `(src, dst)` pairs that already had an edge and got a new weight.
    inserted: i32[m, 2] pairs that got a new edge.
    rejected: i32[m, 2] proposed pairs that found no slot (every slot of the row was stronger).
    displaced: i32[m, 2] existing edges that lost their slot to a stronger new edge.
  """

  updated: np.ndarray
  inserted: np.ndarray
  rejected: np.ndarray
  displaced: np.ndarray


def add_edges(graph: Graph, src, dst, weight, kind, *, mode: str = "max"):
  """Adds or updates many directed edges at once (host-side, for Loop C; O(E log E)).

  For a pair that already has an edge, the weight becomes `max(w, weight)` (`mode="max"`) or
  `min(1, w + weight)` (`mode="add"`) and the kind is kept. A new pair takes an empty slot of its
  row or, when the row is full, the slot of its weakest edge if that edge is weaker: per row, the
  `K` strongest of the existing and proposed edges are kept (ties keep existing edges first, then
  the pair proposed first), which is what inserting the proposals one by one, strongest first and
  in proposal order among equals, into the weakest slot gives.
  Self-loops, pairs with a dead or out-of-range end, and duplicate proposals (the strongest one
  wins) are dropped. Nothing is lost silently: the returned `EdgeUpdate` lists every updated,
  inserted, rejected and displaced pair.

  Args:
    graph: the graph.
    src, dst: i32[E] edge ends (the edge lives in `src`'s row).
    weight: f32[E] weights, clipped to [0, 1].
    kind: edge kind for new edges (scalar or i32[E]).
    mode: `"max"` or `"add"`, how an existing edge's weight combines with the proposal.

  Returns:
    `(graph, EdgeUpdate)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 1), jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    >>> g, rep = add_edges(g, [0, 0, 1], [1, 2, 1], [0.5, 0.75, 0.5], HEBBIAN)  # degree 1
    >>> g.nbr[:, 0].tolist(), rep.inserted.tolist(), rep.rejected.tolist()  # 1 -> 1 is dropped
    ([2, -1, -1], [[0, 2]], [[0, 1]])
    >>> g, rep = add_edges(g, [0], [2], [0.25], HEBBIAN, mode="add")  # an existing edge: w + 0.25
    >>> float(g.w[0, 0]), rep.updated.tolist()
    (1.0, [[0, 2]])
  """
  if mode not in ("max", "add"):
    raise ValueError(f"add_edges: mode must be 'max' or 'add', got {mode!r}")
  n, k = graph.capacity, graph.degree
  src = np.asarray(src, np.int64).reshape(-1)
  dst = np.asarray(dst, np.int64).reshape(-1)
  weight = np.clip(np.asarray(weight, np.float32).reshape(-1), 0.0, 1.0)
  kind = np.broadcast_to(np.asarray(kind, np.int32), src.shape).copy()
  if not (src.shape == dst.shape == weight.shape):
    raise ValueError(
      f"add_edges: src, dst, weight shapes differ: {src.shape} {dst.shape} {weight.shape}"
    )
  empty = np.zeros((0, 2), np.int32)
  edges = np.array(graph.edges)
  alive = np.asarray(graph.node[:, ALIVE]) != 0
  ok = (src >= 0) & (src < n) & (dst >= 0) & (dst < n) & (src != dst) & np.isfinite(weight)
  ok[ok] &= alive[src[ok]] & alive[dst[ok]]
  pos = np.flatnonzero(ok)  # each proposal's place in the input: ties go to the earlier one
  src, dst, weight, kind = src[ok], dst[ok], weight[ok], kind[ok]
  if src.size == 0:
    return graph, EdgeUpdate(empty, empty, empty, empty)
  # Duplicate proposals: keep the strongest (the earliest among equals); the pair ranks by its
  # first proposal.
  order = np.lexsort((pos, -weight, dst, src))
  src, dst, weight, kind, pos = src[order], dst[order], weight[order], kind[order], pos[order]
  first = np.ones(src.size, bool)
  first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
  pos = np.minimum.reduceat(pos, np.flatnonzero(first))
  src, dst, weight, kind = src[first], dst[first], weight[first], kind[first]
  nbr, w, knd = edges[:, :k], edges[:, k : 2 * k].view(np.float32), edges[:, 2 * k :]
  # Existing edges: match proposals against their row's slots.
  match = nbr[src] == dst[:, None]  # [E, K]
  has = match.any(axis=1)
  slot = match.argmax(axis=1)
  us, ud, uslot, uw = src[has], dst[has], slot[has], weight[has]
  if mode == "max":
    w[us, uslot] = np.maximum(w[us, uslot], uw)
  else:
    w[us, uslot] = np.minimum(w[us, uslot] + uw, 1.0)
  updated = np.stack([us, ud], axis=1).astype(np.int32)
  # New edges: per row, keep the K strongest of existing + proposed.
  ns, nd, nw, nk, npos = src[~has], dst[~has], weight[~has], kind[~has], pos[~has]
  rows = np.unique(ns)
  inserted, rejected, displaced = [], [], []
  if rows.size:
    r_nbr, r_w = nbr[rows], w[rows]
    ex_row = np.repeat(np.arange(rows.size), k)
    ex_slot = np.tile(np.arange(k), rows.size)
    ex_ok = r_nbr.reshape(-1) >= 0
    c_row = np.concatenate([ex_row[ex_ok], np.searchsorted(rows, ns)])
    c_w = np.concatenate([r_w.reshape(-1)[ex_ok], nw])
    c_new = np.concatenate([np.zeros(ex_ok.sum(), bool), np.ones(ns.size, bool)])
    c_idx = np.concatenate([ex_slot[ex_ok], np.arange(ns.size)])
    c_pos = np.concatenate([np.zeros(ex_ok.sum(), np.int64), npos])
    # By row, strongest first; on ties existing edges first, then the pair proposed first.
    order = np.lexsort((c_pos, c_new, -c_w, c_row))
    c_row, c_w, c_new, c_idx = c_row[order], c_w[order], c_new[order], c_idx[order]
    start = np.searchsorted(c_row, np.arange(rows.size))
    rank = np.arange(c_row.size) - start[c_row]
    keep = rank < k
    gone_ex = ~keep & ~c_new
    displaced = np.stack([rows[c_row[gone_ex]], r_nbr[c_row[gone_ex], c_idx[gone_ex]]], axis=1)
    rej = ~keep & c_new
    rejected = np.stack([ns[c_idx[rej]], nd[c_idx[rej]]], axis=1)
    # Free the displaced slots, then fill free slots with the kept new edges in order.
    nbr[rows[c_row[gone_ex]], c_idx[gone_ex]] = -1
    w[rows[c_row[gone_ex]], c_idx[gone_ex]] = 0.0
    knd[rows[c_row[gone_ex]], c_idx[gone_ex]] = 0
    ins = keep & c_new
    i_row, i_idx = c_row[ins], c_idx[ins]
    i_start = np.searchsorted(i_row, np.arange(rows.size))
    i_rank = np.arange(i_row.size) - i_start[i_row]
    free = nbr[rows] < 0  # [R, K]
    free_rank = np.cumsum(free, axis=1) - 1
    free_rank = np.where(free, free_rank, k)  # occupied slots never match
    target = np.argmax(free_rank[i_row] == i_rank[:, None], axis=1)
    tr = rows[i_row]
    nbr[tr, target] = nd[i_idx]
    w[tr, target] = nw[i_idx]
    knd[tr, target] = nk[i_idx]
    inserted = np.stack([tr, nd[i_idx]], axis=1)
  as_pairs = lambda a: np.asarray(a, np.int32).reshape(-1, 2) if len(a) else empty
  graph = graph._replace(edges=jnp.asarray(edges))
  return graph, EdgeUpdate(updated, as_pairs(inserted), as_pairs(rejected), as_pairs(displaced))


def to_networkx(graph: Graph, *, include_embeddings: bool = False) -> nx.DiGraph:
  """Exports the live part of the graph to a `networkx.DiGraph` for analysis.

  Nodes keep their id and statistics (`quality`, `access_count`, `last_access`, `created`,
  `strength`, `domain`, and `emb` if asked); edges keep `weight` and `kind` (a name of
  `EDGE_KINDS`). Edges are directed from the node whose row holds them.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 2), jnp.eye(2), quality=0.5)  # two of three slots
    >>> g, _ = add_edges(g, [0], [1], [0.5], CONSOLIDATED)
    >>> nxg = to_networkx(g)
    >>> sorted(nxg.nodes), list(nxg.edges(data=True)), nxg.nodes[0]["quality"]
    ([0, 1], [(0, 1, {'weight': 0.5, 'kind': 'CONSOLIDATED'})], 0.5)
  """
  nbr = np.asarray(graph.nbr)
  w = np.asarray(graph.w)
  kind = np.asarray(graph.kind)
  alive = np.asarray(graph.alive)
  quality = np.asarray(graph.quality)
  access = np.asarray(graph.access_count)
  last = np.asarray(graph.last_access)
  created = np.asarray(graph.created)
  strength = np.asarray(graph.strength)
  domain = np.asarray(graph.domain)
  emb = np.asarray(graph.emb) if include_embeddings else None
  import networkx as nx

  g = nx.DiGraph()
  for i in np.flatnonzero(alive):
    attrs = dict(
      quality=float(quality[i]),
      access_count=int(access[i]),
      last_access=int(last[i]),
      created=int(created[i]),
      strength=float(strength[i]),
      domain=int(domain[i]),
    )
    if emb is not None:
      attrs["emb"] = emb[i]
    g.add_node(int(i), **attrs)
  rows, cols = np.nonzero(nbr >= 0)
  for i, j in zip(rows, cols, strict=True):
    g.add_edge(int(i), int(nbr[i, j]), weight=float(w[i, j]), kind=EDGE_KINDS[int(kind[i, j])])
  return g


# ---------------------------------------------------------------------------------------------
# Stable memory ids.
#
# A slot is recycled when its memory is evicted or merged away, so a slot index alone cannot tell
# a caller's old memory from the slot's new occupant. The id handed out for a memory therefore
# carries the slot's generation: `id = slot + N * tag(generation)`. A slot's first memory has
# tag 0, so its id is the slot itself (graphs that never recycle a slot see ids equal to slots).
# Tags wrap modulo `max_tag(N) = (2^31 - 1) // N` (21,474 reuses of one slot at N = 100,000):
# an id held across that many reuses of its slot would alias; nothing shorter can.


def max_tag(capacity: int) -> int:
  """How many generations of one slot have distinct ids before they wrap (int32 ids).

  Examples:
    >>> max_tag(100_000), max_tag(100_000) * 100_000 <= 2**31 - 1
    (21474, True)
  """
  return (2**31 - 1) // int(capacity)


def id_tag(generation, capacity: int):
  """i32 tag of a slot's generation: 0 for the first memory of the slot (and for generation 0).

  Examples:
    >>> import jax.numpy as jnp
    >>> id_tag(jnp.array([0, 1, 2, 3]), 4).tolist()  # the first memory of a slot has tag 0
    [0, 0, 1, 2]
    >>> int(id_tag(max_tag(4) + 1, 4))  # tags wrap after max_tag generations
    0
  """
  g = jnp.asarray(generation, jnp.int32)
  return jnp.maximum(g - 1, 0) % jnp.int32(max_tag(capacity))


def memory_id(graph: Graph, slot):
  """The stable id of the memory now in `slot` (i32, any shape), -1 where the slot is free.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(2, 2, 1), jnp.eye(2), time=0)
    >>> memory_id(g, jnp.array([0, 1, -1])).tolist()  # first use of a slot: the id is the slot
    [0, 1, -1]
    >>> g, new, _ = add_node(remove_node(g, 1), jnp.array([1.0, 1.0]), time=0)  # reuses slot 1
    >>> int(new), int(memory_id(g, 1))  # slot 1 + capacity 2 * tag 1
    (3, 3)
  """
  slot = jnp.asarray(slot, jnp.int32)
  n = graph.capacity
  safe = jnp.clip(slot, 0, n - 1)
  row = graph.node[..., safe, :]
  mid = safe + jnp.int32(n) * id_tag(row[..., GENERATION], n)
  return jnp.where((slot >= 0) & (slot < n) & (row[..., ALIVE] != 0), mid, -1)


def memory_ids(graph: Graph) -> jax.Array:
  """i32[N]: the stable id of every slot's memory, -1 for free slots.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(3, 2, 1), jnp.eye(2), time=0)
    >>> memory_ids(g).tolist()
    [0, 1, -1]
  """
  n = graph.capacity
  slots = jnp.arange(n, dtype=jnp.int32)
  mid = slots + jnp.int32(n) * id_tag(graph.node[..., GENERATION], n)
  return jnp.where(graph.node[..., ALIVE] != 0, mid, -1)


def slot_of(ids, capacity: int):
  """The slot an id names (`id mod N`), -1 kept for -1 (no check that the memory still lives).

  Examples:
    >>> import jax.numpy as jnp
    >>> slot_of(jnp.array([0, 3, 7, -1]), 2).tolist()
    [0, 1, 1, -1]
  """
  ids = jnp.asarray(ids, jnp.int32)
  return jnp.where(ids >= 0, ids % jnp.int32(capacity), jnp.minimum(ids, -1))


def resolve_ids(graph: Graph, ids):
  """`(slots, live)` for ids held outside the graph: `live` is False for -1 padding, for ids of
  memories that were evicted or merged away (even when their slot holds a new memory), and for
  ids that were never issued. Use it to map returned ids back to rows of the graph's arrays.

  Examples:
    >>> import jax.numpy as jnp
    >>> g, _, _ = add_nodes(init_graph(2, 2, 1), jnp.eye(2), time=0)
    >>> g, new, _ = add_node(remove_node(g, 1), jnp.array([1.0, 1.0]), time=0)  # id 1 is gone
    >>> slots, live = resolve_ids(g, jnp.array([0, 1, int(new), -1]))
    >>> slots.tolist(), live.tolist()  # id 1's slot now holds id 3
    ([0, 1, 1, -1], [True, False, True, False])
  """
  ids = jnp.asarray(ids, jnp.int32)
  n = graph.capacity
  slots = slot_of(ids, n)
  safe = jnp.clip(slots, 0, n - 1)
  node = graph.node[safe]
  live = (
    (ids >= 0) & (node[..., ALIVE] != 0) & (ids // jnp.int32(n) == id_tag(node[..., GENERATION], n))
  )
  return slots, live


@functools.partial(jax.jit, donate_argnums=0)
def place_node(graph: Graph, slot, embedding, *, quality, time, domain, generation) -> Graph:
  """Puts a memory into `slot` with the given `generation`, replacing whatever the slot holds
  (its edges in and out are cleared, as `add_node` does when it evicts).

  `add_node` chooses the slot; this repeats a choice already made, so that replaying a recorded
  addition on another version of the state (the driver's journal after a Loop B/C cycle) gives
  the memory the same id as the first time. The input graph is donated.

  Examples:
    >>> import jax.numpy as jnp
    >>> e = jnp.array([0.0, 3.0])
    >>> g = place_node(init_graph(3, 2, 1), 2, e, quality=0.5, time=7, domain=1, generation=2)
    >>> int(memory_id(g, 2)), g.emb[2].tolist(), int(g.created[2])  # id 2 + 3 * tag(2)
    (5, [0.0, 1.0], 7)
    >>> g1, _, _ = add_node(init_graph(3, 2, 1), e, quality=0.5, time=7)  # replaying a choice
    >>> g2 = place_node(init_graph(3, 2, 1), 0, e, quality=0.5, time=7, domain=0, generation=1)
    >>> bool((g1.node == g2.node).all() & (g1.emb == g2.emb).all() & (g1.edges == g2.edges).all())
    True
  """
  slot = jnp.asarray(slot, jnp.int32)
  k = graph.degree
  edges = _clear_in_edges(graph.edges, slot, k).at[slot].set(_empty_row(k))
  e = jnp.asarray(embedding, jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e), 1e-12)
  time = jnp.asarray(time, jnp.int32)
  row = make_node(0, time, time, jnp.clip(quality, 0.0, 1.0), 1.0, 1, domain, generation)
  return Graph(emb=graph.emb.at[slot].set(e), edges=edges, node=graph.node.at[slot].set(row))
