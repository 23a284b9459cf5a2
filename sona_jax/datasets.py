"""Real-data streams for demos, tests and benchmarks, built from data that scikit-learn ships.

Nothing is downloaded: `load_digits` (1,797 8x8 images, 10 classes) and `load_breast_cancer` are
inside scikit-learn.

`digits_drift` builds the retrieval-drift scenario of docs/design.md ("Micro-LoRA step"): PCA
embeddings of the digits, split into a memory (the retrieval corpus, with labels) and a query
stream whose embeddings are shifted along one fixed direction, as when an upstream encoder or the
traffic drifts. A retrieved memory is relevant when it has the query's label.
`retrieval_interaction` turns one retrieval into the feedback a production system would log:
memories judged useful (`used`), retrieved but not useful (`unused`), and a quality score (the
precision of the retrieval).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sona_jax.config import SonaConfig
from sona_jax.types import Interaction, make_interaction

__all__ = [
  "DriftTask",
  "StreamResult",
  "digits_drift",
  "DIGITS_TIER_NAMES",
  "DIGITS_TIER_COSTS",
  "digits_tiers",
  "RoutingTask",
  "routing_task",
  "ROUTING_TASKS",
  "top_k_cosine",
  "precision_at_k",
  "retrieval_interaction",
  "run_drift_stream",
]


class DriftTask(NamedTuple):
  """A retrieval task with drifted queries (NumPy arrays).

  Attributes:
    memories: f32[m, dim] unit-norm memory embeddings.
    memory_labels: i32[m] class of each memory.
    queries: f32[n, dim] drifted query embeddings (the stream).
    clean_queries: f32[n, dim] the same queries before the drift.
    query_labels: i32[n] class of each query.
    direction: f32[dim] unit drift direction.
    memory_index: i32[m] index of each memory in `load_digits`.
    query_index: i32[n] index of each query in `load_digits`.
  """

  memories: np.ndarray
  memory_labels: np.ndarray
  queries: np.ndarray
  clean_queries: np.ndarray
  query_labels: np.ndarray
  direction: np.ndarray
  memory_index: np.ndarray
  query_index: np.ndarray


def digits_drift(
  *, seed: int = 0, dim: int = 32, n_memories: int = 600, drift: float = 1.0
) -> DriftTask:
  """The `load_digits` retrieval-drift task.

  Embeddings: standardised pixels -> PCA(`dim`, fitted on the memories) -> unit norm. Queries are
  the remaining images, shifted by `drift` times a fixed random unit direction (then left
  unnormalised: cosine retrieval normalises).

  Args:
    seed: split and drift-direction seed.
    dim: embedding width (PCA components, <= 64).
    n_memories: number of images in the memory; the rest are queries.
    drift: length of the shift relative to the unit-norm clean embedding.
  """
  from sklearn.datasets import load_digits
  from sklearn.decomposition import PCA
  from sklearn.preprocessing import StandardScaler

  if not 1 <= dim <= 64:
    raise ValueError(f"digits_drift: dim={dim} must be in [1, 64]")
  x, y = load_digits(return_X_y=True)
  if not 10 <= n_memories <= len(x) - 10:
    raise ValueError(f"digits_drift: n_memories={n_memories} must be in [10, {len(x) - 10}]")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(x))
  mem_idx, q_idx = perm[:n_memories], perm[n_memories:]
  scaler = StandardScaler().fit(x[mem_idx])
  pca = PCA(n_components=dim, random_state=seed).fit(scaler.transform(x[mem_idx]))
  emb = pca.transform(scaler.transform(x)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  direction = rng.normal(size=dim).astype(np.float32)
  direction /= np.linalg.norm(direction)
  clean = emb[q_idx]
  return DriftTask(
    memories=emb[mem_idx],
    memory_labels=y[mem_idx].astype(np.int32),
    queries=(clean + drift * direction[None, :]).astype(np.float32),
    clean_queries=clean,
    query_labels=y[q_idx].astype(np.int32),
    direction=direction,
    memory_index=mem_idx.astype(np.int32),
    query_index=q_idx.astype(np.int32),
  )


DIGITS_TIER_NAMES = ("nearest centroid", "logistic regression", "RBF SVM")
DIGITS_TIER_COSTS = (1.0, 3.0, 10.0)


def digits_tiers(fit_index) -> np.ndarray:
  """Three real model tiers of rising cost on `load_digits`, and where each one is right.

  Nearest centroid, logistic regression (C 0.05) and an RBF SVM (C 3), all trained on the
  standardised pixels of the images `fit_index` (the scaler too); costs `DIGITS_TIER_COSTS`.

  Args:
    fit_index: indices into `load_digits` of the training images.

  Returns:
    bool[1797, 3]: whether each tier predicts each image's label.
  """
  import warnings

  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import NearestCentroid
  from sklearn.preprocessing import StandardScaler
  from sklearn.svm import SVC

  x, y = load_digits(return_X_y=True)
  fit = np.asarray(fit_index)
  z = StandardScaler().fit(x[fit]).transform(x)
  with warnings.catch_warnings():  # NearestCentroid warns about the digits' constant pixels
    warnings.simplefilter("ignore", UserWarning)
    models = [
      NearestCentroid().fit(z[fit], y[fit]),
      LogisticRegression(max_iter=300, C=0.05).fit(z[fit], y[fit]),
      SVC(C=3.0, gamma="scale").fit(z[fit], y[fit]),
    ]
  return np.stack([m.predict(z) == y for m in models], axis=1)


class RoutingTask(NamedTuple):
  """A routing stream over real model tiers of rising cost (`routing_task`).

  Attributes:
    name: the task's name (`ROUTING_TASKS`).
    emb: f32[n, d] unit-norm embeddings (PCA of the standardised features, fitted on the training
      rows).
    correct: bool[n, T] whether each tier predicts each row's label.
    stream: i64[s] rows served online (cycled for longer streams).
    held: i64[h] rows never served: the held-out evaluation.
    costs: tuple[float, ...] tier costs, increasing.
    tier_names: tuple[str, ...] the tiers' models.
  """

  name: str
  emb: np.ndarray
  correct: np.ndarray
  stream: np.ndarray
  held: np.ndarray
  costs: tuple[float, ...]
  tier_names: tuple[str, ...]


ROUTING_TASKS = ("digits", "breast_cancer")


def routing_task(name: str = "digits", seed: int = 0) -> RoutingTask:
  """A routing task on data scikit-learn ships; `seed` draws the split.

  - `"digits"` (`load_digits`, 1,797 images): `digits_tiers` (nearest centroid, logistic
    regression, RBF SVM; costs 1, 3, 10) trained on 500 images, 900 stream images, 397 held out;
    unit PCA-32 embeddings.
  - `"breast_cancer"` (`load_breast_cancer`, 569 tumours, 30 features): a depth-1 decision stump,
    Gaussian naive Bayes and logistic regression (C 0.1; costs 1, 3, 10), trained on 100 rows,
    250 stream rows, 219 held out; unit PCA-16 embeddings. Other data, other tiers, a smaller gap
    between the tiers (held-out success about 0.90 / 0.93 / 0.96): a check that routing defaults
    are not tuned to the digits.

  Raises:
    ValueError: an unknown name.
  """
  from sklearn.decomposition import PCA
  from sklearn.preprocessing import StandardScaler

  if name == "digits":
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    sizes, width = (500, 900), 32
    costs, names = DIGITS_TIER_COSTS, DIGITS_TIER_NAMES
  elif name == "breast_cancer":
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    sizes, width = (100, 250), 16
    costs = (1.0, 3.0, 10.0)
    names = ("decision stump", "Gaussian naive Bayes", "logistic regression")
  else:
    raise ValueError(f"routing_task: unknown task {name!r}; expected one of {ROUTING_TASKS}")
  perm = np.random.default_rng(seed).permutation(len(x))
  fit, stream, held = perm[: sizes[0]], perm[sizes[0] : sum(sizes)], perm[sum(sizes) :]
  z = StandardScaler().fit(x[fit]).transform(x)
  if name == "digits":
    correct = digits_tiers(fit)
  else:
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB
    from sklearn.tree import DecisionTreeClassifier

    models = [
      DecisionTreeClassifier(max_depth=1, random_state=0),
      GaussianNB(),
      LogisticRegression(C=0.1, max_iter=1000),
    ]
    correct = np.stack([m.fit(z[fit], y[fit]).predict(z) == y for m in models], axis=1)
  emb = PCA(width, random_state=0).fit(z[fit]).transform(z).astype(np.float32)
  emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  return RoutingTask(name, emb, correct, stream, held, tuple(costs), tuple(names))


def top_k_cosine(queries: np.ndarray, memories: np.ndarray, k: int) -> np.ndarray:
  """Indices `[n, k]` of the `k` memories most cosine-similar to each query (best first)."""
  q = np.atleast_2d(queries)
  q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  m = memories / np.maximum(np.linalg.norm(memories, axis=-1, keepdims=True), 1e-12)
  sims = q @ m.T
  idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(sims, idx, axis=1), axis=1)
  return np.take_along_axis(idx, order, axis=1)


def precision_at_k(
  queries: np.ndarray, labels: np.ndarray, memories: np.ndarray, memory_labels: np.ndarray, k: int
) -> float:
  """Mean fraction of the top-`k` memories that share the query's label."""
  idx = top_k_cosine(queries, memories, k)
  return float(np.mean(memory_labels[idx] == np.asarray(labels)[:, None]))


