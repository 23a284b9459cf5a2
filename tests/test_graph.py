"""Memory graph: Hebbian formulas, bounds, slot recycling, networkx export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sona_jax import graph as G


def _graph(n=8, dim=4, k=4, seed=0):
  g = G.init_graph(n, dim, k)
  rng = np.random.default_rng(seed)
  g, ids, _ = G.add_nodes(g, jnp.asarray(rng.normal(size=(n, dim)), jnp.float32), quality=0.5)
  return g, np.asarray(ids)


def _reference_row(nbr, w, kind, anchor, used, unused, s, wk):
  """Sequential NumPy reference of the Hebbian rule (one id at a time, float64): strengthen the
  existing edges of used ids, then insert the others in order, then weaken unused ids' edges."""
  nbr, w, kind = list(nbr), [float(v) for v in w], list(kind)
  used = [u for u in used if u >= 0 and u != anchor]
  for u in used:
    if u in nbr:
      j = nbr.index(u)
      w[j] = w[j] + s * (1 - w[j])
      kind[j] = G.HEBBIAN
  for u in used:
    if u in nbr:
      continue
    empties = [j for j, v in enumerate(nbr) if v < 0]
    if empties:
      j = empties[0]
    else:
      j = int(np.argmin(w))
      if not w[j] < s:
        continue
    nbr[j], w[j], kind[j] = u, s, G.HEBBIAN
  for v in unused:
    if v < 0 or v == anchor or v not in nbr:
      continue
    j = nbr.index(v)
    w[j] = w[j] * (1 - wk)
  return np.array(nbr), np.array(w), np.array(kind)


def test_init_graph_is_empty():
  g = G.init_graph(5, 3, 2)
  assert g.emb.shape == (5, 3) and g.edges.shape == (5, 6) and g.node.shape == (5, 8)
  assert np.all(np.asarray(g.nbr) == -1) and np.all(np.asarray(g.w) == 0)
  assert not np.any(np.asarray(g.alive))


def test_hebbian_values_match_formulas():
  g, _ = _graph()
  s, wk = 0.05, 0.02
  g = G.hebbian_update(g, 0, [1, 2, -1, -1], [-1] * 4, strengthen_rate=s, weaken_rate=wk)
  w = np.asarray(g.w[0])
  nbr = np.asarray(g.nbr[0])
  assert nbr[:2].tolist() == [1, 2]
  np.testing.assert_allclose(w[:2], [s, s], rtol=1e-6)
  # Use again: w <- w + s (1 - w); skip: w <- w (1 - wk).
  g = G.hebbian_update(g, 0, [1, -1, -1, -1], [2, -1, -1, -1], strengthen_rate=s, weaken_rate=wk)
  w = np.asarray(g.w[0])
  np.testing.assert_allclose(w[0], s + s * (1 - s), rtol=1e-6)
  np.testing.assert_allclose(w[1], s * (1 - wk), rtol=1e-6)
  assert np.asarray(g.kind[0, :2]).tolist() == [G.HEBBIAN, G.HEBBIAN]


def test_hebbian_full_row_replaces_weakest_only_if_weaker():
  g, _ = _graph(n=8, k=2)
  s = 0.05
  g = G.hebbian_update(g, 0, [1, 2, -1, -1], [-1] * 4, strengthen_rate=s, weaken_rate=0.02)
  # Row full at weight s: a new id is not weaker-replaced (s is not < s).
  g2 = G.hebbian_update(g, 0, [3, -1, -1, -1], [-1] * 4, strengthen_rate=s, weaken_rate=0.02)
  assert sorted(np.asarray(g2.nbr[0]).tolist()) == [1, 2]
  # Weaken id 2 below s: now 3 replaces it.
  g3 = G.hebbian_update(g, 0, [-1] * 4, [2, -1, -1, -1], strengthen_rate=s, weaken_rate=0.02)
  g3 = G.hebbian_update(g3, 0, [3, -1, -1, -1], [-1] * 4, strengthen_rate=s, weaken_rate=0.02)
  assert sorted(np.asarray(g3.nbr[0]).tolist()) == [1, 3]


