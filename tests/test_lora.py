"""Tests of `sona_jax.lora` (docs/design.md, "Loop A") against `jax.grad` and NumPy float64
references."""

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sona_jax import lora as lo

D_IN, D_OUT = 32, 24

# Jitted entry points: one compile per shape keeps the file fast (eager dispatch compiles every op).
# The eager paths are compared with these in the no-retracing tests.
_consolidate = jax.jit(lo.consolidate)
# `clip` is traced too (only None vs. a value changes the trace), so its values share one compile.
_update = jax.jit(lo.micro_update_with_norm)


def _micro_update(*args, **kwargs):
  return _update(*args, **kwargs)[0]


def _f64(x):
  return np.asarray(x, dtype=np.float64)


_POOL = 4096


def _normal(key, shape):
  """f32[shape] standard normal from `key`: one fixed-size draw sliced on the host, because
  `jax.random.normal` compiles once per shape and that dominated this file's run time."""
  size = int(np.prod(shape))
  assert size <= _POOL
  draw = np.asarray(jax.random.normal(key, (_POOL,)))
  return jnp.asarray(draw[:size].reshape(shape))


def _random_lora(key, d_in, d_out, rank, b_std=0.3):
  """An adapter with Gaussian `A ~ N(0, 1/d_in)` and a non-zero `B`, so both gradients and
  products are non-trivial."""
  k_a, k_b = jax.random.split(key)
  a = _normal(k_a, (d_in, rank)) / np.float32(np.sqrt(d_in))
  return lo.LoRA(a=a, b=b_std * _normal(k_b, (rank, d_out)))


def _norm(x):
  return float(np.linalg.norm(_f64(x)))


def _rel_err(actual, expected):
  return np.linalg.norm(_f64(actual) - _f64(expected)) / np.linalg.norm(_f64(expected))


# 1. Supervised micro_update is one SGD step of jax.grad.


def _mse_setup(key, batch_shape):
  k_l, k_x, k_y, k_t = jax.random.split(key, 4)
  micro = _random_lora(k_l, D_IN, D_OUT, 2)
  x = _normal(k_x, (*batch_shape, D_IN))
  y0 = _normal(k_y, (*batch_shape, D_OUT))
  target = _normal(k_t, (*batch_shape, D_OUT))
  return micro, x, y0, target


@pytest.mark.parametrize("batch_shape", [(), (5,)])
@pytest.mark.parametrize("clip", [None, 1e6])
def test_micro_update_is_sgd_step_of_jax_grad(batch_shape, clip):
  scale, lr, weight = 0.5, 0.05, 0.8
  micro, x, y0, target = _mse_setup(jax.random.key(1), batch_shape)

  def loss_of_y(y):
    return 0.5 * jnp.sum(jnp.square(y - target))

  def loss(params):
    return loss_of_y(lo.apply(params, x, y0, scale=scale))

  ref = jax.grad(loss)(micro)
  g = jax.grad(loss_of_y)(lo.apply(micro, x, y0, scale=scale))
  new = _micro_update(micro, x, g, lr, weight, scale=scale, clip=clip)
  np.testing.assert_allclose(new.a, micro.a - lr * weight * ref.a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.b, micro.b - lr * weight * ref.b, rtol=1e-5, atol=1e-5)
  # The step really moved both factors, so the comparison is not vacuous.
  assert _norm(ref.a) > 1e-2 and _norm(ref.b) > 1e-2


def test_lora_grads_linear_loss_matches_jax_grad():
  """L = sum(t * y): g = t, and the rank-1 formulas equal autodiff."""
  scale = 2.0
  micro, x, y0, t = _mse_setup(jax.random.key(2), ())
  ref = jax.grad(lambda p: jnp.sum(t * lo.apply(p, x, y0, scale=scale)))(micro)
  grads = lo.lora_grads(micro, x, t, scale=scale)
  np.testing.assert_allclose(grads.a, ref.a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads.b, ref.b, rtol=1e-5, atol=1e-6)
  # And the closed forms of docs/design.md ("Micro-LoRA step") in float64.
  a, b, x64, t64 = _f64(micro.a), _f64(micro.b), _f64(x), _f64(t)
  np.testing.assert_allclose(grads.b, scale * np.outer(x64 @ a, t64), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads.a, scale * np.outer(x64, t64 @ b.T), rtol=1e-5, atol=1e-6)


