"""Tests of `sona_jax.router` (docs/design.md, "Routing"): FastGRNN (Kusupati et al. 2018) against a
NumPy float64 reference, the routing rule, the partial-feedback step, and learning on scikit-learn
digits.

Optimisers are `optax.sgd` / `optax.rmsprop`: `optax.adam`'s bias correction computes
`float ** int32`, which the strict dtype promotion of `conftest.py` rejects.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sona_jax import router as rt

N_FEATURES, HIDDEN, N_TIERS = 5, 8, 3


def _f64(x):
  return np.asarray(x, dtype=np.float64)


def _perturb(params, key, scale=0.5):
  """Adds noise to every parameter, so biases, zeta and nu are not at their trivial inits."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noisy = [
    leaf + scale * jax.random.normal(k, leaf.shape, jnp.float32)
    for leaf, k in zip(leaves, keys, strict=True)
  ]
  return jax.tree.unflatten(treedef, noisy)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _reference_fastgrnn(cell, x_seq):
  """Kusupati et al. 2018, eqs. 3-4, in NumPy float64 from `h_0 = 0` (row-vector layout)."""
  c = {k: _f64(v) for k, v in cell.items()}
  w = c["W"] if "W" in c else c["W1"] @ c["W2"]
  u = c["U"] if "U" in c else c["U1"] @ c["U2"]
  h = np.zeros(w.shape[1])
  for x_t in _f64(x_seq):
    pre = x_t @ w + h @ u
    z = _sigmoid(pre + c["b_z"])
    h_tilde = np.tanh(pre + c["b_h"])
    h = z * h + (_sigmoid(c["zeta"]) * (1.0 - z) + _sigmoid(c["nu"])) * h_tilde
  return h


# 1. The FastGRNN cell against NumPy float64.


@pytest.mark.parametrize("w_rank,u_rank", [(None, None), (2, 3)])
def test_fastgrnn_matches_numpy_reference(w_rank, u_rank):
  k_init, k_noise, k_x = jax.random.split(jax.random.key(1), 3)
  module = rt.FastGRNN(HIDDEN, w_rank, u_rank)
  x_seq = jax.random.normal(k_x, (3, N_FEATURES), jnp.float32)
  params = module.init(k_init, x_seq)["params"]
  np.testing.assert_allclose(_f64(params["zeta"]), 1.0)
  np.testing.assert_allclose(_f64(params["nu"]), -4.0)
  low_rank_names = {"W1", "W2"} if w_rank else {"W"}
  low_rank_names |= {"U1", "U2"} if u_rank else {"U"}
  assert low_rank_names <= set(params)
  params = _perturb(params, k_noise)
  h = jax.jit(module.apply)({"params": params}, x_seq)
  assert h.shape == (HIDDEN,) and h.dtype == jnp.float32
  np.testing.assert_allclose(_f64(h), _reference_fastgrnn(params, x_seq), atol=1e-5, rtol=1e-5)
  if w_rank:
    # The factorised module equals the dense one with W = W1 W2, U = U1 U2.
    dense = {k: v for k, v in params.items() if k not in ("W1", "W2", "U1", "U2")}
    dense["W"] = params["W1"] @ params["W2"]
    dense["U"] = params["U1"] @ params["U2"]
    assert dense["W"].shape == (N_FEATURES, HIDDEN) and dense["U"].shape == (HIDDEN, HIDDEN)
    h_dense = rt.FastGRNN(HIDDEN).apply({"params": dense}, x_seq)
    np.testing.assert_allclose(_f64(h), _f64(h_dense), atol=1e-5, rtol=1e-5)


