"""The run's figure: held-out tasks before and after adaptation, and loss against inner steps."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metagrad.tasks import sinusoid  # noqa: E402


def adaptation_figure(exp, meta_params, results: dict, path: Path, num_tasks: int = 3) -> None:
    """Writes ``path`` (PNG). Regression: ``num_tasks`` test tasks with the true curve, the
    prediction before and after adaptation and the support points (as in the MAML paper's
    figure). Every task: the query loss (and accuracy) against inner steps with 95% bands."""
    regression = exp.source.kind == "regression"
    ncols = (num_tasks if regression else 0) + 1
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.6), squeeze=False)
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
    plt.close(fig)


def _sinusoid_panels(exp, meta_params, axes, post_steps: int) -> None:
    shots = exp.cfg.eval.shots or exp.cfg.task.shots
    keys = jax.random.split(sinusoid.heldout_key("test"), exp.cfg.eval.tasks)[: len(axes)]
    path_fn = exp.curve_fn(steps=max(post_steps, 1)).path
    xs = jnp.linspace(*sinusoid.INPUT_RANGE, 200)[:, None]
    apply = exp.model.apply
    for ax, key in zip(axes, keys, strict=True):
        task, (amp, phase) = sinusoid.sample_task(key, shots=shots, query=1, return_params=True)
        params_path = path_fn(meta_params, task.support)
        before = jax.tree.map(lambda p: p[0], params_path)
        after = jax.tree.map(lambda p: p[post_steps], params_path)
        ax.plot(xs[:, 0], amp * jnp.sin(xs[:, 0] - phase), "k-", lw=1.5, label="ground truth")
        ax.plot(xs[:, 0], apply(before, xs)[:, 0], "C2--", label="before adaptation")
        ax.plot(xs[:, 0], apply(after, xs)[:, 0], "C3-", label=f"after {post_steps} step(s)")
        ax.plot(
            task.support[0][:, 0],
            task.support[1][:, 0],
            "k^",
            ms=6,
            label=f"{shots} support points",
        )
        ax.set_xlabel("x")
    axes[0].legend(fontsize=7, loc="lower left")
