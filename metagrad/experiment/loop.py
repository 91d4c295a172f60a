"""The meta-training loop as a library function (Hydra-free).

`train(cfg, run_dir)` runs chunks of meta-steps per compiled call (a `lax.scan` with task
sampling on the device), validates every ``train.eval_every`` steps keeping the best
checkpoint, checkpoints atomically every ``train.checkpoint_every`` steps and at the end, resumes
a killed run bit for bit (the task stream is a function of the step, not of the history), and
finishes with a held-out test evaluation written to ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from metagrad._types import MetaParams
from metagrad.experiment import build, compile_cache, distributed
from metagrad.experiment.checkpoint import Checkpoints
from metagrad.experiment.chunks import ChunkRunner, check_heldout_memory
from metagrad.experiment.config import ConfigError, validate
from metagrad.experiment.evaluation import make_curve_fn, summarize
from metagrad.experiment.profiling import StepTrace
from metagrad.experiment.runinfo import run_metadata
from metagrad.experiment.runlog import RunLock, RunLog, dumps, open_wandb, write_json
from metagrad.outer import MetaState, meta_learner, task_mesh


class NonFiniteLoss(RuntimeError):
    """The meta-loss became NaN or Inf; the last good checkpoint is kept.

    Raised by :func:`train` after a chunk of meta-steps whose mean meta-loss fails
    ``math.isfinite``; the message names the steps and the checkpoint kept.

    Example:
        >>> try:
        ...     raise NonFiniteLoss("meta-loss became nan in meta-steps 500..1000")
        ... except RuntimeError as err:  # a RuntimeError, so generic handlers catch it too
        ...     print(type(err).__name__, err)
        NonFiniteLoss meta-loss became nan in meta-steps 500..1000
    """


@dataclass
class Experiment:
    """Everything built from a config: the pieces `train` and ``experiments/eval.py`` share.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> cfg.model.hidden = [8]
        >>> exp = Experiment.from_config(cfg)
        >>> exp.estimator.name, exp.source.kind, exp.meta_params.lr is None
        ('maml', 'regression', True)
    """

    cfg: Any
    model: build.Model
    source: build.TaskSource
    estimator: Any
    optimizer: Any
    meta_params: MetaParams
    _curve_fns: dict = field(default_factory=dict, repr=False)  # steps -> compiled curves

    @classmethod
    def from_config(cls, cfg, *, validated: bool = False) -> Experiment:
        if not validated:  # train() validates once, before starting the JAX backend
            validate(cfg)
        devices = str(cfg.train.devices)
        n = len(jax.devices()) if devices == "all" else int(devices)
        if n > len(jax.devices()) or cfg.train.meta_batch_size % n:
            raise ConfigError(
                f"train.devices={devices}: {n} device(s) of {len(jax.devices())} "
                f"in all; train.meta_batch_size={cfg.train.meta_batch_size} must "
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
            build.initial_meta_params(cfg, model, source),
        )

    def curve_fn(self, *, steps: int, post: int | None = None):
        """The compiled held-out curves over ``steps`` inner steps. An algorithm whose
        estimator has no inner loop of its own but adapts (Proto-MAML) is scored by its
        objective at ``post`` inner steps instead."""
        a = self.cfg.algo
        adapts_inside = a.EMBEDDING and a.INNER_LOOP and post is not None
        key = (steps, post if adapts_inside else None)
        if key in self._curve_fns:  # one compilation per run, not one per validation
            return self._curve_fns[key]
        estimator = self.estimator
        if adapts_inside and post != self.cfg.inner.steps:
            estimator = build.build_estimator(self.cfg, self.model, steps=post)
        self._curve_fns[key] = make_curve_fn(
            estimator, self.model.loss_fn, self.model.metrics_fn, **self.curve_options(steps)
        )
        return self._curve_fns[key]

    def curve_options(self, steps: int) -> dict:
        """:func:`make_curve_fn`'s keywords besides the estimator, loss and metrics."""
        return dict(
            steps=steps,
            batch_size=self.cfg.eval.batch_size,
            scores_fn=self.model.scores_fn,
            # One parameter set at a time where tasks are mapped (convolutional models on CPU).
            steps_batching="map" if build.resolve_task_batching(self.cfg) == "map" else "vmap",
        )

    def eval_steps(self) -> tuple[int, int]:
        """``(post, steps)``: the inner steps scored as "after adaptation" (``eval.inner_steps``,
        else ``inner.steps``) and the curves' length (at least ``eval.curve_steps``)."""
        e = self.cfg.eval
        post = self.cfg.inner.steps if e.inner_steps is None else e.inner_steps
        return post, max(post, e.curve_steps)

    def heldout_tasks(self, split: str, num_tasks: int):
        """The fixed held-out tasks of ``split`` (the same for every seed), at eval's sizes."""
        e, t = self.cfg.eval, self.cfg.task
        return self.source.heldout(split, num_tasks, e.shots or t.shots, e.query or t.query, e.ways)

    def evaluate(self, meta_params, split: str, num_tasks: int, prefix: str) -> dict:
        post, steps = self.eval_steps()
        tasks = self.heldout_tasks(split, num_tasks)
        # Calls of at least TASKS_PER_CALL tasks: a Python dispatch per task would cost more than
        # eval.batch_size=1 saves.
        block = min(max(self.cfg.eval.batch_size, TASKS_PER_CALL), num_tasks)
        curves = _in_blocks(self.curve_fn(steps=steps, post=post), meta_params, tasks, block)
        out = summarize(curves, post, prefix)
        out[f"{prefix}_inner_steps"] = post
        return out


