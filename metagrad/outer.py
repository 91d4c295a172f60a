"""Meta-objectives and meta-gradient estimators, task batching, and the meta-step.

Meta-parameters are a dict: ``{"params": theta}``, plus ``"lr"`` when the inner learning rates
are meta-learned (Meta-SGD, MAML++). An estimator computes a meta-gradient for one task; what
applies it (an optax optimizer in `meta_learner`) is separate, as in learned_optimization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from metagrad.autodiff import gnvp
from metagrad.inner import LossFn, PyTree, _validate_steps, adapt
from metagrad.tasks.base import Task

MetricsFn = Callable[[PyTree, Any], dict]


def meta_loss(
    loss_fn: LossFn,
    params: PyTree,
    support: Any,
    query: Any,
    *,
    steps: int,
    lr,
    first_order: bool = False,
    **adapt_kwargs,
) -> jax.Array:
    r"""MAML's meta-objective: the query loss after `adapt` on the support set.

    .. math:: \mathcal{L}(\theta) = L\big(\phi(\theta); Q\big), \qquad
              \phi(\theta) = \operatorname{adapt}(\theta; S)

    ``jax.grad`` of this is the MAML meta-gradient (first-order MAML's with ``first_order``).
    Extra keywords go to :func:`metagrad.adapt` (``per_step``, ``mask``, ``optimizer``,
    ``remat``, ``unroll``).

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> batch = (jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0]))
        >>> float(meta_loss(loss_fn, 2.0, batch, batch, steps=1, lr=0.1))  # already optimal
        0.0
    """
    adapted = adapt(
        loss_fn, params, support, steps=steps, lr=lr, first_order=first_order, **adapt_kwargs
    )
    return loss_fn(adapted, query)


# --- estimators --------------------------------------------------------------------------------


class MetaGradEstimator(NamedTuple):
    r"""A meta-gradient estimator for one task.

    Attributes:
        name: e.g. ``"maml"``.
        objective: ``(loss_fn, meta_params, task, step) -> (loss, metrics)``: the meta-objective
            whose gradient is estimated (what `check_meta_grad` differentiates numerically).
        value_and_grad: ``(loss_fn, meta_params, task, step) -> ((loss, metrics), grads)``, with
            ``grads`` shaped like ``meta_params``.

    Example:
        A custom estimator (no adaptation, :math:`g = \nabla_\theta L(\theta; Q)`), checked
        against finite differences like the built-in ones:

        >>> def objective(loss_fn, meta_params, task, step):
        ...     return loss_fn(meta_params["params"], task.query), {}
        >>> def value_and_grad(loss_fn, meta_params, task, step):
        ...     vg = jax.value_and_grad(objective, argnums=1, has_aux=True)
        ...     return vg(loss_fn, meta_params, task, step)
        >>> joint = MetaGradEstimator("joint", objective, value_and_grad)
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> (loss, _), g = joint.value_and_grad(loss_fn, {"params": 0.0}, task, 0)
        >>> float(loss), float(g["params"])  # (0 - 2)^2 and 2 (0 - 2)
        (4.0, -4.0)
        >>> check_meta_grad(joint, loss_fn, {"params": jnp.array(0.5)}, task) < 1e-8
        True
    """

    name: str
    objective: Callable
    value_and_grad: Callable


@dataclass(frozen=True)
class InnerConfig:
    """The inner loop's static settings, shared by every estimator (see :func:`metagrad.adapt`)."""

    steps: int
    lr: Any = None
    per_step: bool = False
    mask: Any = None
    optimizer: Any = None
    remat: bool = False
    unroll: bool = False
    step_arg: bool = False

    def __post_init__(self):
        _validate_steps(self.steps)

    def run(self, loss_fn, meta_params, support, *, first_order, return_trajectory=False):
        lr = meta_params["lr"] if "lr" in meta_params else self.lr
        if lr is None and self.optimizer is None:
            raise ValueError(
                "the inner loop needs lr (SGD), meta_params['lr'] (learned rates) "
                "or an optax optimizer"
            )
        return adapt(
            loss_fn,
            meta_params["params"],
            support,
            steps=self.steps,
            lr=None if self.optimizer is not None else lr,
            first_order=first_order,
            per_step=self.per_step,
            mask=self.mask,
            optimizer=self.optimizer,
            remat=self.remat,
            unroll=self.unroll,
            step_arg=self.step_arg,
            return_trajectory=return_trajectory,
        )