_hebbian_row_jit = jax.jit(
  lambda r, a, u, v: G.hebbian_row(r, a, u, v, strengthen_rate=0.05, weaken_rate=0.02)
)


@settings(max_examples=60, deadline=None)
@given(
  nbr=st.lists(st.integers(-1, 9), min_size=4, max_size=4),
  w=st.lists(st.floats(0.0, 1.0, width=32), min_size=4, max_size=4),
  ids=st.lists(st.integers(-1, 9), min_size=8, max_size=8),
  anchor=st.integers(0, 9),
)
def test_hebbian_row_matches_sequential_reference(nbr, w, ids, anchor):
  # Distinct non-negative ids, as Loop A guarantees (it rejects duplicates).
  seen, clean = set(), []
  for v in ids:
    if v >= 0 and v in seen:
      v = -1
    seen.add(v)
    clean.append(v)
  used, unused = np.array(clean[:4], np.int32), np.array(clean[4:], np.int32)
  nbr_seen, nbr_clean = set(), []
  for v in nbr:
    nbr_clean.append(-1 if (v >= 0 and v in nbr_seen) else v)
    nbr_seen.add(v)
  nbr = np.array(nbr_clean, np.int32)
  w = np.where(nbr >= 0, np.array(w, np.float32), 0.0).astype(np.float32)
  kind = np.full(4, G.CREATIVE, np.int32)
  row = G.make_edges(nbr, w, kind)
  new_row, _ = _hebbian_row_jit(row, jnp.int32(anchor), used, unused)
  k = 4
  got_nbr = np.asarray(new_row[:k])
  got_w = np.asarray(jax.lax.bitcast_convert_type(new_row[k : 2 * k], jnp.float32))
  ref_nbr, ref_w, ref_kind = _reference_row(nbr, w, kind, anchor, used, unused, 0.05, 0.02)
  np.testing.assert_array_equal(got_nbr, ref_nbr)
  np.testing.assert_allclose(got_w, ref_w, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(new_row[2 * k :]), ref_kind)
  assert np.all((got_w >= 0) & (got_w <= 1))


def test_weights_stay_in_unit_interval_under_many_updates():
  g, _ = _graph(n=6, k=3)
  rng = np.random.default_rng(1)
  step = jax.jit(
    lambda g, a, u, v: G.hebbian_update(g, a, u, v, strengthen_rate=0.9, weaken_rate=0.9)
  )
  for _ in range(200):
    ids = rng.choice(6, size=4, replace=False).astype(np.int32)
    g = step(g, jnp.int32(rng.integers(6)), ids[:2], ids[2:])
  w = np.asarray(g.w)
  assert np.all((w >= 0) & (w <= 1)) and np.all(np.isfinite(w))


def test_recycled_node_keeps_no_stale_edges():
  n = 4
  g = G.init_graph(n, 3, 3)
  rng = np.random.default_rng(0)
  g, ids, _ = G.add_nodes(g, jnp.asarray(rng.normal(size=(n, 3)), jnp.float32), quality=0.9)
  # Node 2 gets a low quality, so it is evicted first; everyone links to it, and it links out.
  g = g._replace(node=g.node.at[2, G.QUALITY].set(jax.lax.bitcast_convert_type(0.01, jnp.int32)))
  for a in (0, 1, 3):
    g = G.hebbian_update(g, a, [2, -1, -1, -1], [-1] * 4)
  g = G.hebbian_update(g, 2, [0, 1, -1, -1], [-1] * 4)
  assert np.sum(np.asarray(g.nbr) == 2) == 3
  gen_before = int(g.generation[2])
  g, new_id, evicted = G.add_node(g, jnp.ones(3, jnp.float32), quality=0.5, time=10)
  # Same slot, next generation: a new id (`memory_id`); the evicted memory's id was the slot.
  assert int(G.slot_of(new_id, n)) == 2 and int(new_id) != 2 and int(evicted) == 2
  assert np.sum(np.asarray(g.nbr) == 2) == 0, "edges into the recycled slot survived"
  assert np.all(np.asarray(g.nbr[2]) == -1), "the recycled slot kept its old out-edges"
  assert int(g.generation[2]) == gen_before + 1
  np.testing.assert_allclose(np.linalg.norm(np.asarray(g.emb[2])), 1.0, rtol=1e-6)


