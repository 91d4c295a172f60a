"""Differentiable inner loops: an SGD (or optax) step is just a function that `jax.grad` can see.

`adapt` runs `steps` inner steps with `lax.scan` (or a Python loop with ``unroll=True``). The
meta-gradient of MAML is `jax.grad` of a loss taken after `adapt`: grad-through-grad.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metagrad._types import LossFn, PyTree

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


def _check_mask(params: PyTree, mask: PyTree | Callable[[str], bool] | None) -> list[bool]:
    leaves, treedef = jax.tree.flatten(params)
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):  # a path predicate, resolved against these params
        mask = mask_by_path(params, mask)
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


def with_step(loss_fn: LossFn, step_arg: bool) -> Callable:
    """``loss_fn`` as ``f(params, batch, step)``: the step index is passed on only to models that
    take it (``step_arg=True``), so every caller has one calling convention."""
    if step_arg:
        return loss_fn
    return lambda params, batch, step: loss_fn(params, batch)


def proximal(loss_fn: LossFn, anchor: PyTree, reg: float) -> LossFn:
    r"""iMAML's proximal inner objective :math:`L(\phi; B) + \frac{\lambda}{2}\|\phi - a\|^2`.

    Example:
        >>> float(proximal(lambda p, b: p * b, 1.0, 2.0)(3.0, 1.0))  # 3 + (2 / 2) (3 - 1)^2
        7.0
    """

    def prox(params, batch, *step):
        return loss_fn(params, batch, *step) + 0.5 * reg * sq_dist(params, anchor)

    return prox


def sq_dist(a: PyTree, b: PyTree) -> jax.Array:
    """:math:`\\|a - b\\|^2` summed over every leaf of two pytrees of one structure."""
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.sum((x - y) ** 2) for x, y in leaves)


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


class UpdateRule(NamedTuple):
    """How one inner step turns gradients into new parameters (over the adapted leaves only).

    ``init(leaves) -> state``; ``update(grads, state, leaves, x) -> (leaves, state)``, where
    ``x`` is the step's slice of ``xs`` (per-step rates), or None.
    """

    init: Callable
    update: Callable
    xs: Any


def sgd_rule(lr, params: PyTree, mask_leaves: list[bool], steps: int, per_step: bool):
    """Plain SGD with a shared, per-leaf or per-step rate (see :func:`adapt`'s ``lr``)."""
    kind, rate = _lr_leaves(lr, params, mask_leaves, steps, per_step)

    def update(grads, state, leaves, x):
        rate_i = x if per_step else rate
        rates = [rate_i] * len(leaves) if kind == "shared" else rate_i
        new = [p - (a * g).astype(p.dtype) for p, a, g in zip(leaves, rates, grads, strict=True)]
        return new, state

    return UpdateRule(lambda leaves: (), update, rate if per_step else None)


def optax_rule(optimizer: optax.GradientTransformation, *, first_order: bool):
    """Any optax optimizer, its state started fresh and differentiated through."""

    def update(grads, state, leaves, x):
        updates, state = optimizer.update(grads, state, leaves)
        if first_order:
            updates = lax.stop_gradient(updates)
        return optax.apply_updates(leaves, updates), state

    return UpdateRule(optimizer.init, update, None)


def unroll_steps(
    step_fn: Callable,
    carry,
    xs,
    *,
    steps: int,
    remat: bool,
    python_loop: bool,
    start: int = 0,
    loop_one_step: bool = True,
):
    """``steps`` applications of ``step_fn(carry, (i, x_i)) -> (carry, out)``: a ``lax.scan`` (or
    a Python loop), each step under ``jax.checkpoint`` with ``remat``, the step index ``i``
    counted from ``start``. Returns ``(carry, outs)`` with the outputs stacked on a leading axis
    (None for zero steps).

    A single step runs without a scan (unless ``loop_one_step=False``). A scan's carry has one
    batching for all its iterations, so under ``vmap`` over tasks the shared initial parameters
    would be broadcast to one copy per task first, and the step's products would become batched
    products with per-task weights; without the scan the step multiplies every task's support
    set by the one shared weight matrix (second-order MAML on the sinusoid MLP: 1.12x the
    meta-steps/s on a 2-core CPU).
    """
    if remat:
        step_fn = jax.checkpoint(step_fn)
    ids = jnp.arange(start, start + steps, dtype=jnp.int32)
    if python_loop or steps == 0 or (steps == 1 and loop_one_step):
        outs = []
        for i in range(steps):
            carry, out = step_fn(carry, (ids[i], jax.tree.map(lambda a, i=i: a[i], xs)))
            outs.append(out)
        return carry, (jax.tree.map(lambda *o: jnp.stack(o), *outs) if outs else None)
    return lax.scan(step_fn, carry, (ids, xs))


def adapt(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    steps: int,
    lr=None,
    first_order: bool = False,
    per_step: bool = False,
    mask: PyTree | Callable[[str], bool] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    remat: bool = False,
    unroll: bool = False,
    return_trajectory: bool = False,
    step_arg: bool = False,
    truncate: int | None = None,
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
        mask: which parameters adapt: a params-shaped pytree of Python bools, or a predicate on
            leaf paths such as ``lambda path: path.startswith("head")`` (ANIL). Frozen parameters
            are never differentiated in the inner loop.
        optimizer: an optax ``GradientTransformation`` to use instead of SGD (e.g.
            ``optax.adam(1e-2, eps_root=1e-8)``); its state starts fresh at :math:`\theta` and is
            differentiated through like everything else. An optimizer whose update has no
            derivative at a zero gradient (``optax.adam``'s default ``eps_root=0``) is refused
            unless ``first_order``: it would give NaN meta-gradients (see
            :func:`check_inner_optimizer`).
        remat: wrap each step in ``jax.checkpoint``: the backward pass recomputes a step's
            activations instead of storing them.
        unroll: a Python loop instead of ``lax.scan`` (for small step counts).
        return_trajectory: also return the parameters after each step, stacked on a leading
            axis of length ``steps`` (:math:`\phi_1, \dots, \phi_{steps}`).
        step_arg: pass the step index (an int32 scalar) as ``loss_fn``'s third argument.
        truncate: backpropagate through the last ``truncate`` steps only (truncated
            backpropagation). The first :math:`n = \text{steps} - \text{truncate}` steps run as
            usual, then their result is cut from the tape and reattached to :math:`\theta`
            with an identity Jacobian, :math:`\tilde\phi_n = (\theta - \bar\theta) +
            \bar\phi_n` (:math:`\bar x` = ``stop_gradient(x)``; the value is
            :math:`\phi_n` exactly): so :math:`\partial\phi/\partial\theta =
            \prod_{i \ge n} (I - \alpha_i H_i)` and the first steps count as first order;
            their rates and any optimizer state get no gradient. ``None`` (or
            ``truncate >= steps``) is full backpropagation; ``0`` gives first-order MAML's
            gradient with respect to :math:`\theta` (but none to learned rates).

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
    if truncate is not None:
        _validate_truncate(truncate)
    mask_leaves = _check_mask(params, mask)
    if optimizer is None:
        rule = sgd_rule(lr, params, mask_leaves, steps, per_step)
    else:
        if lr is not None:
            raise ValueError(
                "pass either lr (SGD) or optimizer, not both: the optax optimizer "
                "carries its own learning rate"
            )
        if not first_order:
            check_inner_optimizer(optimizer)
        rule = optax_rule(optimizer, first_order=first_order)
    leaves0, combine = _split(params, mask_leaves)
    loss = with_step(loss_fn, step_arg)

    def step_fn(carry, step_and_x):
        leaves, state = carry
        step, x = step_and_x
        grads = jax.grad(lambda ls: loss(combine(ls), batch, step))(leaves)
        if first_order:
            grads = lax.stop_gradient(grads)
        leaves, state = rule.update(grads, state, leaves, x)
        return (leaves, state), leaves

    carry0 = (leaves0, rule.init(leaves0))
    if truncate is None or truncate >= steps:
        (leaves, _), stacked = unroll_steps(
            step_fn, carry0, rule.xs, steps=steps, remat=remat, python_loop=unroll
        )
    else:
        (leaves, _), stacked = _truncated_unroll(
            step_fn, carry0, rule.xs, leaves0, steps=steps, truncate=truncate, remat=remat,
            python_loop=unroll,
        )  # fmt: skip
    adapted = combine(leaves)
    if not return_trajectory:
        return adapted
    if steps == 0:
        empty = lambda p: jnp.zeros((0,) + jnp.shape(p), jnp.result_type(p))
        return adapted, jax.tree.map(empty, params)
    it = iter(stacked)  # frozen leaves repeat along the trajectory
    traj = [
        next(it) if m else jnp.broadcast_to(p, (steps,) + jnp.shape(p))
        for p, m in zip(jax.tree.leaves(params), mask_leaves, strict=True)
    ]
    return adapted, jax.tree.unflatten(jax.tree.structure(params), traj)


def _validate_truncate(truncate) -> None:
    if isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 0:
        raise ValueError(f"truncate must be None or a non-negative int, got {truncate!r}")


def _truncated_unroll(step_fn, carry0, xs, leaves0, *, steps, truncate, remat, python_loop):
    """The first ``steps - truncate`` steps off the tape (reattached to the initial leaves with an
    identity Jacobian), then the last ``truncate`` steps differentiable."""
    cut = steps - truncate
    head_xs = jax.tree.map(lambda a: a[:cut], xs)
    tail_xs = jax.tree.map(lambda a: a[cut:], xs)
    # The head runs on stopped inputs: nothing of it is kept for the backward pass. Head and
    # tail scan even a single step, so that their steps compile as the full unroll's scan body
    # and truncation leaves the values bit for bit as they were.
    (leaves, state), head = unroll_steps(
        step_fn, lax.stop_gradient(carry0), lax.stop_gradient(head_xs), steps=cut, remat=remat,
        python_loop=python_loop, loop_one_step=False,
    )  # fmt: skip
    # (theta - sg(theta)) + sg(phi): exactly phi in value, d/dtheta = I (the tutorial's
    # straight-through form, whose derivatives are consistent at every order).
    leaves = [
        (p0 - lax.stop_gradient(p0)) + lax.stop_gradient(p)
        for p0, p in zip(leaves0, leaves, strict=True)
    ]
    carry = (leaves, lax.stop_gradient(state))
    carry, tail = unroll_steps(
        step_fn, carry, tail_xs, steps=truncate, remat=remat, python_loop=python_loop, start=cut,
        loop_one_step=False,
    )  # fmt: skip
    if tail is None:
        return carry, lax.stop_gradient(head)
    stacked = jax.tree.map(lambda h, t: jnp.concatenate([lax.stop_gradient(h), t]), head, tail)
    return carry, stacked


@functools.cache
def check_inner_optimizer(optimizer: optax.GradientTransformation) -> None:
    """Refuses an inner optimizer whose update has no derivative at a zero gradient.

    Second-order meta-gradients differentiate the inner update with respect to the gradient.
    ``optax.adam`` with its default ``eps_root=0`` divides by :math:`\\sqrt{v}`, whose derivative
    at :math:`v = 0` is infinite, so the meta-gradient is NaN wherever a support-gradient entry
    is exactly zero (a dead ReLU unit); optax documents ``eps_root > 0`` for this use. The probe
    differentiates one update at a zero gradient and checks that the result is finite.

    Example:
        >>> check_inner_optimizer(optax.adam(0.1, eps_root=1e-8))  # fine: returns None
        >>> check_inner_optimizer(optax.adam(0.1))
        Traceback (most recent call last):
        ValueError: the inner optimizer's update has no derivative at a zero gradient...
    """
    with jax.ensure_compile_time_eval():
        params = jnp.ones(2, jnp.float32)
        zero = jnp.zeros(2, jnp.float32)
        first_update = lambda g: optimizer.update(g, optimizer.init(params), params)[0]
        finite = bool(jnp.all(jnp.isfinite(jax.jacfwd(first_update)(zero))))
    if not finite:
        raise ValueError(
            "the inner optimizer's update has no derivative at a zero gradient, so second-order "
            "meta-gradients would be NaN wherever a support-gradient entry is exactly zero (e.g. "
            "optax.adam with its default eps_root=0, through sqrt(v) at v=0): use "
            "optax.adam(lr, eps_root=1e-8), or first_order=True"
        )
