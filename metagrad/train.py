"""The meta-training loop as a library function (Hydra-free).

`train(cfg, run_dir)` runs chunks of meta-steps per compiled call (a `lax.scan` with task
sampling on the device), validates every ``train.eval_every`` steps keeping the best
checkpoint, checkpoints atomically every ``train.checkpoint_every`` steps and at the end, resumes
a killed run bit for bit (the task stream is a function of the step, not of the history), and
finishes with a held-out test evaluation written to ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from metagrad import build
from metagrad.checkpoint import Checkpoints
from metagrad.config import ConfigError, validate
from metagrad.evaluation import make_curve_fn, summarize
from metagrad.outer import MetaState, meta_learner
from metagrad.runinfo import run_metadata


class NonFiniteLoss(RuntimeError):
    """The meta-loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class Experiment:
    """Everything built from a config: the pieces `train` and `evaluate_run` share."""

    cfg: Any
    model: build.Model
    source: build.TaskSource
    estimator: Any
    optimizer: Any
    meta_params: dict

    @classmethod
    def from_config(cls, cfg) -> Experiment:
        validate(cfg)
        devices = str(cfg.train.devices)
        n = len(jax.local_devices()) if devices == "all" else int(devices)
        if n > len(jax.local_devices()) or cfg.train.meta_batch_size % n:
            raise ConfigError(
                f"train.devices={devices}: {n} device(s) of {len(jax.local_devices())} "
                f"local; train.meta_batch_size={cfg.train.meta_batch_size} must "
                "divide evenly across them"
            )
        source = build.build_task_source(cfg)  # checks data paths and task sizes before compiling
        model = build.build_model(cfg, jax.random.key(cfg.seed))
        return cls(
            cfg,
            model,
            source,
            build.build_estimator(cfg, model),
            build.build_optimizer(cfg),
            build.initial_meta_params(cfg, model),
        )

    def curve_fn(self, *, steps: int):
        a = self.cfg.algo
        mask = build.inner_mask(self.cfg, self.model.params)
        return make_curve_fn(
            self.model.loss_fn,
            self.model.metrics_fn,
            steps=steps,
            lr=None if a.learn_lr else self.cfg.inner.lr,
            per_step=a.per_step_lr,
            mask=mask,
            step_arg=self.model.step_arg,
            prox_reg=a.reg if a.name == "imaml" else None,
            batch_size=self.cfg.eval.batch_size,
        )

    def evaluate(self, meta_params, split: str, num_tasks: int, prefix: str) -> dict:
        e = self.cfg.eval
        post = self.cfg.inner.steps if e.inner_steps is None else e.inner_steps
        steps = max(post, e.curve_steps)
        tasks = self.source.heldout(
            split, num_tasks, e.shots or self.cfg.task.shots, e.query or self.cfg.task.query
        )
        curves = jax.device_get(self.curve_fn(steps=steps)(meta_params, tasks))
        out = summarize(curves, post, prefix)
        out[f"{prefix}_inner_steps"] = post
        return out