def test_router_batch_is_vmap_of_single():
  state = rt.init_router(jax.random.key(2), N_FEATURES, N_TIERS, optax.sgd(0.1), hidden=HIDDEN)
  apply_fn = rt.router_apply_fn(N_TIERS, hidden=HIDDEN)
  x = jax.random.normal(jax.random.key(3), (4, 2, N_FEATURES), jnp.float32)
  probs = rt.predict(state.params, apply_fn, x)
  assert probs.shape == (4, N_TIERS)
  for i in range(4):
    np.testing.assert_allclose(probs[i], rt.predict(state.params, apply_fn, x[i]), rtol=1e-6)


def test_router_features_layout():
  feats = rt.router_features(
    jnp.array([0.5, -1.0], jnp.float32), 99, 10.0, jnp.array([0.2, jnp.nan, 0.9], jnp.float32)
  )
  np.testing.assert_allclose(_f64(feats), [0.5, -1.0, np.log(100.0), 4.0, 0.2, 0.5, 0.9], 1e-6)


# 2. The routing rule.

_route = jax.jit(rt.route)
_COSTS = jnp.array([1.0, 3.0, 10.0], jnp.float32)


def test_route_picks_cheapest_above_threshold_else_most_likely():
  key = jax.random.key(4)
  assert int(_route(jnp.array([0.9, 0.95, 0.99]), _COSTS, 0.8, key, 0.0)) == 0
  assert int(_route(jnp.array([0.5, 0.85, 0.99]), _COSTS, 0.8, key, 0.0)) == 1
  # Costs need not be sorted by index: tier 2 is the cheapest here.
  costs = jnp.array([5.0, 3.0, 1.0], jnp.float32)
  assert int(_route(jnp.array([0.9, 0.95, 0.81]), costs, 0.8, key, 0.0)) == 2
  # None clears the threshold: the most likely.
  assert int(_route(jnp.array([0.3, 0.6, 0.4]), _COSTS, 0.8, key, 0.0)) == 1
  assert int(_route(jnp.array([0.3, jnp.nan, 0.4]), _COSTS, 0.8, key, 0.0)) == 2


def test_route_exploration():
  keys = jax.random.split(jax.random.key(5), 3000)
  probs = jnp.array([0.5, 0.95, 0.99], jnp.float32)
  batched = jax.jit(jax.vmap(rt.route, in_axes=(None, None, None, 0, None)))
  greedy = np.asarray(batched(probs, _COSTS, 0.8, keys, 0.0))
  assert (greedy == 1).all()
  explored = np.asarray(batched(probs, _COSTS, 0.8, keys, 1.0))
  freq = np.bincount(explored, minlength=N_TIERS) / len(keys)
  np.testing.assert_allclose(freq, 1.0 / 3.0, atol=0.04)  # ~7 standard errors
  partial = np.asarray(batched(probs, _COSTS, 0.8, keys, 0.3))
  # Greedy 70% of the time, plus a third of the 30% explored.
  np.testing.assert_allclose(np.mean(partial == 1), 0.8, atol=0.04)


# 3. The partial-feedback step.


