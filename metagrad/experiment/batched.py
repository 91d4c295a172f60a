"""Many meta-training runs in one compiled program: the run axis vmapped outside the task axis.

Runs whose configs differ only in the :data:`BATCHABLE` keys (the seed, which draws the model's
initial weights and the task stream, and hyperparameters that never change a shape) share one
program: one compilation, one dispatch per chunk of meta-steps for all of them (the runs vmapped, or
mapped one after another inside the program on CPU: ``train.run_batching``). The differing
values enter that program as arrays with a leading run axis, so a learning-rate sweep does not
recompile per point (hyperparameters baked into an optimizer as constants would). Each run keeps
its own directory in the usual layout (``metrics.jsonl``, ``checkpoints/{last,best}``,
``run_info.json``, ``metrics.json``), so ``summarize.py``, ``eval.py`` and ``train.resume`` treat
it as a separate run; and it gives the same parameters as the same run alone, to float32
rounding (``tests/test_batched.py`` states and checks the bound).

:func:`group_runs` splits a sweep into the groups that can share a program (at most
``train.parallel_runs`` runs each); :func:`train_batched` trains one group, and runs the configs
one by one with :func:`metagrad.experiment.loop.train` where they cannot share one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from metagrad.experiment import build, compile_cache
from metagrad.experiment.checkpoint import Checkpoints
from metagrad.experiment.chunks import (
    PRESAMPLE_BYTES,
    ChunkRunner,
    check_heldout_memory,
    chunk_steps,
    presampled,
)
from metagrad.experiment.config import ImageTaskConfig, Sampling, validate
from metagrad.experiment.evaluation import make_curve_fn, summarize
from metagrad.experiment.loop import (
    TASKS_PER_CALL,
    DiskFull,
    Experiment,
    NonFiniteLoss,
    TrainingInterrupted,
    _in_blocks,
    _is_disk_full,
    check_resumable,
    open_log,
    restore_latest,
    train,
    write_results,
)
from metagrad.experiment.runlog import RunLock
from metagrad.outer import MetaState, meta_learner

# The keys whose values may differ between the runs of one program: each only scales or offsets
# arithmetic (never a shape, a loop bound or a Python branch). A key absent from a config (the
# algorithm has no such field) is skipped.
BATCHABLE = (
    "seed",  # the model's initial weights and the training task stream
    "inner.lr",  # the inner SGD rate (the learned rates' initial value)
    "outer.lr",  # the outer optimizer's rate (a schedule's initial value)
    "algo.reg",  # iMAML's proximal (L2) weight
    "algo.implicit_reg",  # algo=maml grad_mode=implicit: the same
    "algo.msl_anneal_steps",  # MAML++'s multi-step-loss weights (how fast they anneal)
)


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _has(cfg, key: str) -> bool:
    head, _, rest = key.partition(".")
    return hasattr(cfg, head) and (not rest or _has(getattr(cfg, head), rest))


def batched_keys(cfg) -> list[str]:
    """The :data:`BATCHABLE` keys ``cfg`` has.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> batched_keys(Config())
        ['seed', 'inner.lr', 'outer.lr', 'algo.implicit_reg']
    """
    return [k for k in BATCHABLE if _has(cfg, k)]


def with_values(cfg, values: dict):
    """A copy of ``cfg`` with ``values`` (``{"inner.lr": x, ...}``) set, the nodes on each path
    copied and ``cfg`` untouched. No check runs: the values may be tracers, inside the program.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> with_values(cfg, {"inner.lr": 0.5}).inner.lr, cfg.inner.lr
        (0.5, 0.01)
    """
    out = copy.copy(cfg)
    for key, value in values.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            child = copy.copy(getattr(node, part))
            setattr(node, part, child)
            node = child
        setattr(node, last, value)
    return out


def cannot_batch(cfg) -> str | None:
    """Why ``cfg``'s run cannot share a program with others (a key, as the user would set it),
    or None.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> cfg = Config()
        >>> cannot_batch(cfg) is None
        True
        >>> cfg.train.parallel_runs = 1
        >>> cannot_batch(cfg)
        'train.parallel_runs=1'
    """
    t = cfg.train
    if t.parallel_runs == 1:
        return "train.parallel_runs=1"
    if t.wandb:
        return "train.wandb=true (one wandb run per process)"
    if t.profile_steps:
        return "train.profile_steps (one trace per run)"
    if str(t.devices) != "1":
        return f"train.devices={t.devices} (the task axis is sharded)"
    if cfg.distributed.enabled:
        return "distributed.enabled=true"
    if isinstance(cfg.task, ImageTaskConfig) and cfg.task.sampling == Sampling.host:
        return "task.sampling=host (each run's stream from the host)"
    return None


def program_key(cfg) -> str:
    """What must be equal for runs to share a program: the config less the batchable keys.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> a, b = Config(), Config()
        >>> b.seed, b.inner.lr = 3, 0.1
        >>> program_key(a) == program_key(b)
        True
        >>> b.inner.steps = 5  # a loop bound: another program
        >>> program_key(a) == program_key(b)
        False
    """
    tree = dataclasses.asdict(cfg)
    for key in batched_keys(cfg):
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node[part]
        node.pop(last)
    return json.dumps(tree, sort_keys=True, default=str)


def group_runs(cfgs: list) -> list[list[int]]:
    """The indices of ``cfgs`` in groups that can share a compiled program, in the order of
    their first member; each group holds at most its ``train.parallel_runs`` configs, and a
    config that :func:`cannot_batch` is a group of its own.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> cfgs = [Config() for _ in range(4)]
        >>> for i, c in enumerate(cfgs):
        ...     c.seed = i
        >>> cfgs[2].inner.steps = 3  # another shape of program
        >>> group_runs(cfgs)
        [[0, 1, 3], [2]]
    """
    groups: dict[str, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, cfg in enumerate(cfgs):
        if cannot_batch(cfg) is not None:
            order.append([i])
            continue
        chain = groups.setdefault(program_key(cfg), [])
        if not chain or len(chain[-1]) >= cfg.train.parallel_runs:
            chain.append([])
            order.append(chain[-1])
        chain[-1].append(i)
    return order


@dataclass
class RunGroup:
    """The runs of one program: the shared experiment (built from the first config), each run's
    config, directory, checkpoints, log and best validation score, and the batchable values as
    arrays with a leading run axis (``hparams``)."""

    exp: Experiment
    cfgs: list
    run_dirs: list[Path]
    ckpts: list[Checkpoints]
    logs: list
    best_val: np.ndarray  # (runs,)
    hparams: dict[str, jax.Array]

    @property
    def size(self) -> int:
        return len(self.cfgs)

    @property
    def mesh(self) -> Mesh | None:
        """The local devices the runs are spread over (as many as divide the runs), or None
        for one device. On CPU, ``experiments/train.py`` asks XLA for one host device per core
        for a sweep: a small model's program keeps one core busy, so two groups of runs on two
        devices take half the time (2.1x, 8 sinusoid runs on this 2-core CPU)."""
        devices = jax.local_devices()
        n = max(d for d in range(1, len(devices) + 1) if self.size % d == 0)
        return Mesh(np.array(devices[:n]), ("runs",)) if n > 1 else None

    def put(self, tree, *, per_run: bool):
        """``tree`` placed for the program: split over the runs' devices (``per_run``: a
        leading run axis) or copied to each; as it is on one device."""
        mesh = self.mesh
        if mesh is None or tree is None:
            return tree
        return jax.device_put(tree, NamedSharding(mesh, P("runs") if per_run else P()))

    def cfg_for(self, hp: dict):
        """The shared config with one run's (traced) values."""
        return with_values(self.exp.cfg, hp)

    def estimator_for(self, hp: dict, steps: int | None = None):
        return build.build_estimator(self.cfg_for(hp), self.exp.model, steps=steps)

    def learner_for(self, hp: dict):
        cfg = self.cfg_for(hp)
        return meta_learner(
            self.exp.model.loss_fn,
            build.build_estimator(cfg, self.exp.model),
            build.build_optimizer(cfg),
            task_batching=build.resolve_task_batching(cfg),
            jit=False,
        )