def _query_loss(loss_fn, inner: InnerConfig, params, batch, step_index):
    return loss_fn(params, batch, step_index) if inner.step_arg else loss_fn(params, batch)


def _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss_post):
    """Pre- and post-adaptation query metrics, outside the gradient. ``loss_post`` is the query
    loss at ``adapted``, which every estimator has already computed (recomputing it here costs
    a forward pass per task that XLA does not always merge)."""
    params = lax.stop_gradient(meta_params["params"])
    adapted = lax.stop_gradient(adapted)
    out = {
        "loss_pre": _query_loss(loss_fn, inner, params, task.query, 0),
        "loss_post": lax.stop_gradient(loss_post),
    }
    if metrics_fn is not None:
        for k, v in metrics_fn(params, task.query).items():
            out[f"{k}_pre"] = v
        for k, v in metrics_fn(adapted, task.query).items():
            out[f"{k}_post"] = v
    return out


def maml(
    *,
    steps: int,
    lr=None,
    first_order: bool = False,
    metrics_fn: MetricsFn | None = None,
    **inner_kwargs,
) -> MetaGradEstimator:
    r"""MAML (second order) or, with ``first_order=True``, first-order MAML.

    .. math:: g = \nabla_\theta L\big(\phi(\theta); Q\big)
              = \Big(\prod_i (I - \alpha H_i)\Big)^{\!\top} \nabla_\phi L(\phi; Q)

    where :math:`H_i` is the support-loss Hessian at step :math:`i`; first-order MAML drops the
    :math:`\alpha H_i` terms (:math:`g = \nabla_\phi L(\phi; Q)`). Meta-SGD is MAML with
    ``meta_params["lr"]`` present (then differentiated too); ANIL is MAML with a head-only
    ``mask``. Keywords are :func:`metagrad.adapt`'s.

    Example:
        >>> est = maml(steps=1, lr=0.1)
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> (loss, _), g = est.value_and_grad(loss_fn, {"params": 0.0}, task, 0)
        >>> round(float(g["params"]), 4)  # d/dp (0.8 p + 0.4 - 2)^2 = 2 (0.8 p - 1.6) 0.8
        -2.56
    """
    inner = InnerConfig(steps=steps, lr=lr, **inner_kwargs)

    def objective(loss_fn, meta_params, task, step, fo=first_order):
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=fo)
        loss = _query_loss(loss_fn, inner, adapted, task.query, max(steps - 1, 0))
        return loss, _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)

    def value_and_grad(loss_fn, meta_params, task, step):
        return jax.value_and_grad(objective, argnums=1, has_aux=True)(
            loss_fn, meta_params, task, step
        )

    exact = lambda loss_fn, meta_params, task, step: objective(
        loss_fn, meta_params, task, step, False
    )
    return MetaGradEstimator("fomaml" if first_order else "maml", exact, value_and_grad)


def fomaml(**kwargs) -> MetaGradEstimator:
    r"""First-order MAML: :func:`maml` with ``first_order=True``.

    .. math:: g = \nabla_\phi L(\phi; Q) \big|_{\phi = \phi(\theta)}

    Example:
        One step on :math:`L(p) = (p - 2)^2` from :math:`p = 0` with :math:`\alpha = 0.1`
        reaches :math:`\phi = 0.4`; the gradient there is :math:`2 (0.4 - 2) = -3.2`, where
        :func:`maml` gives :math:`(1 - \alpha H)(-3.2) = 0.8 \cdot (-3.2) = -2.56`.

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = fomaml(steps=1, lr=0.1)
        >>> (loss, _), g = est.value_and_grad(loss_fn, {"params": 0.0}, task, 0)
        >>> round(float(g["params"]), 4)
        -3.2
    """
    return maml(first_order=True, **kwargs)


