"""Supervised adaptation: gradients of a flax model's loss drive the per-request micro-LoRA.

A frozen flax classifier was trained on clean `load_digits` embeddings; in production its inputs
drift (a fixed shift of the encoder's output). Each labelled request gives the gradient of the
model's loss at the adapted embedding, `g = dL/dy`, which the interaction carries (`grad=g`):
Loop A then takes the exact LoRA step (docs/design.md, "Micro-LoRA step", supervised mode) and the
adapter learns to undo the drift while the model itself never changes.

Run: `python examples/flax_adaptation.py [--requests N]`. Uses scikit-learn's load_digits.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sona_jax as sona
from sona_jax import datasets


class Classifier(nn.Module):
  """The served model: a small MLP over 32-dim embeddings."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def _train_classifier(x, y, steps=400):
  model = Classifier()
  params = model.init(jax.random.key(0), x[:1])
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
      u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  for _ in range(steps):
    params, opt_state, _ = step(params, opt_state)
  return model, params


def main(requests: int = 600) -> dict:
  task = datasets.digits_drift(seed=0, dim=32, drift=2.0)
  model, params = _train_classifier(
    jnp.asarray(task.memories), jnp.asarray(task.memory_labels, jnp.int32)
  )
  cfg = sona.SonaConfig(dim=32, signal_capacity=4096, trajectory_capacity=256, graph_capacity=16)
  state = sona.init_state(cfg, jax.random.key(0))
  n = len(task.queries)
  stream, held = np.arange(n // 2), np.arange(n // 2, n)

  @jax.jit
  def loss_grad(y, label):
    """dL/dy of the frozen model's cross-entropy at the adapted embedding y."""

    def loss(y):
      logits = model.apply(params, y)
      return optax.softmax_cross_entropy_with_integer_labels(logits, label)

    return jax.value_and_grad(loss)(y)

  def accuracy(state, idx):
    y = sona.adapt(state, jnp.asarray(task.queries[idx]), cfg)
    pred = jnp.argmax(model.apply(params, y), axis=-1)
    return float(jnp.mean(pred == jnp.asarray(task.query_labels[idx])))

  clean = float(
    jnp.mean(
      jnp.argmax(model.apply(params, jnp.asarray(task.clean_queries[held])), -1)
      == task.query_labels[held]
    )
  )
  before = accuracy(state, held)
  for i in range(requests):
    j = stream[i % len(stream)]
    x = jnp.asarray(task.queries[j])
    y = sona.adapt(state, x, cfg)
    loss, g = loss_grad(y, jnp.int32(task.query_labels[j]))
    # The loss in [0, inf) becomes a quality in (0, 1]; the gradient is the learning signal.
    quality = float(jnp.exp(-loss))
    it = sona.make_interaction(cfg, query=x, quality=quality, grad=np.asarray(g), time=i)
    state, _ = sona.instant_step(state, it, cfg)
  after = accuracy(state, held)
  out = {"clean": clean, "before": before, "after": after, "requests": requests}
  print(
    f"held-out accuracy of the frozen classifier: clean inputs {clean:.3f}, drifted {before:.3f}, "
    f"drifted through the adapter after {requests} requests {after:.3f}"
  )
  return out


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=600)
  main(parser.parse_args().requests)
