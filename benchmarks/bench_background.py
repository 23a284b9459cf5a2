"""Loop B cycle time per phase, k-means++ against scikit-learn, and the peer's `forceLearn`.

For 1,000 / 5,200 / 20,000 signals at dim 768 with 50 clusters: a full `background_step` (drain,
consolidate, router with EWC++, Fisher, patterns) timed per phase after compilation (the first
cycle's total, compilation included, is reported separately); `patterns.kmeans_pp` against
scikit-learn `KMeans(init="k-means++", n_init=1)` on the same unit-normalised queries (time and
spherical inertia); and, in the same run, `@ruvector/sona`'s `forceLearn()` on the same number of
trajectories at the same dim (skipped with a note when Node.js or the package is missing).

Usage: `python benchmarks/bench_background.py [--sizes 1000 5200 20000] [--dim 768] [--no-install]`.
Writes `benchmarks/results/background.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _fill(state, cfg, n, rng):
  """Pushes `n` served requests through Loop A (no retrieval ids: only signals matter here)."""
  import numpy as np

  import sona_jax as sona

  done = 0
  while done < n:
    b = min(1000, n - done)
    its = [
      sona.make_interaction(
        cfg,
        query=rng.normal(size=cfg.dim).astype(np.float32),
        quality=float(rng.uniform()),
        tier=int(rng.integers(cfg.n_tiers)),
        latency_ms=float(rng.uniform(20, 400)),
        context_tokens=int(rng.integers(0, 4000)),
        time=done + i,
      )
      for i in range(b)
    ]
    state, _ = sona.instant_scan(state, sona.stack_interactions(its), cfg)
    done += b
  return state


def _spherical_inertia(x, labels, k):
  import numpy as np

  c = np.stack(
    [x[labels == j].sum(0) if np.any(labels == j) else np.zeros(x.shape[1]) for j in range(k)]
  )
  c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
  return float(2.0 * np.sum(1.0 - np.sum(x * c[labels], axis=1)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5200, 20000])
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--clusters", type=int, default=50)
  p.add_argument("--no-install", action="store_true")
  a = p.parse_args(argv)

  from sona_jax.runtime import configure_cpu_low_latency

  configure_cpu_low_latency()
  import jax
  import numpy as np
  from sklearn.cluster import KMeans

  import sona_jax as sona
  from sona_jax import patterns

  rows = []
  for n in a.sizes:
    cfg = sona.SonaConfig(
      dim=a.dim,
      graph_capacity=64,
      signal_capacity=n,
      trajectory_capacity=64,
      pattern_clusters=a.clusters,
      min_samples=min(100, n),
    )
    rng = np.random.default_rng(0)
    state = sona.init_state(cfg, jax.random.key(0))
    state = _fill(state, cfg, n, rng)
    t = time.perf_counter()
    state, first = sona.background_step(state, cfg, 3600)
    first_s = time.perf_counter() - t
    state = _fill(state, cfg, n, rng)
    state, rep = sona.background_step(state, cfg, 7200)
    assert rep.ran and rep.n_signals == n, rep
    # k-means++ on the same queries: ours (compiled once above at this size) vs scikit-learn.
    sig = sona.types.unpack_signals(np.stack(sona.buffer.to_list(state.signals)), cfg)
    x = np.asarray(sig.query, np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xf = jax.numpy.asarray(x, jax.numpy.float32)
    km = patterns.kmeans_pp(jax.random.key(1), xf, a.clusters)
    jax.block_until_ready(km)
    t = time.perf_counter()
    km = patterns.kmeans_pp(jax.random.key(2), xf, a.clusters)
    jax.block_until_ready(km)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    sk = KMeans(a.clusters, init="k-means++", n_init=1, random_state=0).fit(x)
    sk_s = time.perf_counter() - t
    rows.append(
      dict(
        n=n,
        first_cycle_s=first_s,
        **{f"{k}_s": v for k, v in rep.seconds.items()},
        kmeans_s=ours_s,
        sklearn_s=sk_s,
        kmeans_inertia=_spherical_inertia(x, np.asarray(km.labels), a.clusters),
        sklearn_inertia=_spherical_inertia(x, sk.labels_, a.clusters),
      )
    )

  sys.path.insert(0, str(HERE))
  import _peer

  ok, note = _peer.ensure_peer(install=not a.no_install)
  peer = None
  if ok:
    peer, note = _peer.run_peer_script(
      "forcelearn.js", {"sizes": a.sizes, "dim": a.dim, "clusters": a.clusters}, timeout=1200
    )
  peer_by_n = {r["n"]: r for r in (peer or {}).get("results", [])}

  phases = ["drain", "consolidate", "router", "fisher", "patterns"]
  head = (
    f"{'signals':>8} {'total':>8} "
    + " ".join(f"{ph:>11}" for ph in phases)
    + f" {'1st+jit':>8} {'kmeans':>8} {'sklearn':>8} {'inertia':>8} {'peer':>8} {'ratio':>6}"
  )
  lines = [head, "-" * len(head)]
  for r in rows:
    pr = peer_by_n.get(r["n"])
    r["peer_force_learn_s"] = pr and pr["force_learn_s"]
    r["ratio"] = r["total_s"] / pr["force_learn_s"] if pr else None
    lines.append(
      f"{r['n']:>8} {r['total_s']:>7.3f}s "
      + " ".join(f"{r[ph + '_s']:>10.3f}s" for ph in phases)
      + f" {r['first_cycle_s']:>7.2f}s {r['kmeans_s']:>7.3f}s {r['sklearn_s']:>7.3f}s"
      + f" {r['kmeans_inertia'] / r['sklearn_inertia']:>8.3f}"
      + (f" {pr['force_learn_s']:>7.2f}s {r['ratio']:>6.3f}" if pr else f" {'-':>8} {'-':>6}")
    )
  table = "\n".join(lines)
  print(table)
  print("\ninertia: ours / scikit-learn (spherical objective, same queries, k-means++, n_init=1)")
  if not peer:
    print(f"peer column skipped: {note}")
  else:
    print(f"peer: @ruvector/sona {peer.get('version')} forceLearn() on the same N and dim")
  RESULTS.mkdir(parents=True, exist_ok=True)
  out = dict(
    benchmark="background",
    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
    config=dict(dim=a.dim, clusters=a.clusters),
    rows=rows,
    peer=peer,
    peer_note=note,
    table=table,
  )
  (RESULTS / "background.json").write_text(json.dumps(out, indent=2))
  print(f"\nwrote {(RESULTS / 'background.json').relative_to(HERE.parent)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