TASKS_PER_CALL = 50


def _in_blocks(curves_fn, meta_params, tasks, block: int) -> dict:
    """``curves_fn`` over blocks of ``block`` tasks (the last padded with copies of the final
    task, then cut): one compilation serves validation and test, whatever their sizes. The tasks
    stay where they are (on the device); only the curves come back to the host."""
    n = jax.tree.leaves(tasks)[0].shape[0]
    parts = []
    for start in range(0, n, block):
        idx = np.minimum(np.arange(start, start + block), n - 1)
        block_tasks = jax.tree.map(lambda x, idx=idx: x[idx], tasks)
        parts.append(jax.device_get(curves_fn(meta_params, block_tasks)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:n], *parts)


@dataclass
class Run:
    """A run that has been accepted and set up: what the loop of :func:`train` needs."""

    exp: Experiment
    learner: Any
    ckpt: Checkpoints
    state: MetaState
    best_val: np.ndarray
    log: RunLog | None  # None on the processes of a multi-host run that do not write
    run_dir: Path


def start_run(cfg, run_dir: Path, *, primary: bool) -> Run:
    """Builds the run, restores its checkpoint when resuming, and opens its log.

    Refuses (before writing anything) to start over a directory that holds checkpoints without
    ``train.resume``, and to resume a directory that holds none.
    """
    exp = Experiment.from_config(cfg, validated=True)  # by train()
    check_heldout_memory(exp)
    t = cfg.train
    ckpt = Checkpoints(run_dir)
    latest = check_resumable(cfg, run_dir, ckpt)
    learner = meta_learner(
        exp.model.loss_fn,
        exp.estimator,
        exp.optimizer,
        task_batching=build.resolve_task_batching(cfg),
        jit=False,
        devices=t.devices,
    )
    state = learner.init(exp.meta_params)
    if jax.process_count() > 1:  # orbax saves and restores global arrays
        state = distributed.replicate(state, task_mesh(t.devices))
    state, best_val = restore_latest(ckpt, latest, state)
    log = open_log(cfg, run_dir, exp, state, latest) if primary else None
    return Run(exp, learner, ckpt, state, best_val, log, run_dir)


def check_resumable(cfg, run_dir: Path, ckpt: Checkpoints) -> int | None:
    """The newest checkpoint's step (None: none). Refuses to start over checkpoints without
    ``train.resume``, and to resume a directory that holds none."""
    latest = ckpt.latest_step()
    if latest is not None and not cfg.train.resume:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass train.resume=true to "
            "continue that run, or choose a new run directory"
        )
    if latest is None and cfg.train.resume:
        raise FileNotFoundError(
            f"train.resume=true, but {run_dir} holds no checkpoint to resume: check the "
            "path, or drop train.resume to start a new run there"
        )
    return latest


def restore_latest(ckpt: Checkpoints, latest: int | None, state: MetaState):
    """``(state, best_val)``: restored from the newest intact checkpoint, or as given."""
    best_val = np.array(np.inf)
    if latest is not None:
        _, state, extra = ckpt.restore(state, extra={"best_val": best_val}, fall_back=True)
        best_val = extra["best_val"]
    return state, best_val


