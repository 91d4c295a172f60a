"""The run's figure: held-out tasks before and after adaptation, and loss against inner steps."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend switch, no display needed

from metagrad.tasks import sinusoid


def adaptation_figure(exp, meta_params, results: dict, path: Path, num_tasks: int = 3) -> None:
    """Writes ``path`` (PNG). Regression: ``num_tasks`` test tasks with the true curve, the
    prediction before and after adaptation and the support points (as in the MAML paper's
    figure). Every task: the query loss (and accuracy) against inner steps with 95% bands."""
    regression = exp.source.kind == "regression"
    ncols = (num_tasks if regression else 0) + 1
    fig = Figure(figsize=(4.2 * ncols, 3.6))
    axes = fig.subplots(1, ncols, squeeze=False)
    axes = axes[0]
    post = results["eval_inner_steps"]
    if regression:
        _sinusoid_panels(exp, meta_params, axes[:num_tasks], post)
    ax = axes[-1]
    for name in ("loss", "acc"):
        curve = results.get(f"eval_{name}_curve")
        if curve is None:
            continue
        band = np.asarray(results[f"eval_{name}_curve_ci95"])
        steps = np.arange(len(curve))
        target = ax if name == "loss" else ax.twinx()
        target.plot(
            steps,
            curve,
            marker="o",
            ms=3,
            color="C0" if name == "loss" else "C1",
            label=f"query {name}",
        )
        target.fill_between(
            steps,
            np.asarray(curve) - band,
            np.asarray(curve) + band,
            alpha=0.2,
            color="C0" if name == "loss" else "C1",
        )
        target.set_ylabel(f"query {name}")
    ax.set_xlabel("inner steps")
    ax.set_title(f"{exp.cfg.algo.name}: {exp.cfg.eval.tasks} test tasks (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _sinusoid_panels(exp, meta_params, axes, post_steps: int) -> None:
    e, n = exp.cfg.eval, len(axes)
    shots, query = e.shots or exp.cfg.task.shots, e.query or exp.cfg.task.query
    path_fn = exp.curve_fn(steps=max(post_steps, 1)).path
    xs = np.linspace(*sinusoid.INPUT_RANGE, 200, dtype=np.float32)[:, None]

    @jax.jit  # one compilation: eager ops would each compile on their own (seconds on CPU)
    def panels(meta_params):
        # The first test tasks, drawn as the evaluation draws them (build.build_task_source).
        tasks, (amp, phase) = sinusoid.sample_batch_flat(
            sinusoid.heldout_key("test"),
            max(e.tasks, n),
            shots=shots,
            query=query,
            return_params=True,
        )
        support = jax.tree.map(lambda x: x[:n], tasks.support)
        paths = jax.vmap(path_fn, in_axes=(None, 0))(meta_params, support)
        at = lambda path, i: exp.model.apply(jax.tree.map(lambda p: p[i], path), xs)[:, 0]
        before = jax.vmap(lambda path: at(path, 0))(paths)
        after = jax.vmap(lambda path: at(path, post_steps))(paths)
        truth = amp[:n, None] * jnp.sin(xs[None, :, 0] - phase[:n, None])
        return support, truth, before, after

    (sx, sy), truth, before, after = jax.device_get(panels(meta_params))
    grid = xs[:, 0]
    for i, ax in enumerate(axes):
        ax.plot(grid, truth[i], "k-", lw=1.5, label="ground truth")
        ax.plot(grid, before[i], "C2--", label="before adaptation")
        ax.plot(grid, after[i], "C3-", label=f"after {post_steps} step(s)")
        ax.plot(sx[i, :, 0], sy[i, :, 0], "k^", ms=6, label=f"{shots} support points")
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower left")
