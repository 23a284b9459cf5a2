"""Loop C: consolidation and compression against hand-built graphs and references; a cycle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sona_jax as sona
from sona_jax import graph as G
from sona_jax.loops import deep

DAY = 86_400
NOW = 100 * DAY


def _graph(emb, *, access, quality, created=None, last=None, strength=None, alive=None, k=4):
  """A graph from NumPy columns; edges are added with `_edge`."""
  n = emb.shape[0]
  full = lambda v, d, t: np.full(n, d, t) if v is None else np.asarray(v, t)
  created = full(created, NOW - DAY, np.int32)
  node = G.make_node(
    np.asarray(access, np.int32),
    full(last, NOW - DAY, np.int32),
    created,
    np.asarray(quality, np.float32),
    full(strength, 1.0, np.float32),
    full(alive, 1, np.int32),
    np.zeros(n, np.int32),
    np.ones(n, np.int32),
  )
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  nbr = np.full((n, k), -1, np.int32)
  edges = G.make_edges(nbr, np.zeros((n, k), np.float32), np.zeros((n, k), np.int32))
  return G.Graph(emb=jnp.asarray(e, jnp.float32), edges=edges, node=node)


def _with_edges(g, triples):
  """Sets edges `(src, dst, w, kind)` in the first free slots of their rows."""
  k = g.degree
  e = np.array(g.edges)
  for s, d, w, kind in triples:
    slot = int(np.argmax(e[s, :k] < 0))
    assert e[s, slot] < 0
    e[s, slot] = d
    e[s, k + slot] = np.float32(w).view(np.int32)
    e[s, 2 * k + slot] = kind
  return g._replace(edges=jnp.asarray(e))


def _edge_dict(g):
  """{(src, dst): (w, kind)} of every edge."""
  nbr, w, kind = np.asarray(g.nbr), np.asarray(g.w), np.asarray(g.kind)
  r, s = np.nonzero(nbr >= 0)
  return {
    (int(a), int(nbr[a, b])): (float(w[a, b]), int(kind[a, b]))
    for a, b in zip(r.tolist(), s.tolist(), strict=True)
  }


def _check_invariants(g):
  """No edge touches a dead node, no self-loop, no repeated neighbour in a row."""
  nbr, alive = np.asarray(g.nbr), np.asarray(g.alive)
  assert not np.any(nbr[~alive] >= 0)
  r, s = np.nonzero(nbr >= 0)
  assert np.all(alive[nbr[r, s]])
  assert not np.any(nbr[r, s] == r)
  for row in nbr:
    ids = row[row >= 0]
    assert ids.size == np.unique(ids).size


def _bits(g):
  return [np.asarray(a).tobytes() for a in g]


CFG = sona.SonaConfig(dim=8, base_rank=4, graph_capacity=16, graph_degree=4)


# ------------------------------------------------------------------------------- consolidation


def _consolidation_graph():
  rng = np.random.default_rng(0)
  n, d = 16, 8
  base = np.zeros(d)
  base[0] = 1.0
  emb = rng.normal(size=(n, d))
  # Nodes 0-6 around one direction at various spreads, so cosines straddle 0.7.
  for i, spread in enumerate([0.1, 0.15, 0.2, 0.25, 0.6, 0.1, 0.1]):
    emb[i] = base + spread * rng.normal(size=d)
  emb[7] = emb[0]  # dead twin of a high-value node
  access = [9, 6, 7, 20, 8, 5, 9, 50, 0, 1, 2, 0, 0, 3, 3, 3]
  quality = [0.9, 0.8, 0.75, 0.95, 0.71, 0.9, 0.7, 0.9, 0.2, 0.2, 0.2, 0.2, 0.5, 0.5, 0.5, 0.5]
  created = np.full(n, NOW - DAY, np.int32)
  created[8] = NOW - 31 * DAY  # old, never used: decays
  created[9] = NOW - 40 * DAY  # old, used once: decays (access 1 < 2)
  created[10] = NOW - 40 * DAY  # old, access 2: stays
  created[11] = NOW - 30 * DAY  # exactly 30 days: not older than 30, stays
  created[12] = NOW - 30 * DAY - 1  # one second older: decays
  created[7] = 0  # dead: never decays
  alive = np.ones(n, np.int32)
  alive[7] = 0
  g = _graph(emb, access=access, quality=quality, created=created, alive=alive)
  # 0 -> 1 exists (gains weight, kind kept); 2's row is full of strong edges (a proposal is
  # rejected); 3's row is full of weak edges (a proposal displaces the weakest).
  triples = [(0, 1, 0.5, G.HEBBIAN), (1, 0, 0.97, G.ANALOGY)]
  triples += [(2, t, 0.95, G.HEBBIAN) for t in (10, 11, 12, 13)]
  triples += [(3, t, 0.001 * (t - 9), G.HEBBIAN) for t in (10, 11, 12, 13)]
  return _with_edges(g, triples)


def _consolidation_reference(g, cfg):
  emb = np.asarray(g.emb, np.float64)
  alive = np.asarray(g.alive)
  acc, q = np.asarray(g.access_count), np.asarray(g.quality)
  high = alive & (acc > cfg.consolidate_min_access) & (q > np.float32(cfg.consolidate_min_quality))
  s = emb @ emb.T
  pairs = {
    (i, j): s[i, j]
    for i in np.flatnonzero(high).tolist()
    for j in np.flatnonzero(high).tolist()
    if i < j and s[i, j] > cfg.consolidate_min_cosine
  }
  age = NOW - np.asarray(g.created).astype(np.int64)
  low = alive & (acc < cfg.decay_max_access) & (age > cfg.decay_min_age_days * DAY)
  return high, pairs, np.flatnonzero(low)


def test_consolidation_strengthens_exactly_the_qualifying_pairs_and_decays_old_unused_nodes():
  g = _consolidation_graph()
  high, pairs, low = _consolidation_reference(g, CFG)
  assert len(pairs) >= 4 and 0 < len(low)  # the graph exercises both halves
  # Boundary nodes are out: access == 5 (node 5), quality == 0.7 (node 6), dead (node 7).
  assert not high[5] and not high[6] and not high[7]
  before = _edge_dict(g)
  new, rep = deep.consolidate_memories(g, CFG, NOW)
  assert rep.method == "exact" and rep.candidate_recall == 1.0
  assert rep.high_value == int(high.sum())
  assert {tuple(p) for p in rep.strengthened.tolist()} == set(pairs)
  np.testing.assert_allclose(
    rep.cosine, [pairs[tuple(p)] for p in rep.strengthened.tolist()], atol=1e-5
  )
  after = _edge_dict(new)
  cos = {}
  for (i, j), c in pairs.items():
    cos[i, j] = cos[j, i] = c
  updated = {tuple(p) for p in rep.updated.tolist()}
  inserted = {tuple(p) for p in rep.inserted.tolist()}
  rejected = {tuple(p) for p in rep.rejected.tolist()}
  displaced = {tuple(p) for p in rep.displaced.tolist()}
  # Every proposed direction is accounted for exactly once.
  assert updated | inserted | rejected == set(cos)
  assert len(updated) + len(inserted) + len(rejected) == len(cos)
  for e, c in cos.items():
    if e in updated:  # existed: gained 0.1 cos (capped at 1), kind kept
      assert after[e][1] == before[e][1]
      assert after[e][0] == pytest.approx(min(1.0, before[e][0] + 0.1 * c), abs=1e-6)
    elif e in inserted:
      assert after[e] == (pytest.approx(0.1 * c, abs=1e-6), G.CONSOLIDATED)
    else:
      assert e not in after
  assert (0, 1) in updated and (1, 0) in updated
  assert after[1, 0] == (1.0, G.ANALOGY)  # 0.97 + 0.1 cos, capped
  assert any(s == 2 for s, _ in rejected)  # 2's row was full of stronger edges
  assert any(s == 3 for s, _ in displaced) and any(s == 3 for s, _ in inserted)
  # Every other edge is untouched, except the displaced ones, which are gone.
  for e, v in before.items():
    if e not in cos:
      assert (e in displaced) != (after.get(e) == v)
  # Decay: exactly the reference nodes, strength halved; nothing else on the nodes changed.
  np.testing.assert_array_equal(rep.decayed, low)
  assert set(low.tolist()) == {8, 9, 12}
  s0, s1 = np.asarray(g.strength), np.asarray(new.strength)
  np.testing.assert_array_equal(s1[low], s0[low] * np.float32(0.5))
  keep = np.setdiff1d(np.arange(16), low)
  np.testing.assert_array_equal(s1[keep], s0[keep])
  np.testing.assert_array_equal(np.asarray(new.emb), np.asarray(g.emb))
  other = np.asarray(new.node)[:, [G.ACCESS, G.LAST_ACCESS, G.CREATED, G.QUALITY, G.ALIVE]]
  np.testing.assert_array_equal(
    other, np.asarray(g.node)[:, [G.ACCESS, G.LAST_ACCESS, G.CREATED, G.QUALITY, G.ALIVE]]
  )
  _check_invariants(new)


def test_consolidation_through_the_inverted_file_gives_the_same_graph():
  g = _consolidation_graph()
  a, ra = deep.consolidate_memories(g, CFG, NOW)
  b, rb = deep.consolidate_memories(
    g, CFG, NOW, key=jax.random.key(3), exact_max=0, measure_recall=True
  )
  assert rb.method == "ivf" and rb.candidate_recall == 1.0  # few rows: every cell probed
  np.testing.assert_array_equal(ra.strengthened, rb.strengthened)
  assert _bits(a) == _bits(b)


# --------------------------------------------------------------------------------- compression


def _unit(d, *pairs):
  v = np.zeros(d)
  for i, x in pairs:
    v[i] = x
  return v / np.linalg.norm(v)


def _compression_graph():
  d, t = 8, np.arccos(0.96)
  emb = np.stack(
    [
      _unit(d, (0, 1.0)),  # 0 a ~ b
      _unit(d, (0, np.cos(t)), (1, np.sin(t))),  # 1 b ~ a, b ~ c
      _unit(d, (0, np.cos(2 * t)), (1, np.sin(2 * t))),  # 2 c: cos(a, c) = 0.843 < 0.95
      _unit(d, (3, 1.0)),  # 3 d ~ e
      _unit(d, (3, 1.0), (4, 0.1)),  # 4 e
      _unit(d, (5, 1.0)),  # 5 x
      _unit(d, (6, 1.0)),  # 6 y
      _unit(d, (7, 1.0)),  # 7 z
      _unit(d, (0, 1.0)),  # 8 dead twin of a
      _unit(d, (2, 1.0)),  # 9 w
    ]
  )
  access = [3, 10, 10, 4, 4, 1, 1, 1, 99, 1]
  quality = [0.2, 0.5, 0.8, 0.4, 0.6, 0.5, 0.5, 0.5, 0.5, 0.5]
  created = [50, 40, 60, 10, 5, 1, 1, 1, 1, 1]
  last = [900, 700, 800, 100, 300, 1, 1, 1, 1, 1]
  strength = [0.5, 0.25, 1.0, 0.75, 0.5, 1, 1, 1, 1, 1]
  alive = [1, 1, 1, 1, 1, 1, 1, 1, 0, 1]
  g = _graph(
    emb,
    access=access,
    quality=quality,
    created=created,
    last=last,
    strength=strength,
    alive=alive,
  )
  h, c, cr, a = G.HEBBIAN, G.CONSOLIDATED, G.CREATIVE, G.ANALOGY
  return _with_edges(
    g,
    [
      (0, 5, 0.3, h),  # a -> x: b -> x exists (0.6, ANALOGY) and stays
      (1, 5, 0.6, a),
      (5, 0, 0.4, cr),  # x -> a and x -> c both become x -> b: the stronger wins
      (5, 2, 0.7, h),
      (2, 0, 0.5, h),  # c -> a: inside the group, absorbed
      (0, 6, 0.2, c),  # a -> y becomes b -> y
      (6, 7, 0.005, h),  # weak: pruned
      (4, 7, 0.9, h),  # e -> z becomes d -> z
      (7, 3, 0.3, h),  # z -> d exists; z -> e merges into it (max weight, kind kept)
      (7, 4, 0.35, cr),
      (9, 5, 0.009, a),  # weak: pruned
    ],
  )


def test_compression_merges_groups_rewires_edges_and_prunes():
  g = _compression_graph()
  new, rep = deep.compress_memory(g, CFG, key=jax.random.key(0))
  assert rep.method == "exact" and rep.candidate_recall == 1.0
  # Groups: {a, b, c} (a chain: a and c are not within the threshold) -> b (ties of access go to
  # the lower id), {d, e} -> d; the dead twin of a is never touched.
  assert rep.merged.tolist() == [[0, 1], [2, 1], [4, 3]]
  assert rep.candidate_pairs == 3 and rep.rounds == 1
  assert (rep.initial_nodes, rep.final_nodes) == (9, 6)
  assert rep.ratio == pytest.approx(9 / 6)
  alive = np.asarray(new.alive)
  assert alive.tolist() == [0, 1, 0, 1, 0, 1, 1, 1, 0, 1]
  # Merged statistics of b.
  w = np.array([3.0, 10.0, 10.0])
  emb0 = np.asarray(g.emb, np.float64)
  mean = (w[:, None] * emb0[[0, 1, 2]]).sum(0)
  np.testing.assert_allclose(np.asarray(new.emb)[1], mean / np.linalg.norm(mean), atol=1e-6)
  assert int(new.access_count[1]) == 23 and int(new.access_count[3]) == 8
  assert float(new.quality[1]) == pytest.approx((3 * 0.2 + 10 * 0.5 + 10 * 0.8) / 23, abs=1e-6)
  assert float(new.quality[3]) == pytest.approx(0.5, abs=1e-6)  # 4 * 0.4 + 4 * 0.6 over 8
  assert int(new.created[1]) == 40 and int(new.last_access[1]) == 900
  assert float(new.strength[1]) == 1.0 and float(new.strength[3]) == 0.75
  # Edges.
  assert _edge_dict(new) == {
    (1, 5): (pytest.approx(0.6), G.ANALOGY),
    (1, 6): (pytest.approx(0.2), G.CONSOLIDATED),
    (5, 1): (pytest.approx(0.7), G.HEBBIAN),
    (3, 7): (pytest.approx(0.9), G.HEBBIAN),
    (7, 3): (pytest.approx(0.35), G.HEBBIAN),
  }
  assert rep.absorbed.tolist() == [[2, 0]]
  assert rep.pruned.tolist() == [[6, 7], [9, 5]]
  assert rep.dropped.shape == (0, 2)
  assert (rep.initial_edges, rep.final_edges) == (11, 5)
  _check_invariants(new)


def test_compression_twice_changes_nothing_the_second_time():
  g = _compression_graph()
  once, _ = deep.compress_memory(g, CFG, key=jax.random.key(0))
  twice, rep = deep.compress_memory(once, CFG, key=jax.random.key(1))
  assert rep.merged.shape == (0, 2) and rep.pruned.shape == (0, 2) and rep.rounds == 0
  assert rep.ratio == 1.0 and rep.initial_edges == rep.final_edges
  assert _bits(once) == _bits(twice)


def _random_graph(seed, n=120, d=12, k=6):
  """Clustered nodes with planted duplicate groups, random edges (many rows full), dead rows."""
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(n, d))
  src = rng.integers(n, size=n // 3)
  dst = rng.choice(n, n // 3, replace=False)
  emb[dst] = emb[src] + 0.05 * rng.normal(size=(dst.size, d))
  alive = (rng.uniform(size=n) > 0.1).astype(np.int32)
  g = _graph(
    emb,
    access=rng.integers(0, 6, size=n),
    quality=rng.uniform(size=n),
    created=rng.integers(0, NOW, size=n),
    strength=rng.uniform(size=n),
    alive=alive,
    k=k,
  )
  live = np.flatnonzero(alive)
  triples = []
  for s in live.tolist():
    for t in rng.choice(live, rng.integers(0, k + 1), replace=False).tolist():
      if t != s:
        triples.append((s, t, float(rng.choice([0.005, rng.uniform()])), int(rng.integers(4))))
  return _with_edges(g, triples)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compression_accounts_for_every_node_and_edge(seed):
  g = _random_graph(seed)
  new, rep = deep.compress_memory(g, CFG.replace(graph_degree=6), key=jax.random.key(seed))
  assert rep.merged.shape[0] > 5
  _check_invariants(new)
  alive0, alive1 = np.asarray(g.alive), np.asarray(new.alive)
  # Nodes: every node that died was merged, into a live survivor.
  died = np.flatnonzero(alive0 & ~alive1)
  np.testing.assert_array_equal(np.sort(rep.merged[:, 0]), died)
  assert np.all(alive1[rep.merged[:, 1]])
  assert rep.final_nodes == alive1.sum() == rep.initial_nodes - died.size
  # No near-duplicates are left among the live nodes.
  emb = np.asarray(new.emb, np.float64)[alive1]
  s = emb @ emb.T
  assert np.max(s - 2 * np.eye(s.shape[0])) < CFG.dedup_threshold
  # Edges: each old edge (u, v) lives on as (rep u, rep v), or is listed as absorbed, dropped or
  # pruned; and no edge is weaker than the prune threshold.
  rep_of = np.arange(alive0.size)
  rep_of[rep.merged[:, 0]] = rep.merged[:, 1]
  after = _edge_dict(new)
  absorbed = {tuple(p) for p in rep.absorbed.tolist()}
  lost = {tuple(p) for p in rep.dropped.tolist()} | {tuple(p) for p in rep.pruned.tolist()}
  for (u, v), (w, _) in _edge_dict(g).items():
    ru, rv = int(rep_of[u]), int(rep_of[v])
    if ru == rv:
      assert (u, v) in absorbed
    else:
      assert (ru, rv) in after or (ru, rv) in lost
      if (ru, rv) in after:
        assert after[ru, rv][0] >= w or (ru, rv) in lost
  assert all(w >= CFG.prune_threshold for w, _ in after.values())
  assert rep.final_edges == len(after)
  # Idempotent.
  again, rep2 = deep.compress_memory(new, CFG.replace(graph_degree=6), key=jax.random.key(9))
  assert rep2.merged.size == 0 and rep2.pruned.size == 0
  assert _bits(again) == _bits(new)


def test_compression_through_the_inverted_file_matches_exact():
  g = _random_graph(3)
  cfg = CFG.replace(graph_degree=6, ivf_probe=64)  # probe every cell: exhaustive
  a, ra = deep.compress_memory(g, cfg, key=jax.random.key(0))
  b, rb = deep.compress_memory(g, cfg, key=jax.random.key(0), exact_max=0)
  assert rb.method == "ivf" and rb.candidate_recall == 1.0
  np.testing.assert_array_equal(ra.merged, rb.merged)
  assert _bits(a) == _bits(b)


# ---------------------------------------------------------------------------------- deep_step

DEEP_CFG = sona.SonaConfig(
  dim=16,
  base_rank=4,
  graph_capacity=200,
  graph_degree=8,
  bank_capacity=64,
  signal_capacity=16,
  trajectory_capacity=16,
  n_dreams=64,
  dream_length=6,
  phi_max_nodes=24,
)


def _deep_state(seed=0):
  """180 memories in 12 clusters (with near-duplicates), kNN edges, and a bank of 40 patterns."""
  cfg = DEEP_CFG
  rng = np.random.default_rng(seed)
  state = sona.init_state(cfg, jax.random.key(seed))
  n = 180
  centres = rng.normal(size=(12, cfg.dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  label = rng.integers(12, size=n)
  emb = centres[label] + 0.35 * rng.normal(size=(n, cfg.dim)) / np.sqrt(cfg.dim)
  dup = rng.choice(n, 20, replace=False)
  emb[dup[10:]] = emb[dup[:10]] + 0.02 * rng.normal(size=(10, cfg.dim))
  created = rng.integers(0, NOW, size=n).astype(np.int32)
  g, ids, _ = G.add_nodes(
    state.graph,
    jnp.asarray(emb, jnp.float32),
    quality=jnp.asarray(rng.uniform(0.3, 1.0, size=n), jnp.float32),
    time=jnp.asarray(created),
  )
  node = np.array(g.node)
  node[:n, G.ACCESS] = rng.integers(0, 12, size=n)
  node[:n, G.CREATED] = created
  g = g._replace(node=jnp.asarray(node))
  e = np.asarray(g.emb)[:n]
  s = e @ e.T
  np.fill_diagonal(s, -np.inf)
  nn = np.argsort(-s, axis=1)[:, :4]
  src = np.repeat(np.arange(n), 4)
  w = rng.choice([0.004, 0.3, 0.6, 0.9], size=src.size).astype(np.float32)
  g, _ = G.add_edges(g, src, nn.reshape(-1), w, G.HEBBIAN)
  # Patterns: 40 around 5 directions, so Ward finds clusters larger than 3.
  pc = np.repeat(centres[:5], 8, axis=0) + 0.1 * rng.normal(size=(40, cfg.dim))
  bank, _ = sona.patterns.merge_patterns(
    state.bank,
    jnp.asarray(pc, jnp.float32),
    jnp.full((40,), 10.0, jnp.float32),
    jnp.full((40,), 0.7, jnp.float32),
    jnp.ones((40, cfg.n_tiers), jnp.float32),
    jnp.full((40, cfg.n_tiers), 2.0, jnp.float32),
    jnp.ones((40,), jnp.bool_),
    now=NOW - DAY,
    merge_threshold=0.999,
  )
  return state._replace(graph=g, bank=bank)


def _same(a, b, path="report"):
  """Reports equal field by field (wall times excepted)."""
  if isinstance(a, tuple) and hasattr(a, "_fields"):
    for f in a._fields:
      if f != "seconds":
        _same(getattr(a, f), getattr(b, f), f"{path}.{f}")
  elif isinstance(a, dict):
    assert a.keys() == b.keys(), path
  elif isinstance(a, np.ndarray | tuple | list):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
  elif isinstance(a, float) and np.isnan(a):
    assert np.isnan(b), path
  else:
    assert a == b, path


def test_deep_step_runs_every_phase_deterministically_and_accounts_for_everything():
  state = _deep_state()
  cfg = DEEP_CFG
  new, rep = deep.deep_step(state, cfg, NOW)
  phases = ["consolidation", "abstraction", "dreams", "transfer", "compression", "phi"]
  assert list(rep.seconds) == phases + ["total"]
  assert rep.seconds["total"] >= sum(rep.seconds[p] for p in phases) * 0.99
  # Each phase did something on this state.
  c, m = rep.consolidation, rep.compression
  assert c.strengthened.shape[0] > 0 and c.decayed.size > 0
  assert len(rep.abstraction.meta_ids) > 0
  assert rep.dreams.n_dreams == cfg.n_dreams
  assert rep.transfer.n_domains > 0
  assert m.merged.shape[0] >= 10 and m.pruned.shape[0] > 0
  assert np.isfinite(rep.phi.phi) and rep.phi.n_nodes == cfg.phi_max_nodes
  # The state changed where Loop C works, and the key moved on.
  assert not np.array_equal(np.asarray(new.key), np.asarray(state.key))
  assert _bits(new.graph) != _bits(state.graph)
  assert int(np.sum(np.asarray(new.bank.alive))) > int(np.sum(np.asarray(state.bank.alive)))
  for f in ("micro", "base", "router", "signals", "trajectories"):
    assert jax.tree.leaves(getattr(new, f)) == jax.tree.leaves(getattr(state, f))
  # Nothing lost silently: nodes die only by merging, and the counts add up.
  alive0, alive1 = np.asarray(state.graph.alive), np.asarray(new.graph.alive)
  np.testing.assert_array_equal(np.sort(m.merged[:, 0]), np.flatnonzero(alive0 & ~alive1))
  assert m.initial_nodes == alive0.sum() and m.final_nodes == alive1.sum()
  assert m.final_edges == int(np.sum(np.asarray(new.graph.nbr) >= 0))
  s0, s1 = np.asarray(state.graph.strength), np.asarray(new.graph.strength)
  changed = np.flatnonzero((s0 != s1) & alive1)
  survivors = set(m.merged[:, 1].tolist())
  assert set(changed.tolist()) <= set(c.decayed.tolist()) | survivors
  _check_invariants(new.graph)
  # What the cycle created is in today's metrics bins.
  today = sona.metrics.daily_table(new.metrics.daily)[-1]
  assert today["day"] == NOW // 86_400
  assert today["abstractions"] == len(rep.abstraction.meta_ids)
  assert today["novel_connections"] == len(rep.dreams.edges.inserted)
  assert today["transfers"] == len(rep.transfer.edges.inserted)
  assert today["phi"] == np.float32(rep.phi.phi)
  # Deterministic: the same inputs give the same state and report.
  new2, rep2 = deep.deep_step(state, cfg, NOW)
  assert all(
    np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new2), strict=True)
  )
  _same(rep, rep2)
