"""Low-rank adapters: the micro-LoRA of Loop A and the base LoRA of Loop B (docs/design.md,
"LoRA adapters").

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
adapts a frozen weight `W0: [d_in, d_out]` with a trainable low-rank product,
`y = x W0 + s * (x @ A) @ B`, `A: [d_in, r]`, `B: [r, d_out]` zero-initialised so the adapted
model equals the base at step 0, and `s = alpha / r` (the PEFT convention). SONA stacks two adapters
on the same layer, a rank 1-2 micro-LoRA trained per request and a rank 4-16 base LoRA:
`y = x W0 + s_b x A_b B_b + s_m x A_m B_m`.

Consolidation moves what the micro adapter learnt into the base. The seed adds the micro factors
into the base factors (`A_b += A_m`, `B_b += B_m`), which is dimensionally wrong when the ranks
differ (`[d_in, 2]` into `[d_in, 8]`) and, even at equal ranks, is not the sum of the two weight
updates (`(A_b + A_m)(B_b + B_m)` has cross terms). `consolidate` works in weight space instead: it
takes the best rank-`r_b` approximation (Eckart & Young 1936) of `s_b A_b B_b + rate s_m A_m B_m`
through thin QR factorisations of the stacked factors and an SVD of the small
`(r_b + r_m) x (r_b + r_m)` core, never forming a dense `d_in x d_out` matrix.

All functions are pure and jittable; state is the `LoRA` named tuple of two arrays.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  "LoRA",
  "init_lora",
  "delta",
  "apply",
  "lora_grads",
  "micro_update",
  "micro_update_with_norm",
  "micro_update_fast",
  "consolidate",
  "consolidation_rate",
  "merge_into",
]

# Below this a norm counts as zero: guards the divisions of clipping and normalisation.
_TINY = 1e-30
# Just below log(f32 max): an unclipped step magnitude saturates here instead of becoming inf * 0.
_LOG_F32_MAX = 88.0


class LoRA(NamedTuple):
  """A low-rank adapter `s * A @ B` (Hu et al. 2021); the scale `s` is passed to each function.

  Attributes:
    a: f32[d_in, r], the down projection (random init).
    b: f32[r, d_out], the up projection (zero init, so the adapter starts as the identity).
  """

  a: jax.Array
  b: jax.Array


def _check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def init_lora(key: jax.Array, d_in: int, d_out: int, rank: int, *, init: str = "gaussian") -> LoRA:
  """Initialises an adapter with `B = 0`, so the adapted output equals the base output.

  Hu et al. 2021, section 4.1: "random Gaussian initialization for A and zero for B". PEFT's default
  instead draws `A` Kaiming-uniform with `a = sqrt(5)` on fan-in `d_in`, i.e. uniform in
  `[-1/sqrt(d_in), 1/sqrt(d_in)]`.

  Args:
    key: a `jax.random.key`.
    d_in: input width, > 0.
    d_out: output width, > 0.
    rank: adapter rank `r`, with `0 < r <= min(d_in, d_out)`.
    init: `"gaussian"` (`A ~ N(0, 1/d_in)` per entry) or `"kaiming"` (PEFT's Kaiming-uniform).

  Returns:
    `LoRA(a: f32[d_in, rank], b: f32[rank, d_out] zeros)`.

  Raises:
    ValueError: naming the argument, for a non-positive or non-int size, a rank above
      `min(d_in, d_out)`, or an unknown `init`.

  Examples:
    >>> import jax
    >>> adapter = init_lora(jax.random.key(0), 4, 3, 2)
    >>> adapter.a.shape, adapter.b.shape
    ((4, 2), (2, 3))
    >>> float(abs(adapter.b).sum())  # B = 0: the adapted output equals the base output
    0.0
  """
  _check_positive_int("d_in", d_in)
  _check_positive_int("d_out", d_out)
  _check_positive_int("rank", rank)
  if rank > min(d_in, d_out):
    raise ValueError(f"rank={rank} must be <= min(d_in, d_out) = {min(d_in, d_out)}")
  shape = (d_in, rank)
  if init == "gaussian":
    a = jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(jnp.float32(d_in))
  elif init == "kaiming":
    bound = 1.0 / float(d_in) ** 0.5
    a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  else:
    raise ValueError(f"init={init!r} is unknown; expected 'gaussian' or 'kaiming'")
  return LoRA(a=a, b=jnp.zeros((rank, d_out), jnp.float32))


def _check_last_dim(name: str, arr: jax.Array, size: int) -> None:
  if arr.ndim < 1 or arr.shape[-1] != size:
    raise ValueError(f"{name} must have last dimension {size}, got shape {arr.shape}")


def delta(lora: LoRA, x: jax.Array, *, scale) -> jax.Array:
  """The adapter's contribution `s * (x @ A) @ B` (Hu et al. 2021, eq. 3), in O(r (d_in + d_out)).

  Args:
    lora: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[..., d_in] inputs.
    scale: `s = alpha / r`, a float or f32 scalar.

  Returns:
    f32[..., d_out].

  Examples:
    >>> import jax.numpy as jnp
    >>> adapter = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))  # r 1, d 2 -> 2
    >>> delta(adapter, jnp.array([1.0, 1.0]), scale=2.0).tolist()  # 2 * (1 + 2) * [3, 0.5]
    [18.0, 3.0]
  """
  _check_last_dim("x", x, lora.a.shape[0])
  return scale * ((x @ lora.a) @ lora.b)


def apply(lora: LoRA, x: jax.Array, y0: jax.Array, *, scale) -> jax.Array:
  """The full adapted output `y0 + s (x A) B` given the base output `y0 = x W0`.

  See docs/design.md, "LoRA adapters".

  Returns the adapted output, never a bare delta (a pitfall of the peer implementation). With
  `B = 0` it returns `y0` exactly.

  Args:
    lora: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[..., d_in] inputs.
    y0: f32[..., d_out] base outputs for the same inputs.
    scale: `s = alpha / r`.

  Returns:
    f32[..., d_out].

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> adapter = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> apply(adapter, jnp.array([1.0, 1.0]), jnp.array([1.0, -1.0]), scale=2.0).tolist()
    [19.0, 2.0]
    >>> fresh = init_lora(jax.random.key(0), 2, 2, 1)  # B = 0: y0 comes back exactly
    >>> apply(fresh, jnp.array([1.0, 1.0]), jnp.array([1.0, -1.0]), scale=2.0).tolist()
    [1.0, -1.0]
  """
  _check_last_dim("y0", y0, lora.b.shape[1])
  return y0 + delta(lora, x, scale=scale)


def lora_grads(lora: LoRA, x: jax.Array, g: jax.Array, *, scale) -> LoRA:
  """Exact gradients of a loss w.r.t. the factors given `g = dL/dy` at the adapted output.

  For `y = y0 + s (x A) B` (Hu et al. 2021; docs/design.md, "Micro-LoRA step") the gradients are
  rank-1 outer products, `dB = s (x A)^T g: [r, d_out]` and `dA = s x^T (g B^T): [d_in, r]`. For a
  batch they are summed over the leading axes (the gradient of a sum of per-example losses).

  Args:
    lora: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[d_in] or f32[n, d_in] (any leading axes) inputs.
    g: f32[d_out] or f32[n, d_out] (the same leading axes) output gradients.
    scale: `s = alpha / r`.

  Returns:
    `LoRA(a=dA: f32[d_in, r], b=dB: f32[r, d_out])`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> adapter = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> x, g = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0])
    >>> grads = lora_grads(adapter, x, g, scale=2.0)
    >>> grads.b.tolist()  # s (x A)^T g = 2 * 3 * [1, 0]
    [[6.0, 0.0]]
    >>> grads.a.tolist()  # s x^T (g B^T) = 2 * [1, 1]^T * 3
    [[6.0], [6.0]]
    >>> auto = jax.grad(lambda l: jnp.dot(g, delta(l, x, scale=2.0)))(adapter)  # autodiff agrees
    >>> bool(jnp.allclose(auto.a, grads.a) & jnp.allclose(auto.b, grads.b))
    True
  """
  _check_last_dim("x", x, lora.a.shape[0])
  _check_last_dim("g", g, lora.b.shape[1])
  if x.shape[:-1] != g.shape[:-1]:
    raise ValueError(f"x and g must share leading axes, got shapes {x.shape} and {g.shape}")
  xa = x @ lora.a  # [..., r]
  gb = g @ lora.b.T  # [..., r]
  d_b = scale * jnp.einsum("...r,...o->ro", xa, g)
  d_a = scale * jnp.einsum("...i,...r->ir", x, gb)
  return LoRA(a=d_a, b=d_b)


def _normalise(arr: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns `(arr / m, log m)` with `m = max |arr|`; a zero array stays zero, `log m = -inf`."""
  m = jnp.max(jnp.abs(arr))
  safe = jnp.where(m > 0, m, jnp.float32(1.0))
  return arr / safe, jnp.log(m)


