"""Loop C cycle time per phase, peak memory, and the recall of the all-pairs candidate search.

For 10,000 and 100,000 memories at dim 384, degree 16: a realistic graph (a mixture of 300
Gaussian clusters on the sphere with 5% planted near-duplicates, 12 nearest-neighbour edges per node
inside its cluster, random access counts, qualities, creation times and weights) and a bank of 1,000
patterns. A full `deep_step` is timed per phase twice on the same state: cold (compilation
included) and warm. Reported with it: the recall against brute force of the inverted-file searches
(measured by the phases on 1,000 sampled rows), what each phase did, and the peak resident memory
of the process. In the same run, for sizes up to `--brute-max`, the exact blocked brute force of
the near-duplicate search is timed against the inverted file (the ratio is the speed-up).

Usage: `python benchmarks/bench_deep.py [--sizes 10000 100000] [--dim 384] [--quick]`.
Writes `benchmarks/results/deep.json` (`deep_quick.json` with `--quick`).

`--louvain` instead compares, on the same graphs and side by side in one run, the domain search of
phase 4 (`domains.communities`) by the hand-written NumPy Louvain coarsening (then networkx) against
igraph's multilevel (Louvain) and Leiden on the whole graph (time and modularity, over `--seeds`);
it writes `benchmarks/results/deep_louvain.json`. Needs `pip install igraph`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DAY = 86_400
PHASES = ["consolidation", "abstraction", "dreams", "transfer", "compression", "phi"]


def _rss_mb() -> float:
  """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_state(n, dim, *, degree=16, fill=12, clusters=300, patterns_n=1000, seed=0):
  """A `SonaState` with `n` clustered memories, kNN edges and `patterns_n` bank patterns."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import sona_jax as sona
  from sona_jax import graph as G

  cfg = sona.SonaConfig(
    dim=dim,
    graph_capacity=n,
    graph_degree=degree,
    bank_capacity=max(1024, patterns_n + 64),
    signal_capacity=64,
    trajectory_capacity=64,
  )
  rng = np.random.default_rng(seed)
  now = 200 * DAY
  centres = rng.normal(size=(clusters, dim)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  spread = rng.uniform(0.4, 0.9, size=clusters).astype(np.float32)  # intra cosine ~0.55-0.85
  label = rng.integers(clusters, size=n)
  emb = centres[label] + spread[label, None] * rng.standard_normal((n, dim), np.float32) / np.sqrt(
    dim
  ).astype(np.float32)
  # 5% planted near-duplicates (cosine ~0.98), some of them chains of three.
  nd = n // 20
  dst = rng.choice(n, nd, replace=False)
  src = rng.integers(n, size=nd)
  label[dst] = label[src]
  emb[dst] = emb[src] + 0.2 * rng.standard_normal((nd, dim), np.float32) / np.sqrt(dim).astype(
    np.float32
  )
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  # Edges: the `fill` nearest neighbours inside each cluster.
  nbr = np.full((n, degree), -1, np.int32)
  for c in range(clusters):
    mem = np.flatnonzero(label == c)
    if mem.size < 2:
      continue
    s = emb[mem] @ emb[mem].T
    np.fill_diagonal(s, -np.inf)
    k = min(fill, mem.size - 1)
    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
    nbr[mem, :k] = mem[top]
  has = nbr >= 0
  w = np.where(has, rng.uniform(0.0, 1.0, size=(n, degree)), 0.0).astype(np.float32)
  w[has & (rng.uniform(size=(n, degree)) < 0.02)] = 0.005  # some weak edges to prune
  kind = np.where(has, rng.choice(4, size=(n, degree), p=[0.85, 0.1, 0.03, 0.02]), 0)
  access = (rng.geometric(0.25, size=n) - 1).astype(np.int32)  # mean 3; P(> 5) ~ 0.18
  created = rng.integers(now - 120 * DAY, now, size=n).astype(np.int32)
  last = np.minimum(created + rng.integers(0, 30 * DAY, size=n), now).astype(np.int32)
  node = G.make_node(
    access,
    last,
    created,
    rng.uniform(0.0, 1.0, size=n).astype(np.float32),
    np.ones(n, np.float32),
    np.ones(n, np.int32),
    np.zeros(n, np.int32),
    np.ones(n, np.int32),
  )
  graph = G.Graph(
    emb=jnp.asarray(emb), edges=G.make_edges(nbr, w, kind.astype(np.int32)), node=node
  )
  state = sona.init_state(cfg, jax.random.key(seed))
  # Patterns: noisy copies of cluster centres (level 0), all inserted.
  pc = centres[rng.integers(clusters, size=patterns_n)]
  pc = pc + 0.3 * rng.standard_normal(pc.shape, np.float32) / np.sqrt(dim).astype(np.float32)
  t = cfg.n_tiers
  bank, _ = sona.patterns.merge_patterns(
    state.bank,
    jnp.asarray(pc),
    jnp.asarray(rng.uniform(1, 50, size=patterns_n), jnp.float32),
    jnp.asarray(rng.uniform(0, 1, size=patterns_n), jnp.float32),
    jnp.asarray(rng.uniform(0, 5, size=(patterns_n, t)), jnp.float32),
    jnp.full((patterns_n, t), 5.0, jnp.float32),
    jnp.ones((patterns_n,), jnp.bool_),
    now=now - DAY,
    merge_threshold=1.01,
  )
  return cfg, state._replace(graph=graph, bank=bank), now


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
  p.add_argument("--dim", type=int, default=384)
  p.add_argument("--brute-max", type=int, default=20_000, help="time brute force up to this size")
  p.add_argument("--quick", action="store_true", help="small run: 2,000 nodes at dim 64")
  p.add_argument("--louvain", action="store_true", help="compare the domain search backends")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of --louvain")
  a = p.parse_args(argv)
  if a.quick:
    a.sizes, a.dim = [2000], 64
  if a.louvain:
    return louvain_main(a)

  import jax
  import numpy as np

  from sona_jax import ivf
  from sona_jax.loops.deep import deep_step

  rows = []
  for n in a.sizes:
    rss0 = _rss_mb()
    t = time.perf_counter()
    cfg, state, now = build_state(n, a.dim, patterns_n=200 if a.quick else 1000)
    build_s = time.perf_counter() - t
    rss_built = _rss_mb()
    _, cold = deep_step(state, cfg, now)
    new, rep = deep_step(state, cfg, now)
    rss_peak = _rss_mb()
    c, m = rep.consolidation, rep.compression
    row = dict(
      n=n,
      dim=a.dim,
      build_s=build_s,
      **{f"{k}_s": v for k, v in rep.seconds.items()},
      **{f"cold_{k}_s": v for k, v in cold.seconds.items()},
      rss_before_mb=rss0,
      rss_built_mb=rss_built,
      rss_peak_mb=rss_peak,
      high_value=c.high_value,
      strengthened=int(c.strengthened.shape[0]),
      inserted=int(c.inserted.shape[0]),
      rejected=int(c.rejected.shape[0]),
      decayed=int(c.decayed.size),
      consolidation_method=c.method,
      consolidation_recall=c.candidate_recall,
      meta_patterns=len(rep.abstraction.meta_ids),
      dreams_kept=int(rep.dreams.n_kept),
      creative_inserted=int(rep.dreams.edges.inserted.shape[0]),
      domains=int(rep.transfer.n_domains),
      analogies=int(rep.transfer.analogies.shape[0]),
      merged=int(m.merged.shape[0]),
      pruned=int(m.pruned.shape[0]),
      dropped=int(m.dropped.shape[0]),
      initial_nodes=m.initial_nodes,
      final_nodes=m.final_nodes,
      initial_edges=m.initial_edges,
      final_edges=m.final_edges,
      compression_method=m.method,
      compression_recall=m.candidate_recall,
      candidate_pairs=m.candidate_pairs,
      phi=rep.phi.phi,
      phi_method=rep.phi.method,
    )
    # Side by side: the near-duplicate search, inverted file against exact brute force.
    g = state.graph
    alive = np.asarray(g.alive)
    t = time.perf_counter()
    pairs = ivf.ivf_pairs(
      g.emb, alive, cfg.dedup_threshold, cells=cfg.ivf_cells, probe=cfg.ivf_probe,
      key=jax.random.key(1),
    )  # fmt: skip
    row["ivf_s"] = time.perf_counter() - t
    row["brute_s"] = None
    if n <= a.brute_max:
      t = time.perf_counter()
      exact = ivf.brute_force_pairs(g.emb, alive, cfg.dedup_threshold)
      row["brute_s"] = time.perf_counter() - t
      got = set((pairs[0].astype(np.int64) * n + pairs[1]).tolist())
      want = set((exact[0].astype(np.int64) * n + exact[1]).tolist())
      row["ivf_full_recall"] = len(got & want) / max(len(want), 1)
    rows.append(row)
    del state, new, rep, cold

  head = (
    f"{'nodes':>7} {'total':>7} "
    + " ".join(f"{ph[:8]:>8}" for ph in PHASES)
    + f" {'cold':>7} {'peakRSS':>8} {'recall C':>8} {'recall M':>8}"
    + f" {'merged':>6} {'pruned':>6} {'decayed':>7} {'strength':>8} {'ivf':>6} {'brute':>6}"
  )
  lines = [head, "-" * len(head)]
  fmt_r = lambda r, method: "exact" if method == "exact" else f"{r:.3f}"
  for r in rows:
    lines.append(
      f"{r['n']:>7} {r['total_s']:>6.2f}s "
      + " ".join(f"{r[ph + '_s']:>7.2f}s" for ph in PHASES)
      + f" {r['cold_total_s']:>6.1f}s {r['rss_peak_mb']:>6.0f}MB"
      + f" {fmt_r(r['consolidation_recall'], r['consolidation_method']):>8}"
      + f" {fmt_r(r['compression_recall'], r['compression_method']):>8}"
      + f" {r['merged']:>6} {r['pruned']:>6} {r['decayed']:>7} {r['strengthened']:>8}"
      + f" {r['ivf_s']:>5.2f}s"
      + (f" {r['brute_s']:>5.2f}s" if r["brute_s"] is not None else f" {'-':>6}")
    )
  table = "\n".join(lines)
  print(table)
  print(
    "\ntotal and phases: warm deep_step (cold = first call, compilation included); recall C/M:"
    "\ncandidate recall of the consolidation (cos > 0.7) and compression (cos >= 0.95) searches"
    "\nagainst brute force on 1,000 sampled rows; ivf/brute: near-duplicate search alone."
  )
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = dict(
    benchmark="deep",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
    config=dict(dim=a.dim, degree=16, clusters=300, quick=a.quick),
    rows=rows,
    table=table,
  )
  name = "deep_quick.json" if a.quick else "deep.json"
  (RESULTS / name).write_text(json.dumps(out, indent=2, default=float))
  print(f"\nwrote {(RESULTS / name).relative_to(HERE.parent)}")
  return 0


def _louvain_rows(n, variant, g, seeds):
  """Each backend of `domains.communities` on graph `g`, per seed: time and modularity."""
  import igraph as ig
  import numpy as np

  from sona_jax.loops.deep import domains

  lo, hi, w = domains.undirected_edges(g)
  # A yardstick outside the code under test: igraph's modularity of each labelling.
  ref = ig.Graph(n=g.capacity, edges=list(zip(lo.tolist(), hi.tolist(), strict=True)))
  ref.es["weight"] = w.tolist()
  rows = []
  for method in ("numpy", "multilevel", "leiden"):
    for seed in seeds:
      t = time.perf_counter()
      domain, info = domains.communities(g, seed=seed, method=method)
      sec = time.perf_counter() - t
      member = np.where(domain >= 0, domain, domain.max() + 1 + np.arange(domain.size))
      q_ref = ref.modularity(member.tolist(), weights="weight")
      rows.append(
        dict(
          n=n,
          graph=variant,
          edges=int(lo.size),
          method=method,
          seed=seed,
          seconds=sec,
          modularity=info["modularity"],
          modularity_igraph=q_ref,
          domains=int(domain.max()) + 1,
          n_coarse=info["n_coarse"],
        )
      )
      print(f"  {n} {variant} {method} seed {seed}: {sec:.2f} s, Q {q_ref:.4f}", flush=True)
  return rows


def louvain_main(a) -> int:
  """`--louvain`: NumPy coarsening + networkx against igraph multilevel and Leiden."""
  import igraph as ig
  import numpy as np

  from sona_jax import graph as G

  def rewired(graph, fraction, seed=0):
    """The graph with `fraction` of its edges pointed at uniformly random nodes (harder)."""
    rng = np.random.default_rng(seed)
    nbr = np.array(graph.nbr)
    hit = (nbr >= 0) & (rng.random(nbr.shape) < fraction)
    nbr[hit] = rng.integers(graph.capacity, size=int(hit.sum()))
    return graph._replace(edges=G.make_edges(nbr, np.asarray(graph.w), np.asarray(graph.kind)))

  rows = []
  for n in a.sizes:
    _, state, _ = build_state(n, a.dim, patterns_n=200 if a.quick else 1000)
    for variant, fraction in (("kNN", 0.0), ("kNN+20%", 0.2)):
      rows += _louvain_rows(n, variant, rewired(state.graph, fraction), a.seeds)

  head = (
    f"{'nodes':>7} {'graph':>8} {'edges':>8} {'method':>10} {'seed':>4} {'time':>7}"
    f" {'modularity':>10} {'Q (igraph)':>10} {'domains':>7}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(
      f"{r['n']:>7} {r['graph']:>8} {r['edges']:>8} {r['method']:>10} {r['seed']:>4}"
      f" {r['seconds']:>6.2f}s {r['modularity']:>10.4f} {r['modularity_igraph']:>10.4f}"
      f" {r['domains']:>7}"
    )
  table = "\n".join(lines)
  print(table)
  print(
    "\nkNN: bench_deep's graph (edges inside 300 planted clusters); kNN+20%: a fifth of its edges"
    "\npointed at random nodes. numpy: NumPy Louvain coarsening to 2,000 super-nodes, then"
    "\nnetworkx Louvain (the default);"
    "\nmultilevel / leiden: igraph on the whole graph. Same graph, same process, one run; time"
    "\nincludes the edge extraction, numbering and modularity of `domains.communities`."
  )
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = dict(
    benchmark="deep_louvain",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
    config=dict(dim=a.dim, degree=16, clusters=300, quick=a.quick, igraph=ig.__version__),
    rows=rows,
    table=table,
  )
  name = "deep_louvain_quick.json" if a.quick else "deep_louvain.json"
  (RESULTS / name).write_text(json.dumps(out, indent=2, default=float))
  print(f"\nwrote {(RESULTS / name).relative_to(HERE.parent)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
