"""Memory graph: Hebbian formulas, bounds, slot recycling, networkx export."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
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
  assert int(new_id) == 2 and int(evicted) == 2
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