def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _run(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def train_batched(cfgs: list, run_dirs: list) -> list[dict]:
    """Trains the runs of ``cfgs`` into ``run_dirs`` (one each) as one compiled program, and
    returns each run's test metrics, as :func:`metagrad.experiment.loop.train` would.

    The configs must differ only in :data:`BATCHABLE` keys (:func:`group_runs` splits a sweep
    so), else ``ValueError``. Configs that cannot share a program (host streaming chosen by
    ``task.sampling=auto``, runs resumed at different steps) are trained one after the other.
    A run whose meta-loss turns non-finite stops writing (its last good checkpoint is kept)
    while the others go on; :class:`NonFiniteLoss` names it at the end.

    Example:
        >>> from metagrad.experiment.config import Config
        >>> cfgs = [Config(), Config()]
        >>> cfgs[1].inner.steps = 2
        >>> train_batched(cfgs, ["runs/a", "runs/b"])
        Traceback (most recent call last):
        ValueError: the runs differ in more than ...BATCHABLE (...): use group_runs to split them
    """
    run_dirs = [Path(d) for d in run_dirs]
    if len(cfgs) != len(run_dirs) or len({d.absolute() for d in run_dirs}) != len(run_dirs):
        raise ValueError("train_batched: one distinct run directory per config")
    if len({program_key(c) for c in cfgs}) > 1:
        raise ValueError(
            "the runs differ in more than metagrad.experiment.batched.BATCHABLE "
            f"({', '.join(BATCHABLE)}): use group_runs to split them"
        )
    for cfg in cfgs:
        validate(cfg)
    compile_cache.enable(cfgs[0].train.compile_cache_dir, on=cfgs[0].train.compile_cache)
    if len(cfgs) == 1 or cannot_batch(cfgs[0]) is not None:
        return [train(c, d) for c, d in zip(cfgs, run_dirs, strict=True)]
    created = [not d.exists() for d in run_dirs]
    locks = []
    try:
        for d in run_dirs:
            locks.append(RunLock(d).acquire())  # one writer per run directory
        group, states = _start(cfgs, run_dirs)
    except BaseException:
        for lock in locks:
            lock.release()
        for d, new in zip(run_dirs, created, strict=True):
            if new:  # a refused run leaves no directory behind
                shutil.rmtree(d, ignore_errors=True)
        raise
    try:
        if group is None:  # cannot share a program after all: one by one
            for lock in locks:
                lock.release()
            locks = []
            return [train(c, d) for c, d in zip(cfgs, run_dirs, strict=True)]
        return _train(group, states)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_stopped("interrupted", run_dirs)) from None
    except Exception as err:  # noqa: BLE001 - orbax may wrap the OSError in its own type
        if not _is_disk_full(err):
            raise
        raise DiskFull(_stopped(f"no space left on the device ({err})", run_dirs)) from None
    finally:
        if group is not None:
            for log in group.logs:
                log.close()
        for lock in locks:
            lock.release()