def test_batch_lora_grads_is_sum_of_single_grads():
  micro, x, _, g = _mse_setup(jax.random.key(3), (7,))
  batch = lo.lora_grads(micro, x, g, scale=0.5)
  singles = jax.vmap(lambda xi, gi: lo.lora_grads(micro, xi, gi, scale=0.5))(x, g)
  np.testing.assert_allclose(batch.a, singles.a.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(batch.b, singles.b.sum(0), rtol=1e-5, atol=1e-5)
  assert batch.a.shape == (D_IN, 2) and batch.b.shape == (2, D_OUT)


def test_micro_update_jits_with_traced_lr_and_weight_without_retracing():
  micro, x, _, g = _mse_setup(jax.random.key(4), ())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(micro, x, g, lr, weight):
    return lo.micro_update_with_norm(micro, x, g, lr, weight, scale=0.5, clip=0.25)

  for lr, weight in [(0.1, 1.0), (0.2, 0.5), (0.05, 2.0)]:
    new, norm = step(micro, x, g, jnp.float32(lr), jnp.float32(weight))
    eager, eager_norm = lo.micro_update_with_norm(micro, x, g, lr, weight, scale=0.5, clip=0.25)
    np.testing.assert_allclose(new.a, eager.a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new.b, eager.b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm, eager_norm, rtol=1e-5)


# 2. Clipping.


def test_step_norm_is_unclipped_norm_of_both_steps():
  micro, x, _, g = _mse_setup(jax.random.key(5), ())
  lr, weight, scale = 0.3, 0.7, 0.5
  grads = lo.lora_grads(micro, x, g, scale=scale)
  expected = lr * weight * np.sqrt(_norm(grads.a) ** 2 + _norm(grads.b) ** 2)
  _, norm = _update(micro, x, g, lr, weight, scale=scale, clip=1e-3)
  assert norm.dtype == jnp.float32 and norm.shape == ()
  np.testing.assert_allclose(norm, expected, rtol=1e-5)


def test_tiny_clip_bounds_each_factor_step_separately():
  micro, x, _, g = _mse_setup(jax.random.key(6), ())
  clip = 1e-3
  new = _micro_update(micro, x, g, 0.5, scale=0.5, clip=clip)
  step_a, step_b = micro.a - new.a, micro.b - new.b
  # Each factor is clipped on its own: both steps have norm exactly `clip`.
  np.testing.assert_allclose(_norm(step_a), clip, rtol=1e-3)
  np.testing.assert_allclose(_norm(step_b), clip, rtol=1e-3)
  # And point along the gradient.
  grads = lo.lora_grads(micro, x, g, scale=0.5)
  np.testing.assert_allclose(_f64(step_a) / clip, _f64(grads.a) / _norm(grads.a), atol=1e-3)
  np.testing.assert_allclose(_f64(step_b) / clip, _f64(grads.b) / _norm(grads.b), atol=1e-3)


@pytest.mark.parametrize("x_mult,g_mult", [(1.0, 1e30), (1e30, 1e30), (1e-30, 1e-30)])
def test_clipped_step_is_finite_and_exact_for_extreme_inputs(x_mult, g_mult):
  micro, x, _, g = _mse_setup(jax.random.key(7), ())
  clip = 0.25
  base = _micro_update(micro, x, g, 1e6, scale=1.0, clip=clip)  # binds: reference direction
  new, norm = _update(micro, x_mult * x, g_mult * g, 1e6, scale=1.0, clip=clip)
  assert np.all(np.isfinite(new.a)) and np.all(np.isfinite(new.b))
  assert not np.isnan(norm)
  if x_mult * g_mult * 1e6 > 1.0:
    # The gradient is bilinear in (x, g), so the clipped step is the same as for unit inputs.
    np.testing.assert_allclose(_norm(micro.a - new.a), clip, rtol=1e-4)
    np.testing.assert_allclose(_norm(micro.b - new.b), clip, rtol=1e-4)
    np.testing.assert_allclose(new.a, base.a, atol=1e-5)
    np.testing.assert_allclose(new.b, base.b, atol=1e-5)
  else:
    # 1e6 * 1e-60 is tiny: the step does not bind and is ~0.
    np.testing.assert_allclose(new.a, micro.a, atol=1e-6)


def test_zero_gradient_gives_zero_step():
  micro, x, _, _ = _mse_setup(jax.random.key(8), ())
  g = jnp.zeros((D_OUT,), jnp.float32)
  for clip in (None, 0.25):
    new, norm = _update(micro, x, g, 0.2, scale=0.5, clip=clip)
    np.testing.assert_array_equal(new.a, micro.a)
    np.testing.assert_array_equal(new.b, micro.b)
    assert float(norm) == 0.0


def test_step_from_initial_micro_moves_b_only():
  """With `B = 0`, `dA = s x^T (g B^T) = 0`: the first step trains `B` alone (PEFT behaviour)."""
  micro = lo.init_lora(jax.random.key(9), D_IN, D_OUT, 2)
  _, x, _, g = _mse_setup(jax.random.key(10), ())
  new = _micro_update(micro, x, g, 0.2, clip=0.25)
  np.testing.assert_array_equal(new.a, micro.a)
  np.testing.assert_allclose(_norm(new.b), 0.25, rtol=1e-4)


_finite = st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_infinity=False)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(x_mult=_finite, g_mult=_finite, lr=_finite, weight=_finite, a_mult=_finite)
def test_clipped_update_is_finite_for_any_finite_inputs(x_mult, g_mult, lr, weight, a_mult):
  micro, x, _, g = _mse_setup(jax.random.key(11), ())
  micro = micro._replace(a=jnp.clip(micro.a * jnp.float32(a_mult), -1e30, 1e30))
  new, norm = _jit_clipped_update(
    micro,
    jnp.clip(x * jnp.float32(x_mult), -3e38, 3e38),
    jnp.clip(g * jnp.float32(g_mult), -3e38, 3e38),
    jnp.float32(lr),
    jnp.float32(weight),
  )
  assert np.all(np.isfinite(new.a)) and np.all(np.isfinite(new.b))
  assert not np.isnan(norm)
  assert _norm(micro.b - new.b) <= 0.25 * (1 + 1e-4)


