"""The outer loop: task batching (vmap, lax.map, sharded over devices), the meta-step as an
``(init, update)`` pair, and its state.

An estimator (:mod:`metagrad.estimators`) gives one task's meta-gradient; here it is averaged
over a batch of tasks and applied by an optax optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from metagrad._types import LossFn, MetaParams, Task
from metagrad.estimators.base import MetaGradEstimator

TASK_BATCHING = ("vmap", "map")


def default_task_batching(backend: str | None = None, *, convolutional: bool = False) -> str:
    """The task batching to use when none is given: ``"map"`` for convolutional models on CPU,
    ``"vmap"`` everywhere else.

    Measured on a 2-core CPU (second-order MAML, meta-steps/s of the CLI's training loop and
    of ``python -m experiments.bench.speed``): the sinusoid MLP runs 1.13x faster with ``vmap``
    (1,709 vs 1,510 meta-steps/s in 200-step chunks), Conv4 5-way 1-shot runs 1.04-1.06x faster with
    ``lax.map`` (meta-batch 8: 10.6 vs 10.1; meta-batch 32: 4.5 vs 4.2). With per-task weights a
    convolution under ``vmap`` becomes a batched (grouped) convolution, which CPU XLA runs slowly
    (with ``lax.conv`` many times slower; with :mod:`metagrad.nn.conv`'s ``patches`` a little), and
    ``lax.map`` keeps one task's activations in cache. GPUs and TPUs run the batched form well, so
    ``vmap`` is their default (not yet measured here).

    Args:
        backend: ``jax.default_backend()`` when None.
        convolutional: whether the model has convolutions with adapted weights.

    Example:
        >>> [default_task_batching(b, convolutional=True) for b in ("cpu", "gpu")]
        ['map', 'vmap']
        >>> default_task_batching("cpu")
        'vmap'
    """
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" and convolutional else "vmap"


# XLA's CPU backend hands dots, and by default also elementwise and reduce ops, to YNNPACK.
_DOTS_ONLY_IN_YNNPACK = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def default_compiler_options(backend: str | None = None, *, convolutional: bool = False) -> dict:
    """XLA options to compile a meta-step with (``jax.jit(..., compiler_options=...)``): on CPU,
    for models without convolutions, YNNPACK for the dots alone; nothing otherwise.

    Measured on a 2-core CPU, interleaved in one process (meta-steps per CPU-second, twice):
    second-order MAML on the sinusoid MLP runs 1.16x faster with XLA's own fused loops for its
    tiny (10 x 40 per task) elementwise and reduce ops, while on Conv4 the same option is
    0.68x: its batch-norm reductions over 75 x 14 x 14 x 64 activations belong in YNNPACK.

    Example:
        >>> default_compiler_options("cpu")
        {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
        >>> default_compiler_options("cpu", convolutional=True), default_compiler_options("gpu")
        ({}, {})
    """
    backend = backend or jax.default_backend()
    return dict(_DOTS_ONLY_IN_YNNPACK) if backend == "cpu" and not convolutional else {}


def batch_value_and_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    meta_params: MetaParams,
    tasks: Task,
    step,
    *,
    task_batching: str | int = "vmap",
):
    r"""Mean over a batch of tasks (a leading task axis) of one estimator's loss, metrics, grads.

    .. math:: g = \frac{1}{T} \sum_{t=1}^{T} g_t

    Args:
        task_batching: ``"vmap"`` (all tasks at once), ``"map"`` (``lax.map``: one task at a
            time, least memory; on CPU XLA a convolution with per-task weights under vmap becomes
            a slow grouped convolution), or an int ``k``: ``lax.map`` over chunks of ``k``
            vmapped tasks.

    Example:
        Two tasks with slopes 1 and 3, MAML from :math:`p = 0`: each task's gradient is
        :math:`-1.28 a` (see :func:`maml`), so the mean is :math:`-2.56`; every batching
        gives the same numbers:

        >>> from metagrad import maml
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> x, y = jnp.ones((2, 3)), jnp.array([[1.0], [3.0]]) * jnp.ones((2, 3))
        >>> for how in ("vmap", "map"):
        ...     (loss, _), g = batch_value_and_grad(
        ...         maml(steps=1, lr=0.1), loss_fn, MetaParams(0.0), Task((x, y), (x, y)), 0,
        ...         task_batching=how)
        ...     print(how, round(float(loss), 4), round(float(g.params), 4))
        vmap 3.2 -2.56
        map 3.2 -2.56
    """
    fn = lambda task: estimator.value_and_grad(loss_fn, meta_params, task, step)
    if task_batching == "vmap":
        out = jax.vmap(fn)(tasks)
    elif task_batching == "map":
        out = lax.map(fn, tasks)
    elif (
        isinstance(task_batching, int) and not isinstance(task_batching, bool) and task_batching > 0
    ):
        out = lax.map(fn, tasks, batch_size=task_batching)
    else:
        raise ValueError(
            f"task_batching must be 'vmap', 'map' or a positive int, got {task_batching!r}"
        )
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), out)


# --- the meta-step -----------------------------------------------------------------------------


class MetaState(NamedTuple):
    """The outer loop's state: meta-parameters (:class:`metagrad.MetaParams`), the outer
    optimizer's state, the step count.

    Example:
        >>> from metagrad import maml
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.adam(1e-3))
        >>> state = learner.init(MetaParams(jnp.zeros(3)))
        >>> int(state.step), state.meta_params.params.shape
        (0, (3,))
    """

    meta_params: MetaParams
    opt_state: optax.OptState
    step: jax.Array


class MetaLearner(NamedTuple):
    r"""``init(meta_params) -> MetaState`` and ``update(state, tasks) -> (state, metrics)``.

    Example:
        MAML's meta-gradient for :math:`L(p) = (p - 2)^2` is :math:`1.28 (p - 2)` (see
        :func:`maml`); one SGD step of rate 0.5 from 0 gives :math:`0.64 \cdot 2 = 1.28`, and
        twenty reach the minimum, 2:

        >>> from metagrad import maml
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.sgd(0.5))
        >>> x = jnp.ones((4, 3))  # 4 tasks of 3 points, all with slope 2
        >>> state = learner.init(MetaParams(jnp.array(0.0)))
        >>> state, _ = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> round(float(state.meta_params.params), 4)
        1.28
        >>> for _ in range(19):
        ...     state, metrics = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> int(state.step), round(float(state.meta_params.params), 4)
        (20, 2.0)
    """

    init: Callable
    update: Callable


def task_mesh(devices: int | str = "all") -> jax.sharding.Mesh:
    """A one-axis mesh (``"tasks"``) over the first ``devices`` devices (or all).

    The devices are ``jax.devices()``: the local ones in a single process, every process's in a
    multi-host run (see :mod:`metagrad.experiment.distributed`), where ``"all"`` is the one
    choice that gives each process a share.
    """
    devs = jax.devices()
    n = len(devs) if str(devices) == "all" else int(devices)
    if not 1 <= n <= len(devs):
        raise ValueError(f"devices={devices!r}: there are {len(devs)} devices")
    return jax.sharding.Mesh(np.array(devs[:n]), ("tasks",))


def sharded_batch_value_and_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    *,
    task_batching: str | int = "vmap",
    devices: int | str = 1,
) -> Callable:
    r"""``(meta_params, tasks, step) -> ((loss, metrics), grads)``: :func:`batch_value_and_grad`
    with the task axis sharded over ``devices`` (``1``: not sharded; ``"all"``: every device).

    The tasks get a ``NamedSharding`` over :func:`task_mesh`'s ``"tasks"`` axis and the
    meta-parameters stay replicated. ``vmap`` batching is left to XLA's partitioner, which turns
    the mean into a cross-device reduction. ``lax.map`` batching (``"map"`` or an int) runs under
    ``jax.shard_map``, each device mapping over its own tasks, because XLA would all-gather a
    ``lax.map`` over a sharded axis and run every task on every device. The meta-batch must
    divide evenly; the result is the mean over all tasks, as unsharded.

    Example:
        >>> from metagrad import maml
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> f = sharded_batch_value_and_grad(maml(steps=1, lr=0.1), loss_fn, devices="all")
        >>> x = jnp.ones((4, 3))  # 4 tasks of 3 points, slope 2: g = 1.28 (p - 2)
        >>> (loss, _), g = f(MetaParams(jnp.array(0.0)), Task((x, 2 * x), (x, 2 * x)), 0)
        >>> round(float(g.params), 4)
        -2.56
    """
    mean = lambda mp, tasks, step: batch_value_and_grad(
        estimator, loss_fn, mp, tasks, step, task_batching=task_batching
    )
    if str(devices) == "1":
        return mean
    P = jax.sharding.PartitionSpec
    mesh = task_mesh(devices)
    sharding = jax.sharding.NamedSharding(mesh, P("tasks"))
    if task_batching != "vmap":
        # A device's copy of the meta-parameters is cast to "varying", or its inner-loop
        # gradients would be summed over devices (shard_map's transpose of a broadcast).
        def local_mean(mp, tasks, step, f=mean):
            return lax.pmean(f(lax.pcast(mp, "tasks", to="varying"), tasks, step), "tasks")

        mean = jax.shard_map(local_mean, mesh=mesh, in_specs=(P(), P("tasks"), P()), out_specs=P())

    def sharded(meta_params, tasks, step):
        return mean(meta_params, lax.with_sharding_constraint(tasks, sharding), step)

    return sharded


def meta_learner(
    loss_fn: LossFn,
    estimator: MetaGradEstimator,
    optimizer: optax.GradientTransformation,
    *,
    task_batching: str | int = "vmap",
    jit: bool = True,
    devices: int | str = 1,
) -> MetaLearner:
    r"""A meta-step as an ``(init, update)`` pair driven by any optax optimizer.

    ``update`` averages the estimator's meta-gradient over the task batch, applies the optimizer
    and returns metrics: ``meta_loss``, ``loss_pre`` / ``loss_post`` (query loss before and after
    adaptation, plus any ``metrics_fn`` entries) and ``grad_norm`` (of the averaged meta-gradient).

    ``task_batching`` is as in :func:`batch_value_and_grad`; :func:`default_task_batching` gives
    the measured choice per backend and model (the CLI's ``train.task_batching=auto``).

    With ``devices`` > 1 (or ``"all"``) the task axis is sharded across devices with
    ``jax.sharding`` (a ``Mesh`` and ``NamedSharding``); meta-parameters stay replicated and XLA
    turns the mean over tasks into a cross-device reduction. The meta-batch must divide evenly.
    In a multi-host run ``"all"`` spans every process's devices; every process passes the same
    whole meta-batch and each device computes its share.

    Example:
        >>> from metagrad import maml
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> learner = meta_learner(loss_fn, maml(steps=1, lr=0.1), optax.sgd(0.1))
        >>> x = jnp.ones((4, 3))  # 4 tasks, 3 points each, all with slope 2
        >>> state = learner.init(MetaParams(jnp.zeros(())))
        >>> state, metrics = learner.update(state, Task((x, 2 * x), (x, 2 * x)))
        >>> sorted(metrics)
        ['grad_norm', 'loss_post', 'loss_pre', 'meta_loss']
    """
    if task_batching not in TASK_BATCHING and not (
        isinstance(task_batching, int) and task_batching > 0
    ):
        raise ValueError(
            f"task_batching must be 'vmap', 'map' or a positive int, got {task_batching!r}"
        )

    def init(meta_params: MetaParams) -> MetaState:
        estimator.check(meta_params)  # a clear error here, not a cryptic one inside jit
        return MetaState(meta_params, optimizer.init(meta_params), jnp.zeros((), jnp.int32))

    mean_over_tasks = sharded_batch_value_and_grad(
        estimator, loss_fn, task_batching=task_batching, devices=devices
    )

    def update(state, tasks):
        (loss, metrics), grads = mean_over_tasks(state.meta_params, tasks, state.step)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.meta_params)
        meta_params = optax.apply_updates(state.meta_params, updates)
        metrics = dict(metrics, meta_loss=loss, grad_norm=optax.tree.norm(grads))
        return MetaState(meta_params, opt_state, state.step + 1), metrics

    return MetaLearner(init, jax.jit(update) if jit else update)


__all__ = [
    "TASK_BATCHING",
    "MetaLearner",
    "MetaState",
    "batch_value_and_grad",
    "default_compiler_options",
    "default_task_batching",
    "meta_learner",
    "sharded_batch_value_and_grad",
    "task_mesh",
]