def micro_update_with_norm(
  micro: LoRA,
  x: jax.Array,
  g: jax.Array,
  lr,
  weight=1.0,
  *,
  scale=1.0,
  clip: float | jax.Array | None = None,
) -> tuple[LoRA, jax.Array]:
  """One clipped SGD step on the micro-LoRA, also returning the unclipped step norm.

  `A <- A - step_A`, `B <- B - step_B` with `step = lr * weight * grad` and the exact gradients of
  `lora_grads` (docs/design.md, "Micro-LoRA step"). When `clip` is given, each factor's step is
  rescaled separately to Frobenius norm `<= clip` (unclipped SGD on the factors diverged at
  lr >= 0.1 in the prototype, per-factor clipping at 0.25 was stable at lr 0.2).

  The gradient is bilinear in its inputs, so it is computed from `x`, `g`, `A`, `B` each divided by
  its largest magnitude, the result normalised the same way, and the magnitudes recombined in log
  space: with `clip` the result is finite for any finite inputs (a huge `g` gives a step of norm
  exactly `clip`, `g = 0` a zero step).
  Without `clip` a step whose true size overflows f32 saturates near the largest f32.

  Args:
    micro: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[d_in] or f32[n, d_in] inputs (a batch sums the gradients).
    g: f32[d_out] or f32[n, d_out] gradients `dL/dy` at the adapted output.
    lr: learning rate, a float or traced f32 scalar.
    weight: per-signal weight multiplying the step, a float or traced f32 scalar.
    scale: the micro adapter's `s = alpha / r`.
    clip: maximum Frobenius norm of each factor's step, or None for no clipping.

  Returns:
    `(new_micro, step_norm)` with `step_norm: f32[]` the unclipped `sqrt(|step_A|^2 + |step_B|^2)`
    (it may be `inf` when that overflows f32).

  Examples:
    >>> import jax.numpy as jnp
    >>> micro = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> x, g = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0])
    >>> new, norm = micro_update_with_norm(micro, x, g, 0.5, scale=2.0)  # step = 0.5 * lora_grads
    >>> new.a.round(4).tolist(), new.b.round(4).tolist()
    ([[-2.0], [-1.0]], [[0.0, 0.5]])
    >>> round(float(norm) ** 2, 3)  # |step_A|^2 + |step_B|^2 = (9 + 9) + 9
    27.0
    >>> clipped, _ = micro_update_with_norm(micro, x, g, 0.5, scale=2.0, clip=1.0)  # per factor
    >>> [round(float(jnp.linalg.norm(new - old)), 4) for new, old in zip(clipped, micro)]
    [1.0, 1.0]
  """
  x = jnp.asarray(x, jnp.float32)
  g = jnp.asarray(g, jnp.float32)
  lr = jnp.asarray(lr, jnp.float32)
  weight = jnp.asarray(weight, jnp.float32)
  scale = jnp.asarray(scale, jnp.float32)
  sign = jnp.sign(lr) * jnp.sign(weight) * jnp.sign(scale)
  # Logs of finite numbers are finite or -inf, so their sums never give inf - inf = NaN.
  log_coef = jnp.log(jnp.abs(lr)) + jnp.log(jnp.abs(weight)) + jnp.log(jnp.abs(scale))
  x_n, log_x = _normalise(x)
  g_n, log_g = _normalise(g)
  a_n, log_a = _normalise(micro.a)
  b_n, log_b = _normalise(micro.b)
  grad_n = lora_grads(LoRA(a=a_n, b=b_n), x_n, g_n, scale=1.0)
  # Normalise the gradients too, so their norms neither underflow nor overflow.
  dir_a, log_ga = _normalise(grad_n.a)
  dir_b, log_gb = _normalise(grad_n.b)
  # step = sign * exp(log_mag) * dir; dA is bilinear in (x, g, B), dB in (x, A, g).
  log_mag_a = log_coef + log_x + log_g + log_b + log_ga
  log_mag_b = log_coef + log_x + log_g + log_a + log_gb
  norm_a = jnp.sqrt(jnp.sum(jnp.square(dir_a)))  # in [1, sqrt(d_in r)], or 0
  norm_b = jnp.sqrt(jnp.sum(jnp.square(dir_b)))
  log_step_a = log_mag_a + jnp.log(norm_a)
  log_step_b = log_mag_b + jnp.log(norm_b)
  step_norm = jnp.exp(0.5 * jnp.logaddexp(2.0 * log_step_a, 2.0 * log_step_b))
  if clip is not None:
    if isinstance(clip, numbers.Real) and not clip >= 0:
      raise ValueError(f"clip={clip!r} must be >= 0 or None")
    # A traced negative clip is masked to 0 (no step) rather than raised (STYLE.md 5).
    log_clip = jnp.log(jnp.maximum(jnp.asarray(clip, jnp.float32), 0.0))
    # A zero direction has norm 0; the guard only keeps the log finite, the step stays 0.
    log_mag_a = jnp.minimum(log_mag_a, log_clip - jnp.log(jnp.maximum(norm_a, _TINY)))
    log_mag_b = jnp.minimum(log_mag_b, log_clip - jnp.log(jnp.maximum(norm_b, _TINY)))
  # Saturate rather than overflow to inf, which would turn zero entries into NaN.
  step_a = (sign * jnp.exp(jnp.minimum(log_mag_a, _LOG_F32_MAX))) * dir_a
  step_b = (sign * jnp.exp(jnp.minimum(log_mag_b, _LOG_F32_MAX))) * dir_b
  return LoRA(a=micro.a - step_a, b=micro.b - step_b), step_norm