@jax.jit
def _jit_clipped_update(micro, x, g, lr, weight):
  return lo.micro_update_with_norm(micro, x, g, lr, weight, scale=0.5, clip=0.25)


# 3. Consolidation in weight space.


def _truncated_svd_f64(base, micro, rate, s_b, s_m):
  m = s_b * _f64(base.a) @ _f64(base.b) + rate * s_m * _f64(micro.a) @ _f64(micro.b)
  u, s, vt = np.linalg.svd(m, full_matrices=False)
  r_b = base.a.shape[1]
  return (u[:, :r_b] * s[:r_b]) @ vt[:r_b], s


@pytest.mark.parametrize("r_b,r_m", [(8, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("s_b,s_m,rate", [(1.0, 1.0, 1.0), (2.0, 0.5, 0.7), (0.25, 4.0, 0.35)])
def test_consolidate_is_truncated_svd_of_dense_sum(r_b, r_m, s_b, s_m, rate):
  k_b, k_m = jax.random.split(jax.random.key(12))
  base = _random_lora(k_b, D_IN, D_OUT, r_b)
  micro = _random_lora(k_m, D_IN, D_OUT, r_m, b_std=1.0)
  new_base, new_micro = _consolidate(base, micro, rate, base_scale=s_b, micro_scale=s_m)
  expected, sv = _truncated_svd_f64(base, micro, rate, s_b, s_m)
  assert sv[r_b] > 1e-2 * sv[0]  # the sum really has rank > r_b: truncation is tested
  assert new_base.a.shape == (D_IN, r_b) and new_base.b.shape == (r_b, D_OUT)
  assert new_base.a.dtype == jnp.float32 and new_base.b.dtype == jnp.float32
  dense = s_b * _f64(new_base.a) @ _f64(new_base.b)
  assert _rel_err(dense, expected) < 1e-4
  np.testing.assert_array_equal(new_micro.a, micro.a)
  np.testing.assert_array_equal(new_micro.b, np.zeros_like(micro.b))


def test_consolidate_splits_singular_values_symmetrically():
  """`A'^T A' = B' B'^T = S / s_b`: neither factor carries the scale of the other."""
  k_b, k_m = jax.random.split(jax.random.key(13))
  base, micro = _random_lora(k_b, D_IN, D_OUT, 8), _random_lora(k_m, D_IN, D_OUT, 2)
  new_base, _ = _consolidate(base, micro, 1.0, base_scale=2.0)
  gram_a = _f64(new_base.a).T @ _f64(new_base.a)
  gram_b = _f64(new_base.b) @ _f64(new_base.b).T
  np.testing.assert_allclose(gram_a, gram_b, atol=1e-4 * np.abs(gram_a).max())
  np.testing.assert_allclose(gram_a, np.diag(np.diag(gram_a)), atol=1e-4 * np.abs(gram_a).max())


def _adapted(base, micro, x, y0, s_b, s_m):
  return lo.apply(base, x, lo.apply(micro, x, y0, scale=s_m), scale=s_b)


@pytest.mark.parametrize("case", ["zero_base", "rank3_base"])
def test_consolidate_preserves_output_when_sum_fits_in_base_rank(case):
  s_b, s_m = 2.0, 0.5
  k_b, k_m, k_x, k_y = jax.random.split(jax.random.key(14), 4)
  if case == "zero_base":  # B_b = 0, micro rank 2 into base 8
    base = lo.init_lora(k_b, D_IN, D_OUT, 8)
    micro = _random_lora(k_m, D_IN, D_OUT, 2, b_std=1.0)
  else:  # base with 3 non-zero directions + micro rank 1 into base 4
    base = _random_lora(k_b, D_IN, D_OUT, 4)
    base = base._replace(b=base.b.at[3].set(0.0))
    micro = _random_lora(k_m, D_IN, D_OUT, 1, b_std=1.0)
  x = _normal(k_x, (16, D_IN))
  y0 = _normal(k_y, (16, D_OUT))
  before = _adapted(base, micro, x, y0, s_b, s_m)
  new_base, new_micro = _consolidate(base, micro, 1.0, base_scale=s_b, micro_scale=s_m)
  after = _adapted(new_base, new_micro, x, y0, s_b, s_m)
  assert np.max(np.abs(_f64(before) - _f64(y0))) > 0.1  # the micro adapter did something
  np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(new_micro.b, np.zeros_like(micro.b))
  np.testing.assert_array_equal(new_micro.a, micro.a)


def test_consolidate_jits_with_traced_rate_without_retracing():
  k_b, k_m = jax.random.split(jax.random.key(15))
  base, micro = _random_lora(k_b, D_IN, D_OUT, 8), _random_lora(k_m, D_IN, D_OUT, 2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def cons(base, micro, rate):
    return lo.consolidate(base, micro, rate, base_scale=2.0, micro_scale=0.5)

  for rate in (1.0, 0.35, 0.2):
    new_base, new_micro = cons(base, micro, jnp.float32(rate))
    eager, _ = lo.consolidate(base, micro, rate, base_scale=2.0, micro_scale=0.5)
    np.testing.assert_allclose(new_base.a @ new_base.b, eager.a @ eager.b, atol=1e-5)
    expected, _ = _truncated_svd_f64(base, micro, rate, 2.0, 0.5)
    assert _rel_err(2.0 * _f64(new_base.a) @ _f64(new_base.b), expected) < 1e-4
    np.testing.assert_array_equal(new_micro.b, np.zeros_like(micro.b))


def test_consolidate_when_width_below_total_rank():
  """d = 5 < r_b + r_m = 6: the reduced QR has 5 columns; result still the best rank-4 fit."""
  k_b, k_m = jax.random.split(jax.random.key(16))
  base, micro = _random_lora(k_b, 5, 6, 4), _random_lora(k_m, 5, 6, 2, b_std=1.0)
  new_base, new_micro = _consolidate(base, micro, 0.8, base_scale=1.5)
  expected, _ = _truncated_svd_f64(base, micro, 0.8, 1.5, 1.0)
  assert new_base.a.shape == (5, 4) and new_base.b.shape == (4, 6)
  assert _rel_err(1.5 * _f64(new_base.a) @ _f64(new_base.b), expected) < 1e-4


def test_consolidate_pads_when_base_rank_exceeds_width():
  """A hand-built base of rank 4 on 3 x 3: only 3 directions exist, the 4th is zero-padded."""
  k = jax.random.split(jax.random.key(17), 4)
  base = lo.LoRA(a=_normal(k[0], (3, 4)), b=_normal(k[1], (4, 3)))
  micro = lo.LoRA(a=_normal(k[2], (3, 1)), b=_normal(k[3], (1, 3)))
  new_base, _ = _consolidate(base, micro, 1.0)
  assert new_base.a.shape == (3, 4) and new_base.b.shape == (4, 3)
  np.testing.assert_array_equal(new_base.a[:, 3], np.zeros(3))
  dense = _f64(base.a) @ _f64(base.b) + _f64(micro.a) @ _f64(micro.b)
  assert _rel_err(_f64(new_base.a) @ _f64(new_base.b), dense) < 1e-4


def test_consolidate_rejects_mismatched_shapes():
  base = lo.init_lora(jax.random.key(18), D_IN, D_OUT, 4)
  micro = lo.init_lora(jax.random.key(19), D_OUT, D_IN, 1)
  with pytest.raises(ValueError, match="micro"):
    lo.consolidate(base, micro, 1.0)
  with pytest.raises(ValueError, match="base_scale"):
    lo.consolidate(base, base, 1.0, base_scale=0.0)


# 4. Merge and apply.


def test_merge_into_equals_dense_sum_and_apply():
  k_l, k_w, k_x = jax.random.split(jax.random.key(20), 3)
  adapter = _random_lora(k_l, D_IN, D_OUT, 4)
  w0 = _normal(k_w, (D_IN, D_OUT))
  merged = lo.merge_into(w0, adapter, scale=0.5)
  expected = _f64(w0) + 0.5 * _f64(adapter.a) @ _f64(adapter.b)
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)
  x = _normal(k_x, (6, D_IN))
  np.testing.assert_allclose(
    lo.apply(adapter, x, x @ w0, scale=0.5), x @ merged, rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(lo.delta(adapter, x, scale=0.5), x @ (merged - w0), atol=1e-4)


def test_apply_with_zero_b_returns_base_output_exactly():
  adapter = lo.init_lora(jax.random.key(21), D_IN, D_OUT, 2)
  x = _normal(jax.random.key(22), (3, D_IN))
  y0 = _normal(jax.random.key(23), (3, D_OUT))
  np.testing.assert_array_equal(lo.apply(adapter, x, y0, scale=4.0), y0)


def test_apply_rejects_wrong_widths():
  adapter = lo.init_lora(jax.random.key(24), D_IN, D_OUT, 2)
  with pytest.raises(ValueError, match="x"):
    lo.apply(adapter, jnp.zeros((D_OUT,)), jnp.zeros((D_OUT,)), scale=1.0)
  with pytest.raises(ValueError, match="y0"):
    lo.apply(adapter, jnp.zeros((D_IN,)), jnp.zeros((D_IN,)), scale=1.0)
  with pytest.raises(ValueError, match="w0"):
    lo.merge_into(jnp.zeros((D_OUT, D_IN)), adapter)


# 5. Consolidation rate.


@pytest.mark.parametrize("quality,rate", [(0.9, 1.0), (0.7, 0.35), (0.4, 0.2)])
def test_consolidation_rate(quality, rate):
  out = lo.consolidation_rate(quality)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, rate, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(lo.consolidation_rate)(jnp.float32(quality)), rate, rtol=1e-6)


# 6. Initialisation.


def test_init_shapes_dtypes_and_zero_b():
  for init in ("gaussian", "kaiming"):
    adapter = lo.init_lora(jax.random.key(25), D_IN, D_OUT, 4, init=init)
    assert adapter.a.shape == (D_IN, 4) and adapter.b.shape == (4, D_OUT)
    assert adapter.a.dtype == jnp.float32 and adapter.b.dtype == jnp.float32
    np.testing.assert_array_equal(adapter.b, np.zeros((4, D_OUT)))
    assert np.all(np.abs(_f64(adapter.a)) > 0)


def test_init_distributions():
  d_in = 64
  gauss = _f64(lo.init_lora(jax.random.key(26), d_in, d_in, 64).a)
  np.testing.assert_allclose(gauss.var(), 1.0 / d_in, rtol=0.1)
  kaiming = _f64(lo.init_lora(jax.random.key(27), d_in, d_in, 64, init="kaiming").a)
  bound = 1.0 / np.sqrt(d_in)
  assert np.abs(kaiming).max() <= bound
  assert np.abs(kaiming).max() > 0.95 * bound
  np.testing.assert_allclose(kaiming.var(), bound**2 / 3.0, rtol=0.1)  # uniform variance


@pytest.mark.parametrize(
  "kwargs,name",
  [
    ({"d_in": 0}, "d_in"),
    ({"d_out": -1}, "d_out"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.0}, "rank"),
    ({"d_in": True}, "d_in"),
    ({"rank": 17}, "rank"),
    ({"init": "xavier"}, "init"),
  ],
)
def test_init_rejects_bad_arguments(kwargs, name):
  args = {"d_in": 32, "d_out": 16, "rank": 4} | kwargs
  init = args.pop("init", "gaussian")
  with pytest.raises(ValueError, match=name):
    lo.init_lora(jax.random.key(28), **args, init=init)


def test_public_names():
  assert set(lo.__all__) == {
    "LoRA",
    "micro_update_fast",
    "init_lora",
    "delta",
    "apply",
    "lora_grads",
    "micro_update",
    "micro_update_with_norm",
    "consolidate",
    "consolidation_rate",
    "merge_into",
  }
  assert all(hasattr(lo, name) for name in lo.__all__)


def test_micro_update_fast_equals_robust_update_on_ordinary_inputs():
  key = jax.random.key(41)
  k1, k2, k3, k4 = jax.random.split(key, 4)
  micro = lo.LoRA(
    a=jax.random.normal(k1, (24, 2), jnp.float32), b=jax.random.normal(k2, (2, 24), jnp.float32)
  )
  x = jax.random.normal(k3, (24,), jnp.float32)
  g = jax.random.normal(k4, (24,), jnp.float32)
  for clip in (None, 1e-3, 0.25, 1e6):
    fast, n_fast = jax.jit(
      lambda m, x, g, c=clip: lo.micro_update_fast(m, x, g, 0.2, 0.7, scale=1.5, clip=c)
    )(micro, x, g)
    ref, n_ref = lo.micro_update_with_norm(micro, x, g, 0.2, 0.7, scale=1.5, clip=clip)
    np.testing.assert_allclose(np.asarray(fast.a), np.asarray(ref.a), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(fast.b), np.asarray(ref.b), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(n_fast), float(n_ref), rtol=2e-5)