def msl_weights(step, *, steps: int, anneal_steps: int) -> jax.Array:
    r"""MAML++'s multi-step-loss weights at meta-step ``step`` (shape ``(steps,)``, sum 1).

    They start uniform, :math:`w_i = 1/N`, and move linearly over ``anneal_steps`` meta-steps
    towards the final step: non-final weights decay to :math:`0.03/N`, the final weight grows
    to :math:`1 - 0.03 (N-1)/N` (Antoniou et al. 2019, their released code, per meta-step).

    Example:
        >>> msl_weights(0, steps=4, anneal_steps=100).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    n = steps
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(anneal_steps, 1), 0.0, 1.0)
    floor = 0.03 / n
    nonfinal = jnp.maximum(1.0 / n - progress / n, floor)
    final = jnp.minimum(1.0 / n + progress * (n - 1) / n, 1.0 - (n - 1) * floor)
    return jnp.concatenate([jnp.full((n - 1,), nonfinal), final[None]])


def mamlpp(
    *,
    steps: int,
    lr=None,
    anneal_steps: int = 10_000,
    first_order_until: int = 0,
    metrics_fn: MetricsFn | None = None,
    **inner_kwargs,
) -> MetaGradEstimator:
    r"""MAML++'s meta-gradient: the multi-step loss with annealed weights and derivative-order
    annealing (Antoniou et al. 2019).

    .. math:: \mathcal{L}(\theta) = \sum_{i=1}^{N} w_i(t)\, L\big(\phi_i(\theta); Q\big)

    with :math:`w(t)` from :func:`msl_weights` at meta-step :math:`t`; first-order gradients
    while :math:`t <` ``first_order_until``, second-order after. Per-layer, per-step learned
    rates come from ``meta_params["lr"]`` with ``per_step=True``; per-step batch norm from a
    model that takes the step index (``step_arg=True``).

    Example:
        Two steps on :math:`L(p) = (p - 2)^2` from :math:`p = 1` (:math:`\alpha = 0.1`) give
        :math:`\phi_1 = 1.2, \phi_2 = 1.36`; at meta-step 0 the weights are uniform, so the loss
        is :math:`(0.64 + 0.4096) / 2` and its gradient
        :math:`0.8 (1.2 - 2) + 0.64 (1.36 - 2) = -1.0496`.

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = mamlpp(steps=2, lr=0.1)
        >>> (loss, _), g = est.value_and_grad(loss_fn, {"params": 1.0}, task, 0)
        >>> round(float(loss), 4), round(float(g["params"]), 4)
        (0.5248, -1.0496)
    """
    inner = InnerConfig(steps=steps, lr=lr, **inner_kwargs)
    if steps < 1:
        raise ValueError("mamlpp needs steps >= 1")

    def objective(loss_fn, meta_params, task, step, fo=False):
        adapted, traj = inner.run(
            loss_fn, meta_params, task.support, first_order=fo, return_trajectory=True
        )
        idx = jnp.arange(steps, dtype=jnp.int32)
        if inner.step_arg:
            per_step = jax.vmap(lambda p, i: loss_fn(p, task.query, i))(traj, idx)
        else:
            per_step = jax.vmap(lambda p: loss_fn(p, task.query))(traj)
        loss = jnp.sum(msl_weights(step, steps=steps, anneal_steps=anneal_steps) * per_step)
        metrics = _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, per_step[-1])
        return loss, metrics

    def value_and_grad(loss_fn, meta_params, task, step):
        vg = lambda fo: jax.value_and_grad(
            lambda mp: objective(loss_fn, mp, task, step, fo), has_aux=True
        )(meta_params)
        if first_order_until <= 0:
            return vg(False)
        return lax.cond(step < first_order_until, lambda: vg(True), lambda: vg(False))

    return MetaGradEstimator("mamlpp", objective, value_and_grad)


def reptile(
    *, steps: int, lr=None, metrics_fn: MetricsFn | None = None, **inner_kwargs
) -> MetaGradEstimator:
    r"""Reptile (Nichol et al. 2018): the direction :math:`(\theta - \phi) / (k \alpha)`.

    :math:`\phi` is :math:`k` first-order SGD steps from :math:`\theta` on the support set; the
    division by :math:`k\alpha` (``steps * lr``; ``steps`` alone with an optax inner optimizer)
    puts the direction on a gradient's scale, so an optax outer optimizer applies it like one.
    The reported loss is the query loss after adaptation.

    Example:
        One step on :math:`L(p) = (p - 2)^2` from :math:`\theta = 0` with :math:`\alpha = 0.1`
        reaches :math:`\phi = 0.4`, so the direction is :math:`(0 - 0.4) / 0.1 = -4`:

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = reptile(steps=1, lr=0.1)
        >>> (loss, _), g = est.value_and_grad(loss_fn, {"params": 0.0}, task, 0)
        >>> round(float(g["params"]), 4)
        -4.0
    """
    inner = InnerConfig(steps=steps, lr=lr, **inner_kwargs)
    if steps < 1:
        raise ValueError("reptile needs steps >= 1")
    if inner.optimizer is None and jnp.ndim(lr) != 0:
        raise ValueError("reptile needs a scalar inner lr (its direction is divided by steps * lr)")
    scale = steps * (1.0 if inner.optimizer is not None else lr)

    def objective(loss_fn, meta_params, task, step):
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=False)
        loss = _query_loss(loss_fn, inner, adapted, task.query, steps - 1)
        return loss, _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)

    def value_and_grad(loss_fn, meta_params, task, step):
        _no_learned_lr(meta_params, "reptile")
        theta = meta_params["params"]
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=True)
        direction = jax.tree.map(lambda t, p: (t - p) / scale, theta, lax.stop_gradient(adapted))
        loss = _query_loss(loss_fn, inner, adapted, task.query, steps - 1)
        metrics = _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)
        return (lax.stop_gradient(loss), metrics), {"params": direction}

    return MetaGradEstimator("reptile", objective, value_and_grad)


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

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = imaml(steps=20, lr=0.2, reg=1.0)
        >>> (loss, _), g = est.value_and_grad(loss_fn, {"params": 0.0}, task, 0)
        >>> round(float(g["params"]), 4)
        -0.4444
    """
    inner = InnerConfig(steps=steps, lr=lr, **inner_kwargs)
    if not reg > 0:
        raise ValueError(f"imaml: reg (lambda) must be positive, got {reg!r}")
    if inner.mask is not None or inner.step_arg or inner.per_step:
        raise ValueError("imaml supports plain inner loops only (no mask, step_arg or per_step)")
    if curvature not in ("hessian", "gauss_newton"):
        raise ValueError(f"imaml: curvature must be 'hessian' or 'gauss_newton', got {curvature!r}")
    if curvature == "gauss_newton" and (predict_fn is None or output_loss is None):
        raise ValueError(
            "imaml: curvature='gauss_newton' needs predict_fn(params, x) and output_loss(z, y) "
            "with loss_fn(params, (x, y)) == output_loss(predict_fn(params, x), y)"
        )

    def solve_inner(loss_fn, theta, support):
        theta = lax.stop_gradient(theta)
        prox = lambda p, b: loss_fn(p, b) + 0.5 * reg * _sq_dist(p, theta)
        return lax.stop_gradient(inner.run(prox, {"params": theta}, support, first_order=True))

    def objective(loss_fn, meta_params, task, step):
        # Exact as a function of theta only when the inner problem is solved to convergence.
        theta = meta_params["params"]
        prox = lambda p, b: loss_fn(p, b) + 0.5 * reg * _sq_dist(p, theta)
        adapted = inner.run(prox, {"params": theta}, task.support, first_order=False)
        loss = loss_fn(adapted, task.query)
        return loss, _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)

    def value_and_grad(loss_fn, meta_params, task, step):
        _no_learned_lr(meta_params, "imaml")
        adapted = solve_inner(loss_fn, meta_params["params"], task.support)
        loss, g_query = jax.value_and_grad(loss_fn)(adapted, task.query)
        support_loss = lambda p: loss_fn(p, task.support)

        def matvec(v):
            if curvature == "gauss_newton":
                x, y = task.support
                hv = gnvp(lambda p: predict_fn(p, x), lambda z: output_loss(z, y), adapted, v)
            else:
                hv = jax.jvp(jax.grad(support_loss), (adapted,), (v,))[1]
            return jax.tree.map(lambda vi, hvi: vi + (hvi + damping * vi) / reg, v, hv)

        g, _ = jax.scipy.sparse.linalg.cg(matvec, g_query, tol=cg_tol, maxiter=cg_iters)
        metrics = _metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)
        # Diagnostics (the estimator is exact only when both are ~0): CG's relative residual,
        # and the inner residual ||grad P(phi)|| / ||grad P(theta)|| of the proximal objective P.
        residual = jax.tree.map(jnp.subtract, matvec(g), g_query)
        metrics["cg_residual"] = _rel_norm(residual, g_query)
        theta = lax.stop_gradient(meta_params["params"])
        prox_grad = jax.grad(lambda p: support_loss(p) + 0.5 * reg * _sq_dist(p, theta))(adapted)
        metrics["inner_residual"] = _rel_norm(prox_grad, jax.grad(support_loss)(theta))
        return (loss, metrics), {"params": g}

    return MetaGradEstimator("imaml", objective, value_and_grad)