def micro_update_fast(
  micro: LoRA,
  x: jax.Array,
  g: jax.Array,
  lr,
  weight=1.0,
  *,
  scale=1.0,
  clip=None,
  xa: jax.Array | None = None,
  gb: jax.Array | None = None,
  sq_x: jax.Array | None = None,
  sq_g: jax.Array | None = None,
) -> tuple[LoRA, jax.Array]:
  """The micro-LoRA rule in plain f32 arithmetic: the one Loop A applies per request.

  The step and per-factor clipping of `micro_update_with_norm` (docs/design.md, "Micro-LoRA
  step"), without the log-space rescaling that keeps `micro_update_with_norm` finite for inputs
  near the f32 range: on CPU every extra reduction is its own kernel, and Loop A's latency is mostly
  kernel count. Extreme inputs can give a non-finite step here; Loop A checks the result and
  rejects (and counts) such a request instead of applying it.

  A caller that already has the inner products (Loop A computes them together with others, in
  one pass over `dim`) passes them in, and the rule then reduces nothing over `dim`.

  Args:
    micro: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[d_in] input.
    g: f32[d_out] gradient `dL/dy` at the adapted output.
    lr: learning rate (float or traced scalar).
    weight: per-signal weight (float or traced scalar), e.g. a 0/1 gate.
    scale: `s = alpha / r`.
    clip: maximum Frobenius norm of each factor's step, or None.
    xa: f32[r] `x A`, or None to compute it.
    gb: f32[r] `B g`, or None to compute it.
    sq_x: f32[] `|x|^2`, or None to compute it.
    sq_g: f32[] `|g|^2`, or None to compute it.

  Returns:
    `(new_micro, step_norm)`, `step_norm` the unclipped norm of the whole step.

  Examples:
    >>> import jax.numpy as jnp
    >>> micro = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> x, g = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0])
    >>> fast, fast_norm = micro_update_fast(micro, x, g, 0.5, scale=2.0, clip=1.0)
    >>> slow, slow_norm = micro_update_with_norm(micro, x, g, 0.5, scale=2.0, clip=1.0)
    >>> bool(jnp.allclose(fast.a, slow.a) & jnp.allclose(fast.b, slow.b))
    True
    >>> round(float(fast_norm) ** 2, 3), round(float(slow_norm) ** 2, 3)
    (27.0, 27.0)
  """
  coef = jnp.asarray(lr, jnp.float32) * jnp.asarray(weight, jnp.float32) * scale
  xa = x @ micro.a if xa is None else xa  # [r]
  gb = micro.b @ g if gb is None else gb  # [r]
  sq_x = jnp.dot(x, x) if sq_x is None else sq_x
  sq_g = jnp.dot(g, g) if sq_g is None else sq_g
  # |u v^T|_F = |u| |v|: the norms need only the vectors, not the [d, r] steps. Both factors'
  # norms and clip factors are computed as 2-vectors: one kernel each on CPU, not two.
  norms = jnp.abs(coef) * jnp.sqrt(jnp.stack([sq_x * jnp.dot(gb, gb), jnp.dot(xa, xa) * sq_g]))
  step_norm = jnp.sqrt(norms[0] * norms[0] + norms[1] * norms[1])
  if clip is not None:
    coefs = coef * jnp.minimum(1.0, jnp.float32(clip) / jnp.maximum(norms, _TINY))
    coef_a, coef_b = coefs[0], coefs[1]
  else:
    coef_a = coef_b = coef
  step_b = (coef_b * xa)[:, None] * g[None, :]  # [r, d_out]
  step_a = x[:, None] * (coef_a * gb)[None, :]  # [d_in, r]
  return LoRA(a=micro.a - step_a, b=micro.b - step_b), step_norm


