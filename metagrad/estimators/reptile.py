"""Reptile (Nichol et al. 2018): a first-order direction from plain inner SGD, no Hessian."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from metagrad._types import MetaParams, MetricsFn
from metagrad.estimators.base import (
    InnerLoop,
    MetaGradEstimator,
    adaptation_metrics,
    no_learned_lr,
    query_loss,
)


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

        >>> from metagrad import Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = reptile(steps=1, lr=0.1)
        >>> (loss, _), g = est.value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4)
        -4.0
    """
    inner = InnerLoop(steps=steps, lr=lr, **inner_kwargs)
    if steps < 1:
        raise ValueError("reptile needs steps >= 1")
    no_learned_lr(inner, "reptile")
    if inner.optimizer is None and jnp.ndim(lr) != 0:
        raise ValueError("reptile needs a scalar inner lr (its direction is divided by steps * lr)")
    scale = steps * (1.0 if inner.optimizer is not None else lr)

    def objective(loss_fn, meta_params, task, step):
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=False)
        loss = query_loss(loss_fn, inner, adapted, task.query, steps - 1)
        return loss, adaptation_metrics(
            loss_fn, inner, meta_params, adapted, task, metrics_fn, loss
        )

    def value_and_grad(loss_fn, meta_params, task, step):
        theta = meta_params.params
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=True)
        direction = jax.tree.map(lambda t, p: (t - p) / scale, theta, lax.stop_gradient(adapted))
        loss = query_loss(loss_fn, inner, adapted, task.query, steps - 1)
        metrics = adaptation_metrics(loss_fn, inner, meta_params, adapted, task, metrics_fn, loss)
        return (lax.stop_gradient(loss), metrics), MetaParams(direction)

    return MetaGradEstimator("reptile", objective, value_and_grad, inner)
