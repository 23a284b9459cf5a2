"""Measured learning on real data (scikit-learn's digits): forgetting, drift repair, routing.

Three scenarios, each against baselines and, where its API allows, the peer `@ruvector/sona`:

1. **Continual learning** (`continual_benchmark`): Split Digits (5 tasks of 2 classes) and Permuted
   Digits (5 pixel permutations), a flax MLP trained task after task with optax, in task-, domain-
   and class-incremental settings: naive fine-tuning, L2 to the anchor, offline EWC (one Fisher per
   task), online EWC and this library's EWC++ (`sona_jax.ewc`); 5 seeds, lambda picked on a
   validation split; average accuracy and forgetting (Chaudhry et al. 2018).
2. **Drift repair** (`run_drift`): retrieval over a memory of real images whose queries drift;
   feedback-mode micro-LoRA (Loop A) with hourly Loop B consolidation against the frozen model;
   prequential and held-out precision@5, recovery after the drift, retention on clean queries.
3. **Routing** (`run_routing`): three real classifiers of rising cost, the router learned online
   from partial feedback; quality vs cost against fixed tiers, random, the oracle; APGR (RouteLLM).

The peer is driven by `peer/learning.js` on the same streams (skipped with a note when Node.js or
the package is missing). The tests (`tests/test_learning_scenarios.py`) import these functions and
run each scenario at a small size.

Usage: `python benchmarks/bench_learning.py [--quick] [--only continual drift routing] [--no-peer]`.
Writes `benchmarks/results/learning.json`, `learning.md` (a README section) and
`learning_{continual,drift,routing}.png` (`learning_quick.*` with `--quick`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sona_jax.evaluation import (  # shared with the tests and users (`sona_jax.evaluation`)
  apgr,
  average_accuracy,
  calibration_error,
  cost_weight_sweep,
  forgetting,
  pareto_curve,
  pareto_points,
  routing_baselines,
  threshold_sweep,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _peer_module():
  """`benchmarks/_peer.py` (the peer harness), imported from this folder."""
  if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
  import _peer

  return _peer


# ----------------------------------------------------------------------------------------------
# 1. Continual learning: Split and Permuted Digits.
# ----------------------------------------------------------------------------------------------

# One output width for every setting (unused units are masked), so one compile serves them all.
N_OUT = 50
NAIVE, L2, EWC, ONLINE, EWCPP = range(5)
METHOD_NAMES = ("naive", "L2 to anchor", "EWC (offline)", "online EWC", "EWC++ (sona_jax)")


class CLData(NamedTuple):
  """One continual-learning setting as padded arrays (T tasks, S seeds).

  Attributes:
    name: e.g. "permuted/domain".
    x_tr: f32[T, S, N, 64] training inputs per task and seed (rows past `n_tr[t]` are padding).
    y_tr: i32[T, N] training labels in output-unit space.
    n_tr: i32[T] training rows per task.
    x_ev: f32[T, S, Ne, 64] evaluation inputs (validation or test).
    y_ev: i32[T, Ne] evaluation labels.
    ok_ev: bool[T, Ne] real evaluation rows.
    train_mask: bool[T, N_OUT] output units active while training task t.
    eval_mask: bool[T, T, N_OUT] output units active when the model after task l is evaluated on
      task j (`[l, j]`).
  """

  name: str
  x_tr: np.ndarray
  y_tr: np.ndarray
  n_tr: np.ndarray
  x_ev: np.ndarray
  y_ev: np.ndarray
  ok_ev: np.ndarray
  train_mask: np.ndarray
  eval_mask: np.ndarray


def digits_splits():
  """`load_digits` scaled to [0, 1], stratified 59.5 / 10.5 / 30% splits.

  Returns:
    `(x_tr, y_tr, x_val, y_val, x_te, y_te)`.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  y = y.astype(np.int32)
  x_rest, x_te, y_rest, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
  x_tr, x_val, y_tr, y_val = train_test_split(
    x_rest, y_rest, test_size=0.15, random_state=0, stratify=y_rest
  )
  return x_tr, y_tr, x_val, y_val, x_te, y_te


def _pad(rows: list[np.ndarray], n: int, axis: int = 0) -> np.ndarray:
  out = []
  for r in rows:
    width = [(0, 0)] * r.ndim
    width[axis] = (0, n - r.shape[axis])
    out.append(np.pad(r, width))
  return np.stack(out)


