"""Scenario 2 of the learning benchmark: drift repair, retrieval over real digits with drifting
queries, feedback-only micro-LoRA (Loop A) and hourly Loop B against the frozen model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .common import (
  CLOCK_START,
  SECONDS_PER_REQUEST,
  _at,
  _md_table,
  _peer_module,
  _window_means,
)

# ----------------------------------------------------------------------------------------------
# 2. Drift repair: retrieval over real digits with drifting queries.
# ----------------------------------------------------------------------------------------------


def drift_config(dim: int = 32, **overrides):
  """The library defaults, with only sizes set for a 600-memory, 32-dim retrieval task."""
  import sona_jax as sona

  base = dict(dim=dim, graph_capacity=1024, signal_capacity=4096, trajectory_capacity=4096)
  base.update(overrides)
  return sona.SonaConfig(**base)


def run_drift(
  *,
  seed: int = 0,
  drift: float = 2.0,
  n_pre: int = 500,
  n_post: int = 2500,
  n_heldout: int = 300,
  k: int = 5,
  every: int = 250,
  loop_b: bool = True,
  cfg=None,
) -> dict:
  """Serves `n_pre` clean then `n_post` drifted queries through `Sona`, learning from feedback.

  The task is `datasets.digits_drift` (600 real digit images as memories, PCA-32, the other
  images as queries shifted by `drift` along a fixed direction once the drift starts). Per
  request: adapt the query (`Sona.adapt`), retrieve the top-`k` memories by cosine, judge them (a
  memory is useful when it has the query's label), report the feedback (`Sona.observe`, Loop A
  feedback mode), and `Sona.tick()` on a simulated clock (12 s a request, so Loop B consolidates
  every 300 requests). `n_heldout` queries never served measure held-out precision@k every
  `every` requests after the drift, drifted and clean, through the adapter; at the end a last
  Loop B runs and both are measured again.

  Returns:
    A dict: `clean` (held-out precision of the clean queries, unadapted: the ceiling), `frozen`
    (of the drifted ones, unadapted), `curve` (list of `{n, drift, clean}`), `final_drift`,
    `final_clean` (after the last Loop B), `prequential` and `prequential_frozen` (f32 per
    request), `loop_b_runs`, `seconds`, and the streams (`stream_x`, `stream_y`, `held`) for the
    peer.
  """
  import jax

  import sona_jax as sona
  from sona_jax import datasets

  task = datasets.digits_drift(seed=seed, dim=32, n_memories=600, drift=drift)
  cfg = cfg if cfg is not None else drift_config()
  now = [CLOCK_START]
  engine = sona.Sona(cfg, key=jax.random.key(seed), clock=lambda: now[0])
  ids = engine.add_memories(task.memories, quality=0.5, time=0)
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(task.queries))
  held, train = perm[:n_heldout], perm[n_heldout:]
  mem, mlab = task.memories, task.memory_labels
  n = n_pre + n_post
  qi = train[np.arange(n) % len(train)]
  stream_x = np.where((np.arange(n) < n_pre)[:, None], task.clean_queries[qi], task.queries[qi])
  stream_y = task.query_labels[qi]

  def heldout(q):
    return datasets.precision_at_k(q, task.query_labels[held], mem, mlab, k)

  def measure(n_seen):
    return dict(
      n=n_seen,
      drift=heldout(np.asarray(engine.adapt(task.queries[held]))),
      clean=heldout(np.asarray(engine.adapt(task.clean_queries[held]))),
    )

  t0 = time.perf_counter()
  frozen_top = datasets.top_k_cosine(stream_x, mem, k)
  preq_frozen = np.mean(mlab[frozen_top] == stream_y[:, None], axis=1)
  preq = np.zeros(n, np.float32)
  curve = [measure(0)]
  runs = 0
  for i in range(n):
    now[0] = CLOCK_START + SECONDS_PER_REQUEST * (i + 1)
    x = stream_x[i]
    top = datasets.top_k_cosine(np.asarray(engine.adapt(x)), mem, k)[0]
    relevant = mlab[top] == stream_y[i]
    preq[i] = relevant.mean()
    t = int(now[0] - engine.time_origin)
    engine.observe(datasets.retrieval_interaction(cfg, x, ids[top], relevant, time=t))
    if loop_b:
      rep = engine.tick()["background"]
      runs += int(rep is not None and rep.ran)
    if i >= n_pre and (i + 1 - n_pre) % every == 0:
      curve.append(measure(i + 1 - n_pre))
  if loop_b:
    runs += int(engine.run_background().ran)
  end = measure(n_post)
  return dict(
    seed=seed,
    drift_length=drift,
    n_pre=n_pre,
    n_post=n_post,
    loop_b=loop_b,
    clean=heldout(task.clean_queries[held]),
    frozen=heldout(task.queries[held]),
    curve=curve,
    final_drift=end["drift"],
    final_clean=end["clean"],
    prequential=preq,
    prequential_frozen=preq_frozen.astype(np.float32),
    loop_b_runs=runs,
    seconds=time.perf_counter() - t0,
    stream_x=stream_x,
    stream_y=stream_y,
    task=task,
    held=held,
  )


def recovery(result: dict, at: int = 2000) -> float:
  """Share of the precision lost to the drift that is recovered `at` requests after it:
  `(p_adapted(at) - p_frozen) / (p_clean - p_frozen)` on held-out queries."""
  p = next(c["drift"] for c in result["curve"] if c["n"] == at)
  return (p - result["frozen"]) / max(result["clean"] - result["frozen"], 1e-9)


def peer_drift(result: dict, *, k: int = 5, lrs=(0.001, 0.05), every: int = 250, timeout=600):
  """The same stream fed to `@ruvector/sona` (`peer/learning.js`, mode drift)."""
  _peer = _peer_module()

  task, held = result["task"], result["held"]
  n_pre, n_post = result["n_pre"], result["n_post"]
  checkpoints = [n_pre] + [n_pre + j for j in range(every, n_post + 1, every)]
  payload = dict(
    mode="drift",
    memories=task.memories.tolist(),
    memoryLabels=task.memory_labels.tolist(),
    stream=result["stream_x"].tolist(),
    streamLabels=result["stream_y"].tolist(),
    heldDrift=task.queries[held].tolist(),
    heldClean=task.clean_queries[held].tolist(),
    heldLabels=task.query_labels[held].tolist(),
    k=k,
    checkpoints=checkpoints,
    learnEvery=int(3600 / SECONDS_PER_REQUEST),
    microLoraLrs=list(lrs),
    patternClusters=50,
  )
  out, note = _peer.run_peer_script("learning.js", payload, timeout=timeout)
  if out is None:
    return None, note
  for arm in out["arms"]:
    arm["prequential"] = np.asarray(arm["prequential"], np.float32)
    arm["curve"] = [dict(h, n=h["n"] - n_pre) for h in arm.pop("held")]
  return out, note


def drift_table(drift: dict) -> str:
  """Held-out precision@5 of the frozen model, sona_jax and the peer arms."""
  m = drift["measured_at"]
  head = (
    f"{'arm':<28}{'clean':>7}{'drifted':>9}{'@250':>7}{f'@{m // 2}':>7}{f'@{m}':>7}{'@end':>7}"
    f"{f'recov@{m}':>11}{'clean end':>10}{'stream last 500':>16}"
  )
  lines = [head, "-" * len(head)]
  for arm in drift["arms"]:
    at = {c["n"]: c["drift"] for c in arm["curve"]}
    lines.append(
      f"{arm['name']:<28}{arm['clean']:>7.3f}{arm['frozen']:>9.3f}{at.get(250, np.nan):>7.3f}"
      f"{at.get(m // 2, np.nan):>7.3f}{at.get(m, np.nan):>7.3f}{arm['final_drift']:>7.3f}"
      f"{arm['recovery_2000']:>11.1%}{arm['final_clean']:>10.3f}{arm['preq_last']:>16.3f}"
    )
  return "\n".join(lines)


def drift_benchmark(*, quick: bool, seeds, peer_ok: bool, log=print) -> dict:
  """Section 2: sona_jax (Loop A + Loop B), sona_jax without Loop B, the frozen model and the
  peer's arms on the same streams; means over `seeds`."""
  n_pre, n_post = (200, 1000) if quick else (500, 2500)
  at = 500 if quick else 2000
  every = 250
  runs = {"sona_jax (Loop A + Loop B)": [], "sona_jax micro-LoRA only": []}
  peers: dict[str, list] = {}
  notes = []
  for seed in seeds:
    r = run_drift(seed=seed, n_pre=n_pre, n_post=n_post, every=every)
    runs["sona_jax (Loop A + Loop B)"].append(r)
    log(f"  drift seed {seed}: {r['seconds']:.1f} s, {r['loop_b_runs']} Loop B cycles")
    runs["sona_jax micro-LoRA only"].append(
      run_drift(seed=seed, n_pre=n_pre, n_post=n_post, every=every, loop_b=False)
    )
    if peer_ok:
      out, note = peer_drift(r, every=every)
      notes.append(note)
      for arm in out["arms"] if out else []:
        arm.update(clean=r["clean"], frozen=r["frozen"], final_drift=arm["curve"][-1]["drift"])
        arm["final_clean"] = arm["curve"][-1]["clean"]
        peers.setdefault(f"peer {arm['arm']}", []).append(arm)
  arms = []

  def add(name, results, *, preq_key="prequential"):
    at_n = [next(c["drift"] for c in x["curve"] if c["n"] == at) for x in results]
    clean = np.mean([x["clean"] for x in results])
    frozen = np.mean([x["frozen"] for x in results])
    curve_ns = [c["n"] for c in results[0]["curve"]]
    curve = [
      dict(
        n=n,
        drift=float(np.mean([x["curve"][i]["drift"] for x in results])),
        clean=float(np.mean([x["curve"][i]["clean"] for x in results])),
      )
      for i, n in enumerate(curve_ns)
    ]
    rec = [
      (a - x["frozen"]) / max(x["clean"] - x["frozen"], 1e-9)
      for a, x in zip(at_n, results, strict=True)
    ]
    arms.append(
      dict(
        name=name,
        seeds=len(results),
        clean=float(clean),
        frozen=float(frozen),
        curve=curve,
        final_drift=float(np.mean([x["final_drift"] for x in results])),
        final_clean=float(np.mean([x["final_clean"] for x in results])),
        recovery_2000=float(np.mean(rec)),
        recovery_per_seed=[float(v) for v in rec],
        clean_loss_points=float(100 * np.mean([x["clean"] - x["final_clean"] for x in results])),
        preq_last=float(np.mean([np.mean(x[preq_key][-500:]) for x in results])),
        preq_windows=_window_means(np.mean([x[preq_key] for x in results], axis=0)),
      )
    )

  base = runs["sona_jax (Loop A + Loop B)"]
  frozen_arm = [
    dict(
      x,
      curve=[dict(c, drift=x["frozen"], clean=x["clean"]) for c in x["curve"]],
      final_drift=x["frozen"],
      final_clean=x["clean"],
    )
    for x in base
  ]
  add("frozen model", frozen_arm, preq_key="prequential_frozen")
  for name, results in runs.items():
    add(name, results)
  for name, results in peers.items():
    add(name, results)
  return dict(
    n_pre=n_pre,
    n_post=n_post,
    measured_at=at,
    seeds=list(seeds),
    drift_length=2.0,
    config=drift_config().to_dict(),
    arms=arms,
    peer_notes=notes,
    seconds=float(sum(x["seconds"] for rs in runs.values() for x in rs)),
  )