def test_add_node_prefers_free_slot_and_remove_clears_edges():
  g = G.init_graph(4, 2, 2)
  g, i0, ev0 = G.add_node(g, jnp.array([1.0, 0.0]), quality=0.5)
  g, i1, ev1 = G.add_node(g, jnp.array([0.0, 1.0]), quality=0.5)
  assert (int(i0), int(i1), int(ev0), int(ev1)) == (0, 1, -1, -1)
  g = G.hebbian_update(g, 0, [1, -1, -1, -1], [-1] * 4)
  g = G.remove_node(g, 1)
  assert not bool(g.alive[1]) and np.all(np.asarray(g.nbr) != 1)


def test_neighbors_can_exclude_synthetic_edges():
  g = G.init_graph(4, 2, 3)
  nbr = jnp.array([[1, 2, 3], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]], jnp.int32)
  w = jnp.array([[0.5, 0.4, 0.3]] + [[0.0] * 3] * 3, jnp.float32)
  kind = jnp.array([[G.HEBBIAN, G.CREATIVE, G.ANALOGY]] + [[0] * 3] * 3, jnp.int32)
  g = g._replace(edges=G.make_edges(nbr, w, kind))
  ids, _, _, mask = G.neighbors(g, 0)
  assert np.asarray(ids).tolist() == [1, 2, 3] and bool(np.all(mask))
  ids, _, _, mask = G.neighbors(g, 0, exclude_synthetic=True)
  assert np.asarray(ids).tolist() == [1, -1, -1]


def test_to_networkx_keeps_counts_and_attributes():
  g, _ = _graph(n=6, k=3)
  g = G.hebbian_update(g, 0, [1, 2, 3, -1], [-1] * 4)
  g = G.hebbian_update(g, 4, [5, -1, -1, -1], [-1] * 4)
  nxg = G.to_networkx(g)
  assert nxg.number_of_nodes() == int(np.sum(np.asarray(g.alive)))
  assert nxg.number_of_edges() == int(np.sum(np.asarray(g.nbr) >= 0)) == 4
  assert nxg.edges[0, 1]["kind"] == "HEBBIAN"
  np.testing.assert_allclose(nxg.edges[0, 1]["weight"], 0.05, rtol=1e-6)
  assert nxg.nodes[0]["quality"] == np.float32(0.5)


def _reference_add_edges(nbr, w, src, dst, wt, mode):
  """Sequential reference of `add_edges`: update existing pairs, then insert the new ones one by
  one, strongest first, into an empty slot or over a strictly weaker weakest slot."""
  nbr, w = nbr.copy(), w.astype(np.float64).copy()
  best = {}
  for s, d, x in zip(src, dst, wt, strict=True):
    if s != d:
      best[(s, d)] = max(best.get((s, d), -1.0), x)
  new = []
  for (s, d), x in best.items():
    hit = np.flatnonzero(nbr[s] == d)
    if hit.size:
      j = hit[0]
      w[s, j] = max(w[s, j], x) if mode == "max" else min(w[s, j] + x, 1.0)
    else:
      new.append((x, s, d))
  for x, s, d in sorted(new, key=lambda t: -t[0]):
    empties = np.flatnonzero(nbr[s] < 0)
    if empties.size:
      j = empties[0]
    else:
      j = int(np.argmin(w[s]))
      if not w[s, j] < x:
        continue
    nbr[s, j], w[s, j] = d, x
  return nbr, w