def _chunk_fn(exp: Experiment, learner):
    """One compiled call: ``n`` meta-steps with tasks sampled on the device."""
    batch = exp.cfg.train.meta_batch_size
    base_key = jax.random.key(exp.cfg.seed + 1)

    @jax.jit
    def run(state: MetaState, data, n_steps_marker: jax.Array):
        def body(state, _):
            key = jax.random.fold_in(base_key, state.step)  # the stream depends on the step only
            state, metrics = learner.update(state, exp.source.sample_train(data, key, batch))
            return state, metrics

        state, metrics = lax.scan(body, state, None, length=n_steps_marker.shape[0])
        return state, jax.tree.map(jnp.mean, metrics)

    return run


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg, run_dir: str | Path) -> dict:
    """Meta-trains as ``cfg`` says, writing everything into ``run_dir``; returns the test metrics.

    Writes ``metrics.jsonl`` (training and validation records), ``checkpoints/{last,best}``,
    ``run_info.json`` (versions, git commit, backend, devices), ``metrics.json`` (the test
    evaluation and speed) and ``metrics.png`` (held-out tasks before and after adaptation, for
    sinusoid, and the query loss against inner steps).
    """
    run_dir = Path(run_dir)
    exp = Experiment.from_config(cfg)
    t = cfg.train
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(run_dir)
    learner = meta_learner(
        exp.model.loss_fn,
        exp.estimator,
        exp.optimizer,
        task_batching=build.resolve_task_batching(cfg),
        jit=False,
        devices=t.devices,
    )
    state = learner.init(exp.meta_params)
    best_val = np.array(np.inf)
    log_path = run_dir / "metrics.jsonl"
    if ckpt.latest_step() is not None:
        if not t.resume:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; pass train.resume=true to "
                "continue that run, or choose a new run directory"
            )
        _, state, extra = ckpt.restore(state, extra={"best_val": best_val})
        best_val = extra["best_val"]
    (run_dir / "run_info.json").write_text(json.dumps(run_metadata(), indent=2))

    chunk_jit = _chunk_fn(exp, learner)
    compiled: dict[int, Any] = {}
    data = exp.source.train_data
    compile_seconds = 0.0

    def run_chunk(state, n):  # compiled ahead of time, so speed and compile time are separate
        nonlocal compile_seconds
        marker = jnp.zeros((n, 0))
        if n not in compiled:
            tic = time.perf_counter()
            compiled[n] = chunk_jit.lower(state, data, marker).compile()
            compile_seconds += time.perf_counter() - tic
        return compiled[n](state, data, marker)

    start = int(state.step)
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not t.progress,
        desc="meta-train",
        unit="step",
        dynamic_ncols=True,
    )
    timed_steps, timed_seconds = 0, 0.0
    step = start
    while step < t.steps:
        n = min(t.chunk_steps, t.steps - step)
        before = compile_seconds
        tic = time.perf_counter()
        new_state, metrics = run_chunk(state, n)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - tic - (compile_seconds - before)
        if not math.isfinite(metrics["meta_loss"]):
            bar.close()
            kept = ckpt.latest_step()
            where = (
                f"the last good checkpoint (step {kept}) is kept in {run_dir / 'checkpoints'}"
                if kept is not None
                else "no checkpoint had been written yet"
            )
            raise NonFiniteLoss(
                f"meta-loss became {metrics['meta_loss']} in meta-steps {step}..{step + n}; {where}"
            )
        timed_steps, timed_seconds = timed_steps + n, timed_seconds + seconds
        state, step = new_state, step + n
        bar.update(n)
        bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}")
        _log(log_path, {"step": step, "kind": "train", "seconds": seconds, **metrics})
        if step % t.eval_every == 0 or step == t.steps:
            val = exp.evaluate(state.meta_params, "val", cfg.eval.val_tasks, "val")
            _log(log_path, {"step": step, "kind": "val", **val})
            # The validation objective, lower is better: query loss, or minus accuracy.
            score = -val["val_acc_post"] if "val_acc_post" in val else val["val_loss_post"]
            if score < best_val:
                best_val = np.array(score)
                ckpt.save_best(step, state, best_val=best_val)
        if step % t.checkpoint_every == 0 or step == t.steps:
            ckpt.save_last(step, state, best_val=best_val)
    bar.close()
    if ckpt.latest_step() is None:  # train.steps == 0: still leave a checkpoint to evaluate
        ckpt.save_last(step, state, best_val=best_val)
    if ckpt.latest_step("best") is None:
        ckpt.save_best(step, state, best_val=best_val)

    results = evaluate_checkpoint(exp, ckpt, state, which=cfg.eval.checkpoint)
    speed = timed_steps / timed_seconds if timed_seconds > 0 else None
    results.update(
        steps_per_sec=speed,
        compile_seconds=compile_seconds,
        train_steps=int(state.step),
        val_objective=float(best_val),
    )
    ckpt.close()
    write_results(exp, run_dir, results, "metrics.json")
    return results


def evaluate_checkpoint(exp: Experiment, ckpt: Checkpoints, template_state, *, which: str) -> dict:
    step, state, _ = ckpt.restore(template_state, which=which, extra={"best_val": np.array(0.0)})
    results = exp.evaluate(state.meta_params, "test", exp.cfg.eval.tasks, "eval")
    results.update(checkpoint=which, checkpoint_step=int(step))
    results["_meta_params"] = state.meta_params
    return results


def write_results(exp: Experiment, run_dir: Path, results: dict, name: str) -> None:
    meta_params = results.pop("_meta_params")
    (run_dir / name).write_text(json.dumps(results, indent=2))
    if exp.cfg.eval.figure:
        from metagrad.plots import adaptation_figure

        adaptation_figure(exp, meta_params, results, run_dir / name.replace(".json", ".png"))