def test_router_step_leaves_unserved_head_rows_untouched():
  opt = optax.sgd(0.5)
  state = rt.init_router(jax.random.key(6), N_FEATURES, N_TIERS, opt, hidden=HIDDEN)
  apply_fn = rt.router_apply_fn(N_TIERS, hidden=HIDDEN)
  x = jax.random.normal(jax.random.key(7), (6, 2, N_FEATURES), jnp.float32)
  # Only tier 0 served; the padded rows name other tiers and carry NaNs, and must not matter.
  x = x.at[4:].set(jnp.nan)
  tier = jnp.array([0, 0, 0, 0, 2, 1], jnp.int32)
  success = jnp.array([1.0, 0.0, 1.0, 1.0, jnp.nan, 1.0], jnp.float32)
  mask = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], jnp.float32)
  new, loss = jax.jit(rt.router_step, static_argnums=(1, 2))(
    state, apply_fn, opt, x, tier, success, mask
  )
  assert np.isfinite(float(loss))
  old_head, new_head = state.params["head"], new.params["head"]
  np.testing.assert_array_equal(new_head["kernel"][:, 1:], old_head["kernel"][:, 1:])
  np.testing.assert_array_equal(new_head["bias"][1:], old_head["bias"][1:])
  assert not np.allclose(new_head["kernel"][:, 0], old_head["kernel"][:, 0])
  assert not np.allclose(new_head["bias"][0], old_head["bias"][0])
  # The loss is the mean BCE of the served logit over the valid rows only.
  logits = jax.vmap(apply_fn, in_axes=(None, 0))(state.params, x[:4])
  expected = optax.sigmoid_binary_cross_entropy(logits[:, 0], success[:4]).mean()
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def _separable_problem(key, batch):
  k_x, k_w, k_t = jax.random.split(key, 3)
  x = jax.random.normal(k_x, (batch, 1, N_FEATURES), jnp.float32)
  w = jax.random.normal(k_w, (N_FEATURES, N_TIERS), jnp.float32)
  tier = jax.random.randint(k_t, (batch,), 0, N_TIERS, jnp.int32)
  outcome = (x[:, 0, :] @ w > 0).astype(jnp.float32)  # [batch, n_tiers]
  success = jnp.take_along_axis(outcome, tier[:, None], axis=1)[:, 0]
  return x, tier, success