def retrieval_interaction(
  cfg: SonaConfig,
  query: np.ndarray,
  retrieved: np.ndarray,
  relevant: np.ndarray,
  *,
  time: int = 0,
  tier: int = 0,
  latency_ms: float = 0.0,
) -> Interaction:
  """The feedback of one retrieval: used = relevant retrieved memories, unused = the others.

  Args:
    cfg: the config (`max_ids` bounds both lists: the first `max_ids` of each are kept).
    query: f32[dim] the *unadapted* query embedding (the input of the adapted layer).
    retrieved: i32[k] memory node ids, best first.
    relevant: bool[k] whether each retrieved memory was useful.
    time: seconds since the origin.
    tier: model tier that served.
    latency_ms: observed latency.

  Returns:
    An `Interaction` with quality = precision of the retrieval, anchor = the top memory.
  """
  retrieved = np.asarray(retrieved)
  relevant = np.asarray(relevant, bool)
  used = retrieved[relevant][: cfg.max_ids]
  unused = retrieved[~relevant][: cfg.max_ids]
  return make_interaction(
    cfg,
    query=np.asarray(query, np.float32),
    quality=float(np.mean(relevant)) if relevant.size else 0.0,
    anchor=int(retrieved[0]) if retrieved.size else -1,
    used=used.astype(np.int32),
    unused=unused.astype(np.int32),
    tier=tier,
    latency_ms=latency_ms,
    time=time,
  )