@settings(max_examples=40, deadline=None)
@given(
  st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(1, 100)), min_size=1, max_size=30
  ),
  st.sampled_from(["max", "add"]),
)
# Equal weights competing for one slot: the pair proposed first wins (a failure CI drew once).
@example(proposals=[(0, 4, 3), (0, 3, 3)], mode="max")
@example(proposals=[(0, 5, 3), (0, 4, 1), (0, 3, 3), (0, 4, 3)], mode="max")
def test_add_edges_matches_sequential_reference(proposals, mode):
  g, _ = _graph(n=6, k=3)
  g, _ = G.add_edges(g, [0, 0, 1], [1, 2, 2], [0.3, 0.6, 0.2], G.HEBBIAN)
  src = np.array([p[0] for p in proposals])
  dst = np.array([p[1] for p in proposals])
  wt = np.array([p[2] / 100.0 for p in proposals], np.float32)  # distinct-ish weights
  ref_nbr, ref_w = _reference_add_edges(
    np.asarray(g.nbr), np.asarray(g.w), src, dst, wt.astype(np.float64), mode
  )
  g2, up = G.add_edges(g, src, dst, wt, G.CREATIVE, mode=mode)
  for i in range(6):  # same set of (id, weight) per row; slot order may differ
    got = sorted(
      (int(a), round(float(b), 5)) for a, b in zip(g2.nbr[i], g2.w[i], strict=True) if a >= 0
    )
    want = sorted(
      (int(a), round(float(b), 5)) for a, b in zip(ref_nbr[i], ref_w[i], strict=True) if a >= 0
    )
    assert got == want
  # Every proposal is accounted for: updated, inserted or rejected.
  pairs = {(int(s), int(d)) for s, d in zip(src, dst, strict=True) if s != d}
  seen = {tuple(p) for a in (up.updated, up.inserted, up.rejected) for p in a.tolist()}
  assert seen == pairs
  # New edges carry the given kind; updated ones keep theirs.
  kinds = {
    (i, int(a)): int(c)
    for i in range(6)
    for a, c in zip(g2.nbr[i], g2.kind[i], strict=True)
    if a >= 0
  }
  for s, d in up.inserted.tolist():
    assert kinds[(s, d)] == G.CREATIVE
  for s, d in up.displaced.tolist():
    assert (s, d) not in kinds


def test_add_edges_drops_dead_ends_and_self_loops():
  g, _ = _graph(n=4, k=2)
  g = G.remove_node(g, 3)
  g, up = G.add_edges(g, [0, 0, 3, 1], [0, 3, 1, 2], [0.5, 0.5, 0.5, 0.5], G.ANALOGY)
  assert up.inserted.tolist() == [[1, 2]]
  assert int(g.nbr[0, 0]) == -1 and int(g.kind[1, 0]) == G.ANALOGY


# Admission at capacity: free slots, then established nodes by value, then young nodes FIFO.

DAY = 86_400
HL = 7 * 86_400.0


def _ref_values(node, now, half_life_s=HL):
  """float64 NumPy reference of `node_value` from the packed node columns."""
  node = np.asarray(node)
  q = node[:, G.QUALITY].view(np.float32).astype(np.float64)
  s = node[:, G.STRENGTH].view(np.float32).astype(np.float64)
  access = node[:, G.ACCESS].astype(np.float64)
  idle = np.maximum(now - node[:, G.LAST_ACCESS].astype(np.int64), 0)
  v = np.clip(q, 0, None) * (1 + np.log1p(access)) * s * 2.0 ** (-idle / half_life_s)
  return np.where(node[:, G.ALIVE] != 0, v, -1.0)