def test_router_step_learns_separable_problem():
  opt = optax.rmsprop(1e-2)
  apply_fn = rt.router_apply_fn(N_TIERS, hidden=HIDDEN)
  state = rt.init_router(jax.random.key(8), N_FEATURES, N_TIERS, opt, hidden=HIDDEN)
  x, tier, success = _separable_problem(jax.random.key(9), 256)
  mask = jnp.ones((256,), jnp.float32)

  @jax.jit
  def train(state):
    def body(s, _):
      return rt.router_step(s, apply_fn, opt, x, tier, success, mask)

    return jax.lax.scan(body, state, None, length=200)

  _, losses = train(state)
  losses = np.asarray(losses)
  print(f"separable: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[-1] < 0.5 * losses[0]


# 4. Learning from partial feedback on scikit-learn digits.


def test_router_learns_tier_success_on_digits():
  from sklearn.cluster import KMeans
  from sklearn.datasets import load_digits
  from sklearn.decomposition import PCA
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score

  images, labels = load_digits(return_X_y=True)
  images = images / 16.0
  perm = np.random.default_rng(0).permutation(len(images))
  fit, stream, held = perm[:600], perm[600:1400], perm[1400:]
  z = PCA(16, whiten=True, random_state=0).fit(images[fit]).transform(images)

  def nearest_centroid(dims):
    cents = np.stack([z[fit][labels[fit] == k, :dims].mean(0) for k in range(10)])
    return ((z[:, None, :dims] - cents[None]) ** 2).sum(-1).argmin(1)

  # Three tiers of rising quality (and cost): success = that tier labels the image correctly.
  logreg = LogisticRegression(max_iter=2000).fit(images[fit], labels[fit])
  preds = [nearest_centroid(2), nearest_centroid(16), logreg.predict(images)]
  succ = np.stack([p == labels for p in preds], 1).astype(np.float32)  # [n, 3]
  # The "nearest pattern": a k-means cluster of the fit split, with its per-tier success rates.
  km = KMeans(8, n_init=3, random_state=0).fit(z[fit])
  cluster_rates = np.stack([succ[fit][km.labels_ == k].mean(0) for k in range(8)])
  rates = cluster_rates[km.predict(z)].astype(np.float32)
  feats = rt.router_features(
    z.astype(np.float32),
    64.0 * images.sum(1).astype(np.float32),  # ink as a stand-in for context length
    np.ones(len(images), np.float32),
    rates,
  )

  opt = optax.rmsprop(1e-2)
  apply_fn = rt.router_apply_fn(N_TIERS, hidden=16)
  state = rt.init_router(jax.random.key(10), feats.shape[1], N_TIERS, opt, hidden=16)
  feats_stream, succ_stream = feats[stream], jnp.asarray(succ[stream])
  batch, steps, threshold, epsilon = 32, 300, 0.8, 0.2
  route_batch = jax.vmap(rt.route, in_axes=(0, None, None, 0, None))

  def body(carry, key):
    state, served = carry
    k_idx, k_route = jax.random.split(key)
    idx = jax.random.randint(k_idx, (batch,), 0, feats_stream.shape[0])
    x = feats_stream[idx][:, None, :]  # T = 1
    probs = rt.predict(state.params, apply_fn, x)
    tier = route_batch(probs, _COSTS, threshold, jax.random.split(k_route, batch), epsilon)
    observed = succ_stream[idx, tier]  # only the served tier's outcome is seen
    state, loss = rt.router_step(
      state, apply_fn, opt, x, tier, observed, jnp.ones((batch,), jnp.float32)
    )
    return (state, served + jax.nn.one_hot(tier, N_TIERS, dtype=jnp.int32).sum(0)), loss

  train = jax.jit(lambda s, k: jax.lax.scan(body, s, jax.random.split(k, steps)))
  (state, served), losses = train((state, jnp.zeros((N_TIERS,), jnp.int32)), jax.random.key(11))

  probs_held = np.asarray(rt.predict(state.params, apply_fn, feats[held][:, None, :]))
  aucs = [roc_auc_score(succ[held][:, t], probs_held[:, t]) for t in range(N_TIERS)]
  rate_auc0 = roc_auc_score(succ[held][:, 0], rates[held][:, 0])
  acc0 = np.mean((probs_held[:, 0] >= 0.5) == (succ[held][:, 0] > 0.5))
  print(
    f"digits: tier accuracy {succ[held].mean(0).round(3)}, served {np.asarray(served)}, "
    f"loss {float(losses[:10].mean()):.3f} -> {float(losses[-10:].mean()):.3f}, "
    f"held-out AUC {np.round(aucs, 3)}, tier-0 accuracy {acc0:.3f}, "
    f"tier-0 AUC of the pattern rates alone {rate_auc0:.3f}"
  )
  assert (np.asarray(served) > 0.05 * batch * steps).all()  # exploration reached every tier
  assert aucs[0] >= 0.7
  assert min(aucs) >= 0.65


# 5. No retracing.


def test_jitted_router_step_compiles_once():
  base = optax.sgd(0.1, momentum=0.9)
  traces = []

  def counted_update(updates, opt_state, params=None):
    traces.append(None)  # runs once per trace, never at execution
    return base.update(updates, opt_state, params)

  opt = optax.GradientTransformation(base.init, counted_update)
  apply_fn = rt.router_apply_fn(N_TIERS, hidden=HIDDEN, w_rank=2, u_rank=2)
  state = rt.init_router(
    jax.random.key(12), N_FEATURES, N_TIERS, opt, hidden=HIDDEN, w_rank=2, u_rank=2
  )
  jitted = jax.jit(lambda s, x, t, y, m: rt.router_step(s, apply_fn, opt, x, t, y, m))
  mask = jnp.ones((16,), jnp.float32)
  for i in range(4):
    x, tier, success = _separable_problem(jax.random.key(20 + i), 16)
    state, loss = jitted(state, x, tier, success, mask)
    assert np.isfinite(float(loss))
  assert len(traces) == 1
  # As static arguments: a fresh but equal apply_fn is the same argument, so no retrace either.
  static_step = jax.jit(rt.router_step, static_argnums=(1, 2))
  for i in range(3):
    x, tier, success = _separable_problem(jax.random.key(30 + i), 16)
    fresh_apply_fn = rt.router_apply_fn(N_TIERS, hidden=HIDDEN, w_rank=2, u_rank=2)
    state, _ = static_step(state, fresh_apply_fn, opt, x, tier, success, mask)
  assert len(traces) == 2
