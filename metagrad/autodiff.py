"""Higher-order autodiff tools, from JAX's advanced-autodiff tutorial (pure JAX, pytrees in/out).

Everything here is a thin, tested composition of `jax.grad`, `jax.jvp`, `jax.vjp` and
`jax.vmap`; none of it builds a Hessian unless its name says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


def derivative(f: Callable, order: int = 1) -> Callable:
    r"""The ``order``-th derivative of a scalar function of a scalar, by repeated ``jax.grad``.

    .. math:: f^{(n)}(x) = \frac{d}{dx} f^{(n-1)}(x), \qquad f^{(0)} = f.

    Args:
        f: a function of one scalar returning a scalar.
        order: a non-negative integer; 0 returns ``f`` itself.

    Returns:
        A function ``x -> f^(order)(x)``.

    Example:
        >>> f = lambda x: x**3 + 2 * x**2 - 3 * x + 1
        >>> [float(derivative(f, n)(1.0)) for n in (1, 2, 3, 4)]
        [4.0, 10.0, 6.0, 0.0]
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"derivative: order must be a non-negative int, got {order!r}")
    for _ in range(order):
        f = jax.grad(f)
    return f


def hessian(f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    r"""Hessian of a scalar function, forward-over-reverse: ``jacfwd(grad(f))``.

    .. math:: H_{ij} = \frac{\partial^2 f}{\partial x_i \partial x_j}

    For a pytree argument the result is a pytree of blocks: ``H[a][b]`` has shape
    ``a.shape + b.shape``, as ``jax.hessian`` returns it.

    Args:
        f: a scalar-valued function.
        argnums: which positional argument(s) to differentiate.

    Example:
        >>> H = hessian(lambda x: x @ x)(jnp.array([1.0, 2.0, 3.0]))
        >>> H.tolist()
        [[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]
    """
    return jax.jacfwd(jax.grad(f, argnums=argnums), argnums=argnums)


def hvp(f: Callable, x: PyTree, v: PyTree) -> PyTree:
    r"""Hessian-vector product :math:`\nabla^2 f(x)\, v`, forward-over-reverse.

    Computed as the directional derivative of the gradient,
    :math:`\frac{d}{d\epsilon} \nabla f(x + \epsilon v)|_{\epsilon=0}`, with one ``jvp`` of
    ``grad(f)``: the cost is a small multiple of one gradient, and the Hessian is never built.

    Args:
        f: a scalar function of one pytree argument.
        x: the point (a pytree).
        v: the direction, with the same structure as ``x``.

    Returns:
        A pytree shaped like ``x``.

    Example:
        >>> f = lambda x: jnp.sum(x**3)
        >>> hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0])).tolist()  # 6 x * v
        [6.0, 12.0]
    """
    _check_same_structure(x, v, "hvp", "x", "v")
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def gnvp(predict_fn: Callable, loss_fn: Callable, x: PyTree, v: PyTree) -> PyTree:
    r"""Gauss-Newton-vector product :math:`J^\top H_\ell J v`.

    For a loss :math:`\ell(z)` of model outputs :math:`z = g(x)`, the Gauss-Newton matrix
    :math:`G = J^\top H_\ell J` (with :math:`J = \partial g / \partial x` and
    :math:`H_\ell = \nabla_z^2 \ell`) drops the second-derivative term of :math:`g` from the
    Hessian; it is positive semi-definite whenever :math:`\ell` is convex. One ``jvp`` of ``g``,
    one Hessian-vector product of ``ell`` in output space and one ``vjp`` of ``g``.

    Args:
        predict_fn: ``x -> z``, the model's outputs (any pytree).
        loss_fn: ``z -> scalar``.
        x: the point (a pytree).
        v: the direction, with the same structure as ``x``.

    Example:
        >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0]])
        >>> # For a linear model and squared loss, G = 2 A^T A.
        >>> gnvp(lambda x: A @ x, lambda z: z @ z, jnp.zeros(2), jnp.array([1.0, 0.0])).tolist()
        [20.0, 28.0]
    """
    _check_same_structure(x, v, "gnvp", "x", "v")
    z, jv = jax.jvp(predict_fn, (x,), (v,))
    hjv = jax.jvp(jax.grad(loss_fn), (z,), (jv,))[1]
    _, vjp_fn = jax.vjp(predict_fn, x)
    return vjp_fn(hjv)[0]


class Estimate(NamedTuple):
    r"""A Monte Carlo estimate: its mean and the standard error of that mean (pytrees alike).

    For samples :math:`s_1, \dots, s_n`: :math:`\bar s = \frac1n \sum_i s_i` and
    :math:`\mathrm{se} = \mathrm{sd}(s) / \sqrt{n}` (``sd`` with :math:`n - 1`), so
    :math:`\bar s \pm 1.96\,\mathrm{se}` is an approximate 95% confidence interval.

    Example:
        The trace of :math:`H = [[2, 1], [1, 2]]` is 4; a Rademacher probe gives
        :math:`v^\top H v \in \{2, 6\}`, so eight of them leave a visible standard error:

        >>> f = lambda x: x @ jnp.array([[2.0, 1.0], [1.0, 2.0]]) @ x / 2
        >>> est = hutchinson_trace(f, jnp.zeros(2), jax.random.key(0), num_samples=8)
        >>> bool(est.stderr > 0)
        True
        >>> bool(abs(est.mean - 4.0) <= 1.96 * est.stderr)  # the 95% interval holds tr H
        True
    """

    mean: PyTree
    stderr: PyTree


def _rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    signs = [
        jax.random.rademacher(k, jnp.shape(x), dtype=jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, signs)


def _hutchinson_samples(f, x, key, num_samples):
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"hutchinson: num_samples must be an int >= 2, got {num_samples!r}")
    probes = jax.vmap(lambda k: _rademacher_like(k, x))(jax.random.split(key, num_samples))
    hv = jax.vmap(lambda v: hvp(f, x, v))(probes)
    return probes, hv


def _mean_and_stderr(samples: jax.Array) -> Estimate:
    n = samples.shape[0]
    return Estimate(jnp.mean(samples, axis=0), jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(n))


def hutchinson_trace(f: Callable, x: PyTree, key: jax.Array, *, num_samples: int = 100) -> Estimate:
    r"""Hutchinson's estimate of :math:`\operatorname{tr} \nabla^2 f(x)`.

    With Rademacher probes :math:`v` (entries :math:`\pm 1`),
    :math:`E[v^\top H v] = \operatorname{tr} H`;
    the estimate averages ``num_samples`` such products (each one :func:`hvp`) and reports the
    standard error of that average.

    Example:
        >>> f = lambda x: jnp.sum(jnp.arange(1.0, 4.0) * x**2)  # H = diag(2, 4, 6)
        >>> est = hutchinson_trace(f, jnp.ones(3), jax.random.key(0), num_samples=10)
        >>> float(est.mean), float(est.stderr)  # exact for a diagonal H
        (12.0, 0.0)
    """
    probes, hv = _hutchinson_samples(f, x, key, num_samples)
    per_sample = sum(
        jnp.sum((p * h).reshape(num_samples, -1), axis=1)
        for p, h in zip(jax.tree.leaves(probes), jax.tree.leaves(hv), strict=True)
    )
    return _mean_and_stderr(per_sample)


def hutchinson_diagonal(
    f: Callable, x: PyTree, key: jax.Array, *, num_samples: int = 100
) -> Estimate:
    r"""Hutchinson-style estimate of the Hessian's diagonal, :math:`E[v \odot H v]`.

    With Rademacher probes, :math:`E[v_i (Hv)_i] = H_{ii}`; mean and standard error are pytrees
    shaped like ``x``.

    Example:
        >>> f = lambda x: jnp.sum(jnp.arange(1.0, 4.0) * x**2)
        >>> est = hutchinson_diagonal(f, jnp.ones(3), jax.random.key(0), num_samples=10)
        >>> est.mean.tolist()
        [2.0, 4.0, 6.0]
    """
    probes, hv = _hutchinson_samples(f, x, key, num_samples)
    products = jax.tree.map(lambda p, h: p * h, probes, hv)
    estimates = jax.tree.map(_mean_and_stderr, products)
    is_est = lambda t: isinstance(t, Estimate)
    return Estimate(
        jax.tree.map(lambda e: e.mean, estimates, is_leaf=is_est),
        jax.tree.map(lambda e: e.stderr, estimates, is_leaf=is_est),
    )


def per_example_grads(
    loss_fn: Callable, in_axes: Sequence[int | None], *, has_aux: bool = False, argnums: int = 0
) -> Callable:
    r"""Per-example gradients: ``jit(vmap(grad(loss_fn), in_axes))``, as in the JAX tutorial.

    For a batch :math:`\{(x_b)\}`, returns :math:`\nabla_\theta \ell(\theta, x_b)` for every ``b``,
    stacked on a leading axis, in one compiled call.

    Args:
        loss_fn: ``loss_fn(params, *batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
        in_axes: ``vmap``'s ``in_axes``: ``None`` for the shared params, ``0`` for batched inputs.
        has_aux: whether ``loss_fn`` returns ``(loss, aux)``; then ``(grads, aux)`` are returned.
        argnums: which argument to differentiate.

    Example:
        >>> loss = lambda w, x: jnp.sum(w * x) ** 2
        >>> xs = jnp.array([[1.0, 0.0], [1.0, 1.0]])
        >>> g = per_example_grads(loss, in_axes=(None, 0))(jnp.ones(2), xs)
        >>> g.tolist()  # 2 (w.x) x, row by row
        [[2.0, 0.0], [4.0, 4.0]]
    """
    return jax.jit(jax.vmap(jax.grad(loss_fn, argnums=argnums, has_aux=has_aux), in_axes=in_axes))


def per_example_grad_norms(grads: PyTree) -> jax.Array:
    r"""Global L2 norm of each example's gradient, :math:`\|g_b\|_2` over all leaves: ``(B,)``.

    Example:
        >>> per_example_grad_norms({"w": jnp.array([[3.0, 4.0], [0.0, 1.0]])}).tolist()
        [5.0, 1.0]
    """
    leaves = jax.tree.leaves(grads)
    squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in leaves]
    return jnp.sqrt(sum(squares))