def _rel_norm(a: PyTree, b: PyTree) -> jax.Array:
    """``||a|| / ||b||`` (0 when both are 0), for residual diagnostics."""
    na, nb = optax.tree.norm(a), optax.tree.norm(b)
    return jnp.where(nb > 0, na / jnp.where(nb > 0, nb, 1.0), jnp.where(na > 0, jnp.inf, 0.0))


def _sq_dist(a: PyTree, b: PyTree) -> jax.Array:
    return sum(
        jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _no_learned_lr(meta_params, name):
    if "lr" in meta_params:
        raise ValueError(f"{name} does not meta-learn inner learning rates; drop meta_params['lr']")


ESTIMATORS = {"maml": maml, "fomaml": fomaml, "mamlpp": mamlpp, "reptile": reptile, "imaml": imaml}


def make_estimator(name: str, **kwargs) -> MetaGradEstimator:
    """The estimator called ``name`` (one of ``ESTIMATORS``), built with ``kwargs``.

    Example:
        >>> make_estimator("maml", steps=1, lr=0.01).name
        'maml'
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown meta-gradient estimator {name!r}; choose one of {sorted(ESTIMATORS)}"
        )
    return ESTIMATORS[name](**kwargs)


# --- task batching -----------------------------------------------------------------------------

TASK_BATCHING = ("vmap", "map")


def default_task_batching(backend: str | None = None, *, convolutional: bool = False) -> str:
    """The task batching to use when none is given: ``"map"`` for convolutional models on CPU,
    ``"vmap"`` everywhere else.

    Measured on a 2-core CPU (second-order MAML, meta-steps/s of the CLI's training loop and of
    ``experiments/benchmark.py``): the sinusoid MLP runs 1.13x faster with ``vmap`` (1,709 vs
    1,510 meta-steps/s in 200-step chunks), Conv4 5-way 1-shot runs 1.04-1.06x faster with
    ``lax.map`` (meta-batch 8: 10.6 vs 10.1; meta-batch 32: 4.5 vs 4.2). With per-task weights a
    convolution under ``vmap`` becomes a batched (grouped) convolution, which CPU XLA runs slowly
    (with ``lax.conv`` many times slower; with :mod:`metagrad.nn.conv`'s ``patches`` a little), and
    ``lax.map`` keeps one task's activations in cache. GPUs and TPUs run the batched form well, so
    ``vmap`` is their default (not yet measured here).

    Args:
        backend: ``jax.default_backend()`` when None.
        convolutional: whether the model has convolutions with adapted weights.

    Example:
        >>> [default_task_batching(b, convolutional=True) for b in ("cpu", "gpu")]
        ['map', 'vmap']
        >>> default_task_batching("cpu")
        'vmap'
    """
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" and convolutional else "vmap"


def batch_value_and_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    meta_params: PyTree,
    tasks: Task,
    step,
    *,
    task_batching: str | int = "vmap",
):
    r"""Mean over a batch of tasks (a leading task axis) of one estimator's loss, metrics, grads.

    .. math:: g = \frac{1}{T} \sum_{t=1}^{T} g_t

    Args:
        task_batching: ``"vmap"`` (all tasks at once), ``"map"`` (``lax.map``: one task at a
            time, least memory; on CPU XLA a convolution with per-task weights under vmap becomes
            a slow grouped convolution), or an int ``k``: ``lax.map`` over chunks of ``k``
            vmapped tasks.

    Example:
        Two tasks with slopes 1 and 3, MAML from :math:`p = 0`: each task's gradient is
        :math:`-1.28 a` (see :func:`maml`), so the mean is :math:`-2.56`; every batching
        gives the same numbers:

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> x, y = jnp.ones((2, 3)), jnp.array([[1.0], [3.0]]) * jnp.ones((2, 3))
        >>> for how in ("vmap", "map"):
        ...     (loss, _), g = batch_value_and_grad(
        ...         maml(steps=1, lr=0.1), loss_fn, {"params": 0.0}, Task((x, y), (x, y)), 0,
        ...         task_batching=how)
        ...     print(how, round(float(loss), 4), round(float(g["params"]), 4))
        vmap 3.2 -2.56
        map 3.2 -2.56
    """
    fn = lambda task: estimator.value_and_grad(loss_fn, meta_params, task, step)
    if task_batching == "vmap":
        out = jax.vmap(fn)(tasks)
    elif task_batching == "map":
        out = lax.map(fn, tasks)
    elif (
        isinstance(task_batching, int) and not isinstance(task_batching, bool) and task_batching > 0
    ):
        out = lax.map(fn, tasks, batch_size=task_batching)
    else:
        raise ValueError(
            f"task_batching must be 'vmap', 'map' or a positive int, got {task_batching!r}"
        )
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), out)


# --- the meta-step -----------------------------------------------------------------------------


class MetaState(NamedTuple):
    """The outer loop's state: meta-parameters, the outer optimizer's state, the step count.

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.adam(1e-3))
        >>> state = learner.init({"params": jnp.zeros(3)})
        >>> int(state.step), state.meta_params["params"].shape
        (0, (3,))
    """

    meta_params: PyTree
    opt_state: optax.OptState
    step: jax.Array


class MetaLearner(NamedTuple):
    r"""``init(meta_params) -> MetaState`` and ``update(state, tasks) -> (state, metrics)``.

    Example:
        MAML's meta-gradient for :math:`L(p) = (p - 2)^2` is :math:`1.28 (p - 2)` (see
        :func:`maml`); one SGD step of rate 0.5 from 0 gives :math:`0.64 \cdot 2 = 1.28`, and
        twenty reach the minimum, 2:

        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.sgd(0.5))
        >>> x = jnp.ones((4, 3))  # 4 tasks of 3 points, all with slope 2
        >>> state = learner.init({"params": jnp.array(0.0)})
        >>> state, _ = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> round(float(state.meta_params["params"]), 4)
        1.28
        >>> for _ in range(19):
        ...     state, metrics = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> int(state.step), round(float(state.meta_params["params"]), 4)
        (20, 2.0)
    """

    init: Callable
    update: Callable


def task_mesh(devices: int | str = "all") -> jax.sharding.Mesh:
    """A one-axis mesh (``"tasks"``) over the first ``devices`` devices (or all).

    The devices are ``jax.devices()``: the local ones in a single process, every process's in a
    multi-host run (see :mod:`metagrad.distributed`), where ``"all"`` is the one choice that gives
    each process a share.
    """
    devs = jax.devices()
    n = len(devs) if str(devices) == "all" else int(devices)
    if not 1 <= n <= len(devs):
        raise ValueError(f"devices={devices!r}: there are {len(devs)} devices")
    return jax.sharding.Mesh(np.array(devs[:n]), ("tasks",))


def sharded_batch_value_and_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    *,
    task_batching: str | int = "vmap",
    devices: int | str = 1,
) -> Callable:
    r"""``(meta_params, tasks, step) -> ((loss, metrics), grads)``: :func:`batch_value_and_grad`
    with the task axis sharded over ``devices`` (``1``: not sharded; ``"all"``: every device).

    The tasks get a ``NamedSharding`` over :func:`task_mesh`'s ``"tasks"`` axis and the
    meta-parameters stay replicated. ``vmap`` batching is left to XLA's partitioner, which turns
    the mean into a cross-device reduction. ``lax.map`` batching (``"map"`` or an int) runs under
    ``jax.shard_map``, each device mapping over its own tasks, because XLA would all-gather a
    ``lax.map`` over a sharded axis and run every task on every device. The meta-batch must
    divide evenly; the result is the mean over all tasks, as unsharded.

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> f = sharded_batch_value_and_grad(maml(steps=1, lr=0.1), loss_fn, devices="all")
        >>> x = jnp.ones((4, 3))  # 4 tasks of 3 points, slope 2: g = 1.28 (p - 2)
        >>> (loss, _), g = f({"params": jnp.array(0.0)}, Task((x, 2 * x), (x, 2 * x)), 0)
        >>> round(float(g["params"]), 4)
        -2.56
    """
    mean = lambda mp, tasks, step: batch_value_and_grad(
        estimator, loss_fn, mp, tasks, step, task_batching=task_batching
    )
    if str(devices) == "1":
        return mean
    P = jax.sharding.PartitionSpec
    mesh = task_mesh(devices)
    sharding = jax.sharding.NamedSharding(mesh, P("tasks"))
    if task_batching != "vmap":
        # A device's copy of the meta-parameters is cast to "varying", or its inner-loop
        # gradients would be summed over devices (shard_map's transpose of a broadcast).
        def local_mean(mp, tasks, step, f=mean):
            return lax.pmean(f(lax.pcast(mp, "tasks", to="varying"), tasks, step), "tasks")

        mean = jax.shard_map(local_mean, mesh=mesh, in_specs=(P(), P("tasks"), P()), out_specs=P())

    def sharded(meta_params, tasks, step):
        return mean(meta_params, lax.with_sharding_constraint(tasks, sharding), step)

    return sharded


def meta_learner(
    loss_fn: LossFn,
    estimator: MetaGradEstimator,
    optimizer: optax.GradientTransformation,
    *,
    task_batching: str | int = "vmap",
    jit: bool = True,
    devices: int | str = 1,
) -> MetaLearner:
    r"""A meta-step as an ``(init, update)`` pair driven by any optax optimizer.

    ``update`` averages the estimator's meta-gradient over the task batch, applies the optimizer
    and returns metrics: ``meta_loss``, ``loss_pre`` / ``loss_post`` (query loss before and after
    adaptation, plus any ``metrics_fn`` entries) and ``grad_norm`` (of the averaged meta-gradient).

    ``task_batching`` is as in :func:`batch_value_and_grad`; :func:`default_task_batching` gives
    the measured choice per backend and model (the CLI's ``train.task_batching=auto``).

    With ``devices`` > 1 (or ``"all"``) the task axis is sharded across devices with
    ``jax.sharding`` (a ``Mesh`` and ``NamedSharding``); meta-parameters stay replicated and XLA
    turns the mean over tasks into a cross-device reduction. The meta-batch must divide evenly.
    In a multi-host run ``"all"`` spans every process's devices; every process passes the same
    whole meta-batch and each device computes its share.

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.sgd(0.1))
        >>> x = jnp.ones((4, 3))  # 4 tasks, 3 points each, all with slope 2
        >>> state = learner.init({"params": jnp.zeros(())})
        >>> state, metrics = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> sorted(metrics)
        ['grad_norm', 'loss_post', 'loss_pre', 'meta_loss']
    """
    if task_batching not in TASK_BATCHING and not (
        isinstance(task_batching, int) and task_batching > 0
    ):
        raise ValueError(
            f"task_batching must be 'vmap', 'map' or a positive int, got {task_batching!r}"
        )

    def init(meta_params):
        return MetaState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))

    mean_over_tasks = sharded_batch_value_and_grad(
        estimator, loss_fn, task_batching=task_batching, devices=devices
    )

    def update(state, tasks):
        (loss, metrics), grads = mean_over_tasks(state.meta_params, tasks, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        metrics = dict(metrics, meta_loss=loss, grad_norm=optax.tree.norm(grads))
        return MetaState(meta_params, opt_state, state.step + 1), metrics

    return MetaLearner(init, jax.jit(update) if jit else update)


# --- a correctness check users can call --------------------------------------------------------


def check_meta_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    meta_params: PyTree,
    task: Task,
    *,
    step: int = 0,
    eps: float = 1e-5,
    num_directions: int | None = None,
    key: jax.Array | None = None,
) -> float:
    r"""Relative error of an estimator's meta-gradient against float64 central finite differences.

    Both are computed in float64. With :math:`\mathcal{L}` the estimator's ``objective`` and
    :math:`g` its meta-gradient, for directions :math:`v_k` (every coordinate by default, or
    ``num_directions`` random unit-length ones):

    .. math:: d_k = \frac{\mathcal{L}(\theta + \epsilon v_k) - \mathcal{L}(\theta - \epsilon v_k)}
              {2\epsilon}, \qquad
              \text{error} = \frac{\|(v_k^\top g)_k - d\|_2}{\max(\|d\|_2, 10^{-30})}

    Second-order MAML gives errors near 1e-8; first-order MAML's error is the relative size of
    the Hessian term it drops, so a silently first-order meta-gradient shows up here.

    Example:
        >>> loss_fn = lambda p, b: jnp.mean(jnp.sin(p * b[0]) - b[1]) ** 2
        >>> task = Task((jnp.linspace(0, 1, 5), jnp.ones(5)), (jnp.linspace(1, 2, 5), jnp.ones(5)))
        >>> check_meta_grad(maml(steps=2, lr=0.5), loss_fn, {"params": jnp.array(0.3)}, task) < 1e-6
        True
    """
    with jax.enable_x64(True):
        mp64 = _to_float64(meta_params)
        task64 = _to_float64(task)
        value_and_grad = jax.jit(lambda mp, t: estimator.value_and_grad(loss_fn, mp, t, step))
        (_, _), grads = value_and_grad(mp64, task64)
        flat, unravel = ravel_pytree(mp64)
        g_flat, _ = ravel_pytree(grads)
        n = flat.shape[0]
        if num_directions is None:
            directions = jnp.eye(n, dtype=jnp.float64)
        else:
            key = jax.random.key(0) if key is None else key
            directions = jax.random.normal(key, (num_directions, n), jnp.float64)
            # Unit length, so eps is the step actually taken (a kink of ReLU is less likely hit).
            directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
        f = jax.jit(
            lambda x: estimator.objective(loss_fn, unravel(x), task64, jnp.asarray(step))[0]
        )
        fd = lax.map(lambda v: (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps), directions)
        projected = directions @ g_flat
        err = jnp.linalg.norm(projected - fd) / jnp.maximum(jnp.linalg.norm(fd), 1e-30)
        return float(err)


def _to_float64(tree: PyTree) -> PyTree:
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


__all__ = [
    "ESTIMATORS",
    "InnerConfig",
    "MetaGradEstimator",
    "MetaLearner",
    "MetaState",
    "batch_value_and_grad",
    "check_meta_grad",
    "default_task_batching",
    "fomaml",
    "imaml",
    "make_estimator",
    "maml",
    "mamlpp",
    "meta_learner",
    "meta_loss",
    "msl_weights",
    "reptile",
    "sharded_batch_value_and_grad",
    "task_mesh",
]
