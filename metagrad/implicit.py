r"""Implicit differentiation of any solver: derivatives from the optimality condition it solves.

A solver ``solver(init, *theta) -> x_star`` whose result satisfies
:math:`F(x^\star, \theta) = 0` (for a minimiser, :math:`F = \nabla_x f`) has, by the implicit
function theorem,

.. math:: \frac{\partial x^\star}{\partial \theta} = -A^{-1} B, \qquad
          A = \partial_x F(x^\star, \theta), \quad B = \partial_\theta F(x^\star, \theta),

so a cotangent :math:`v` on :math:`x^\star` pulls back to :math:`\bar\theta = -B^\top u` with
:math:`A^\top u = v`. The linear system is solved with :math:`A^\top`-vector products (VJPs of
:math:`F`) only, never by differentiating the solver's iterations: memory and time of the
backward pass do not depend on how many iterations the solver ran. jaxopt's ``custom_root``
did this before it was unmaintained; this module is its small successor for metagrad.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from metagrad._types import PyTree

SOLVES = ("cg", "normal_cg", "gmres", "bicgstab", "neumann", "dense")
"""The linear solvers :func:`implicit_diff` and :func:`implicit_vjp` accept."""


def _check_solve(solve: str, tol, maxiter, ridge, neumann_scale) -> None:
    if solve not in SOLVES:
        raise ValueError(f"implicit_diff: solve must be one of {SOLVES}, got {solve!r}")
    if not (isinstance(maxiter, int) and not isinstance(maxiter, bool) and maxiter >= 1):
        raise ValueError(f"implicit_diff: maxiter must be a positive int, got {maxiter!r}")
    if not tol >= 0 or not ridge >= 0:
        raise ValueError(f"implicit_diff: tol and ridge must be >= 0, got {tol!r}, {ridge!r}")
    if not neumann_scale > 0:
        raise ValueError(f"implicit_diff: neumann_scale must be > 0, got {neumann_scale!r}")


def _rel_norm(a: PyTree, b: PyTree) -> jax.Array:
    """``||a|| / ||b||`` (0 when both are 0)."""
    na, nb = optax.tree.norm(a), optax.tree.norm(b)
    return jnp.where(nb > 0, na / jnp.where(nb > 0, nb, 1.0), jnp.where(na > 0, jnp.inf, 0.0))


def _neumann(matvec: Callable, b: PyTree, *, tol: float, maxiter: int, scale: float):
    r""":math:`u = \alpha \sum_{k<K} (I - \alpha M)^k b`, stopped when a term falls under
    ``tol * ||b||``; returns ``(u, number of terms)``."""
    b_norm = optax.tree.norm(b)
    term0 = jax.tree.map(lambda x: scale * x, b)

    def cond(carry):
        _, term, k = carry
        return (k < maxiter) & (optax.tree.norm(term) > tol * b_norm)

    def body(carry):
        u, term, k = carry
        u = jax.tree.map(jnp.add, u, term)
        term = jax.tree.map(lambda t, mt: t - scale * mt, term, matvec(term))
        return u, term, k + 1

    zeros = jax.tree.map(jnp.zeros_like, b)
    u, _, k = lax.while_loop(cond, body, (zeros, term0, jnp.asarray(0, jnp.int32)))
    return u, k


def _dense(matvec: Callable, b: PyTree):
    """Materialises the matrix of ``matvec`` (one product per column) and solves exactly."""
    flat_b, unravel = jax.flatten_util.ravel_pytree(b)
    flat_mv = lambda f: jax.flatten_util.ravel_pytree(matvec(unravel(f)))[0]
    matrix = jax.jacfwd(flat_mv)(jnp.zeros_like(flat_b))  # linear: the Jacobian is the matrix
    return unravel(jnp.linalg.solve(matrix, flat_b))


def _with_ridge(matvec: Callable, ridge: float) -> Callable:
    """``v -> matvec(v) + ridge * v`` (``matvec`` itself when ``ridge`` is 0)."""
    if ridge == 0:
        return matvec
    return lambda v: jax.tree.map(lambda a, x: a + ridge * x, matvec(v), v)


def solve_linear(
    matvec: Callable,
    b: PyTree,
    *,
    solve: str = "cg",
    tol: float = 1e-6,
    maxiter: int = 100,
    ridge: float = 0.0,
    neumann_scale: float = 1.0,
    rmatvec: Callable | None = None,
) -> tuple[PyTree, dict]:
    r"""Solves :math:`(M + rI) u = b` for a linear operator given by ``matvec`` (:math:`M`).

    Solvers: ``cg`` (symmetric positive definite :math:`M`), ``normal_cg`` (CG on
    :math:`(M + rI)(M + rI)^\top w = b`, :math:`u = (M + rI)^\top w`; any invertible :math:`M`,
    needs ``rmatvec`` = :math:`M^\top`), ``gmres`` and ``bicgstab`` (non-symmetric), ``neumann``
    (the series :math:`u = \alpha\sum_{k<K}(I - \alpha M)^k b`, which converges when the
    spectral radius of :math:`I - \alpha M` is below one; :math:`\alpha` = ``neumann_scale``,
    :math:`K \le` ``maxiter``) and ``dense`` (materialises :math:`M`; small problems and tests).
    ``tol`` is relative to :math:`\|b\|`.

    Returns:
        ``(u, metrics)`` with ``metrics["solve_residual"]`` :math:`= \|(M + rI)u - b\| / \|b\|`
        and, for ``neumann``, ``metrics["solve_iterations"]`` (terms summed).

    Example:
        >>> m = jnp.array([[3.0, 1.0], [1.0, 2.0]])
        >>> u, metrics = solve_linear(lambda v: m @ v, jnp.array([1.0, 1.0]), solve="dense")
        >>> [round(float(x), 4) for x in u], bool(metrics["solve_residual"] < 1e-6)
        ([0.2, 0.4], True)
    """
    _check_solve(solve, tol, maxiter, ridge, neumann_scale)
    op = _with_ridge(matvec, ridge)
    metrics = {}
    if solve == "cg":
        u, _ = jax.scipy.sparse.linalg.cg(op, b, tol=tol, maxiter=maxiter)
    elif solve == "normal_cg":
        if rmatvec is None:
            raise ValueError("solve_linear: solve='normal_cg' needs rmatvec (the transpose)")
        rop = _with_ridge(rmatvec, ridge)
        w, _ = jax.scipy.sparse.linalg.cg(lambda v: op(rop(v)), b, tol=tol, maxiter=maxiter)
        u = rop(w)
    elif solve == "gmres":
        u, _ = jax.scipy.sparse.linalg.gmres(
            op, b, tol=tol, atol=0.0, maxiter=maxiter, solve_method="batched"
        )
    elif solve == "bicgstab":
        u, _ = jax.scipy.sparse.linalg.bicgstab(op, b, tol=tol, atol=0.0, maxiter=maxiter)
    elif solve == "neumann":
        u, metrics["solve_iterations"] = _neumann(
            op, b, tol=tol, maxiter=maxiter, scale=neumann_scale
        )
    else:
        u = _dense(op, b)
    metrics["solve_residual"] = _rel_norm(jax.tree.map(jnp.subtract, op(u), b), b)
    return u, metrics


def implicit_vjp(
    optimality_fn: Callable,
    x_star: PyTree,
    theta: tuple,
    cotangent: PyTree,
    *,
    solve: str = "cg",
    tol: float = 1e-6,
    maxiter: int = 100,
    ridge: float = 0.0,
    neumann_scale: float = 1.0,
    matvec: Callable | None = None,
) -> tuple[tuple, dict]:
    r"""The pull-back of ``cotangent`` on :math:`x^\star` to ``theta``, by the implicit function
    theorem, with the linear solve's metrics.

    .. math:: (A + rI)^\top u = v, \qquad \bar\theta = -B^\top u,

    :math:`A = \partial_x F`, :math:`B = \partial_\theta F` at :math:`(x^\star, \theta)`,
    :math:`F` = ``optimality_fn(x, *theta)`` (a pytree shaped like ``x``), :math:`r` = ``ridge``
    (damping). ``matvec`` replaces :math:`u \mapsto A^\top u` (e.g. by a Gauss-Newton product);
    by default it is a VJP of :math:`F`. ``solve`` and the other keywords are
    :func:`solve_linear`'s; for ``cg``, :math:`A` must be symmetric positive definite (a
    gradient's Jacobian at a strict minimum is).

    Returns:
        ``(theta_cotangents, metrics)``: a tuple like ``theta`` and :func:`solve_linear`'s
        metrics.

    Example:
        :math:`F(x, t) = 2x - t` has :math:`x^\star = t/2`, so :math:`\bar t = v/2`:

        >>> (g,), m = implicit_vjp(lambda x, t: 2 * x - t, 1.5, (3.0,), 1.0, solve="dense")
        >>> float(g)
        0.5
    """
    theta = tuple(theta)
    _, vjp_x = jax.vjp(lambda x: optimality_fn(x, *theta), x_star)
    a_t = matvec or (lambda u: vjp_x(u)[0])
    rmatvec = None
    if solve == "normal_cg":  # needs A itself: a JVP of F
        if matvec is not None:
            raise ValueError("implicit_vjp: solve='normal_cg' needs A's JVP; pass no matvec")
        rmatvec = lambda u: jax.jvp(lambda x: optimality_fn(x, *theta), (x_star,), (u,))[1]
    u, metrics = solve_linear(
        a_t,
        cotangent,
        solve=solve,
        tol=tol,
        maxiter=maxiter,
        ridge=ridge,
        neumann_scale=neumann_scale,
        rmatvec=rmatvec,
    )
    _, vjp_theta = jax.vjp(lambda *t: optimality_fn(x_star, *t), *theta)
    grads = vjp_theta(jax.tree.map(jnp.negative, u))
    return grads, metrics


def implicit_diff(
    optimality_fn: Callable,
    *,
    solve: str = "cg",
    tol: float = 1e-6,
    maxiter: int = 100,
    ridge: float = 0.0,
    neumann_scale: float = 1.0,
    has_aux: bool = False,
    return_metrics: bool = False,
) -> Callable[[Callable], Callable]:
    r"""Decorates ``solver(init, *theta) -> x_star`` so that its derivatives with respect to
    ``theta`` come from the implicit function theorem, not from its iterations.

    With :math:`F` = ``optimality_fn(x, *theta)`` and :math:`F(x^\star, \theta) = 0`, a
    cotangent :math:`v` on :math:`x^\star` becomes

    .. math:: \bar\theta = -\big(\partial_\theta F\big)^\top u, \qquad
              \big(\partial_x F + rI\big)^\top u = v

    (see :func:`implicit_vjp`; the solve uses VJPs of :math:`F` only). ``init`` gets a zero
    cotangent: :math:`x^\star` does not depend on where the solver starts. ``x`` and every
    ``theta`` are pytrees; integer leaves of ``theta`` get no gradient. The decorated solver
    works under ``jit``, ``vmap`` and ``shard_map`` (it is a ``jax.custom_vjp``; forward-mode
    derivatives are not defined).

    Args:
        optimality_fn: ``F(x, *theta)``, a pytree shaped like ``x``, zero at the solution; for
            ``solver`` a minimiser of ``f(x, *theta)``, ``jax.grad(f)``.
        solve: the linear solver (:data:`SOLVES`): ``cg`` for symmetric positive definite
            :math:`\partial_x F` (minimisers), ``normal_cg``, ``gmres`` or ``bicgstab`` for
            non-symmetric ones, ``neumann`` (a truncated series), ``dense`` (small problems).
        tol, maxiter, ridge, neumann_scale: see :func:`solve_linear`.
        has_aux: ``solver`` returns ``(x_star, aux)``; ``aux`` is passed on without gradient.
        return_metrics: also return ``{"optimality_residual": ||F(x*, theta)||}``, the forward
            pass's distance from a solution (the gradients are exact only near 0). The linear
            solve's metrics belong to the backward pass: :func:`implicit_vjp` returns them.

    Example:
        Ridge regression :math:`x^\star(\lambda) = \arg\min \frac12(x - 3)^2 + \frac\lambda2 x^2
        = 3 / (1 + \lambda)`, solved by 100 gradient steps; :math:`dx^\star/d\lambda =
        -3/(1+\lambda)^2 = -0.75` at :math:`\lambda = 1`:

        >>> f = lambda x, lam: 0.5 * (x - 3.0) ** 2 + 0.5 * lam * x**2
        >>> @implicit_diff(jax.grad(f), solve="cg")
        ... def solver(init, lam):
        ...     return jax.lax.fori_loop(0, 100, lambda i, x: x - 0.3 * jax.grad(f)(x, lam), init)
        >>> round(float(jax.grad(solver, argnums=1)(0.0, 1.0)), 6)
        -0.75
    """
    _check_solve(solve, tol, maxiter, ridge, neumann_scale)
    solve_kw = dict(solve=solve, tol=tol, maxiter=maxiter, ridge=ridge, neumann_scale=neumann_scale)

    def decorator(solver: Callable) -> Callable:
        @jax.custom_vjp
        def solved(init, *theta):
            return solver(init, *theta)

        def fwd(init, *theta):
            out = solver(init, *theta)
            x_star = out[0] if has_aux else out
            return out, (init, x_star, theta)

        def bwd(res, cotangent):
            init, x_star, theta = res
            v = cotangent[0] if has_aux else cotangent
            grads, _ = implicit_vjp(optimality_fn, x_star, theta, v, **solve_kw)
            return (_zero_cotangent(init), *grads)

        solved.defvjp(fwd, bwd)

        @functools.wraps(solver)
        def wrapped(init, *theta):
            init, theta = _vary_alike((init, theta))
            out = solved(init, *theta)
            if has_aux:
                out = (out[0], lax.stop_gradient(out[1]))
            if not return_metrics:
                return out
            x_star = lax.stop_gradient(out[0] if has_aux else out)
            resid = optimality_fn(x_star, *lax.stop_gradient(theta))
            return out, {"optimality_residual": optax.tree.norm(resid)}

        return wrapped

    return decorator


def _vary_alike(tree: Any) -> Any:
    """Under ``shard_map``, every leaf made varying over the manual axes any leaf varies over.

    A ``custom_vjp``'s backward rule must return a cotangent as varying as its input; the
    cotangent of a replicated ``theta`` computed from per-shard data varies. Casting the inputs
    first makes JAX sum that cotangent over the shards (the cast's transpose), as it does for
    ordinary functions. Outside ``shard_map`` nothing varies and this is the identity.
    """
    leaves, treedef = jax.tree.flatten(tree)
    vmas = [_varying_axes(x) for x in leaves]
    axes = frozenset().union(*vmas)
    if not axes:
        return tree
    cast = [
        x if vma == axes else lax.pcast(x, tuple(sorted(axes - vma)), to="varying")
        for x, vma in zip(leaves, vmas, strict=True)
    ]
    return jax.tree.unflatten(treedef, cast)


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; older JAX: aval.vma
    return frozenset(manual.varying) if manual is not None else getattr(aval, "vma", frozenset())


def _zero_cotangent(tree: Any) -> PyTree:
    """Zeros for every leaf (float0 for integer leaves, as JAX requires)."""

    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


__all__ = ["implicit_diff", "implicit_vjp", "solve_linear"]