def micro_update(
  micro: LoRA,
  x: jax.Array,
  g: jax.Array,
  lr,
  weight=1.0,
  *,
  scale=1.0,
  clip: float | jax.Array | None = None,
) -> LoRA:
  """One clipped SGD step on the micro-LoRA; see `micro_update_with_norm`.

  See docs/design.md, "Micro-LoRA step".

  Args:
    micro: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    x: f32[d_in] or f32[n, d_in] inputs.
    g: f32[d_out] or f32[n, d_out] gradients `dL/dy` at the adapted output.
    lr: learning rate, a float or traced f32 scalar.
    weight: per-signal weight, a float or traced f32 scalar.
    scale: the micro adapter's `s = alpha / r`.
    clip: maximum Frobenius norm of each factor's step, or None.

  Returns:
    The updated `LoRA`, same shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> micro = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> new = micro_update(micro, jnp.array([1.0, 1.0]), jnp.array([1.0, 0.0]), 0.5, scale=2.0)
    >>> new.b.round(4).tolist()  # B - 0.5 * s (x A)^T g = [3, 0.5] - [3, 0]
    [[0.0, 0.5]]
  """
  new_micro, _ = micro_update_with_norm(micro, x, g, lr, weight, scale=scale, clip=clip)
  return new_micro