def _stopped(why: str, run_dirs: list[Path]) -> str:
    kept = ", ".join(str(d) for d in run_dirs)
    return (
        f"{why}: the checkpoints written are kept in {kept}; continue with "
        "train.resume=true (the same command)"
    )


def _start(cfgs: list, run_dirs: list[Path]):
    """Builds the shared experiment and each run's state (restored when resuming) and log;
    ``(None, None)`` where the runs turn out not to share a program."""
    exp = Experiment.from_config(cfgs[0], validated=True)
    if exp.source.stream is not None:  # task.sampling=auto chose host streaming
        return None, None
    check_heldout_memory(exp)
    ckpts, states, best, latest_steps = [], [], [], []
    for cfg, run_dir in zip(cfgs, run_dirs, strict=True):
        ckpt = Checkpoints(run_dir)
        ckpts.append(ckpt)
        latest = check_resumable(cfg, run_dir, ckpt)
        state, best_val = restore_latest(ckpt, latest, initial_state(exp, cfg))
        states.append(state)
        best.append(float(best_val))
        latest_steps.append(latest)
    if len({int(s.step) for s in states}) > 1:  # resumed from checkpoints of different steps
        for ckpt in ckpts:
            ckpt.close()
        return None, None
    logs = [
        open_log(cfg, d, exp, s, latest)
        for cfg, d, s, latest in zip(cfgs, run_dirs, states, latest_steps, strict=True)
    ]
    hparams = {k: jnp.asarray([_get(c, k) for c in cfgs]) for k in batched_keys(cfgs[0])}
    group = RunGroup(exp, list(cfgs), list(run_dirs), ckpts, logs, np.array(best), hparams)
    return group, _stack(states)


