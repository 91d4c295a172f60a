"""Differentiable inner loops: an SGD (or optax) step is just a function that `jax.grad` can see.

`adapt` runs `steps` inner steps with `lax.scan` (or a Python loop with ``unroll=True``). The
meta-gradient of MAML is `jax.grad` of a loss taken after `adapt`: grad-through-grad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any
LossFn = Callable[..., jax.Array]


# --- which parameters adapt ------------------------------------------------------------------


def mask_by_path(params: PyTree, predicate: Callable[[str], bool]) -> PyTree:
    """A params-shaped pytree of Python bools: ``predicate(path)`` for each leaf.

    The path is the leaf's key path joined by ``/``, e.g. ``"head/kernel"``.

    Example:
        >>> mask_by_path({"body": {"w": 1.0}, "head": {"w": 2.0}}, lambda p: p.startswith("head"))
        {'body': {'w': False}, 'head': {'w': True}}
    """
    return jax.tree_util.tree_map_with_path(lambda kp, _: bool(predicate(path_str(kp))), params)


def path_str(key_path) -> str:
    """``"a/b/0"`` for a JAX key path, the form `mask_by_path` predicates see."""
    parts = []
    for k in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _check_mask(params: PyTree, mask: PyTree | None) -> list[bool]:
    leaves, treedef = jax.tree.flatten(params)
    if mask is None:
        return [True] * len(leaves)
    mask_leaves, mask_def = jax.tree.flatten(mask)
    if mask_def != treedef:
        raise ValueError(
            f"mask must be a params-shaped pytree of bools; got structure {mask_def}, "
            f"params have {treedef}"
        )
    if not all(isinstance(m, bool) for m in mask_leaves):
        raise ValueError("mask leaves must be Python bools (static), not arrays")
    if not any(mask_leaves):
        raise ValueError("mask selects no parameter to adapt")
    return mask_leaves


def _split(params: PyTree, mask_leaves: list[bool]):
    leaves, treedef = jax.tree.flatten(params)
    adapted = [jnp.asarray(x) for x, m in zip(leaves, mask_leaves, strict=True) if m]
    frozen = [x for x, m in zip(leaves, mask_leaves, strict=True) if not m]

    def combine(adapted_leaves):
        it_a, it_f = iter(adapted_leaves), iter(frozen)
        return jax.tree.unflatten(treedef, [next(it_a) if m else next(it_f) for m in mask_leaves])

    return adapted, combine


# --- learning rates ----------------------------------------------------------------------------


def _lr_leaves(lr, params: PyTree, mask_leaves: list[bool], steps: int, per_step: bool):
    """Validates ``lr`` and returns one entry per adapted leaf (with a leading steps axis if
    ``per_step``), or one shared scalar-like entry."""
    param_leaves, treedef = jax.tree.flatten(params)
    lead = (steps,) if per_step else ()
    if isinstance(lr, bool) or lr is None:
        raise ValueError(f"lr must be a number, an array or a params-shaped pytree, got {lr!r}")
    if isinstance(lr, int | float) or (
        hasattr(lr, "shape") and not isinstance(lr, dict | list | tuple)
    ):
        shape = jnp.shape(lr)
        if shape != lead:
            want = f"shape ({steps},) with per_step=True" if per_step else "a scalar"
            raise ValueError(
                f"lr must be {want}; got shape {shape}. A per-parameter lr is a "
                "params-shaped pytree; a per-step lr needs per_step=True."
            )
        return "shared", lr
    lr_leaves, lr_def = jax.tree.flatten(lr)
    if lr_def != treedef:
        raise ValueError(
            f"lr pytree must match params' structure; got {lr_def}, params have {treedef}"
        )
    out = []
    for i, (p, a, m) in enumerate(zip(param_leaves, lr_leaves, mask_leaves, strict=True)):
        a_shape = jnp.shape(a)
        if a_shape[: len(lead)] != lead:
            raise ValueError(
                f"lr leaf {i}: per_step=True needs a leading axis of {steps} steps, "
                f"got shape {a_shape}"
            )
        try:
            if jnp.broadcast_shapes(a_shape[len(lead) :], jnp.shape(p)) != jnp.shape(p):
                raise ValueError
        except ValueError:
            raise ValueError(
                f"lr leaf {i} of shape {a_shape} does not broadcast to its parameter "
                f"of shape {jnp.shape(p)}" + (" after the steps axis" if per_step else "")
            ) from None
        if m:
            out.append(a)
    return "leaves", out


def _validate_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")


# --- the inner loop ----------------------------------------------------------------------------


def sgd_step(
    loss_fn: LossFn, params: PyTree, batch: Any, lr, *, first_order: bool = False
) -> PyTree:
    r"""One differentiable SGD step, :math:`\phi = \theta - \alpha \nabla_\theta L(\theta; B)`.

    ``lr`` (:math:`\alpha`) is a scalar or a params-shaped pytree (Meta-SGD's elementwise rates).
    With ``first_order=True`` the gradient is a constant to outer derivatives
    (:math:`\partial\phi/\partial\theta = I`).

    Example:
        >>> loss = lambda w, x: jnp.sum((w * x) ** 2)
        >>> float(sgd_step(loss, 1.0, 2.0, 0.0625))  # 1 - 0.0625 * (2 * 1 * 4)
        0.5
    """
    return adapt(loss_fn, params, batch, steps=1, lr=lr, first_order=first_order, unroll=True)


def adapt(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    steps: int,
    lr,
    first_order: bool = False,
    per_step: bool = False,
    mask: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    remat: bool = False,
    unroll: bool = False,
    return_trajectory: bool = False,
    step_arg: bool = False,
):
    r"""The inner loop: ``steps`` differentiable gradient steps on ``loss_fn(params, batch)``.

    .. math:: \phi_0 = \theta, \qquad
              \phi_{i+1} = \phi_i - \alpha_i \odot \nabla_\phi L(\phi_i; B), \quad i < \text{steps}

    Everything is an ordinary JAX function of ``params`` and ``lr``, so ``jax.grad`` of a loss at
    the result is the full (second-order) MAML meta-gradient.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (``loss_fn(params, batch, step)`` with
            ``step_arg=True``, for models whose behaviour depends on the inner step, such as
            MAML++'s per-step batch norm).
        params: the initial parameters :math:`\theta` (any pytree).
        batch: the support data, passed to ``loss_fn`` unchanged.
        steps: number of inner steps (static).
        lr: :math:`\alpha`: a scalar; a params-shaped pytree (Meta-SGD; leaves broadcast to their
            parameter); with ``per_step=True``, an array of shape ``(steps,)`` or a params-shaped
            pytree whose leaves carry a leading ``steps`` axis (MAML++'s per-layer, per-step
            rates). Must be ``None`` when ``optimizer`` is given.
        first_order: stop the inner gradients' dependence on ``params``: the outer gradient then
            treats every inner gradient as a constant (first-order MAML), by construction.
        per_step: whether ``lr`` carries a leading ``steps`` axis.
        mask: a params-shaped pytree of Python bools: which parameters adapt (ANIL adapts only
            the ``head``). Frozen parameters are never differentiated in the inner loop.
        optimizer: an optax ``GradientTransformation`` to use instead of SGD (e.g.
            ``optax.adam(1e-2)``); its state starts fresh at :math:`\theta` and is differentiated
            through like everything else.
        remat: wrap each step in ``jax.checkpoint``: the backward pass recomputes a step's
            activations instead of storing them.
        unroll: a Python loop instead of ``lax.scan`` (for small step counts).
        return_trajectory: also return the parameters after each step, stacked on a leading
            axis of length ``steps`` (:math:`\phi_1, \dots, \phi_{steps}`).
        step_arg: pass the step index (an int32 scalar) as ``loss_fn``'s third argument.

    Returns:
        The adapted parameters, or ``(adapted, trajectory)`` with ``return_trajectory=True``.

    Example:
        >>> loss = lambda w, x: jnp.mean((w * x - 3.0 * x) ** 2)
        >>> round(float(adapt(loss, 0.0, jnp.ones(4), steps=20, lr=0.25)), 4)
        3.0
        >>> meta_grad = jax.grad(lambda w: loss(adapt(loss, w, jnp.ones(4), steps=1, lr=0.25), 1.0))
        >>> float(meta_grad(0.0))  # d/dw (0.5 w - 1.5)^2 = 2 (0.5 w - 1.5) 0.5
        -1.5
    """
    _validate_steps(steps)
    mask_leaves = _check_mask(params, mask)
    if optimizer is None:
        lr_kind, lr_val = _lr_leaves(lr, params, mask_leaves, steps, per_step)
    elif lr is not None:
        raise ValueError(
            "pass either lr (SGD) or optimizer, not both: the optax optimizer "
            "carries its own learning rate"
        )
    adapted0, combine = _split(params, mask_leaves)

    def inner_loss(adapted_leaves, step):
        full = combine(adapted_leaves)
        return loss_fn(full, batch, step) if step_arg else loss_fn(full, batch)

    def grads_at(adapted_leaves, step):
        g = jax.grad(inner_loss)(adapted_leaves, step)
        return lax.stop_gradient(g) if first_order else g

    if optimizer is None:

        def step_fn(carry, xs):
            leaves = carry
            step, lr_i = xs
            g = grads_at(leaves, step)
            if lr_kind == "shared":
                new = [p - (lr_i * gi).astype(p.dtype) for p, gi in zip(leaves, g, strict=True)]
            else:
                new = [
                    p - (a * gi).astype(p.dtype) for p, a, gi in zip(leaves, lr_i, g, strict=True)
                ]
            return new, new

        carry0 = adapted0
        lr_xs = lr_val if per_step else None
    else:

        def step_fn(carry, xs):
            leaves, opt_state = carry
            step, _ = xs
            g = grads_at(leaves, step)
            updates, opt_state = optimizer.update(g, opt_state, leaves)
            if first_order:
                updates = lax.stop_gradient(updates)
            new = optax.apply_updates(leaves, updates)
            return (new, opt_state), new

        carry0 = (adapted0, optimizer.init(adapted0))
        lr_xs = None

    if remat:
        step_fn = jax.checkpoint(step_fn)
    step_ids = jnp.arange(steps, dtype=jnp.int32)

    if unroll or steps == 0:
        carry, traj = carry0, []
        for i in range(steps):
            lr_i = (
                _index_lr(lr_xs, i)
                if lr_xs is not None
                else (lr_val if optimizer is None else None)
            )
            carry, out = step_fn(carry, (step_ids[i], lr_i))
            traj.append(out)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *traj) if traj else None
    else:
        if lr_xs is None:
            shared_lr = lr_val if optimizer is None else None
            body = lambda c, s: step_fn(c, (s, shared_lr))
            carry, stacked = lax.scan(body, carry0, step_ids)
        else:
            carry, stacked = lax.scan(step_fn, carry0, (step_ids, lr_xs))

    final_leaves = carry if optimizer is None else carry[0]
    adapted = combine(final_leaves)
    if not return_trajectory:
        return adapted
    if steps == 0:
        return adapted, jax.tree.map(
            lambda p: jnp.zeros((0,) + jnp.shape(p), jnp.result_type(p)), params
        )
    _, leaf_def = jax.tree.flatten(params)
    frozen_like = jax.tree.leaves(params)
    stacked_it = iter(stacked)
    traj_leaves = [
        next(stacked_it) if m else jnp.broadcast_to(p, (steps,) + jnp.shape(p))
        for p, m in zip(frozen_like, mask_leaves, strict=True)
    ]
    return adapted, jax.tree.unflatten(leaf_def, traj_leaves)


def _index_lr(lr_xs, i):
    if isinstance(lr_xs, list):
        return [a[i] for a in lr_xs]
    return lr_xs[i]