def open_log(cfg, run_dir: Path, exp: Experiment, state: MetaState, latest: int | None) -> RunLog:
    """Writes ``run_info.json`` and opens the run's log (and its TensorBoard, wandb writers)."""
    t = cfg.train
    data = {"data": exp.source.info} if exp.source.info else {}  # the image benchmarks'
    write_json(run_dir / "run_info.json", {**run_metadata(), **data})
    tensorboard = None
    if t.tensorboard:
        from tensorboardX import SummaryWriter  # optional; validate() checked it is there

        tensorboard = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10)
    wandb_run, wandb_resumed = None, False
    if t.wandb:
        wandb_run, wandb_resumed = open_wandb(t, config_dict(cfg), run_dir)
    return RunLog(
        run_dir / "metrics.jsonl",
        tensorboard=tensorboard,
        wandb=wandb_run,
        resume_step=int(state.step) if latest is not None else None,
        wandb_resumed=wandb_resumed,
    )


def config_dict(cfg) -> dict:
    """The resolved config as plain JSON types (enums by value), as a logger's config.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> config_dict(Config())["train"]["wandb_project"]
        'metagrad'
    """
    return json.loads(dumps(dataclasses.asdict(cfg), default=lambda v: getattr(v, "value", str(v))))


def _diverged(run: Run, what: str, steps: str) -> NonFiniteLoss:
    kept = run.ckpt.latest_step()
    where = (
        f"the last good checkpoint (step {kept}) is kept in {run.run_dir / 'checkpoints'}"
        if kept is not None
        else "no checkpoint had been written yet"
    )
    return NonFiniteLoss(f"{what} in meta-steps {steps}; {where}")


