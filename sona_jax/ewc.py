"""EWC++: an online diagonal-Fisher penalty against forgetting (docs/design.md, "EWC++").

Elastic weight consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
networks", PNAS, arXiv:1612.00796) keeps parameters that mattered to earlier data close to where
that data left them, with the quadratic penalty `lambda/2 * sum_i F_i (theta_i - theta*_i)^2`,
`F` the diagonal Fisher information and `theta*` the anchor. EWC++ (Chaudhry et al. 2018,
"Riemannian Walk for Incremental Learning", ECCV, arXiv:1801.10112, section 4.1) keeps a single
Fisher as a moving average, `F <- alpha * F_new + (1 - alpha) * F`, instead of one per task, so it
fits SONA's stream of Loop B cycles: each cycle folds its Fisher estimate in and moves the anchor.

`alpha` weights the NEW estimate here, as in Chaudhry et al. The peer (ruvector SONA) uses the
opposite convention, `alpha` weighting the old Fisher: `alpha = 0.9` there is `alpha = 0.1` here.

The penalty enters training in either of two ways, with the same gradient `lambda * F * (theta -
theta*)`: add `penalty(ewc_state, params, lam)` to the loss, or put `ewc_regularize(lam)` before
the optimiser, `optax.chain(ewc_regularize(lam), optax.adam(lr))`, and hand it each cycle's Fisher
and anchor with `with_ewc(opt_state, ewc_state)` (they live in the transform's state, never in its
closure, so the jitted update does not go stale or retrace).

All functions are pure and generic over any parameter pytree (router parameters, a base LoRA).
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
  "EWCState",
  "init_ewc",
  "fisher_from_grads",
  "ewc_step",
  "penalty",
  "EWCRegularizeState",
  "ewc_regularize",
  "with_ewc",
]


class EWCState(NamedTuple):
  """The running EWC++ statistics (Chaudhry et al. 2018, section 4.1).

  Attributes:
    fisher: a pytree like the parameters, f32 leaves: the running diagonal Fisher `F`.
    anchor: a pytree like the parameters: `theta*`, the parameters at the last `ewc_step`.
    count: i32[], how many `ewc_step` updates have been folded in.
  """

  fisher: Any
  anchor: Any
  count: jax.Array


def _zeros_f32(params) -> Any:
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def _copy(params) -> Any:
  return jax.tree.map(lambda p: jnp.array(p, copy=True), params)


def _check_unit_interval(name: str, value) -> None:
  """Checks a concrete Python number; traced values pass through (they cannot raise under jit)."""
  if isinstance(value, numbers.Real) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_non_negative(name: str, value) -> None:
  if isinstance(value, numbers.Real) and not value >= 0.0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def init_ewc(params) -> EWCState:
  """An empty EWC++ state: zero Fisher (so no penalty yet), anchor at `params`, count 0.

  Args:
    params: the parameter pytree.

  Returns:
    `EWCState(fisher=zeros f32 like params, anchor=a copy of params, count=i32[] 0)`.

  Examples:
    >>> import jax.numpy as jnp
    >>> s = init_ewc({"w": jnp.array([1.0, 2.0])})
    >>> s.fisher["w"].tolist(), s.anchor["w"].tolist(), int(s.count)
    ([0.0, 0.0], [1.0, 2.0], 0)
    >>> float(penalty(s, {"w": jnp.array([9.0, 9.0])}, 1.0))  # a zero Fisher: no penalty yet
    0.0
  """
  return EWCState(fisher=_zeros_f32(params), anchor=_copy(params), count=jnp.zeros((), jnp.int32))


def fisher_from_grads(per_sample_grads) -> Any:
  """The empirical diagonal Fisher: the mean over samples of the squared per-sample gradients.

  `F_i = 1/N sum_n (d log p(y_n | x_n) / d theta_i)^2` (Kirkpatrick et al. 2017, supplement; the
  empirical form, with the observed labels). The sign of the gradient does not matter, so the
  gradients of a per-sample loss `-log p` serve as well. Get them with `jax.vmap(jax.grad(loss))`.

  Args:
    per_sample_grads: a pytree like the parameters whose leaves carry a leading sample axis,
      `[n_samples, *param_shape]`, n_samples > 0.

  Returns:
    A pytree like the parameters, f32 leaves of `param_shape`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> fisher_from_grads({"w": jnp.array([[1.0, -2.0], [3.0, 0.0]])})["w"].tolist()  # mean of g^2
    [5.0, 2.0]
    >>> loss = lambda w, x: jnp.square(jnp.dot(w, x))  # per-sample grads with vmap(grad)
    >>> xs = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(jnp.array([1.0, 2.0]), xs)
    >>> fisher_from_grads(grads).tolist()  # grads [2, 0] and [0, 4]
    [2.0, 8.0]
  """
  return jax.tree.map(
    lambda g: jnp.mean(jnp.square(g.astype(jnp.float32)), axis=0), per_sample_grads
  )


def ewc_step(ewc_state: EWCState, per_sample_grads, params, *, alpha) -> EWCState:
  """Folds one Fisher estimate into the running Fisher and moves the anchor (EWC++).

  Chaudhry et al. 2018, section 4.1: `F <- alpha * F_new + (1 - alpha) * F`, with
  `F_new = fisher_from_grads(per_sample_grads)`. `alpha` weights the NEW estimate (the peer
  ruvector SONA weights the old one by its `alpha`: its 0.9 is 0.1 here). The first update
  (`count == 0`) sets `F = F_new`, since there is no earlier estimate to average with. The anchor
  becomes `params` (`theta*` = the parameters at the end of this Loop B cycle).

  Jittable; `alpha` may be traced, so one compile serves every value.

  Args:
    ewc_state: the running `EWCState`.
    per_sample_grads: a pytree like the parameters, leaves `[n_samples, *param_shape]`.
    params: the parameter pytree, the new anchor.
    alpha: the weight of the new estimate, in [0, 1]; a float or f32[].

  Returns:
    The updated `EWCState`, with `count` incremented.

  Raises:
    ValueError: for a concrete `alpha` outside [0, 1].

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.zeros(2)}
    >>> s = init_ewc(params)
    >>> s = ewc_step(s, {"w": jnp.array([[1.0, 2.0], [3.0, 0.0]])}, params, alpha=0.5)
    >>> s.fisher["w"].tolist(), int(s.count)
    ([5.0, 2.0], 1)
    >>> s = ewc_step(s, {"w": jnp.array([[1.0, 0.0]])}, params, alpha=0.5)
    >>> s.fisher["w"].tolist()
    [3.0, 1.0]
  """
  _check_unit_interval("alpha", alpha)
  f_new = fisher_from_grads(per_sample_grads)
  # The first estimate replaces the zero initial Fisher rather than being damped by it.
  weight = jnp.where(ewc_state.count == 0, jnp.float32(1.0), jnp.asarray(alpha, jnp.float32))
  fisher = jax.tree.map(lambda f, fn: weight * fn + (1.0 - weight) * f, ewc_state.fisher, f_new)
  return EWCState(fisher=fisher, anchor=_copy(params), count=ewc_state.count + 1)


def _penalty_grad(fisher, anchor, params, lam) -> Any:
  """`lam * F * (theta - theta*)`, the gradient of `penalty`, in each parameter's dtype."""
  lam = jnp.asarray(lam, jnp.float32)
  return jax.tree.map(
    lambda f, a, p: (lam * f * (p.astype(jnp.float32) - a.astype(jnp.float32))).astype(p.dtype),
    fisher,
    anchor,
    params,
  )