def _pad_cols(m: jax.Array, cols: int) -> jax.Array:
  return jnp.pad(m, ((0, 0), (0, cols - m.shape[1])))


def consolidate(
  base: LoRA, micro: LoRA, rate, *, base_scale=1.0, micro_scale=1.0
) -> tuple[LoRA, LoRA]:
  """Folds the micro adapter into the base in weight space, then resets the micro adapter.

  docs/design.md, "Consolidation": `M = s_b A_b B_b + rate s_m A_m B_m = P Q^T` with
  `P = [s_b A_b, rate s_m A_m]: [d_in, k]` and `Q = [B_b; B_m]^T: [d_out, k]`, `k = r_b + r_m`,
  has rank <= k. Its best rank-`r_b` approximation (Eckart & Young 1936) follows from thin QR
  factorisations `P = Q_p R_p`, `Q = Q_q R_q` and the SVD `R_p R_q^T = U S V^T` of the small core:
  `M_rb = Q_p U_r S_r V_r^T Q_q^T`.
  The singular values are split symmetrically between the new factors,
  `A' = Q_p U_r sqrt(S_r) / sqrt(s_b)`, `B' = sqrt(S_r) V_r^T Q_q^T / sqrt(s_b)`, so
  `s_b A' B' = M_rb` and neither factor dominates the other's scale. Cost O((d_in + d_out) k^2),
  no dense `d_in x d_out` matrix. The micro adapter is then reset, `B_m = 0` (`A_m` kept), so the
  adapted output is unchanged whenever `rate = 1` and `rank(M) <= r_b`.

  Handles `r_m != r_b` (e.g. rank 2 into 8) and widths below `k` (the reduced QR has `min(d, k)`
  columns; missing directions are zero-padded so `A'` keeps shape `[d_in, r_b]`).

  Args:
    base: `LoRA(a: f32[d_in, r_b], b: f32[r_b, d_out])`.
    micro: `LoRA(a: f32[d_in, r_m], b: f32[r_m, d_out])`.
    rate: weight of the micro update, a float or traced f32 scalar (see `consolidation_rate`).
    base_scale: `s_b > 0`.
    micro_scale: `s_m`.

  Returns:
    `(new_base, new_micro)` with the input shapes; `new_micro.b` is zero.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> k_base, k_micro = jax.random.split(jax.random.key(0))
    >>> base = init_lora(k_base, 6, 5, 4)  # rank 4, B = 0
    >>> micro = LoRA(a=jax.random.normal(k_micro, (6, 2)), b=jnp.ones((2, 5)))  # rank 2
    >>> new_base, new_micro = consolidate(base, micro, 1.0)
    >>> new_base.a.shape, new_base.b.shape, float(abs(new_micro.b).sum())
    ((6, 4), (4, 5), 0.0)
    >>> dense = lambda l: l.a @ l.b  # rate 1 and rank <= 4: the weight update is kept exactly
    >>> bool(jnp.allclose(dense(new_base), dense(base) + dense(micro), atol=1e-5))
    True
  """
  d_in, r_b = base.a.shape
  d_out = base.b.shape[1]
  if micro.a.shape[0] != d_in or micro.b.shape[1] != d_out:
    raise ValueError(
      f"micro shapes {micro.a.shape}, {micro.b.shape} do not match base "
      f"{base.a.shape}, {base.b.shape}"
    )
  if isinstance(base_scale, numbers.Real) and not base_scale > 0:
    raise ValueError(f"base_scale={base_scale!r} must be > 0")
  s_b = jnp.asarray(base_scale, jnp.float32)
  s_m = jnp.asarray(micro_scale, jnp.float32)
  rate = jnp.asarray(rate, jnp.float32)
  p = jnp.concatenate([s_b * base.a, (rate * s_m) * micro.a], axis=1)  # [d_in, k]
  q = jnp.concatenate([base.b, micro.b], axis=0).T  # [d_out, k]
  q_p, r_p = jnp.linalg.qr(p, mode="reduced")  # [d_in, kp], [kp, k]
  q_q, r_q = jnp.linalg.qr(q, mode="reduced")  # [d_out, kq], [kq, k]
  u, s, vt = jnp.linalg.svd(r_p @ r_q.T, full_matrices=False)  # [kp, m], [m], [m, kq]
  keep = min(r_b, s.shape[0])
  root = jnp.sqrt(s[:keep])
  inv_root_sb = jax.lax.rsqrt(s_b)
  a_new = (q_p @ (u[:, :keep] * root[None, :])) * inv_root_sb  # [d_in, keep]
  b_new = ((root[:, None] * vt[:keep]) @ q_q.T) * inv_root_sb  # [keep, d_out]
  new_base = LoRA(a=_pad_cols(a_new, r_b), b=_pad_cols(b_new.T, r_b).T)
  new_micro = LoRA(a=micro.a, b=jnp.zeros_like(micro.b))
  return new_base, new_micro