def clip_per_example(grads: PyTree, max_norm: float) -> PyTree:
    r"""Scale each example's gradient to norm at most ``max_norm`` (as DP-SGD does).

    .. math:: g_b \leftarrow g_b \cdot \min\left(1, \frac{c}{\|g_b\|_2}\right)

    Example:
        >>> clip_per_example({"w": jnp.array([[6.0, 8.0], [0.0, 1.0]])}, 5.0)["w"].tolist()
        [[3.0, 4.0], [0.0, 1.0]]
    """
    if not max_norm > 0:
        raise ValueError(f"clip_per_example: max_norm must be positive, got {max_norm!r}")
    norms = per_example_grad_norms(grads)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, jnp.finfo(norms.dtype).tiny))

    def _scale(g):
        return g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)

    return jax.tree.map(_scale, grads)


def _check_same_structure(a: PyTree, b: PyTree, fn: str, a_name: str, b_name: str) -> None:
    sa, sb = jax.tree.structure(a), jax.tree.structure(b)
    if sa != sb:
        raise ValueError(f"{fn}: {b_name} must have the structure of {a_name}; got {sb} vs {sa}")
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.shape(la) != jnp.shape(lb):
            raise ValueError(
                f"{fn}: {b_name} leaf shape {jnp.shape(lb)} != {a_name} leaf shape {jnp.shape(la)}"
            )
