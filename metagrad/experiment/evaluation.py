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
    scores_fn: Callable | None = None,
    steps_batching: str = "vmap",
) -> Callable:
    r"""A jitted ``curves(meta_params, tasks) -> dict`` of per-task curves over inner steps.

    For each task, :math:`\ell_i = L(\phi_i; Q)` for :math:`i = 0..` ``steps`` (:math:`\phi_0 =
    \theta`), plus ``metrics_fn``'s entries, each of shape ``(num_tasks, steps + 1)``. The
    :math:`\phi_i` come from the estimator's own inner loop (:meth:`MetaGradEstimator.adapt`:
    its rates, mask, per-step settings and, for iMAML, proximal term), so the curve at the
    training step count is the training objective's post-adaptation loss.
    ``curves.path(meta_params, support)`` gives the adapted parameters themselves.

    ``scores_fn(params, batch, step)`` (``{"loss", **metrics}`` from one forward pass), when
    given, replaces ``loss_fn`` and ``metrics_fn`` for the scores. ``steps_batching="map"``
    scores the ``steps + 1`` parameter sets one after another (``lax.map``) rather than
    vmapped: on CPU, with a small ``batch_size``, a convolutional model's activations then stay
    in cache (Omniglot 5-way, MAML Conv4, ``Experiment.evaluate`` on a 2-core CPU: 44 ms a task
    with both at ``batch_size=1``, against 79 vmapped at 2 and 224 vmapped at 50, where XLA's
    temporaries were 4.9 GiB).

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

    if steps_batching not in ("vmap", "map"):
        raise ValueError(f"steps_batching must be 'vmap' or 'map', got {steps_batching!r}")

    def one_task(meta_params, task: Task):
        idx = jnp.maximum(jnp.arange(steps + 1) - 1, 0)

        def at(p, i):
            if scores_fn is not None:
                return scores_fn(p, task.query, i) if step_arg else scores_fn(p, task.query)
            out = {"loss": at_step(p, task.query, i)}
            if metrics_fn is not None:
                out.update(metrics_fn(p, task.query))
            return out

        params = path(meta_params, task.support)
        if steps_batching == "map":
            return lax.map(lambda pi: at(*pi), (params, idx))
        return jax.vmap(at)(params, idx)

    curves = _compiled_once(
        lambda meta_params, tasks: lax.map(
            lambda t: one_task(meta_params, t), tasks, batch_size=batch_size
        )
    )
    curves.path = jax.jit(path)  # for plots: the adapted parameters themselves
    return curves


def _objective_curves(estimator, embed_fn, *, steps: int, batch_size: int) -> Callable:
    def one_task(meta_params, task: Task):
        _, metrics = estimator.objective(embed_fn, meta_params, task, 0)
        out = {"loss": metrics["loss_post"], "acc": metrics["acc_post"]}
        return {k: jnp.broadcast_to(v, (steps + 1,)) for k, v in out.items()}

    curves = _compiled_once(
        lambda meta_params, tasks: lax.map(
            lambda t: one_task(meta_params, t), tasks, batch_size=batch_size
        )
    )
    curves.path = None
    return curves


def _compiled_once(fn: Callable) -> Callable:
    """``fn`` jitted and compiled ahead of time once per argument shapes. ``jax.jit`` keys its
    cache on committed-ness as well: parameters restored from a checkpoint (committed) after
    those from training (not) compiled the curves a second time, 14 s of a 200-step run."""
    jitted, compiled = jax.jit(fn), {}

    def call(*args):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return jitted(*args)  # inside another program (metagrad.experiment.batched)
        key = tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(args))
        key = (jax.tree.structure(args), key)
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile()
        return compiled[key](*args)

    return call


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