def penalty(ewc_state, params, lam) -> jax.Array:
  """The EWC penalty `lam/2 * sum_i F_i (theta_i - theta*_i)^2` (Kirkpatrick et al. 2017, eq. 3).

  Add it to the loss of new data; its gradient is `lam * F * (theta - theta*)`.

  Args:
    ewc_state: an `EWCState` (or anything with `fisher` and `anchor` pytrees like `params`).
    params: the parameter pytree `theta`.
    lam: the penalty strength `lambda >= 0`, a float or f32[].

  Returns:
    f32[], summed over every leaf.

  Raises:
    ValueError: for a concrete negative `lam`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> s = EWCState({"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}, jnp.int32(1))
    >>> params = {"w": jnp.array([3.0, 5.0])}
    >>> float(penalty(s, params, 0.5))  # 0.5 / 2 * (2 * (3 - 1)^2 + 0 * (5 - 1)^2)
    2.0
    >>> jax.grad(lambda p: penalty(s, p, 0.5))(params)["w"].tolist()  # lam * F * (theta - theta*)
    [2.0, 0.0]
  """
  _check_non_negative("lam", lam)
  terms = jax.tree.map(
    lambda f, a, p: jnp.sum(f * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
    ewc_state.fisher,
    ewc_state.anchor,
    params,
  )
  total = sum(jax.tree.leaves(terms), start=jnp.zeros((), jnp.float32))
  return 0.5 * jnp.asarray(lam, jnp.float32) * total


class EWCRegularizeState(NamedTuple):
  """The state of `ewc_regularize`: the Fisher and anchor it currently pulls towards.

  Attributes:
    fisher: a pytree like the parameters, f32 leaves, the diagonal Fisher `F`.
    anchor: a pytree like the parameters, `theta*`.
  """

  fisher: Any
  anchor: Any


def ewc_regularize(lam) -> optax.GradientTransformation:
  """An optax transform adding the EWC penalty gradient `lam * F * (theta - theta*)` to updates.

  Chain it before the optimiser, `optax.chain(ewc_regularize(lam), optax.adam(lr))`, as one does
  `optax.add_decayed_weights`: the penalty gradient then goes through the optimiser exactly as if
  `penalty` had been added to the loss. `lam` is a hyperparameter and lives in the closure; the
  Fisher and anchor change every Loop B cycle, so they live in the state: `init` starts them at
  zero Fisher (no penalty) and `theta* = params`, and `with_ewc` replaces them. A concrete
  `lam = 0` passes updates through untouched, so the chain is then bit-for-bit the bare optimiser.

  Args:
    lam: the penalty strength `lambda >= 0`.

  Returns:
    An `optax.GradientTransformation` with state `EWCRegularizeState`; its `update` requires
    `params`.

  Raises:
    ValueError: for a concrete negative `lam`; from `update`, when `params` is None.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> opt = optax.chain(ewc_regularize(2.0), optax.sgd(0.5))
    >>> opt_state = opt.init(params)
    >>> ewc = EWCState({"w": jnp.array([1.0, 0.5])}, {"w": jnp.zeros(2)}, jnp.ones((), jnp.int32))
    >>> opt_state = with_ewc(opt_state, ewc)
    >>> updates, _ = opt.update({"w": jnp.zeros(2)}, opt_state, params)
    >>> updates["w"].tolist()  # -0.5 * 2 * F * (theta - theta*)
    [-1.0, -1.0]
  """
  _check_non_negative("lam", lam)

  def init_fn(params) -> EWCRegularizeState:
    return EWCRegularizeState(fisher=_zeros_f32(params), anchor=_copy(params))

  def update_fn(updates, state: EWCRegularizeState, params=None):
    if params is None:
      raise ValueError("ewc_regularize needs params: call update(updates, state, params)")
    if isinstance(lam, numbers.Real) and lam == 0:
      # Off exactly: even an exact zero added here changes how XLA compiles the optimiser after
      # it (ulp-level drift from plain Adam over 50 steps), and lam = 0 must mean "no EWC".
      return updates, state
    grad = _penalty_grad(state.fisher, state.anchor, params, lam)
    updates = jax.tree.map(lambda u, g: u + g.astype(u.dtype), updates, grad)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def with_ewc(opt_state, ewc_state):
  """Returns `opt_state` with each `EWCRegularizeState` in it set to `ewc_state`'s Fisher, anchor.

  Searches the whole optimiser state pytree, so it works on a bare `ewc_regularize` state and on
  one nested in `optax.chain` or other wrappers. Call it after each `ewc_step`. The new Fisher and
  anchor must have the structure, shapes and dtypes of the old ones, so a jitted update does not
  retrace.

  Args:
    opt_state: an optax state containing at least one `EWCRegularizeState`.
    ewc_state: an `EWCState` (or anything with `fisher` and `anchor`).

  Returns:
    The optimiser state with the Fisher and anchor replaced; everything else unchanged.

  Raises:
    ValueError: when `opt_state` holds no `EWCRegularizeState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> opt_state = optax.chain(ewc_regularize(1.0), optax.sgd(0.1)).init(params)
    >>> float(opt_state[0].fisher["w"].sum())  # starts with a zero Fisher
    0.0
    >>> s = ewc_step(init_ewc(params), {"w": jnp.array([[1.0, 3.0]])}, params, alpha=0.1)
    >>> opt_state = with_ewc(opt_state, s)
    >>> opt_state[0].fisher["w"].tolist(), opt_state[0].anchor["w"].tolist()
    ([1.0, 9.0], [1.0, 2.0])
  """
  found = []

  def replace(node):
    if isinstance(node, EWCRegularizeState):
      found.append(node)
      return EWCRegularizeState(fisher=ewc_state.fisher, anchor=ewc_state.anchor)
    return node

  new_state = jax.tree.map(
    replace, opt_state, is_leaf=lambda node: isinstance(node, EWCRegularizeState)
  )
  if not found:
    raise ValueError(
      f"opt_state holds no EWCRegularizeState (got {type(opt_state).__name__}); "
      "build the optimiser with ewc_regularize(lam)"
    )
  return new_state