def _ref_slot(node, value, now, window, order=None):
  """Reference of the admission rule, written as plain sorting: a free slot (lowest first), else
  the established node of lowest value, else the earliest-created young node; remaining ties by
  creation / value, last access, generation, slot. Slots with `order >= 0` (taken earlier in the
  same batch) come last, earliest first."""
  node = np.asarray(node)
  n = node.shape[0]
  order = np.full(n, -1) if order is None else order
  alive = node[:, G.ALIVE] != 0
  if not alive.all():
    return int(np.flatnonzero(~alive)[0])
  open_slots = [i for i in range(n) if order[i] < 0]
  if not open_slots:
    return int(np.argmin(order))
  created, last, gen = (
    node[:, c].astype(np.int64) for c in (G.CREATED, G.LAST_ACCESS, G.GENERATION)
  )
  young = [window > 0 and now - created[i] < window for i in range(n)]
  established = [i for i in open_slots if not young[i]]
  if established:
    return min(established, key=lambda i: (value[i], created[i], last[i], gen[i], i))
  return min(open_slots, key=lambda i: (created[i], value[i], last[i], gen[i], i))


def _full_graph(quality, created, access=None, last_access=None, dim=4, k=3, seed=0):
  """A full graph, node `i` with the given statistics, embeddings random."""
  n = len(quality)
  g = G.init_graph(n, dim, k)
  emb = jnp.asarray(np.random.default_rng(seed).normal(size=(n, dim)), jnp.float32)
  q = jnp.asarray(quality, jnp.float32)
  g, ids, _ = G.add_nodes(g, emb, quality=q, time=jnp.asarray(created, jnp.int32))
  assert np.asarray(ids).tolist() == list(range(n))
  node = np.array(g.node)
  if access is not None:
    node[:, G.ACCESS] = access
  if last_access is not None:
    node[:, G.LAST_ACCESS] = last_access
  return g._replace(node=jnp.asarray(node))


def _slots(g, ids):
  """Slots named by ids that `add_node`/`add_nodes` return (an id carries its slot's generation)."""
  return np.asarray(G.slot_of(jnp.asarray(ids, jnp.int32), g.capacity)).tolist()


def _link_ring(g):
  """Every node gets edges to its two successors, so every node has edges in and out."""
  n = g.capacity
  for a in range(n):
    g = G.hebbian_update(g, a, [(a + 1) % n, (a + 2) % n, -1, -1], [-1] * 4)
  return g


# The reported scenario: 8 established memories (created 10 days ago, used since), all of value
# above a newcomer's 0.5, so without a window every newcomer is the lowest-value node.
NOW = 10 * DAY
SCENARIO = dict(
  quality=[0.9, 0.6, 0.7, 0.65, 0.8, 0.75, 0.62, 0.85],
  created=[0] * 8,
  access=[12, 1, 3, 1, 2, 7, 1, 2],
  last_access=[NOW - int(d * DAY) for d in (1, 5, 2, 3, 6, 4, 2.5, 8)],
)


