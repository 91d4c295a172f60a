"""MAML++ (Antoniou et al. 2019): the multi-step loss with annealed weights and
derivative-order annealing; per-step rates and per-step batch norm come from the inner loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from metagrad._types import MetricsFn
from metagrad.estimators.base import InnerLoop, MetaGradEstimator, adaptation_metrics
from metagrad.inner import check_inner_optimizer, with_step


def msl_weights(step, *, steps: int, anneal_steps: int, dtype=jnp.float32) -> jax.Array:
    r"""MAML++'s multi-step-loss weights at meta-step ``step`` (shape ``(steps,)``, sum 1).

    They start uniform, :math:`w_i = 1/N`, and move linearly over ``anneal_steps`` meta-steps
    towards the final step: non-final weights decay to :math:`0.03/N`, the final weight grows
    to :math:`1 - 0.03 (N-1)/N` (Antoniou et al. 2019, their released code, per meta-step).
    ``dtype`` is the losses' (float64 losses get float64 weights).

    Example:
        >>> msl_weights(0, steps=4, anneal_steps=100).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    n = steps
    # jnp, not Python, arithmetic on anneal_steps: a batched program traces it (one per run).
    span = jnp.maximum(jnp.asarray(anneal_steps, dtype), 1)
    progress = jnp.clip(jnp.asarray(step, dtype) / span, 0.0, 1.0)
    floor = 0.03 / n
    nonfinal = jnp.maximum(1.0 / n - progress / n, floor)
    final = jnp.minimum(1.0 / n + progress * (n - 1) / n, 1.0 - (n - 1) * floor)
    return jnp.concatenate([jnp.full((n - 1,), nonfinal, dtype), final[None]])


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
    rates come from ``MetaParams.lr`` with ``lr=None, per_step=True``; per-step batch norm from
    a model that takes the step index (``step_arg=True``).

    Example:
        Two steps on :math:`L(p) = (p - 2)^2` from :math:`p = 1` (:math:`\alpha = 0.1`) give
        :math:`\phi_1 = 1.2, \phi_2 = 1.36`; at meta-step 0 the weights are uniform, so the loss
        is :math:`(0.64 + 0.4096) / 2` and its gradient
        :math:`0.8 (1.2 - 2) + 0.64 (1.36 - 2) = -1.0496`.

        >>> from metagrad import MetaParams, Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = mamlpp(steps=2, lr=0.1)
        >>> (loss, _), g = est.value_and_grad(loss_fn, MetaParams(1.0), task, 0)
        >>> round(float(loss), 4), round(float(g.params), 4)
        (0.5248, -1.0496)
    """
    inner = InnerLoop(steps=steps, lr=lr, **inner_kwargs)
    if steps < 1:
        raise ValueError("mamlpp needs steps >= 1")
    # A traced anneal_steps (one per run of a batched program) was checked on the host.
    traced = isinstance(anneal_steps, jax.core.Tracer)
    if (not traced and anneal_steps < 0) or first_order_until < 0:
        raise ValueError("mamlpp: anneal_steps and first_order_until must be >= 0")
    if inner.optimizer is not None:
        check_inner_optimizer(inner.optimizer)

    def objective(loss_fn, meta_params, task, step, fo=False):
        adapted, traj = inner.run(
            loss_fn, meta_params, task.support, first_order=fo, return_trajectory=True
        )
        at = with_step(loss_fn, inner.step_arg)
        idx = jnp.arange(steps, dtype=jnp.int32)
        per_step = jax.vmap(lambda p, i: at(p, task.query, i))(traj, idx)
        weights = msl_weights(step, steps=steps, anneal_steps=anneal_steps, dtype=per_step.dtype)
        loss = jnp.sum(weights * per_step)
        metrics = adaptation_metrics(
            loss_fn, inner, meta_params, adapted, task, metrics_fn, per_step[-1]
        )
        return loss, metrics

    def value_and_grad(loss_fn, meta_params, task, step):
        vg = lambda fo: jax.value_and_grad(
            lambda mp: objective(loss_fn, mp, task, step, fo), has_aux=True
        )(meta_params)
        if first_order_until <= 0:
            return vg(False)
        return lax.cond(step < first_order_until, lambda: vg(True), lambda: vg(False))

    return MetaGradEstimator("mamlpp", objective, value_and_grad, inner)
