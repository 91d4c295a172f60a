"""iMAML (Rajeswaran et al. 2019): the implicit gradient of the proximal inner problem, by
conjugate gradient on Hessian (or Gauss-Newton) vector products; memory independent of steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metagrad._types import MetaParams, MetricsFn  # noqa: F401 (MetaParams: the examples)
from metagrad.autodiff import gnvp
from metagrad.estimators.base import InnerLoop, MetaGradEstimator, no_learned_lr
from metagrad.estimators.implicit import implicit


def imaml(
    *,
    steps: int,
    lr=None,
    reg: float = 1.0,
    cg_iters: int = 10,
    cg_tol: float = 1e-6,
    damping: float = 0.0,
    curvature: str = "hessian",
    predict_fn: Callable | None = None,
    output_loss: Callable | None = None,
    metrics_fn: MetricsFn | None = None,
    **inner_kwargs,
) -> MetaGradEstimator:
    r"""Implicit MAML (Rajeswaran et al. 2019): the implicit gradient of the proximal inner problem.

    .. math:: \phi^*(\theta) = \arg\min_\phi\; L(\phi; S) + \frac{\lambda}{2}\|\phi - \theta\|^2,
              \qquad g = \Big(I + \frac{H + \delta I}{\lambda}\Big)^{-1} \nabla_\phi L(\phi^*; Q)

    with :math:`H = \nabla^2 L(\phi^*; S)`, :math:`\lambda` = ``reg`` and :math:`\delta` =
    ``damping``. :math:`\phi^*` is approximated by ``steps`` inner steps from :math:`\theta` with
    no gradient tape; the linear system is solved by conjugate gradient on Hessian-vector
    products (``cg_iters``, ``cg_tol``), so memory does not grow with ``steps``.

    The estimate is exact only when :math:`\phi` solves the proximal problem and CG solves the
    system; the metrics ``inner_residual`` (:math:`\|\nabla P(\phi)\| / \|\nabla P(\theta)\|` for
    the proximal objective :math:`P`) and ``cg_residual`` (:math:`\|Ag - b\| / \|b\|`) say how far
    from that a run is. CG needs :math:`I + (H + \delta I)/\lambda` positive definite: a ReLU
    MLP's Hessian away from a minimiser has eigenvalues far below :math:`-\lambda` (sinusoid MLP at
    init: -9 to -33), and then CG's output is not the implicit gradient (``cg_residual`` near 1).

    ``curvature="gauss_newton"`` puts the Gauss-Newton matrix :math:`G = J^\top H_\ell J` (see
    :func:`metagrad.gnvp`) in place of :math:`H`: positive semi-definite for a convex output loss,
    so the system is symmetric positive definite and CG well posed; :math:`G = H` at an
    interpolating minimiser and for linear models. It needs the loss split as
    ``loss_fn(p, (x, y)) == output_loss(predict_fn(p, x), y)``.

    Example:
        For :math:`L(p) = (p - 2)^2` on support and query (:math:`H = 2`), :math:`\lambda = 1`
        and :math:`\theta = 0`: :math:`\phi^* = 4/3` and
        :math:`g = (1 + 2)^{-1} \cdot 2 (4/3 - 2) = -4/9` (20 inner steps converge here):

        >>> from metagrad import Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = imaml(steps=20, lr=0.2, reg=1.0)
        >>> (loss, _), g = est.value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4)
        -0.4444
    """
    # A traced reg (one per run of a batched program) was checked on the host before tracing.
    if not isinstance(reg, jax.core.Tracer) and (not reg > 0 or not math.isfinite(reg)):
        raise ValueError(f"imaml: reg (lambda) must be positive and finite, got {reg!r}")
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise ValueError(f"imaml: cg_iters must be a positive int, got {cg_iters!r}")
    if not damping >= 0 or not cg_tol >= 0:
        raise ValueError(f"imaml: damping and cg_tol must be >= 0, got {damping!r}, {cg_tol!r}")
    inner = InnerLoop(steps=steps, lr=lr, prox_reg=reg, **inner_kwargs)
    no_learned_lr(inner, "imaml")
    if inner.mask is not None or inner.step_arg or inner.per_step:
        raise ValueError("imaml supports plain inner loops only (no mask, step_arg or per_step)")
    if curvature not in ("hessian", "gauss_newton"):
        raise ValueError(f"imaml: curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    if curvature == "gauss_newton" and (predict_fn is None or output_loss is None):
        raise ValueError(
            "imaml: curvature='gauss_newton' needs predict_fn(params, x) and output_loss(z, y) "
            "with loss_fn(params, (x, y)) == output_loss(predict_fn(params, x), y)"
        )

    def matvec(loss_fn, adapted, theta, support):
        # (dF/dphi)^T u = (H + reg I) u for F = grad L(phi; S) + reg (phi - theta); H symmetric,
        # so a forward-over-reverse product (or Gauss-Newton's) serves as the transpose.
        if curvature == "gauss_newton":
            x, y = support
            curv = lambda u: gnvp(
                lambda p: predict_fn(p, x), lambda z: output_loss(z, y), adapted, u
            )
        else:
            grad_s = jax.grad(lambda p: loss_fn(p, support))
            curv = lambda u: jax.jvp(grad_s, (adapted,), (u,))[1]
        return lambda u: jax.tree.map(lambda ui, hui: hui + reg * ui, u, curv(u))

    # The system (H + reg I + damping I) u = grad L(phi; Q) is reg times the original
    # (I + (H + damping I) / reg) g = grad L(phi; Q), and g = -(dF/dtheta)^T u = reg u: CG's
    # iterates and stopping rule are the same (CG is invariant to scaling the matrix).
    implicit_est = implicit(
        inner_solver=inner,
        reg=reg,
        solve="cg",
        tol=cg_tol,
        maxiter=cg_iters,
        ridge=damping,
        matvec=matvec,
        metrics_fn=metrics_fn,
        name="imaml",
    )

    def value_and_grad(loss_fn, meta_params, task, step):
        (loss, metrics), g = implicit_est.value_and_grad(loss_fn, meta_params, task, step)
        # Diagnostics (the estimator is exact only when both are ~0): CG's relative residual,
        # and the inner residual ||grad P(phi)|| / ||grad P(theta)|| of the proximal objective P
        # (the optimality residual, relative to its value at the start).
        metrics["cg_residual"] = metrics.pop("solve_residual")
        opt_norm = metrics.pop("optimality_residual")
        theta = lax.stop_gradient(meta_params.params)
        start = optax.tree.norm(jax.grad(loss_fn)(theta, task.support))
        metrics["inner_residual"] = _rel_norm(opt_norm, start)
        return (loss, metrics), g

    return MetaGradEstimator("imaml", implicit_est.objective, value_and_grad, inner)


def _rel_norm(na: jax.Array, nb: jax.Array) -> jax.Array:
    """``na / nb`` for two norms (0 when both are 0), for residual diagnostics."""
    return jnp.where(nb > 0, na / jnp.where(nb > 0, nb, 1.0), jnp.where(na > 0, jnp.inf, 0.0))