def test_full_graph_admits_new_memories_evicting_the_lowest_established():
  g = _link_ring(_full_graph(**SCENARIO))
  value = _ref_values(g.node, NOW)
  lowest = np.argsort(value)[:4]
  # The reference ordering is unambiguous, and the scenario is the reported one.
  assert np.min(np.diff(np.sort(value))) > 1e-3 and value.min() > 0.5
  np.testing.assert_allclose(np.asarray(G.node_value(g, NOW, HL)), value, rtol=1e-5)
  rng = np.random.default_rng(5)
  new_emb = rng.normal(size=(4, 4)).astype(np.float32)
  old_ids = np.asarray(G.memory_ids(g))
  new_ids, evicted = [], []
  for j in range(4):
    g, i, ev = G.add_node(g, jnp.asarray(new_emb[j]), quality=0.5, time=NOW + j)
    new_ids.append(int(i))
    evicted.append(int(ev))
  ids = _slots(g, new_ids)
  assert ids == lowest.tolist(), "not the established nodes of lowest value, in value order"
  assert len(set(new_ids)) == 4 and new_ids == np.asarray(G.memory_ids(g))[ids].tolist()
  assert evicted == old_ids[ids].tolist()
  assert np.all(np.asarray(g.alive))
  np.testing.assert_array_equal(np.asarray(g.created)[ids], NOW + np.arange(4))
  np.testing.assert_allclose(
    np.asarray(g.emb)[ids], new_emb / np.linalg.norm(new_emb, axis=1, keepdims=True), rtol=1e-6
  )
  gen = np.asarray(g.generation)
  assert gen[ids].tolist() == [2] * 4 and np.delete(gen, ids).tolist() == [1] * 4
  # Evicted nodes keep no edges in or out; the other nodes' edges among themselves survive.
  nbr = np.asarray(g.nbr)
  assert not np.any(np.isin(nbr, ids)) and np.all(nbr[ids] == -1)
  kept = np.delete(np.arange(8), ids)
  for a in kept:
    want = sorted({(a + 1) % 8, (a + 2) % 8} - set(ids))
    assert sorted(nbr[a][nbr[a] >= 0].tolist()) == want


def test_without_window_newcomers_evict_each_other():
  # `admission_window_s=0` is the old behaviour, kept as an explicit choice: the bug reproduces.
  g = _full_graph(**SCENARIO)
  first = int(np.argmin(_ref_values(g.node, NOW)))
  ids = []
  for j in range(4):
    g, i, _ = G.add_node(
      g, jnp.ones(4, jnp.float32), quality=0.5, time=NOW + j, admission_window_s=0
    )
    ids.append(int(i))
  assert _slots(g, ids) == [first] * 4


def test_batch_at_capacity_gets_distinct_live_slots():
  value = _ref_values(_full_graph(**SCENARIO).node, NOW)
  emb = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
  for window in (DAY, 0):  # distinct even without a window, where each newcomer is the lowest
    g, ids, evicted = G.add_nodes(
      _full_graph(**SCENARIO), emb, quality=0.5, time=NOW, admission_window_s=window
    )
    slots = _slots(g, ids)
    assert len(set(slots)) == 5 and np.all(np.asarray(g.alive))
    assert _slots(g, evicted) == slots
    assert sorted(slots) == sorted(np.argsort(value)[:5].tolist())
    assert np.all(np.asarray(g.created)[slots] == NOW)
  # All young (created within the window): the batch takes the 3 earliest created, in order.
  created = [500, 100, 700, 300, 200, 600, 400, 800]
  g = _full_graph([0.5] * 8, created)
  g, ids, _ = G.add_nodes(g, emb[:3], quality=0.5, time=1_000)
  assert _slots(g, ids) == [1, 4, 3]


def test_batch_larger_than_capacity_keeps_its_last_nodes():
  g = G.init_graph(4, 3, 2)
  emb = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32)
  g, ids, evicted = G.add_nodes(
    g, jnp.asarray(emb), quality=0.5, time=jnp.arange(6, dtype=jnp.int32)
  )
  assert _slots(g, ids) == [0, 1, 2, 3, 0, 1]
  assert np.asarray(evicted).tolist() == [-1, -1, -1, -1, *np.asarray(ids)[:2].tolist()]
  kept = emb[[4, 5, 2, 3]]
  np.testing.assert_allclose(
    np.asarray(g.emb), kept / np.linalg.norm(kept, axis=1, keepdims=True), rtol=1e-6
  )
  assert np.asarray(g.created).tolist() == [4, 5, 2, 3]
  assert np.asarray(g.generation).tolist() == [2, 2, 1, 1]