def initial_state(exp: Experiment, cfg) -> MetaState:
    """The meta-state ``cfg``'s run starts from, alone or in a group sharing ``exp``: its
    seed's initial weights, its rates, its optimizer's state."""
    model = exp.model
    if cfg.seed != exp.cfg.seed:
        key = jax.random.key(cfg.seed)  # as Experiment.from_config draws them
        model = dataclasses.replace(model, params=build.build_model(cfg, key).params)
    meta_params = build.initial_meta_params(cfg, model, exp.source)
    learner = meta_learner(
        model.loss_fn, build.build_estimator(cfg, model), build.build_optimizer(cfg), jit=False
    )
    return learner.init(meta_params)


def stack_runs(exp: Experiment, cfgs: list) -> tuple[dict, MetaState]:
    """``(hparams, states)``: the batchable values and the initial states of ``cfgs``'s runs,
    each with a leading run axis."""
    keys = batched_keys(cfgs[0])
    hparams = {k: jnp.asarray([_get(c, k) for c in cfgs]) for k in keys}
    return hparams, _stack([initial_state(exp, c) for c in cfgs])


def run_batching(cfg) -> str:
    """``train.run_batching``; ``auto`` is ``map`` on CPU, where the runs' tasks vmapped together
    outgrow the cache (200 sinusoid tasks at once cost 10 times 25, not 8), else ``vmap``."""
    choice = cfg.train.run_batching
    if choice == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return choice


def over_runs(fn, group: RunGroup, per_run: tuple, shared: tuple = ()):
    """``fn(*run_args, *shared)`` for each run's slice of ``per_run`` (leading run axis),
    stacked: ``jax.vmap`` or ``lax.map`` as :func:`run_batching` says, within each device of
    ``group.mesh`` (``shard_map``: each device its own runs, ``shared`` copied to each)."""

    def local(per_run, shared):
        if run_batching(group.exp.cfg) == "map":
            return lax.map(lambda a: fn(*a, *shared), per_run)
        return jax.vmap(lambda *a: fn(*a, *shared))(*per_run)

    mesh = group.mesh
    if mesh is None:
        return local(per_run, shared)
    spread = jax.shard_map(
        local, mesh=mesh, in_specs=(P("runs"), P()), out_specs=P("runs"), check_vma=False
    )
    return spread(per_run, shared)


class BatchedChunks(ChunkRunner):
    """:class:`ChunkRunner` for a :class:`RunGroup`: each compiled call runs ``n`` meta-steps of
    every run, :func:`over_runs` of :func:`chunk_steps` (each run's learner built inside from
    its traced values, its tasks from ``fold_in(key(seed + 1), step)`` as alone)."""

    def __init__(self, group: RunGroup):
        exp = group.exp
        budget = PRESAMPLE_BYTES // group.size  # the presampled tasks of every run

        @jax.jit
        def run(states: MetaState, hparams, data, n_steps_marker):
            n = n_steps_marker.shape[0]
            presample = presampled(exp, data, n, budget)

            def one(state, hp, data):
                base_key = jax.random.key(hp["seed"] + 1)  # as chunks._base_key, traced
                return chunk_steps(exp, group.learner_for(hp), base_key, state, data, n, presample)

            return over_runs(one, group, (states, hparams), (data,))

        self._stream, self._jit = None, run
        self._hparams = group.put(group.hparams, per_run=True)
        self._data, self._compiled = group.put(exp.source.train_data, per_run=False), {}
        self.compile_seconds, self.memory_check = 0.0, exp.cfg.train.memory_check
        self._compiler_options = build.resolve_compiler_options(exp.cfg) or None

    def _args(self, state: MetaState, n: int) -> tuple:
        return (self._hparams, *super()._args(state, n))


