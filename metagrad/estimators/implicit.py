"""The implicit estimator: the meta-gradient of any inner problem through its optimality
condition (:mod:`metagrad.implicit`), never through the inner solver's iterations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401 (the examples use it)
import optax
from jax import lax

from metagrad._types import MetaParams, MetricsFn
from metagrad.estimators.base import (
    InnerLoop,
    MetaGradEstimator,
    adaptation_metrics,
    check_meta_params,
    no_learned_lr,
)
from metagrad.implicit import _check_solve, implicit_vjp
from metagrad.inner import proximal


@dataclass(frozen=True)
class SolverInner:
    """A user's inner solver ``solver(loss_fn, params, support) -> adapted`` in the place of an
    :class:`InnerLoop`, so that evaluation adapts with it as training does. It runs as it is:
    another step count or a trajectory is refused."""

    solver: Callable
    steps: int | None = None
    step_arg: bool = False
    mask: Any = None
    learns_lr: bool = False

    def rates(self, meta_params: MetaParams):
        check_meta_params(meta_params)
        if meta_params.lr is not None:
            raise ValueError("the implicit estimator does not meta-learn inner rates: drop lr")

    def run(
        self, loss_fn, meta_params, support, *, first_order=False, steps=None,
        return_trajectory=False,
    ):  # fmt: skip
        if steps is not None or return_trajectory:
            raise ValueError(
                "a custom inner_solver runs as it is: no steps override or trajectory "
                "(pass an InnerLoop as inner_solver for evaluation curves)"
            )
        self.rates(meta_params)
        return self.solver(loss_fn, meta_params.params, support)


def proximal_optimality(reg: float) -> Callable:
    r"""iMAML's optimality condition :math:`F(\phi, \theta) = \nabla_\phi L(\phi; S) +
    \lambda(\phi - \theta)`, zero at the proximal problem's solution.

    Example:
        >>> F = proximal_optimality(2.0)
        >>> float(F(lambda p, b: (p - b) ** 2, 1.0, 0.0, 3.0))  # 2 (1 - 3) + 2 (1 - 0)
        -2.0
    """
    return lambda loss_fn, phi, theta, support: jax.grad(proximal(loss_fn, theta, reg))(
        phi, support
    )


def _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss) -> dict:
    """Pre- and post-adaptation metrics; with a custom solver only post-adaptation ones, as its
    ``theta`` need not be model parameters (a hyperparameter, say)."""
    if isinstance(inner, InnerLoop):
        return adaptation_metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)
    adapted = lax.stop_gradient(adapted)
    out = {"loss_post": lax.stop_gradient(loss)}
    for k, v in ({} if metrics_fn is None else metrics_fn(adapted, task.query)).items():
        out[f"{k}_post"] = v
    return out


def implicit(
    *,
    inner_solver: InnerLoop | Callable,
    optimality: Callable | None = None,
    reg: float | None = None,
    solve: str = "cg",
    tol: float = 1e-6,
    maxiter: int = 20,
    ridge: float = 0.0,
    neumann_scale: float = 1.0,
    matvec: Callable | None = None,
    metrics_fn: MetricsFn | None = None,
    name: str = "implicit",
) -> MetaGradEstimator:
    r"""The implicit meta-gradient of any inner problem, by the implicit function theorem.

    The inner solver returns :math:`\phi^\star(\theta)` with
    :math:`F(\phi^\star, \theta; S) = 0`; then

    .. math:: g = -\big(\partial_\theta F\big)^\top u, \qquad
              \big(\partial_\phi F + rI\big)^\top u = \nabla_\phi L(\phi^\star; Q)

    (:func:`metagrad.implicit.implicit_vjp`, :math:`r` = ``ridge``). The solver's iterations are
    never differentiated, so memory does not grow with its step count.

    Args:
        inner_solver: an :class:`InnerLoop` (run with no gradient tape from
            :math:`\theta`), or any ``solver(loss_fn, params, support) -> adapted``.
        optimality: ``F(loss_fn, phi, theta, support)``, a pytree shaped like ``phi``. Default,
            with ``reg``: :func:`proximal_optimality` (iMAML's problem; an InnerLoop then gets
            the proximal term too). One of the two is needed: the plain stationarity
            :math:`\nabla L(\phi; S) = 0` does not depend on :math:`\theta`.
        solve, tol, maxiter, ridge, neumann_scale: the linear solve
            (:func:`metagrad.implicit.solve_linear`).
        matvec: ``matvec(loss_fn, phi, theta, support) -> (u -> (dF/dphi)^T u)`` in place of
            the VJP of :math:`F` (e.g. a Gauss-Newton product).
        metrics_fn: extra query metrics, pre and post adaptation.

    With a custom solver, :math:`\theta` need not be model parameters (a per-feature L2
    strength learned on a validation loss is a meta-gradient too), and only post-adaptation
    metrics are reported. The metrics hold ``solve_residual`` (the linear solve's relative
    residual) and ``optimality_residual`` :math:`\|F(\phi, \theta)\|`: the estimate is exact
    only when both are near 0.

    Example:
        :math:`L(p) = (p - 2)^2` with :math:`\lambda = 1` from :math:`\theta = 0`:
        :math:`g = -4/9`, as :func:`metagrad.imaml` gives.

        >>> from metagrad import InnerLoop, MetaParams, Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = implicit(inner_solver=InnerLoop(steps=20, lr=0.2), reg=1.0)
        >>> (loss, metrics), g = est.value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4), bool(metrics["solve_residual"] < 1e-6)
        (-0.4444, True)
    """
    _check_solve(solve, tol, maxiter, ridge, neumann_scale)
    if optimality is None and reg is None:
        raise ValueError(
            "implicit: pass optimality=F(loss_fn, phi, theta, support), or reg for iMAML's "
            "proximal problem (the plain stationarity grad L(phi; S) = 0 does not depend on theta)"
        )
    if reg is not None and not isinstance(reg, jax.core.Tracer) and not reg > 0:  # traced: checked
        raise ValueError(f"implicit: reg must be positive, got {reg!r}")
    if optimality is None:
        optimality = proximal_optimality(reg)
    if isinstance(inner_solver, InnerLoop):
        inner = inner_solver
        if reg is not None and inner.prox_reg is None:
            inner = InnerLoop(**{**inner.__dict__, "prox_reg": reg})
        no_learned_lr(inner, name)
    elif callable(inner_solver):
        inner = SolverInner(inner_solver)
    else:
        raise TypeError(
            f"implicit: inner_solver must be an InnerLoop or a callable, got {inner_solver!r}"
        )
    solve_kw = dict(solve=solve, tol=tol, maxiter=maxiter, ridge=ridge, neumann_scale=neumann_scale)

    def solve_inner(loss_fn, meta_params, support):
        stopped = MetaParams(lax.stop_gradient(meta_params.params), meta_params.lr)
        return lax.stop_gradient(inner.run(loss_fn, stopped, support, first_order=True))

    def objective(loss_fn, meta_params, task, step):
        # Exact as a function of theta only when the inner problem is solved to convergence.
        adapted = inner.run(loss_fn, meta_params, task.support)
        loss = loss_fn(adapted, task.query)
        return loss, _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)

    def value_and_grad(loss_fn, meta_params, task, step):
        inner.rates(meta_params)  # checks meta_params
        adapted = solve_inner(loss_fn, meta_params, task.support)
        loss, g_query = jax.value_and_grad(loss_fn)(adapted, task.query)
        theta = lax.stop_gradient(meta_params.params)
        F = lambda phi, th: optimality(loss_fn, phi, th, task.support)
        mv = None if matvec is None else matvec(loss_fn, adapted, theta, task.support)
        (g,), solve_metrics = implicit_vjp(F, adapted, (theta,), g_query, matvec=mv, **solve_kw)
        metrics = _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)
        metrics.update(solve_metrics)  # solve_residual (and neumann's solve_iterations)
        metrics["optimality_residual"] = optax.tree.norm(F(adapted, theta))
        return (loss, metrics), MetaParams(g)

    return MetaGradEstimator(name, objective, value_and_grad, inner)