def test_young_memories_survive_while_established_ones_exist():
  window, now = 100, 10_000
  # Slots 2 and 3 are young and of far lower value than the established slots 0 and 1.
  g = _full_graph(
    quality=[0.9, 0.8, 0.3, 0.02],
    created=[0, 0, now - 10, now - 5],
    access=[20, 10, 0, 0],
    last_access=[now, now, now - 10, now - 5],
  )
  value = _ref_values(g.node, now)
  assert value[2] < value[1] < value[0] and value[3] < value[2]
  ids = []
  for j in range(5):
    g, i, _ = G.add_node(
      g, jnp.ones(4, jnp.float32), quality=0.5, time=now + j, admission_window_s=window
    )
    ids.append(int(i))
  # The established ones go first (lowest value first); then, all young, the earliest created
  # (slot 2 before the lower-value slot 3), then the first newcomer.
  assert _slots(g, ids) == [1, 0, 2, 3, 1]
  # Past the window the newcomers in slots 0, 2, 3 are established and compete on value; slot 1
  # (created at now + 4) is still young and survives although its value is made the lowest.
  t = now + 3 + window
  low = jax.lax.bitcast_convert_type(jnp.float32(0.01), jnp.int32)
  g = g._replace(node=g.node.at[0, G.ACCESS].set(50).at[1, G.QUALITY].set(low))
  value = _ref_values(g.node, t)
  assert np.argmin(value) == 1 and np.argmin(value[[0, 2, 3]]) == 1
  g, i, _ = G.add_node(g, jnp.ones(4, jnp.float32), quality=0.5, time=t, admission_window_s=window)
  assert _slots(g, i) == 2


def test_ties_do_not_pile_onto_one_slot():
  # All-equal established values (a newcomer's value too): successive adds take different slots.
  for window in (0, DAY):
    g = _full_graph([0.5] * 6, [0] * 6, last_access=[NOW] * 6)
    ids = []
    for _ in range(6):
      g, i, _ = G.add_node(
        g, jnp.ones(4, jnp.float32), quality=0.5, time=NOW, admission_window_s=window
      )
      ids.append(int(i))
    assert _slots(g, ids) == list(range(6)), window
  # All young and created in the same second: equal in every key but the generation, so the adds
  # go round the slots instead of evicting the previous newcomer.
  g = _full_graph([0.5] * 4, [NOW] * 4)
  ids = []
  for _ in range(8):
    g, i, _ = G.add_node(g, jnp.ones(4, jnp.float32), quality=0.5, time=NOW)
    ids.append(int(i))
  assert _slots(g, ids) == [0, 1, 2, 3, 0, 1, 2, 3]
  assert np.asarray(g.generation).tolist() == [3] * 4


def test_equal_values_prefer_earliest_created_then_least_recently_accessed():
  # A half-life of 1e30 s makes the recency factor 1, so the values are equal although the last
  # accesses differ; generations are equal too.
  g = _full_graph(
    quality=[0.5] * 5,
    created=[300, 100, 100, 200, 100],
    access=[1] * 5,
    last_access=[NOW - 10, NOW - 10, NOW - 50, NOW - 90, NOW - 10],
  )
  value = np.asarray(G.node_value(g, NOW, 1e30))
  assert np.all(value == value[0])
  ids = []
  for _ in range(5):
    g, i, _ = G.add_node(g, jnp.ones(4, jnp.float32), quality=0.9, time=NOW, half_life_s=1e30)
    ids.append(int(i))
  # Created at 100: slot 2 (accessed least recently), then slots 1 and 4 (lowest slot first);
  # then slot 3 (created at 200) although it was accessed least recently of all; then slot 0.
  assert _slots(g, ids) == [2, 1, 4, 3, 0]