class _BatchedCurves:
    """The held-out curves of every run in one compiled call (the tasks shared), one compilation
    per ``(steps, post)`` as :meth:`Experiment.curve_fn`."""

    def __init__(self, group: RunGroup):
        self.group, self._fns = group, {}

    def __call__(self, meta_params, split: str, num_tasks: int, prefix: str) -> list[dict]:
        g = self.group
        post, steps = g.exp.eval_steps()
        fn = self._fns.get((steps, post))
        if fn is None:
            fn = self._fns[(steps, post)] = self._compile(steps, post)
        tasks = g.exp.heldout_tasks(split, num_tasks)
        block = min(max(g.exp.cfg.eval.batch_size, TASKS_PER_CALL), num_tasks)
        hparams, meta_params = g.put(g.hparams, per_run=True), g.put(meta_params, per_run=True)
        call = lambda mp, t: fn(hparams, mp, g.put(t, per_run=False))  # noqa: E731
        curves = _in_blocks(call, meta_params, tasks, block)
        out = []
        for i in range(g.size):  # tasks on axis 0, runs on axis 1
            summary = summarize({k: v[:, i] for k, v in curves.items()}, post, prefix)
            out.append({**summary, f"{prefix}_inner_steps": post})
        return out

    def _compile(self, steps: int, post: int):
        g, cfg = self.group, self.group.exp.cfg
        adapts_inside = cfg.algo.EMBEDDING and cfg.algo.INNER_LOOP
        model = g.exp.model

        def one(hp, meta_params, tasks):
            estimator = g.estimator_for(hp, steps=post if adapts_inside else None)
            options = g.exp.curve_options(steps)
            curves = make_curve_fn(estimator, model.loss_fn, model.metrics_fn, **options)
            return curves(meta_params, tasks)

        def runs(hparams, meta_params, tasks):  # tasks on axis 0, runs on axis 1
            curves = over_runs(one, g, (hparams, meta_params), (tasks,))
            return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), curves)

        return jax.jit(runs)