def make_setting(
  scenario: str, mode: str, *, n_tasks: int, n_seeds: int, split: str = "test", data=None
) -> CLData:
  """Builds a Split or Permuted Digits setting in task-, domain- or class-incremental mode.

  Split Digits: task t holds classes {2t, 2t+1} (5 tasks). Task-IL: a 10-unit output where only
  the task's two units are active (the task id is given, "multi-headed"); domain-IL: one shared
  2-unit head, label = class parity; class-IL: 10 units, active = the classes seen so far (van de
  Ven & Tolias 2019). Permuted Digits: task 0 = the original pixels, task t > 0 a fixed random
  pixel permutation per seed; domain-IL: one shared 10-way head; task-IL: a 10-unit head per task.

  Args:
    scenario: "split" or "permuted".
    mode: "task", "domain" or "class" (class only for split).
    n_tasks: tasks (split: at most 5).
    n_seeds: seeds; permutations depend on the seed.
    split: evaluate on "val" or "test".
    data: `digits_splits()` output (computed when None).
  """
  x_tr, y_tr, x_val, y_val, x_te, y_te = data if data is not None else digits_splits()
  x_ev, y_ev = (x_val, y_val) if split == "val" else (x_te, y_te)
  T, S = n_tasks, n_seeds
  tr_x, tr_y, ev_x, ev_y = [], [], [], []
  train_mask = np.zeros((T, N_OUT), bool)
  eval_mask = np.zeros((T, T, N_OUT), bool)
  if scenario == "split":
    if T > 5 or mode not in ("task", "domain", "class"):
      raise ValueError(f"split digits: n_tasks={T} (<= 5), mode={mode!r}")
    for t in range(T):
      sel_tr = (y_tr // 2) == t
      sel_ev = (y_ev // 2) == t
      tr_x.append(np.broadcast_to(x_tr[sel_tr], (S, int(sel_tr.sum()), 64)))
      ev_x.append(np.broadcast_to(x_ev[sel_ev], (S, int(sel_ev.sum()), 64)))
      lab = (lambda y: y % 2) if mode == "domain" else (lambda y: y)
      tr_y.append(lab(y_tr[sel_tr]))
      ev_y.append(lab(y_ev[sel_ev]))
      if mode == "task":
        train_mask[t, 2 * t : 2 * t + 2] = True
        eval_mask[:, t, 2 * t : 2 * t + 2] = True
      elif mode == "domain":
        train_mask[t, :2] = True
        eval_mask[:, t, :2] = True
      else:
        train_mask[t, : 2 * t + 2] = True
        eval_mask[t, :, : 2 * t + 2] = True
  elif scenario == "permuted":
    if mode not in ("task", "domain"):
      raise ValueError(f"permuted digits: mode={mode!r}; expected 'task' or 'domain'")
    for t in range(T):
      perms = [
        np.arange(64) if t == 0 else np.random.default_rng(10_000 * s + t).permutation(64)
        for s in range(S)
      ]
      tr_x.append(np.stack([x_tr[:, p] for p in perms]))
      ev_x.append(np.stack([x_ev[:, p] for p in perms]))
      off = 10 * t if mode == "task" else 0
      tr_y.append(y_tr + off)
      ev_y.append(y_ev + off)
      train_mask[t, off : off + 10] = True
      eval_mask[:, t, off : off + 10] = True
  else:
    raise ValueError(f"scenario={scenario!r}; expected 'split' or 'permuted'")
  n_tr = np.array([len(y) for y in tr_y], np.int32)
  n_ev = np.array([len(y) for y in ev_y], np.int32)
  n_max, ne_max = int(n_tr.max()), int(n_ev.max())
  return CLData(
    name=f"{scenario}/{mode}",
    x_tr=_pad(tr_x, n_max, axis=1).astype(np.float32),
    y_tr=_pad(tr_y, n_max).astype(np.int32),
    n_tr=n_tr,
    x_ev=_pad(ev_x, ne_max, axis=1).astype(np.float32),
    y_ev=_pad(ev_y, ne_max).astype(np.int32),
    ok_ev=np.arange(ne_max)[None, :] < n_ev[:, None],
    train_mask=train_mask,
    eval_mask=eval_mask,
  )


class CLRun(NamedTuple):
  """Accuracy matrices of a grid of models (M = configs x seeds)."""

  acc: np.ndarray  # f32[M, T, T]: acc[m, l, j] = accuracy on task j after training task l
  method: np.ndarray  # i32[M]
  lam: np.ndarray  # f32[M]
  alpha: np.ndarray  # f32[M]
  seed: np.ndarray  # i32[M]


@functools.cache
def _cl_fns(hidden: int, steps: int, batch: int, lr: float, fisher_samples: int, gamma: float):
  """Jitted, model-vmapped train / Fisher / evaluate functions (compiled once per shape)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from sona_jax import ewc

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(hidden)(x))
      x = nn.relu(nn.Dense(hidden)(x))
      return nn.Dense(N_OUT)(x)

  model = MLP()
  adam = optax.adam(lr)
  neg = jnp.float32(-1e9)

  def logits(p, x, mask):
    return jnp.where(mask, model.apply({"params": p}, x), neg)

  def xent(p, x, y, mask):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits(p, x, mask), y))

  def init(key):
    return model.init(key, jnp.zeros((1, 64), jnp.float32))["params"]

  @jax.jit
  def train(params, fisher, anchor, lam, seed, x, y, n, mask, key):
    """`steps` Adam steps (fresh optimiser state per task) of cross-entropy + the quadratic
    penalty `lam/2 sum F (theta - theta*)^2` (`ewc.penalty`) for every model."""

    def one(p, f, a, lam_m, s, k):
      xs = x[s]
      reg = ewc.EWCState(f, a, jnp.ones((), jnp.int32))

      def body(carry, kk):
        p, st = carry
        idx = jax.random.randint(kk, (batch,), 0, n)
        g = jax.grad(lambda q: xent(q, xs[idx], y[idx], mask) + ewc.penalty(reg, q, lam_m))(p)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
          u, st = adam.update(g, st, p)
        return (optax.apply_updates(p, u), st), None

      return jax.lax.scan(body, (p, adam.init(p)), jax.random.split(k, steps))[0][0]

    keys = jax.random.split(key, lam.shape[0])
    return jax.vmap(one)(params, fisher, anchor, lam, seed, keys)

  @jax.jit
  def consolidate(params, fisher, anchor, count, method, alpha, seed, x, y, n, mask, key):
    """End of a task: each method's new (F, theta*). The per-sample gradients of the task loss
    (`vmap(grad)`, empirical Fisher) are shared; EWC++ folds them in with `ewc.ewc_step`."""

    def one(args):
      p, f, a, c, m, al, s, k = args
      idx = jax.random.randint(k, (fisher_samples,), 0, n)
      grads = jax.vmap(
        jax.grad(lambda q, xx, yy: xent(q, xx[None], yy[None], mask)), in_axes=(None, 0, 0)
      )(p, x[s][idx], y[idx])
      f_new = jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)
      pp = ewc.ewc_step(ewc.EWCState(f, a, c), grads, p, alpha=al)

      def pick(f_old, a_old, fn, f_pp, prm):
        f_sum = f_old + fn
        # Offline EWC keeps one penalty per task, sum_k F_k (theta - theta*_k)^2; up to a constant
        # that is one quadratic with F = sum_k F_k and theta* = sum_k F_k theta*_k / sum_k F_k.
        a_off = jnp.where(f_sum > 0, (f_old * a_old + fn * prm) / jnp.maximum(f_sum, 1e-30), prm)
        f_out = jnp.select(
          [m == NAIVE, m == L2, m == EWC, m == ONLINE],
          [jnp.zeros_like(fn), jnp.ones_like(fn), f_sum, gamma * f_old + fn],
          f_pp,
        )
        a_out = jnp.where(m == EWC, a_off, prm)
        return f_out, a_out

      out = jax.tree.map(pick, f, a, f_new, pp.fisher, p)
      is_pair = lambda o: isinstance(o, tuple)  # noqa: E731
      f_out = jax.tree.map(lambda o: o[0], out, is_leaf=is_pair)
      a_out = jax.tree.map(lambda o: o[1], out, is_leaf=is_pair)
      return f_out, a_out, c + 1

    keys = jax.random.split(key, method.shape[0])
    # lax.map, not vmap: per-sample gradients of every model at once would not fit in memory.
    return jax.lax.map(one, (params, fisher, anchor, count, method, alpha, seed, keys))

  @jax.jit
  def evaluate(params, seed, x, y, ok, mask):
    def one(p, s):
      hit = jnp.argmax(logits(p, x[s], mask), axis=-1) == y
      return jnp.sum(jnp.where(ok, hit, False).astype(jnp.float32)) / jnp.sum(
        ok.astype(jnp.float32)
      )

    return jax.vmap(one)(params, seed)

  return init, train, consolidate, evaluate


def run_continual(
  train: CLData,
  evals: list[CLData],
  configs: list[tuple[int, float, float]],
  *,
  n_seeds: int,
  hidden: int = 100,
  steps: int = 400,
  batch: int = 64,
  lr: float = 1e-3,
  fisher_samples: int = 200,
  gamma: float = 1.0,
  seed: int = 0,
) -> list[CLRun]:
  """Trains every (method, lambda, alpha) config x seed on the tasks in order, all models at once.

  Args:
    train: the setting to train on (its `x_tr`, `y_tr`, masks).
    evals: settings whose evaluation split is measured after each task (e.g. val and test).
    configs: `(method, lam, alpha)` triples; `alpha` is used by EWC++ only.
    n_seeds: seeds per config (init, minibatch order, and the permutations of the data).
    hidden: MLP width (64 -> hidden -> hidden -> outputs, ReLU).
    steps: Adam steps per task, minibatch `batch`, learning rate `lr`.
    fisher_samples: training rows (with replacement) for the per-sample Fisher gradients.
    gamma: online EWC decay (Schwarz et al. 2018; 1.0 as in van de Ven & Tolias 2019).
    seed: PRNG seed of the whole run.

  Returns:
    One `CLRun` per entry of `evals`.
  """
  import jax
  import jax.numpy as jnp

  init, train_fn, consolidate, evaluate = _cl_fns(hidden, steps, batch, lr, fisher_samples, gamma)
  S = n_seeds
  C = len(configs)
  method = np.repeat([c[0] for c in configs], S).astype(np.int32)
  lam = np.repeat([c[1] for c in configs], S).astype(np.float32)
  alpha = np.repeat([c[2] for c in configs], S).astype(np.float32)
  seeds = np.tile(np.arange(S), C).astype(np.int32)
  key = jax.random.key(seed)
  p0 = jax.vmap(init)(jax.random.split(jax.random.fold_in(key, 1), S))
  params = jax.tree.map(lambda a: a[jnp.asarray(seeds)], p0)  # same init for a seed across configs
  fisher = jax.tree.map(jnp.zeros_like, params)
  anchor = params
  count = jnp.zeros((C * S,), jnp.int32)
  j_method, j_lam, j_alpha, j_seed = map(jnp.asarray, (method, lam, alpha, seeds))
  T = train.x_tr.shape[0]
  accs = [np.zeros((C * S, T, T), np.float32) for _ in evals]
  for t in range(T):
    k_train, k_fisher = jax.random.split(jax.random.fold_in(key, 100 + t))
    x, y = jnp.asarray(train.x_tr[t]), jnp.asarray(train.y_tr[t])
    n, mask = jnp.int32(train.n_tr[t]), jnp.asarray(train.train_mask[t])
    params = train_fn(params, fisher, anchor, j_lam, j_seed, x, y, n, mask, k_train)
    fisher, anchor, count = consolidate(
      params, fisher, anchor, count, j_method, j_alpha, j_seed, x, y, n, mask, k_fisher
    )
    for e, ev in enumerate(evals):
      for j in range(T):
        accs[e][:, t, j] = np.asarray(
          evaluate(
            params,
            j_seed,
            jnp.asarray(ev.x_ev[j]),
            jnp.asarray(ev.y_ev[j]),
            jnp.asarray(ev.ok_ev[j]),
            jnp.asarray(ev.eval_mask[t, j]),
          )
        )
  return [CLRun(a, method, lam, alpha, seeds) for a in accs]


CL_SETTINGS = (
  ("permuted", "domain"),
  ("permuted", "task"),
  ("split", "domain"),
  ("split", "task"),
  ("split", "class"),
)
# Lambda grids (a factor ~3 apart) around the optimum each family reached in a wider development
# sweep; the Fisher-based methods share one grid. lambda is chosen per method and setting by the
# mean validation accuracy over seeds (never on the test split).
L2_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
FISHER_GRID = (100.0, 300.0, 1000.0, 3000.0, 10_000.0)


def cl_configs(quick: bool, ewc_alpha: float) -> list[tuple[int, float, float]]:
  """The (method, lambda, alpha) grid: naive, L2, offline EWC, online EWC, EWC++ (`alpha` =
  `SonaConfig().ewc_alpha`, the library default)."""
  l2, fisher = ((0.1,), (1000.0,)) if quick else (L2_GRID, FISHER_GRID)
  out = [(NAIVE, 0.0, 0.0)]
  out += [(L2, lam, 0.0) for lam in l2]
  for m in (EWC, ONLINE, EWCPP):
    out += [(m, lam, ewc_alpha if m == EWCPP else 0.0) for lam in fisher]
  return out


def summarize_continual(val: CLRun, test: CLRun, configs, n_seeds: int) -> dict:
  """Per method: lambda picked on validation ACC, then test ACC and forgetting (mean, std over
  seeds, in points); plus every grid point for the trade-off plot."""
  S = n_seeds
  grid = []
  for i, (m, lam, alpha) in enumerate(configs):
    sl = slice(i * S, (i + 1) * S)
    acc = 100 * average_accuracy(test.acc[sl])
    fgt = 100 * forgetting(test.acc[sl])
    grid.append(
      dict(
        method=METHOD_NAMES[m],
        lam=float(lam),
        alpha=float(alpha),
        val_acc=float(100 * average_accuracy(val.acc[sl]).mean()),
        acc=float(acc.mean()),
        acc_std=float(acc.std()),
        forgetting=float(fgt.mean()),
        forgetting_std=float(fgt.std()),
        just_learned=float(100 * np.mean([np.diag(a).mean() for a in test.acc[sl]])),
      )
    )
  best = {}
  for g in grid:
    if g["method"] not in best or g["val_acc"] > best[g["method"]]["val_acc"]:
      best[g["method"]] = g
  return {"selected": [best[n] for n in METHOD_NAMES if n in best], "grid": grid}


def continual_benchmark(*, quick: bool, log=print) -> dict:
  """Section 1: every setting of `CL_SETTINGS`, every method and lambda, 5 seeds (2 with quick)."""
  import sona_jax as sona

  alpha = sona.SonaConfig(dim=8).ewc_alpha
  n_seeds = 2 if quick else 5
  data = digits_splits()
  configs = cl_configs(quick, alpha)
  hp = dict(hidden=100, batch=64, lr=1e-3, fisher_samples=200, gamma=1.0)
  out = {"n_seeds": n_seeds, "hyper": hp, "ewcpp_alpha": alpha, "settings": {}}
  for scenario, mode in CL_SETTINGS:
    n_tasks = 5 if not quick else 3
    steps = (400 if scenario == "permuted" else 150) // (4 if quick else 1)
    t0 = time.perf_counter()
    tr = make_setting(scenario, mode, n_tasks=n_tasks, n_seeds=n_seeds, split="test", data=data)
    va = make_setting(scenario, mode, n_tasks=n_tasks, n_seeds=n_seeds, split="val", data=data)
    val, test = run_continual(tr, [va, tr], configs, n_seeds=n_seeds, steps=steps, **hp)
    res = summarize_continual(val, test, configs, n_seeds)
    res.update(n_tasks=n_tasks, steps=steps, seconds=time.perf_counter() - t0)
    out["settings"][tr.name] = res
    log(f"  continual {tr.name}: {res['seconds']:.1f} s")
  return out


# ----------------------------------------------------------------------------------------------
# 2. Drift repair: retrieval over real digits with drifting queries.
# ----------------------------------------------------------------------------------------------

# Monday 2026-11-23 00:00 UTC: a stream of a few simulated hours never reaches Loop C's weekly slot.
CLOCK_START = 1_795_392_000.0
SECONDS_PER_REQUEST = 12.0  # 300 requests an hour: Loop B (hourly) every 300 requests


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


# ----------------------------------------------------------------------------------------------
# 3. Routing: three real tiers of rising cost, the router learned online from partial feedback.
# ----------------------------------------------------------------------------------------------


def routing_tiers(seed: int = 0, task: str = "digits"):
  """`(emb, correct, stream, held, costs)` of `datasets.routing_task(task, seed)`.

  digits: nearest centroid (cost 1), logistic regression (3) and an RBF SVM (10), trained on 500
  images; 900 stream images, the other 397 held out; unit PCA-32 embeddings of the standardised
  pixels (`examples/routing.py`'s tiers). breast_cancer: a decision stump, Gaussian naive Bayes
  and logistic regression (1, 3, 10) on 100 tumours; 250 stream rows, 219 held out; PCA-16.
  """
  from sona_jax import datasets

  t = datasets.routing_task(task, seed)
  return t.emb, t.correct, t.stream, t.held, t.costs


def routing_config(costs, dim: int = 32, **overrides):
  """The library defaults, with only sizes and the tier costs set."""
  import sona_jax as sona

  base = dict(
    dim=dim, graph_capacity=64, signal_capacity=4096, trajectory_capacity=256, tier_costs=costs
  )
  base.update(overrides)
  return sona.SonaConfig(**base)


def run_routing(*, seed: int = 0, n_requests: int = 2700, cfg=None, task: str = "digits") -> dict:
  """Serves `n_requests` stream images through `Sona.route` / `observe` / `tick` (Loop B hourly on
  a simulated clock, 300 requests an hour), then measures the greedy router on held-out images.

  Returns:
    A dict with the online success and cost, the held-out predicted probabilities, the threshold
    sweep, the baselines, APGR of the router and of the best random mix of tiers, and the point
    at the configured threshold.
  """
  import jax

  import sona_jax as sona

  emb, correct, stream, held, costs = routing_tiers(seed, task)
  cfg = cfg if cfg is not None else routing_config(costs, dim=emb.shape[1])
  now = [CLOCK_START]
  engine = sona.Sona(cfg, key=jax.random.key(seed), clock=lambda: now[0])
  key = jax.random.key(seed + 1)

  def held_probs(c=cfg):
    return np.stack(
      [np.asarray(sona.route(engine.state, emb[j], c, key, explore=False)[1]) for j in held]
    )

  untrained = evaluate_router(held_probs(), correct[held], costs, cfg.router_threshold)
  t0 = time.perf_counter()
  ok = np.zeros(n_requests, bool)
  served = np.zeros(n_requests, np.int32)
  runs = 0
  for i in range(n_requests):
    now[0] = CLOCK_START + SECONDS_PER_REQUEST * (i + 1)
    j = stream[i % len(stream)]
    tier = engine.route(emb[j])
    ok[i], served[i] = correct[j, tier], tier
    t = int(now[0] - engine.time_origin)
    engine.observe(
      sona.make_interaction(cfg, query=emb[j], quality=float(ok[i]), tier=tier, time=t)
    )
    rep = engine.tick()["background"]
    runs += int(rep is not None and rep.ran)
  res = evaluate_router(held_probs(), correct[held], costs, cfg.router_threshold)
  # Each part of the estimates alone: the router head (a prior of overwhelming strength) and the
  # bank's records (a prior of 0.01 pseudo-trials: a tier no nearby pattern tried keeps the head's).
  parts = {
    "head": cfg.replace(router_prior_strength=1e6),
    "bank": cfg.replace(router_prior_strength=0.01),
  }
  for name, c in parts.items():
    part = evaluate_router(held_probs(c), correct[held], costs, cfg.router_threshold)
    res[f"apgr_{name}_alone"], res[f"ece_{name}_alone"] = part["apgr"], part["ece"]
  # A reference no partial-feedback router can beat on average: every tier's outcome on every
  # stream row known (full information), success = the smoothed rate of the 20 nearest rows.
  near = np.argsort(-(emb[held] @ emb[stream].T), axis=1)[:, :20]
  full_info = (correct[stream][near].sum(1) + 1.0) / (20 + 2.0)
  ceiling = evaluate_router(full_info, correct[held], costs, cfg.router_threshold)
  res.update(
    apgr_full_information=ceiling["apgr"],
    apgr_untrained=untrained["apgr"],
    at_threshold_untrained=untrained["at_threshold"],
    seed=seed,
    task=task,
    n_requests=n_requests,
    online_success=float(ok.mean()),
    online_cost=float(np.asarray(costs)[served].mean()),
    online_tier_share=(np.bincount(served, minlength=len(costs)) / n_requests).tolist(),
    loop_b_runs=runs,
    seconds=time.perf_counter() - t0,
    stream=stream,
    held=held,
    emb=emb,
    correct=correct,
    costs=costs,
  )
  return res


def evaluate_router(probs: np.ndarray, correct: np.ndarray, costs, threshold: float) -> dict:
  """Threshold sweep, APGR, baselines and the operating point at `threshold` on held-out rows."""
  costs = np.asarray(costs, np.float64)
  q = correct.mean(0)
  pts = threshold_sweep(probs, correct, costs)
  ok = probs >= threshold
  choice = np.where(ok.any(1), np.argmax(ok, 1), np.argmax(probs, 1))
  base = routing_baselines(correct, costs)
  tiers = [(costs[i], q[i]) for i in range(len(costs))]
  args = (float(q[0]), float(q[-1]), float(costs[0]), float(costs[-1]))
  return dict(
    sweep=pts,
    pareto=pareto_points(pts),
    apgr=apgr(pts, *args),
    apgr_cost_rule=apgr(cost_weight_sweep(probs, correct, costs), *args),
    ece=calibration_error(probs, correct),
    apgr_random_mix=apgr(tiers, *args),
    apgr_oracle=apgr([base["oracle"]], *args),
    at_threshold=(
      float(costs[choice].mean()),
      float(correct[np.arange(len(choice)), choice].mean()),
    ),
    tier_share=(np.bincount(choice, minlength=len(costs)) / len(choice)).tolist(),
    baselines=base,
  )


def peer_routing(result: dict, *, threshold: float, epsilon: float, timeout=600):
  """The same routing stream fed to `@ruvector/sona` (`peer/learning.js`, mode route)."""
  _peer = _peer_module()

  n = result["n_requests"]
  stream = result["stream"][np.arange(n) % len(result["stream"])]
  payload = dict(
    mode="route",
    emb=result["emb"].tolist(),
    correct=result["correct"].astype(int).tolist(),
    stream=stream.tolist(),
    held=result["held"].tolist(),
    costs=list(result["costs"]),
    threshold=threshold,
    epsilon=epsilon,
    learnEvery=int(3600 / SECONDS_PER_REQUEST),
    patternClusters=50,
    seed=result["seed"],
  )
  out, note = _peer.run_peer_script("learning.js", payload, timeout=timeout)
  if out is None:
    return None, note
  probs = np.asarray(out["held_probs"], np.float64)
  res = evaluate_router(probs, result["correct"][result["held"]], result["costs"], threshold)
  res.update(
    online_success=out["online_success"],
    online_cost=out["online_cost"],
    online_tier_share=out["tier_share"],
    force_learn_s=out["force_learn_s"],
    patterns=out["patterns"],
  )
  return res, note


# ----------------------------------------------------------------------------------------------
# Reporting: targets, tables, plots, JSON, README section.
# ----------------------------------------------------------------------------------------------

# Published context: van de Ven & Tolias 2019, "Three scenarios for continual learning"
# (arXiv:1904.07734), and Hsu et al. 2018, "Re-evaluating continual learning scenarios"
# (arXiv:1810.12488), on split and permuted MNIST. Their figures are not copied here: they could
# not be checked against the papers offline, and MNIST with larger MLPs is not this benchmark.
ANCHOR_NOTE = (
  "Published context (van de Ven & Tolias 2019, arXiv:1904.07734; Hsu et al. 2018, "
  "arXiv:1810.12488; split and permuted MNIST with larger MLPs): the EWC family beats naive "
  "fine-tuning in task- and domain-incremental learning and fails in class-incremental "
  "learning, where every regularisation method stays near the last task's share. The pattern "
  "above is the same; the papers' figures are not copied here because they could not be "
  "checked offline."
)


def _fmt_pm(m, s):
  return f"{m:5.1f}±{s:3.1f}"


def continual_table(cl: dict) -> str:
  """ACC and forgetting (points, mean±std over seeds) per method and setting, lambda on val."""
  names = list(cl["settings"])
  head = f"{'method':<18}" + "".join(f"{n:>27}" for n in names)
  sub = f"{'':<18}" + "".join(f"{'ACC':>13} {'forget':>13}" for _ in names)
  lines = [head, sub, "-" * len(sub)]
  for i, method in enumerate(METHOD_NAMES):
    row = f"{method:<18}"
    for n in names:
      r = cl["settings"][n]["selected"][i]
      acc, fgt = _fmt_pm(r["acc"], r["acc_std"]), _fmt_pm(r["forgetting"], r["forgetting_std"])
      row += f" {acc:>12} {fgt:>13}"
    lines.append(row)
  lines.append(
    "lambda picked on validation: "
    + "; ".join(
      f"{n}: "
      + ", ".join(
        f"{r['method'].split(' ')[0]} {r['lam']:g}" for r in cl["settings"][n]["selected"][1:]
      )
      for n in names
    )
  )
  return "\n".join(lines)


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


def routing_table(routing: dict) -> str:
  """Held-out quality and cost per policy, APGR (threshold rule, and the cost rule), calibration."""
  head = f"{'policy':<40}{'success':>9}{'cost':>7}{'APGR':>8}{'APGR cost rule':>15}{'ECE':>7}"
  lines = [head, "-" * len(head)]
  for row in routing["rows"]:
    apgr_s = f"{row['apgr']:>8.3f}" if row.get("apgr") is not None else f"{'':>8}"
    cw = f"{row['apgr_cost_rule']:>15.3f}" if row.get("apgr_cost_rule") is not None else " " * 15
    ece = f"{row['ece']:>7.3f}" if row.get("ece") is not None else " " * 7
    lines.append(f"{row['name']:<40}{row['success']:>9.3f}{row['cost']:>7.2f}{apgr_s}{cw}{ece}")
  return "\n".join(lines)


def _window_means(x: np.ndarray, w: int = 100) -> list[float]:
  n = len(x) // w
  return [float(v) for v in np.asarray(x[: n * w], np.float64).reshape(n, w).mean(1)]


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


def routing_benchmark(
  *, quick: bool, seeds, peer_ok: bool, task: str = "digits", log=print
) -> dict:
  """Section 3: the learned router against fixed policies, the oracle and the peer, on `task`."""
  from sona_jax import datasets

  n_requests = 900 if quick else 2700
  ours, peer, notes = [], [], []
  cfg0 = None
  for seed in seeds:
    r = run_routing(seed=seed, n_requests=n_requests, task=task)
    ours.append(r)
    log(f"  routing {task} seed {seed}: {r['seconds']:.1f} s, {r['loop_b_runs']} Loop B cycles")
    cfg0 = cfg0 or routing_config(r["costs"], dim=r["emb"].shape[1])
    if peer_ok:
      out, note = peer_routing(r, threshold=cfg0.router_threshold, epsilon=cfg0.router_epsilon)
      notes.append(note)
      if out is not None:
        peer.append(out)
  mean = lambda xs: float(np.mean(xs))  # noqa: E731
  costs = ours[0]["costs"]
  names = datasets.routing_task(task, seeds[0]).tier_names
  rows = []
  last = len(costs) - 1
  for key, name in [
    *[
      (
        f"always tier {i}",
        f"always {n}" + (" (cheap)" if i == 0 else " (expensive)" if i == last else ""),
      )
      for i, n in enumerate(names)
    ],
    ("random (uniform)", "random tier (uniform)"),
    ("oracle", "oracle (cheapest correct tier)"),
  ]:
    rows.append(
      dict(
        name=name,
        cost=mean([r["baselines"][key][0] for r in ours]),
        success=mean([r["baselines"][key][1] for r in ours]),
        apgr=mean([r["apgr_oracle"] for r in ours]) if key == "oracle" else None,
      )
    )

  def curve(name: str, apgr_key: str, ece_key: str | None = None) -> dict:
    """A row that is a quality-for-cost curve (APGR), not one operating point."""
    row = dict(name=name, cost=float("nan"), success=float("nan"))
    row["apgr"] = mean([r[apgr_key] for r in ours])
    if ece_key is not None:
      row["ece"] = mean([r[ece_key] for r in ours])
    return row

  rows.append(curve("best random mix of tiers (curve)", "apgr_random_mix"))
  rows.append(curve("estimates: router head alone", "apgr_head_alone", "ece_head_alone"))
  rows.append(curve("estimates: bank records alone", "apgr_bank_alone", "ece_bank_alone"))
  rows.append(curve("full-information 20-NN (reference)", "apgr_full_information"))
  rows.append(
    dict(
      name="sona_jax router before learning",
      cost=mean([r["at_threshold_untrained"][0] for r in ours]),
      success=mean([r["at_threshold_untrained"][1] for r in ours]),
      apgr=mean([r["apgr_untrained"] for r in ours]),
    )
  )
  thr = cfg0.router_threshold
  for label, rs in (
    (f"sona_jax router (threshold {thr:g})", ours),
    (f"peer router ({thr:g})", peer),
  ):
    if rs:
      rows.append(
        dict(
          name=label,
          cost=mean([r["at_threshold"][0] for r in rs]),
          success=mean([r["at_threshold"][1] for r in rs]),
          apgr=mean([r["apgr"] for r in rs]),
          apgr_per_seed=[float(r["apgr"]) for r in rs],
          apgr_cost_rule=mean([r["apgr_cost_rule"] for r in rs]),
          ece=mean([r["ece"] for r in rs]),
          online_success=mean([r["online_success"] for r in rs]),
          online_cost=mean([r["online_cost"] for r in rs]),
        )
      )
  strip = lambda r: {  # noqa: E731
    k: v for k, v in r.items() if k not in ("stream", "held", "emb", "correct", "costs")
  }
  return dict(
    task=task,
    tier_names=list(names),
    n_requests=n_requests,
    seeds=list(seeds),
    costs=list(costs),
    config=cfg0.to_dict(),
    rows=rows,
    ours=[strip(r) for r in ours],
    peer=peer,
    peer_notes=notes,
    seconds=float(sum(r["seconds"] for r in ours)),
  )


def _routing_targets(routing: dict) -> list[dict]:
  """Issue 13's acceptance on one routing task: APGR >= 0.90 and >= the peer's + 0.03; held-out
  success >= 0.97 x always-expensive at <= 0.35 x its cost."""
  task = routing["task"]
  row = next(r for r in routing["rows"] if r["name"].startswith("sona_jax router ("))
  peer = next((r for r in routing["rows"] if r["name"].startswith("peer router")), None)
  top = next(r for r in routing["rows"] if r["name"].endswith("(expensive)"))
  out = [
    dict(
      name=f"{task}: router APGR >= 0.90",
      measured=f"{row['apgr']:.3f} (per seed "
      + ", ".join(f"{v:.3f}" for v in row["apgr_per_seed"])
      + f"); calibration error {row['ece']:.3f}",
      met=bool(row["apgr"] >= 0.90),
    ),
    dict(
      name=f"{task}: held-out success >= 0.97 x always-expensive at <= 0.35 x its cost",
      measured=f"success {row['success']:.3f} = {row['success'] / top['success']:.3f} x "
      f"{top['success']:.3f}, cost {row['cost']:.2f} = {row['cost'] / top['cost']:.2f} x "
      f"{top['cost']:.0f}",
      met=bool(row["success"] >= 0.97 * top["success"] and row["cost"] <= 0.35 * top["cost"]),
    ),
  ]
  if peer is not None:
    out.append(
      dict(
        name=f"{task}: router APGR >= peer's + 0.03",
        measured=(
          f"{row['apgr']:.3f} vs peer {peer['apgr']:.3f} ({row['apgr'] - peer['apgr']:+.3f})"
        ),
        met=bool(row["apgr"] >= peer["apgr"] + 0.03),
      )
    )
  return out


def targets(cl: dict | None, drift: dict | None, routing: list[dict] | None) -> list[dict]:
  """The issue's acceptance targets with the measured numbers."""
  out = []
  if cl is not None and "permuted/domain" in cl["settings"]:
    sel = {r["method"]: r for r in cl["settings"]["permuted/domain"]["selected"]}
    naive, pp = sel[METHOD_NAMES[NAIVE]], sel[METHOD_NAMES[EWCPP]]
    out.append(
      dict(
        name="EWC++ forgetting <= half of naive's, ACC >= naive + 10 (permuted digits, domain-IL)",
        measured=(
          f"forgetting {pp['forgetting']:.1f} vs naive {naive['forgetting']:.1f} "
          f"(limit {naive['forgetting'] / 2:.1f}); ACC {pp['acc']:.1f} vs naive {naive['acc']:.1f} "
          f"(+{pp['acc'] - naive['acc']:.1f}); lambda {pp['lam']:g}"
        ),
        met=bool(pp["forgetting"] <= naive["forgetting"] / 2 and pp["acc"] >= naive["acc"] + 10),
      )
    )
  if drift is not None:
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
  for r in routing or ():
    out += _routing_targets(r)
  return out


def plots(cl, drift, routing, out_dir: Path, suffix: str = "") -> list[str]:
  """Writes learning_continual.png, learning_drift.png and learning_routing.png.

  Returns:
    The paths written (none without matplotlib).
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return []
  paths = []
  if cl is not None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, setting in zip(axes, ("permuted/domain", "permuted/task"), strict=True):
      if setting not in cl["settings"]:
        continue
      grid = cl["settings"][setting]["grid"]
      for i, name in enumerate(METHOD_NAMES):
        pts = [g for g in grid if g["method"] == name]
        ax.plot(
          [g["forgetting"] for g in pts],
          [g["acc"] for g in pts],
          "o-" if len(pts) > 1 else "s",
          color=f"C{i}",
          label=name,
          ms=5,
        )
        sel = cl["settings"][setting]["selected"][i]
        ax.plot(sel["forgetting"], sel["acc"], "*", color=f"C{i}", ms=14, mec="k")
      ax.set_xlabel("forgetting (points, Chaudhry et al. 2018)")
      ax.set_ylabel("average accuracy after the last task (%)")
      ax.set_title(f"{setting} digits (points: λ grid; star: picked on val)", fontsize=10)
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = out_dir / f"learning_continual{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))
  if drift is not None:
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
    paths.append(str(path))
  if routing is not None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    r0 = routing["ours"][0]
    grid = np.linspace(routing["costs"][0], routing["costs"][-1], 400)
    base = r0["baselines"]
    tiers = [base[f"always tier {i}"] for i in range(len(routing["costs"]))]
    end = [tiers[0], tiers[-1]]
    ax.plot(grid, pareto_curve(tiers, grid), "--", color="gray", label="best random mix of tiers")
    ax.plot(grid, pareto_curve(list(r0["sweep"]) + end, grid), color="C0", label="sona_jax router")
    if routing["peer"]:
      p0 = routing["peer"][0]
      ax.plot(grid, pareto_curve(list(p0["sweep"]) + end, grid), color="C1", label="peer router")
    labels = dict(zip(base, ("nearest centroid", "logistic regression", "RBF SVM"), strict=False))
    for name, (c, q) in base.items():
      ax.plot(c, q, "ko" if name != "oracle" else "k*", ms=6 if name != "oracle" else 12)
      ax.annotate(
        labels.get(name, name), (c, q), fontsize=7, xytext=(4, -10), textcoords="offset points"
      )
    ax.plot(*r0["at_threshold"], "D", color="C0", label="sona_jax at its threshold")
    ax.set_xlabel("mean cost per request")
    ax.set_ylabel("held-out success rate")
    ax.set_title(f"Routing, data seed {routing['seeds'][0]}: quality vs cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = out_dir / f"learning_routing{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(str(path))
  return paths


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def markdown(report: dict) -> str:
  """The README-ready "Results: learning" section."""
  cl, drift, routing = report.get("continual"), report.get("drift"), report.get("routing")
  sfx = "_quick" if report["quick"] else ""
  cmd = "python benchmarks/bench_learning.py" + (" --quick" if report["quick"] else "")
  md = [
    "## Results: learning",
    "",
    f"Reproduce with `{cmd}` (fixed seeds; writes `benchmarks/results/learning{sfx}.json`, "
    f"this section as `learning{sfx}.md`, and the plots). Measured on "
    f"{report['host']['cpus']} CPUs in {report['wall_seconds'] / 60:.1f} min"
    + (", shared with other jobs" if report["host"]["load_start"] > report["host"]["cpus"] else "")
    + f"; peer `@ruvector/sona` {report.get('peer_version') or 'not run: ' + report['peer_note']}.",
    "",
    "**Targets**",
    "",
    _md_table(
      ["target", "measured", "met"],
      [[t["name"], t["measured"], "yes" if t["met"] else "**no**"] for t in report["targets"]],
    ),
    "",
  ]
  if cl is not None:
    names = list(cl["settings"])
    rows = []
    for i, method in enumerate(METHOD_NAMES):
      row = [method]
      for n in names:
        r = cl["settings"][n]["selected"][i]
        lam = "" if i == NAIVE else f" (λ {r['lam']:g})"
        row.append(f"{r['acc']:.1f} / {r['forgetting']:.1f}{lam}")
      rows.append(row)
    default = {
      n: next(
        g
        for g in cl["settings"][n]["grid"]
        if g["method"] == METHOD_NAMES[EWCPP] and g["lam"] == 100.0
      )
      for n in names
      if any(g["lam"] == 100.0 for g in cl["settings"][n]["grid"])
    }
    if default:
      rows.append(
        ["EWC++ at λ 100 (`SonaConfig.ewc_lambda`)"]
        + [f"{default[n]['acc']:.1f} / {default[n]['forgetting']:.1f}" for n in names]
      )
    hp = cl["hyper"]
    md += [
      "### 1. Forgetting: Split and Permuted Digits",
      "",
      f"An MLP (64-{hp['hidden']}-{hp['hidden']}-out, ReLU, flax) trained task after task with "
      f"Adam (lr {hp['lr']}, batch {hp['batch']}, a fresh optimiser per task) on scikit-learn's "
      "8x8 digits (59.5% train, 10.5% validation, 30% test, stratified). Split Digits: 5 tasks of "
      "two classes; Permuted Digits: 5 tasks, the original pixels then 4 fixed permutations "
      "(per seed). Task-IL: the task's own output units (multi-head); domain-IL: one shared head "
      "(split: class parity); class-IL: all classes seen so far. Every method adds "
      "`λ/2 Σ F (θ - θ*)²`: L2 with F = 1 and θ* = the last task's end; offline EWC one "
      "empirical Fisher per task (Kirkpatrick et al. 2017); online EWC a running sum "
      f"(Schwarz et al. 2018, γ = {hp['gamma']:g}); EWC++ = `sona_jax.ewc.ewc_step` (α = "
      f"{cl['ewcpp_alpha']:g}, the library default, weighting the new Fisher) and "
      "`ewc.penalty`. Fisher from per-sample gradients (`vmap(grad)`) on "
      f"{hp['fisher_samples']} training rows. λ per method and setting is picked on the "
      f"validation split from {{{', '.join(f'{v:g}' for v in L2_GRID)}}} (L2) or "
      f"{{{', '.join(f'{v:g}' for v in FISHER_GRID)}}} (Fisher methods); {cl['n_seeds']} seeds. "
      "ACC = mean test accuracy over all tasks after the last; forgetting (Chaudhry et al. 2018) "
      "= mean over tasks j < T of max_{l<T} a(l, j) - a(T, j), in points.",
      "",
      "ACC / forgetting (test, mean over seeds):",
      "",
      _md_table(["method"] + names, rows),
      "",
      f"![accuracy vs forgetting](benchmarks/results/learning_continual{sfx}.png)",
      "",
    ]
    sel = {r["method"]: r for r in cl["settings"]["permuted/domain"]["selected"]}
    nv, pp = sel[METHOD_NAMES[NAIVE]], sel[METHOD_NAMES[EWCPP]]
    dflt = default.get("permuted/domain")
    md += [
      f"On domain-incremental Permuted Digits naive fine-tuning ends at {nv['acc']:.1f}% with "
      f"{nv['forgetting']:.1f} points forgotten; EWC++ keeps {pp['acc']:.1f}% and forgets "
      f"{pp['forgetting']:.1f}. The plot shows the stability-plasticity trade-off behind λ: "
      "larger λ forgets less but learns each new permutation worse (the MLP has one shared "
      "head for five input permutations), so average accuracy peaks at a middle λ. The Fisher "
      "methods (offline EWC, online EWC, EWC++) are close to each other and well ahead of L2. "
      "As on MNIST, the EWC family helps when tasks share a head and differ in input (permuted, "
      "task- and domain-IL), helps little on Split domain-IL, and cannot help in class-IL: "
      "nothing in a quadratic penalty stops the new task's output units from taking over, so "
      "every method ends near 20% (the last task only).",
      "",
      *(
        [
          "With `SonaConfig.ewc_lambda` (100, the router's default) instead of the λ picked on "
          f"validation, EWC++ on domain-IL Permuted Digits reaches {dflt['acc']:.1f}% "
          f"(+{dflt['acc'] - nv['acc']:.1f} points over naive, of the +{pp['acc'] - nv['acc']:.1f} "
          f"at λ {pp['lam']:g}) and forgets {dflt['forgetting']:.1f} points (the target asks "
          f"<= {nv['forgetting'] / 2:.1f}): λ scales with the loss and the model, so a classifier "
          "trained with `ewc_regularize` should pick λ on held-out data as done here; for this "
          "MLP 300-1,000 works.",
          "",
        ]
        if dflt is not None
        else []
      ),
      ANCHOR_NOTE,
      "",
    ]
  if drift is not None:
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
  for task_result in (routing, report.get("routing_breast_cancer")):
    if task_result is not None:
      md += _routing_markdown(task_result, sfx)
  return "\n".join(md)


_TASK_TEXT = {
  "digits": (
    "Nearest centroid (cost 1), logistic regression (3) and an RBF SVM (10) trained on 500 digit "
    "images; {n:,} stream requests (900 images, cycled); held out: the other 397 images."
  ),
  "breast_cancer": (
    "A second task with other data and tiers, so the defaults are not tuned to the digits: "
    "`load_breast_cancer`, a decision stump (cost 1), Gaussian naive Bayes (3) and logistic "
    "regression (10) trained on 100 tumours; {n:,} stream requests (250 rows, cycled); held out: "
    "the other 219 rows. The tiers are closer (held-out success about 0.90 / 0.93 / 0.96), so "
    "APGR is noisier."
  ),
}


def _routing_markdown(routing: dict, sfx: str) -> list[str]:
  """One routing task's part of the README section."""
  task = routing["task"]
  rows = [
    [
      r["name"],
      f"{r['success']:.3f}" if _finite(r["success"]) else "",
      f"{r['cost']:.2f}" if _finite(r["cost"]) else "",
      "" if r.get("apgr") is None else f"{r['apgr']:.3f}",
      "" if r.get("apgr_cost_rule") is None else f"{r['apgr_cost_rule']:.3f}",
      "" if r.get("ece") is None else f"{r['ece']:.3f}",
    ]
    for r in routing["rows"]
  ]
  ours = next(r for r in routing["rows"] if r["name"].startswith("sona_jax router ("))
  peer = next((r for r in routing["rows"] if r["name"].startswith("peer router")), None)
  mix = next(r for r in routing["rows"] if r["name"].startswith("best random mix"))
  top = next(r for r in routing["rows"] if r["name"].endswith("(expensive)"))
  untrained = next(r for r in routing["rows"] if r["name"].endswith("before learning"))
  ceiling = next(r for r in routing["rows"] if r["name"].startswith("full-information"))
  md = [
    f"### 3. Routing: three real tiers ({task})",
    "",
    _TASK_TEXT[task].format(n=routing["n_requests"])
    + " Requests are routed by `Sona.route` (library defaults except sizes and tier costs: "
    "per-tier success estimates from the ReasoningBank's nearest patterns shrunk toward the "
    "FastGRNN head, the threshold rule, Thompson sampling), only the served tier's outcome is "
    "observed (`Sona.observe`, quality 1 if right), Loop B runs hourly at 300 requests an hour. "
    "Held-out: greedy decisions on the estimates. APGR (RouteLLM, Ong et al. 2024): PGR(c) = "
    "(q(c) - q_cheap) / (q_expensive - q_cheap) averaged over 1,001 cost budgets from the cheap "
    "tier's cost to the expensive one's; q(c) is the best held-out success reachable at mean "
    "cost <= c by the rule at any threshold (or, in the next column, any cost weight of "
    "`argmax p - w c`) or a random mix of two (`sona_jax.evaluation`). ECE: expected calibration "
    "error of the held-out estimates over all tiers (10 bins). The peer: one engine per tier "
    "holding that tier's served requests; estimate = the success rate of the nearest pattern "
    "(`findPatterns(q, 1)`), decided by the same rule. Means over data seeds "
    f"{routing['seeds']}.",
    "",
    _md_table(
      ["policy (held-out)", "success", "mean cost", "APGR", "APGR (cost rule)", "ECE"], rows
    ),
    "",
  ]
  if task == "digits":
    md += [f"![routing](benchmarks/results/learning_routing{sfx}.png)", ""]
  md += [
    f"The router recovers {100 * ours['apgr']:.0f}% of the quality gap on average over cost "
    f"budgets (per seed: " + ", ".join(f"{v:.3f}" for v in ours["apgr_per_seed"]) + "; the "
    f"best non-contextual mix of tiers: {100 * mix['apgr']:.0f}%, the same router before "
    f"learning: {100 * untrained['apgr']:.0f}%); at its default threshold it serves at "
    f"{ours['cost']:.2f} per request ({ours['cost'] / top['cost']:.2f} x always-expensive) with "
    f"success {ours['success']:.3f} ({ours['success'] / top['success']:.3f} x "
    f"{top['success']:.3f}); calibration error {ours['ece']:.3f}. For scale: estimates from the "
    "20 nearest stream rows with every tier's outcome known (full information, which a router "
    f"that only sees the served tier never has) reach APGR {ceiling['apgr']:.3f}.",
    "",
  ]
  if peer is not None:
    md += [
      f"The peer's per-tier pattern lookup scores APGR {peer['apgr']:.3f} (per seed: "
      + ", ".join(f"{v:.3f}" for v in peer["apgr_per_seed"])
      + f"; {ours['apgr'] - peer['apgr']:+.3f} for sona_jax), calibration error "
      f"{peer['ece']:.3f}; at the same threshold it serves at {peer['cost']:.2f} with success "
      f"{peer['success']:.3f}.",
      "",
    ]
  return md


def _finite(x) -> bool:
  return x is not None and bool(np.isfinite(x))


def _at(arm: dict, n: int) -> float:
  return next((c["drift"] for c in arm["curve"] if c["n"] == n), float("nan"))


def _json_default(v):
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, np.integer | np.bool_):
    return v.item()
  if isinstance(v, np.floating):
    return None if not np.isfinite(v) else float(v)
  raise TypeError(type(v).__name__)


def _clean(obj):
  """Drops non-JSON payloads (tasks, raw streams) and NaNs from the report."""
  if isinstance(obj, dict):
    return {
      k: _clean(v)
      for k, v in obj.items()
      if k
      not in ("task", "stream_x", "stream_y", "prequential", "prequential_frozen", "held", "sweep")
    }
  if isinstance(obj, list | tuple):
    return [_clean(v) for v in obj]
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small sizes, 2 seeds (about 2 minutes)")
  p.add_argument(
    "--only", nargs="+", choices=("continual", "drift", "routing"), help="run only these parts"
  )
  p.add_argument("--no-peer", action="store_true", help="skip @ruvector/sona")
  p.add_argument("--no-install", action="store_true", help="never npm-install the peer")
  p.add_argument("--out", default=str(RESULTS), help="output folder")
  a = p.parse_args(argv)
  parts = set(a.only or ("continual", "drift", "routing"))
  out_dir = Path(a.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  load_start = os.getloadavg()[0]

  _peer = _peer_module()

  peer_ok, peer_note = (False, "skipped (--no-peer)")
  if not a.no_peer:
    peer_ok, peer_note = _peer.ensure_peer(install=not a.no_install)
  print(f"peer: {'@ruvector/sona ' + peer_note if peer_ok else 'not run: ' + peer_note}")
  seeds = [0] if a.quick else [0, 1, 2]
  cl = continual_benchmark(quick=a.quick) if "continual" in parts else None
  drift = drift_benchmark(quick=a.quick, seeds=seeds, peer_ok=peer_ok) if "drift" in parts else None
  routing, routing_other = None, None
  if "routing" in parts:
    routing = routing_benchmark(quick=a.quick, seeds=seeds, peer_ok=peer_ok, task="digits")
    routing_other = routing_benchmark(
      quick=a.quick, seeds=seeds, peer_ok=peer_ok, task="breast_cancer"
    )
  report = dict(
    quick=a.quick,
    peer_version=peer_note if peer_ok else None,
    peer_note=peer_note,
    host=dict(
      platform=platform.platform(),
      python=platform.python_version(),
      cpus=os.cpu_count(),
      load_start=load_start,
      load_end=os.getloadavg()[0],
    ),
    continual=cl,
    drift=drift,
    routing=routing,
    routing_breast_cancer=routing_other,
  )
  report["targets"] = targets(cl, drift, [r for r in (routing, routing_other) if r is not None])
  report["wall_seconds"] = time.perf_counter() - t0
  suffix = "_quick" if a.quick else ""
  report["plots"] = plots(cl, drift, routing, out_dir, suffix)
  if cl is not None:
    print("\n1. Continual learning: ACC / forgetting (points, test, mean±std over seeds)")
    print(continual_table(cl))
  if drift is not None:
    print(f"\n2. Drift repair: held-out precision@5 (means over seeds {drift['seeds']})")
    print(drift_table(drift))
  for r in (routing, routing_other):
    if r is not None:
      print(f"\n3. Routing, {r['task']}: held-out (means over seeds {r['seeds']})")
      print(routing_table(r))
  print("\nTargets:")
  for t in report["targets"]:
    print(f"  [{'met' if t['met'] else 'MISSED'}] {t['name']}: {t['measured']}")
  path = out_dir / f"learning{suffix}.json"
  path.write_text(json.dumps(_clean(report), indent=1, default=_json_default))
  (out_dir / f"learning{suffix}.md").write_text(markdown(report) + "\n")
  print(f"\nwrote {path}, {out_dir / f'learning{suffix}.md'}, plots: {', '.join(report['plots'])}")
  print(f"wall time {report['wall_seconds']:.0f} s (load average at start {load_start:.1f})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