def test_free_slots_are_taken_before_any_eviction():
  # Slot 1 is by far the lowest-value established node, yet the removed slots go first.
  g = _full_graph([0.9, 0.05, 0.9, 0.9, 0.9, 0.9], [0] * 6, last_access=[NOW] * 6)
  g = _link_ring(g)
  g = G.remove_node(G.remove_node(g, 2), 4)
  before = np.array(g.node)
  old_id = int(G.memory_id(g, 1))
  ids, evicted = [], []
  for _ in range(3):
    g, i, ev = G.add_node(g, jnp.ones(4, jnp.float32), quality=0.5, time=NOW)
    ids.append(int(i))
    evicted.append(int(ev))
  assert _slots(g, ids) == [2, 4, 1] and evicted == [-1, -1, old_id]
  # Each (re)used slot's generation grows by exactly one, the others' not at all.
  assert (np.asarray(g.generation) - before[:, G.GENERATION]).tolist() == [0, 1, 1, 0, 1, 0]
  nbr = np.asarray(g.nbr)
  assert not np.any(np.isin(nbr, [1, 2, 4])), "edges into a reused slot survived"
  assert np.all(nbr[[1, 2, 4]] == -1), "a reused slot kept out-edges"
  assert nbr[0][nbr[0] >= 0].tolist() == [] and sorted(nbr[3][nbr[3] >= 0].tolist()) == [5]


def test_admission_window_must_be_non_negative():
  g = G.init_graph(2, 2, 1)
  with pytest.raises(ValueError, match="admission_window_s=-1 is out of range"):
    G.add_node(g, jnp.ones(2, jnp.float32), admission_window_s=-1)


# A half-life of 1e30 s makes the recency factor exactly 1, so values depend on quality and access
# only and the float64 reference orders them exactly as float32 does (no near ties).
@settings(max_examples=30, deadline=None)
@given(
  window=st.sampled_from([0, 50, 400]),
  steps=st.lists(
    st.tuples(
      st.sampled_from([0, 1, 20, 49, 60, 300]),  # seconds since the previous step
      st.sampled_from([0.1, 0.5, 0.9]),  # quality of the new memories
      st.integers(-1, 4),  # a slot to touch (an access) before adding, -1 for none
      st.integers(1, 3),  # memories added (1: add_node, more: one add_nodes batch)
    ),
    min_size=1,
    max_size=12,
  ),
)
def test_admission_matches_reference_and_spares_young_nodes(window, steps):
  n, hl = 5, 1e30
  g = G.init_graph(n, 2, 1)
  node = np.array(g.node)
  t = 0
  for dt, q, touch, k in steps:
    t += dt
    if touch >= 0 and node[touch, G.ALIVE]:
      node[touch, G.ACCESS] += 1
      node[touch, G.LAST_ACCESS] = t
      g = g._replace(node=jnp.asarray(node))
    # Reference: one memory at a time, slots taken by this call set aside.
    order = np.full(n, -1)
    want_ids, want_ev = [], []
    for j in range(k):
      slot = _ref_slot(node, _ref_values(node, t, hl), t, window, order)
      alive = node[:, G.ALIVE] != 0
      if alive[slot]:
        age = t - node[:, G.CREATED]
        young = window > 0 and age[slot] < window
        # The property: a node younger than the window goes only when every live node is young.
        assert not young or np.all(age[alive] < window)
      want_ids.append(slot)
      want_ev.append(slot if alive[slot] else -1)
      row = [0, t, t, np.float32(q).view(np.int32), np.float32(1).view(np.int32), 1, 0]
      node[slot] = row + [node[slot, G.GENERATION] + 1]
      order[slot] = j
    emb = jnp.ones((k, 2), jnp.float32)
    if k == 1:
      g, i, ev = G.add_node(g, emb[0], quality=q, time=t, half_life_s=hl, admission_window_s=window)
      ids, evicted = [i], [ev]
    else:
      g, ids, evicted = G.add_nodes(
        g, emb, quality=q, time=t, half_life_s=hl, admission_window_s=window
      )
    assert _slots(g, ids) == want_ids and _slots(g, evicted) == want_ev
    assert len(set(np.asarray(ids).tolist())) == k
    np.testing.assert_array_equal(np.asarray(g.node), node)