def _train(group: RunGroup, states: MetaState) -> list[dict]:
    cfg, exp = group.exp.cfg, group.exp
    t = cfg.train
    chunks, curves = BatchedChunks(group), _BatchedCurves(group)
    states = group.put(states, per_run=True)
    step = int(states.step[0])
    failed: dict[int, str] = {}  # run -> why it stopped writing
    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not t.progress,
        desc=f"meta-train ({group.size} runs)",
        unit="step",
        dynamic_ncols=True,
    )
    timed_steps, timed_seconds = 0, 0.0
    while step < t.steps:
        n = min(t.chunk_steps, t.steps - step)
        before = chunks.compile_seconds
        tic = time.perf_counter()
        new_states, metrics = chunks(states, n)
        metrics = {k: np.asarray(v, dtype=np.float64) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - tic - (chunks.compile_seconds - before)
        timed_steps, timed_seconds = timed_steps + n, timed_seconds + seconds
        states, step = new_states, step + n
        finite = metrics.pop("params_finite") == 1.0
        for i in range(group.size):
            bad = [k for k in ("meta_loss", "grad_norm") if not math.isfinite(metrics[k][i])]
            if i not in failed and (bad or not finite[i]):
                what = f"{bad[0]} became {metrics[bad[0]][i]}" if bad else "non-finite params"
                failed[i] = f"{what} in meta-steps {step - n}..{step}"
            if i not in failed:
                record = {k: float(v[i]) for k, v in metrics.items()}
                group.logs[i].write({"step": step, "kind": "train", "seconds": seconds, **record})
        bar.update(n)
        bar.set_postfix(meta_loss=f"{np.nanmean(metrics['meta_loss']):.4f}")
        if step % t.eval_every == 0 or step == t.steps:
            for i, val in enumerate(curves(states.meta_params, "val", cfg.eval.val_tasks, "val")):
                if i in failed:
                    continue
                group.logs[i].write({"step": step, "kind": "val", **val})
                score = -val["val_acc_post"] if "val_acc_post" in val else val["val_loss_post"]
                if not math.isfinite(score):
                    failed[i] = f"the validation objective became {score} at meta-step {step}"
                elif score < group.best_val[i]:
                    group.best_val[i] = score
                    group.ckpts[i].save_best(step, _run(states, i), best_val=np.array(score))
        if step % t.checkpoint_every == 0 or step == t.steps:
            for i, ckpt in enumerate(group.ckpts):
                if i not in failed:
                    ckpt.save_last(step, _run(states, i), best_val=np.array(group.best_val[i]))
    bar.close()
    for i, ckpt in enumerate(group.ckpts):  # train.steps == 0: still a checkpoint to evaluate
        if i not in failed and ckpt.latest_step() is None:
            ckpt.save_last(step, _run(states, i), best_val=np.array(group.best_val[i]))
        if i not in failed and ckpt.latest_step("best") is None:
            ckpt.save_best(step, _run(states, i), best_val=np.array(group.best_val[i]))
    results = _test(group, curves, states, failed)
    speed = timed_steps / timed_seconds if timed_seconds > 0 else None
    for i, r in enumerate(results):
        if r is None:
            continue
        r.update(
            steps_per_sec=speed,
            compile_seconds=chunks.compile_seconds,
            train_steps=step,
            val_objective=float(group.best_val[i]),
            parallel_runs=group.size,
        )
        group.ckpts[i].close()
        group.logs[i].summary(r)
        run_exp = dataclasses.replace(
            exp, cfg=group.cfgs[i], estimator=build.build_estimator(group.cfgs[i], exp.model)
        )
        run_exp._curve_fns = {}  # the figure's own compiled curves, at this run's values
        write_results(run_exp, group.run_dirs[i], r, "metrics.json")
    if failed:
        lines = "; ".join(f"{group.run_dirs[i]}: {why}" for i, why in sorted(failed.items()))
        raise NonFiniteLoss(
            f"{len(failed)} of {group.size} runs stopped ({lines}); their last good checkpoints "
            "are kept, the other runs finished"
        )
    return results


def _test(group: RunGroup, curves: _BatchedCurves, states: MetaState, failed: dict) -> list:
    """Each run's test metrics from its ``eval.checkpoint`` checkpoint, evaluated together; None
    for the runs in ``failed``."""
    which = group.exp.cfg.eval.checkpoint
    restored, steps = [], []
    for i, ckpt in enumerate(group.ckpts):
        template = _run(states, i)
        if i in failed:
            restored.append(template.meta_params)
            steps.append(None)
            continue
        step, state, _ = ckpt.restore(template, which=which, extra={"best_val": np.array(0.0)})
        restored.append(state.meta_params)
        steps.append(int(step))
    evaluated = curves(_stack(restored), "test", group.exp.cfg.eval.tasks, "eval")
    out: list[Any] = []
    for i, r in enumerate(evaluated):
        if i in failed:
            out.append(None)
            continue
        r.update(checkpoint=str(which), checkpoint_step=steps[i], _meta_params=restored[i])
        out.append(r)
    return out


__all__ = [
    "BATCHABLE",
    "batched_keys",
    "cannot_batch",
    "group_runs",
    "program_key",
    "stack_runs",
    "train_batched",
    "with_values",
]
