"""Held-out evaluation: query loss (and accuracy) after 0..M inner steps, with 95% intervals."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad._types import Task
from metagrad.estimators.base import MetaGradEstimator
from metagrad.inner import with_step


def ci95(values: np.ndarray, axis: int = 0) -> np.ndarray:
    r"""Half-width of the normal 95% confidence interval of the mean, :math:`1.96\, s / \sqrt{n}`.

    Example:
        >>> round(float(ci95(np.array([1.0, 2.0, 3.0, 4.0]))), 4)
        1.2652
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    return 1.96 * np.std(values, axis=axis, ddof=1) / np.sqrt(n)


def make_curve_fn(
    estimator: MetaGradEstimator,
    loss_fn: Callable,
    metrics_fn: Callable | None,
    *,
    steps: int,
    batch_size: int = 100,
) -> Callable:
    r"""A jitted ``curves(meta_params, tasks) -> dict`` of per-task curves over inner steps.

    For each task, :math:`\ell_i = L(\phi_i; Q)` for :math:`i = 0..` ``steps`` (:math:`\phi_0 =
    \theta`), plus ``metrics_fn``'s entries, each of shape ``(num_tasks, steps + 1)``. The
    :math:`\phi_i` come from the estimator's own inner loop (:meth:`MetaGradEstimator.adapt`:
    its rates, mask, per-step settings and, for iMAML, proximal term), so the curve at the
    training step count is the training objective's post-adaptation loss.
    ``curves.path(meta_params, support)`` gives the adapted parameters themselves.

    An estimator without an inner loop of its own (``estimator.inner is None``: ProtoNets, R2D2,
    the SVM, Proto-MAML) is scored by its objective, whose classifier is fitted to each support
    set: ``loss`` and ``acc`` (its ``loss_post``, ``acc_post``) repeated over the columns, since
    nothing adapts step by step; ``curves.path`` is None.
    """
    if estimator.inner is None:
        return _objective_curves(estimator, loss_fn, steps=steps, batch_size=batch_size)
    step_arg = estimator.inner is not None and estimator.inner.step_arg
    at_step = with_step(loss_fn, step_arg)

    def path(meta_params, support):
        """Parameters after 0..steps inner steps, stacked on a leading axis."""
        theta = meta_params.params
        _, traj = estimator.adapt(
            loss_fn, meta_params, support, steps=steps, return_trajectory=True
        )
        return jax.tree.map(lambda t0, t: jnp.concatenate([t0[None], t]), theta, traj)

    def one_task(meta_params, task: Task):
        idx = jnp.maximum(jnp.arange(steps + 1) - 1, 0)

        def at(p, i):
            out = {"loss": at_step(p, task.query, i)}
            if metrics_fn is not None:
                out.update(metrics_fn(p, task.query))
            return out

        return jax.vmap(at)(path(meta_params, task.support), idx)

    compiled = jax.jit(
        lambda meta_params, tasks: lax.map(
            lambda t: one_task(meta_params, t), tasks, batch_size=batch_size
        )
    )

    def curves(meta_params, tasks):
        return compiled(meta_params, tasks)

    curves.path = jax.jit(path)  # for plots: the adapted parameters themselves
    return curves


def _objective_curves(estimator, embed_fn, *, steps: int, batch_size: int) -> Callable:
    def one_task(meta_params, task: Task):
        _, metrics = estimator.objective(embed_fn, meta_params, task, 0)
        out = {"loss": metrics["loss_post"], "acc": metrics["acc_post"]}
        return {k: jnp.broadcast_to(v, (steps + 1,)) for k, v in out.items()}

    compiled = jax.jit(
        lambda meta_params, tasks: lax.map(
            lambda t: one_task(meta_params, t), tasks, batch_size=batch_size
        )
    )

    def curves(meta_params, tasks):
        return compiled(meta_params, tasks)

    curves.path = None
    return curves


def summarize(curves: dict, post_step: int, prefix: str = "eval") -> dict:
    """``{prefix}_{name}_pre``, ``_post``, ``_post_ci95`` and ``_curve`` for every curve."""
    out = {}
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=0)
        out[f"{prefix}_{name}_pre"] = float(mean[0])
        out[f"{prefix}_{name}_pre_ci95"] = float(ci95(values[:, 0]))
        out[f"{prefix}_{name}_post"] = float(mean[post_step])
        out[f"{prefix}_{name}_post_ci95"] = float(ci95(values[:, post_step]))
        out[f"{prefix}_{name}_curve"] = [float(v) for v in mean]
        out[f"{prefix}_{name}_curve_ci95"] = [float(v) for v in ci95(values)]
    return out