def consolidation_rate(mean_quality) -> jax.Array:
  """The seed's consolidation rate: 1 if mean signal quality > 0.7, else `0.5 * mean_quality`.

  Args:
    mean_quality: f32[] mean quality of the signals of a Loop B cycle, in [0, 1].

  Returns:
    f32[] rate for `consolidate`.

  Examples:
    >>> consolidation_rate(0.9).item(), consolidation_rate(0.5).item()
    (1.0, 0.25)
  """
  q = jnp.asarray(mean_quality, jnp.float32)
  return jnp.where(q > 0.7, jnp.float32(1.0), jnp.float32(0.5) * q)


def merge_into(w0: jax.Array, lora: LoRA, *, scale=1.0) -> jax.Array:
  """A dense adapted weight `W0 + s A B` for export (Hu et al. 2021, section 4.1: no inference
  latency once merged).

  Args:
    w0: f32[d_in, d_out] frozen base weight.
    lora: `LoRA(a: f32[d_in, r], b: f32[r, d_out])`.
    scale: `s = alpha / r`.

  Returns:
    f32[d_in, d_out].

  Examples:
    >>> import jax.numpy as jnp
    >>> adapter = LoRA(a=jnp.array([[1.0], [2.0]]), b=jnp.array([[3.0, 0.5]]))
    >>> w = merge_into(jnp.eye(2), adapter, scale=2.0)  # I + 2 [[3, 0.5], [6, 1]]
    >>> w.tolist()
    [[7.0, 1.0], [12.0, 3.0]]
    >>> x = jnp.array([1.0, -1.0])  # the merged weight gives the adapted output
    >>> bool(jnp.allclose(x @ w, apply(adapter, x, x @ jnp.eye(2), scale=2.0)))
    True
  """
  if w0.shape != (lora.a.shape[0], lora.b.shape[1]):
    raise ValueError(f"w0 must have shape {(lora.a.shape[0], lora.b.shape[1])}, got {w0.shape}")
  return w0 + scale * (lora.a @ lora.b)