def train(cfg, run_dir: str | Path) -> dict:
    r"""Meta-trains as ``cfg`` says, writing everything into ``run_dir``; returns the test metrics.

    Writes ``metrics.jsonl`` (training and validation records), ``checkpoints/{last,best}``,
    ``run_info.json`` (versions, git commit, backend, devices), ``metrics.json`` (the test
    evaluation and speed) and ``metrics.png`` (held-out tasks before and after adaptation, for
    sinusoid, and the query loss against inner steps); with ``train.tensorboard``, the log's
    numbers also as TensorBoard event files in ``tensorboard/``; with ``train.wandb``, as a
    Weights & Biases run in ``wandb/`` (history, test metrics as its summary, the config); with
    ``train.profile_steps=[a, b]``, a ``jax.profiler`` trace of those meta-steps in ``profile/``.

    Each meta-step applies the outer optimizer to :math:`\frac{1}{T} \sum_t g_t`, the mean of
    the estimator's meta-gradients over ``train.meta_batch_size`` tasks
    (:func:`metagrad.meta_learner`); test metrics are means over ``eval.tasks`` held-out tasks
    with ``*_ci95`` half-widths :math:`1.96\, s / \sqrt{n}`.

    Example:
        The config is checked before anything is built or compiled:

        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> cfg.train.steps, cfg.train.progress = 100, False
        >>> cfg.inner.steps = -1
        >>> train(cfg, "runs/never-written")
        Traceback (most recent call last):
        metagrad.experiment.config.ConfigError: inner.steps=-1: must be >= 0

        With ``cfg.inner.steps = 1`` this trains (about 15 s here, mostly compilation;
        ``tests/test_train_cli.py`` runs it end to end):

        >>> results = train(cfg, "runs/sinusoid")  # doctest: +SKIP
        >>> sorted(results)[:3]  # doctest: +SKIP
        ['checkpoint', 'checkpoint_step', 'compile_seconds']
    """
    run_dir = Path(run_dir)
    validate(cfg)
    # Before this process compiles anything: JAX reads the cache settings once.
    compile_cache.enable(cfg.train.compile_cache_dir, on=cfg.train.compile_cache)
    distributed.initialize(cfg.distributed)  # before anything else starts a JAX backend
    primary = distributed.is_primary()  # only process 0 writes logs, metrics and figures
    distributed.check_same_everywhere(str(run_dir.absolute()), "the run directory")
    created = not run_dir.exists()
    lock = RunLock(run_dir).acquire() if primary else None  # one writer per run directory
    try:
        run = start_run(cfg, run_dir, primary=primary)
    except BaseException:
        if lock is not None:
            lock.release()
        if created and primary:  # a refused run leaves no directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        return _train(cfg, run, primary)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_stopped_at(run, "interrupted")) from None
    except Exception as err:  # noqa: BLE001 - orbax may wrap the OSError in its own type
        if not _is_disk_full(err):
            raise
        raise DiskFull(_stopped_at(run, f"no space left on the device ({err})")) from None
    finally:
        if run.log is not None:  # closed already unless the run stopped early: then the
            run.log.close(failed=True)  # wandb run is marked failed, not left open
        if lock is not None:
            lock.release()


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during training; the message says where it stopped and how to resume."""


class DiskFull(RuntimeError):
    """A write failed with ENOSPC; the last good checkpoint is kept."""


def _is_disk_full(err: BaseException | None) -> bool:
    while err is not None:  # orbax may wrap the OSError
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        err = err.__cause__ or err.__context__
    return False


def _stopped_at(run: Run, why: str) -> str:
    kept = run.ckpt.latest_step()
    where = f"checkpoint at step {kept} kept" if kept is not None else "no checkpoint written yet"
    return (
        f"{why}: {where} in {run.run_dir}; continue with train.resume=true "
        f"hydra.run.dir={run.run_dir}"
    )


def _train(cfg, run: Run, primary: bool) -> dict:
    t, exp, run_dir = cfg.train, run.exp, run.run_dir
    chunks = ChunkRunner(
        exp,
        run.learner,
        exp.source.train_data,
        memory_check=t.memory_check,
        compiler_options=build.resolve_compiler_options(cfg),
    )
    state, best_val = run.state, run.best_val
    bar = tqdm(
        total=t.steps,
        initial=int(state.step),
        disable=not (t.progress and primary),
        desc="meta-train",
        unit="step",
        dynamic_ncols=True,
    )
    step = int(state.step)
    trace = StepTrace(t.profile_steps if primary else None, run_dir / "profile")
    try:
        state, best_val, step, timed_steps, timed_seconds = _chunks_loop(
            cfg, run, primary, chunks, bar, trace, state, best_val, step
        )
    finally:
        trace.close()
        chunks.close()  # frees a host stream's chunks prefetched past the last step
    bar.close()
    if run.ckpt.latest_step() is None:  # train.steps == 0: still leave a checkpoint to evaluate
        run.ckpt.save_last(step, state, best_val=best_val)
    if run.ckpt.latest_step("best") is None:
        run.ckpt.save_best(step, state, best_val=best_val)

    results = evaluate_checkpoint(exp, run.ckpt, state, which=cfg.eval.checkpoint)
    bad = [k for k, v in results.items() if k.endswith("_post") and not math.isfinite(v)]
    speed = timed_steps / timed_seconds if timed_seconds > 0 else None
    results.update(
        steps_per_sec=speed,
        compile_seconds=chunks.compile_seconds,
        train_steps=int(state.step),
        val_objective=float(best_val),
    )
    run.ckpt.close()
    if primary:
        run.log.summary(results)
        run.log.close()
        write_results(exp, run_dir, results, "metrics.json")  # non-finite values as null
    else:
        results.pop("_meta_params")
    if bad:
        raise NonFiniteLoss(
            f"the test evaluation's {bad[0]} is {results[bad[0]]} (metrics.json holds null); "
            f"the checkpoint it evaluated is kept in {run_dir / 'checkpoints'}"
        )
    return results


def _chunks_loop(cfg, run: Run, primary: bool, chunks, bar, trace, state, best_val, step):
    """The meta-training chunks from ``step`` to ``train.steps``: each a compiled call, then its
    log record, validation and checkpoints when due."""
    t, exp = cfg.train, run.exp
    timed_steps, timed_seconds = 0, 0.0
    while step < t.steps:
        n = min(t.chunk_steps, t.steps - step)
        before = chunks.compile_seconds
        tic = time.perf_counter()
        with trace.chunk(step, n):
            new_state, metrics = chunks(state, n)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        params_finite = metrics.pop("params_finite") == 1.0
        seconds = time.perf_counter() - tic - (chunks.compile_seconds - before)
        bad = [k for k in ("meta_loss", "grad_norm") if not math.isfinite(metrics[k])]
        if bad or not params_finite:
            bar.close()
            what = (
                f"{bad[0]} became {metrics[bad[0]]}" if bad else "meta-parameters turned non-finite"
            )
            raise _diverged(run, what, f"{step}..{step + n}")
        timed_steps, timed_seconds = timed_steps + n, timed_seconds + seconds
        state, step = new_state, step + n
        bar.update(n)
        bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}")
        if primary:
            run.log.write({"step": step, "kind": "train", "seconds": seconds, **metrics})
        if step % t.eval_every == 0 or step == t.steps:
            val = exp.evaluate(state.meta_params, "val", cfg.eval.val_tasks, "val")
            if primary:
                run.log.write({"step": step, "kind": "val", **val})
            # The validation objective, lower is better: query loss, or minus accuracy.
            score = -val["val_acc_post"] if "val_acc_post" in val else val["val_loss_post"]
            if not math.isfinite(score):
                bar.close()
                raise _diverged(run, f"the validation objective became {score}", f"..{step}")
            if distributed.agree(bool(score < best_val)):  # saving is collective
                best_val = np.array(score)
                run.ckpt.save_best(step, state, best_val=best_val)
        if step % t.checkpoint_every == 0 or step == t.steps:
            run.ckpt.save_last(step, state, best_val=best_val)
    return state, best_val, step, timed_steps, timed_seconds


def evaluate_checkpoint(exp: Experiment, ckpt: Checkpoints, template_state, *, which: str) -> dict:
    r"""Evaluates the newest ``which`` (``"best"`` or ``"last"``) checkpoint on the test tasks.

    ``template_state`` gives the structure to restore into (a :class:`metagrad.MetaState`).
    Returns ``eval_*`` metrics: for each metric the mean over ``cfg.eval.tasks`` test tasks
    before adaptation (``_pre``), after ``eval.inner_steps`` steps (``_post``) and along
    ``eval.curve_steps`` (``_curve``), each with its half-width :math:`1.96\, s / \sqrt{n}`
    (``_ci95``); plus ``checkpoint``, ``checkpoint_step`` and the restored meta-parameters under
    ``"_meta_params"`` (which :func:`write_results` takes out).

    Example:
        >>> import tempfile
        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> cfg.model.hidden, cfg.eval.tasks, cfg.eval.curve_steps = [8], 4, 1
        >>> exp = Experiment.from_config(cfg)
        >>> learner = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False)
        >>> state = learner.init(exp.meta_params)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> ckpt = Checkpoints(tmp.name)
        >>> ckpt.save_best(0, state, best_val=np.inf)
        >>> results = evaluate_checkpoint(exp, ckpt, state, which="best")
        >>> results["checkpoint"], results["checkpoint_step"], results["eval_inner_steps"]
        ('best', 0, 1)
        >>> len(results["eval_loss_curve"])  # before adaptation and after each of 1 step
        2
        >>> ckpt.close(); tmp.cleanup()
    """
    step, state, _ = ckpt.restore(template_state, which=which, extra={"best_val": np.array(0.0)})
    results = exp.evaluate(state.meta_params, "test", exp.cfg.eval.tasks, "eval")
    results.update(checkpoint=which, checkpoint_step=int(step))
    results["_meta_params"] = state.meta_params
    return results


def write_results(exp: Experiment, run_dir: Path, results: dict, name: str) -> None:
    """Writes ``results`` as ``run_dir / name`` (JSON) and, with ``eval.figure``, the figure
    next to it (``.png``); ``results["_meta_params"]`` feeds the figure and is removed.

    Example:
        >>> import tempfile
        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> cfg.model.hidden, cfg.eval.figure = [8], False
        >>> exp = Experiment.from_config(cfg)
        >>> results = {"eval_loss_post": 0.25, "_meta_params": exp.meta_params}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     write_results(exp, Path(folder), results, "metrics.json")
        ...     print((Path(folder) / "metrics.json").read_text())
        {
          "eval_loss_post": 0.25
        }
        >>> "_meta_params" in results
        False
    """
    meta_params = results.pop("_meta_params")
    write_json(run_dir / name, results)
    if exp.cfg.eval.figure:
        from metagrad.experiment.plots import adaptation_figure

        adaptation_figure(exp, meta_params, results, run_dir / name.replace(".json", ".png"))
