"""Held-out evaluation: query loss (and accuracy) after 0..M inner steps, with 95% intervals."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad.inner import adapt
from metagrad.tasks.base import Task


def ci95(values: np.ndarray, axis: int = 0) -> np.ndarray:
    r"""Half-width of the normal 95% confidence interval of the mean, :math:`1.96\, s / \sqrt{n}`.

    Example:
        >>> round(float(ci95(np.array([1.0, 2.0, 3.0, 4.0]))), 4)
        1.2652
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    return 1.96 * np.std(values, axis=axis, ddof=1) / np.sqrt(n)


def extend_per_step(lr: Any, steps: int) -> Any:
    """A per-step rate pytree with at least ``steps`` entries, repeating the last rate."""

    def pad(a):
        extra = steps - a.shape[0]
        return a if extra <= 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])

    return jax.tree.map(pad, lr)


def make_curve_fn(
    loss_fn: Callable,
    metrics_fn: Callable | None,
    *,
    steps: int,
    lr=None,
    per_step: bool = False,
    mask=None,
    step_arg: bool = False,
    prox_reg: float | None = None,
    batch_size: int = 100,
) -> Callable:
    r"""A jitted ``curves(meta_params, tasks) -> dict`` of per-task curves over inner steps.

    ``curves.path(meta_params, support)`` gives the adapted parameters themselves. For each
    task, :math:`\ell_i = L(\phi_i; Q)` for :math:`i = 0..` ``steps`` (:math:`\phi_0 =
    \theta`), plus ``metrics_fn``'s entries, each of shape ``(num_tasks, steps + 1)``. Learned
    rates come from ``meta_params["lr"]``; with ``prox_reg`` (iMAML) the inner loop minimises
    :math:`L(\phi; S) + \frac{\lambda}{2}\|\phi - \theta\|^2`, as in training.
    """

    def path(meta_params, support):
        """Parameters after 0..steps inner steps, stacked on a leading axis."""
        theta = meta_params["params"]
        rate = meta_params.get("lr", lr)
        inner_loss = loss_fn
        if prox_reg is not None:

            def inner_loss(p, b):
                sq = sum(
                    jnp.sum((x - y) ** 2)
                    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(theta), strict=True)
                )
                return loss_fn(p, b) + 0.5 * prox_reg * sq

        if steps == 0:
            return jax.tree.map(lambda t0: t0[None], theta)
        if per_step:
            rate = jax.tree.map(lambda a: a[:steps], extend_per_step(rate, steps))
        _, traj = adapt(
            inner_loss,
            theta,
            support,
            steps=steps,
            lr=rate,
            per_step=per_step,
            mask=mask,
            step_arg=step_arg,
            return_trajectory=True,
        )
        return jax.tree.map(lambda t0, t: jnp.concatenate([t0[None], t]), theta, traj)

    def one_task(meta_params, task: Task):
        idx = jnp.maximum(jnp.arange(steps + 1) - 1, 0)

        def at(p, i):
            loss = loss_fn(p, task.query, i) if step_arg else loss_fn(p, task.query)
            out = {"loss": loss}
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