def drift_targets(drift: dict) -> list[dict]:
  """The drift-repair acceptance targets with the measured numbers."""
  out = []
  arm = next(a for a in drift["arms"] if a["name"] == "sona_jax (Loop A + Loop B)")
  out.append(
    dict(
      name=f"drift repair recovers >= 50% within {drift['measured_at']:,} requests",
      measured=f"{arm['recovery_2000']:.1%} (per seed "
      + ", ".join(f"{v:.0%}" for v in arm["recovery_per_seed"])
      + ")",
      met=bool(arm["recovery_2000"] >= 0.5),
    )
  )
  out.append(
    dict(
      name="clean-distribution loss after consolidation <= 2 points",
      measured=f"{arm['clean_loss_points']:.2f} points lost (held-out clean precision@5 "
      f"{arm['clean']:.3f} unadapted -> {arm['final_clean']:.3f} adapted)",
      met=bool(arm["clean_loss_points"] <= 2.0),
    )
  )
  return out


def plot_drift(drift: dict, out_dir: Path, suffix: str, plt) -> str:
  """learning_drift.png: prequential and held-out precision after the drift."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
  w = 100
  for i, arm in enumerate(drift["arms"]):
    y = arm["preq_windows"]
    x = (np.arange(len(y)) + 0.5) * w - drift["n_pre"]
    style = dict(color="k", ls="--", lw=1.2, zorder=5) if arm["name"] == "frozen model" else {}
    style.setdefault("color", f"C{i}")
    axes[0].plot(x, y, label=arm["name"], **style)
    c = arm["curve"]
    axes[1].plot([p["n"] for p in c], [p["drift"] for p in c], marker="o", ms=3, **style)
  for ax in axes:
    ax.axvline(0, color="gray", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.set_xlabel("requests since the drift")
  axes[1].axhline(drift["arms"][0]["clean"], color="k", ls="--", lw=1, label="clean ceiling")
  axes[0].set_ylabel(f"precision@5 (served stream, mean of {w})")
  axes[1].set_ylabel("held-out precision@5, drifted queries")
  axes[0].set_title("Prequential precision (drift at 0)")
  axes[1].set_title("Held-out recovery")
  axes[0].legend(fontsize=7, loc="lower right")
  axes[1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  path = out_dir / f"learning_drift{suffix}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return str(path)


def drift_markdown(drift: dict, sfx: str) -> list[str]:
  """Section 2 of the README's "Results: learning"."""
  md = []
  rows = []
  for a in drift["arms"]:
    at = {c["n"]: c["drift"] for c in a["curve"]}
    rows.append(
      [
        a["name"],
        f"{a['frozen']:.3f}",
        f"{at.get(500, float('nan')):.3f}",
        f"{at.get(drift['measured_at'], float('nan')):.3f}",
        f"{a['final_drift']:.3f}",
        f"{100 * a['recovery_2000']:.0f}%",
        f"{a['final_clean']:.3f} ({0.0 - a['clean_loss_points'] + 0.0:+.1f})",
        f"{a['preq_last']:.3f}",
      ]
    )
  ours = next(a for a in drift["arms"] if a["name"] == "sona_jax (Loop A + Loop B)")
  micro = next(a for a in drift["arms"] if a["name"] == "sona_jax micro-LoRA only")
  m = drift["measured_at"]
  peers = [a for a in drift["arms"] if a["name"].startswith("peer micro")]
  peer_span = max([100 * abs(a["final_drift"] - a["frozen"]) for a in peers], default=0.0)
  peer_pat = next(
    (a for a in drift["arms"] if a["name"] == "peer patterns"),
    dict(frozen=float("nan"), final_drift=float("nan")),
  )
  md += [
    "### 2. Drift repair: retrieval with drifting queries",
    "",
    "A memory of 600 real digit images (PCA-32 embeddings, `datasets.digits_drift`); "
    f"{drift['n_pre']} clean queries, then {drift['n_post']:,} whose embeddings are shifted by "
    f"{drift['drift_length']:g} along a fixed direction (an upstream encoder that changed). "
    "Per request: `Sona.adapt`, top-5 by cosine, a memory is useful when it has the query's "
    "label, `Sona.observe` with used / unused ids (feedback mode, no gradient given), "
    "`Sona.tick()` on a simulated clock of 300 requests an hour, so Loop B consolidates the "
    "micro-LoRA into the base LoRA hourly; a last Loop B at the end. Library defaults except "
    "sizes. Held-out: 300 queries never served, measured every 250 requests, drifted and "
    f"clean. Recovery = (p(n) - p_frozen) / (p_clean - p_frozen). Means over seeds "
    f"{drift['seeds']} (a seed sets the split and the drift direction); the ablation "
    '"micro-LoRA only" never runs Loop B. The peer gets the '
    "same stream: its `applyMicroLora(q)` as the adapted query (trajectories: the query, the "
    "mean of the useful memories as activation, precision as reward and quality, `flush` "
    "per request), or `q + centroid of findPatterns(q, 1)`; `forceLearn` hourly.",
    "",
    _md_table(
      [
        "arm",
        "drifted, frozen",
        "@500",
        f"@{drift['measured_at']:,}",
        "end",
        f"recovered @{drift['measured_at']:,}",
        "clean after Loop B (Δ points)",
        "stream, last 500",
      ],
      rows,
    ),
    "",
    f"Clean queries, unadapted (the ceiling): {ours['clean']:.3f}.",
    "",
    f"![drift repair](benchmarks/results/learning_drift{sfx}.png)",
    "",
    f"The drift costs {100 * (ours['clean'] - ours['frozen']):.0f} points of precision@5. "
    f"Feedback alone (no labels, no gradients) recovers {100 * ours['recovery_2000']:.0f}% "
    f"of it on held-out queries within {drift['measured_at']:,} requests, and after the "
    f"last consolidation clean queries lose {ours['clean_loss_points']:.1f} points: the "
    "adapter learnt to remove the drift direction, which clean queries barely have. "
    f"Without Loop B (micro-LoRA only) the same feedback reaches {_at(micro, m):.3f} at "
    f"{m:,} requests and {micro['final_drift']:.3f} at the end, against {_at(ours, m):.3f} "
    f"and {ours['final_drift']:.3f} with hourly consolidation"
    + (
      ": folding the micro-LoRA into the rank-8 base every hour costs no accuracy, and what "
      "was learnt then lives in the base, which the next requests' micro-LoRA only corrects. "
      if abs(ours["final_drift"] - micro["final_drift"]) <= 0.02
      else f" ({100 * (ours['final_drift'] - micro['final_drift']):+.1f} points at the end). "
    )
    + "The peer's micro-LoRA arms stay "
    f"within {peer_span:.1f} points of the frozen model: its adapter adds one global direction "
    "whatever the query (benchmarks/peer/NOTES.md), so it cannot undo a shift that retrieval "
    "sees as query-dependent. Its pattern arm retrieves with the query plus the nearest "
    "pattern centroid (a mix of past drifted queries and their useful memories) and ends "
    f"{100 * abs(peer_pat['final_drift'] - peer_pat['frozen']):.0f} points "
    f"{'below' if peer_pat['final_drift'] < peer_pat['frozen'] else 'above'} the frozen model "
    "on drifted queries.",
    "",
  ]
  return md