class StreamResult(NamedTuple):
  """What `run_drift_stream` measured (precision@k values are fractions in [0, 1])."""

  prequential: np.ndarray  # f32[n]: precision@k of each request, before learning from it
  frozen: float  # held-out precision@k of the unadapted queries
  adapted: float  # held-out precision@k of the adapted queries after the stream
  clean: float  # held-out precision@k of the queries before the drift (the ceiling)
  accepted: int  # interactions Loop A accepted


def run_drift_stream(
  engine,
  task: DriftTask,
  node_ids: np.ndarray,
  *,
  n_requests: int = 1000,
  k: int = 5,
  n_heldout: int = 300,
  seed: int = 0,
) -> StreamResult:
  """Serves `n_requests` drifted queries through `engine` with feedback-mode Loop A learning.

  Each request: adapt the query (`engine.adapt`), retrieve the top-`k` memories by cosine, judge
  them (a memory is useful when it has the query's label), report the feedback
  (`engine.observe`). Precision is measured on the stream before each update (prequential) and on
  `n_heldout` queries that the stream never shows, before and after.

  Args:
    engine: a `Sona` driver holding `task.memories` as memory nodes.
    task: the drift task.
    node_ids: i32[m] the node id of each of `task.memories` (what `engine.add_memories` returned).
    n_requests: stream length (queries are cycled if it exceeds the training split).
    k: retrieval depth.
    n_heldout: queries kept out of the stream for the before/after measurement.
    seed: order of the stream.
  """
  import jax.numpy as jnp

  cfg = engine.cfg
  n = len(task.queries)
  if not 0 < n_heldout < n:
    raise ValueError(f"run_drift_stream: n_heldout={n_heldout} must be in (0, {n})")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  held, train = perm[:n_heldout], perm[n_heldout:]
  node_ids = np.asarray(node_ids)
  mem = task.memories

  def heldout(queries):
    return precision_at_k(queries, task.query_labels[held], mem, task.memory_labels, k)

  frozen = heldout(task.queries[held])
  clean = heldout(task.clean_queries[held])
  preq = np.empty(n_requests, np.float32)
  accepted = 0
  for i in range(n_requests):
    qi = train[i % len(train)]
    x = task.queries[qi]
    y = np.asarray(engine.adapt(x))
    top = top_k_cosine(y, mem, k)[0]
    relevant = task.memory_labels[top] == task.query_labels[qi]
    preq[i] = relevant.mean()
    report = engine.observe(retrieval_interaction(cfg, x, node_ids[top], relevant, time=i))
    accepted += int(bool(report.accepted))
  adapted = heldout(np.asarray(engine.adapt(jnp.asarray(task.queries[held]))))
  return StreamResult(preq, frozen, adapted, clean, accepted)
