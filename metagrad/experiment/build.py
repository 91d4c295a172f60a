"""From a validated `Config` to the objects the training loop runs: model, loss, estimator,
outer optimizer and task source. Each group option's dataclass (`metagrad.experiment.config`)
says what it means; this module turns it into the objects, in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from metagrad import estimators
from metagrad import nn as mnn
from metagrad._types import MetaParams, Task
from metagrad.estimators import ESTIMATORS, MetaGradEstimator, learned_rates, make_estimator
from metagrad.experiment.config import (
    BNPolicy,
    ConfigError,
    Conv4Config,
    Conv4QuantConfig,
    Curvature,
    FinetuneConfig,
    ImageTaskConfig,
    IMAMLConfig,
    MLPQuantConfig,
    OmniglotConfig,
    OuterOptimizer,
    ResNet12Config,
    Schedule,
    SinusoidConfig,
)
from metagrad.nn.losses import with_support_context
from metagrad.outer import default_compiler_options, default_task_batching
from metagrad.precision import mixed_precision
from metagrad.tasks import sinusoid


@dataclass
class Model:
    """A model as the engine sees it: initial params, a pure apply, and its loss and metrics."""

    params: Any
    apply: Callable
    loss_fn: Callable
    metrics_fn: Callable | None
    step_arg: bool  # the model takes the inner step index (MAML++ per-step batch norm)
    # ``(params, batch, step=None) -> {"loss", **metrics}`` from one forward pass, for the
    # held-out curves; None: they call loss_fn and metrics_fn apart.
    scores_fn: Callable | None = None


@dataclass
class TaskSource:
    """Training batches sampled on the device, and held-out tasks from fixed keys.

    ``train_data`` (device arrays, or None) is passed to ``sample_train`` as an argument of the
    compiled training chunk rather than baked into it as a constant.
    """

    kind: str  # "regression" or "classification"
    train_data: Any
    sample_train: Callable[[Any, jax.Array, int], Task]  # (data, key, meta_batch) -> Task batch
    # (split, num_tasks, shots, query[, ways]) -> Task batch; ways: eval.ways, else task.ways
    heldout: Callable[..., Task]
    # Host streaming (a split too large for the device): an object whose
    # ``chunk(base_key, first_step, n)`` returns the per-step data of steps first_step .. +n-1
    # (leading axis n, on the device, prefetched), each step's slice passed to ``sample_train``
    # in place of ``train_data``. None: tasks are sampled on the device from ``train_data``.
    stream: Any = None
    # What run_info.json records of the data ("data"): the data set, the container read, its
    # fingerprint (sha256 of the decoded splits) and the classes and images per split.
    info: dict = field(default_factory=dict)
    train_counts: Any = None  # images per training class where they differ (image benchmarks)
    train_classes: int | None = None  # algo=finetune: the classes its classifier covers


def build_task_source(cfg) -> TaskSource:
    source = _episodic_source(cfg)
    if isinstance(cfg.algo, FinetuneConfig):
        return supervised_source(cfg, source)
    return source


def supervised_source(cfg, source: TaskSource) -> TaskSource:
    """``algo=finetune``'s training batches: each of ``train.meta_batch_size`` "tasks" a batch
    of ``algo.batch_size`` training images with their global labels (Omniglot: character and
    rotation, ``4 c + r``), from the same device-held split as the episodic tasks; the held-out
    tasks are the episodic ones."""
    from metagrad.estimators.finetune import supervised_batch

    if source.stream is not None:
        raise ConfigError(
            "task.sampling=host: algo=finetune pre-trains on batches of the training split held "
            "on the device; set task.sampling=device (and task.device_budget_mb if needed)"
        )
    rotations = isinstance(cfg.task, OmniglotConfig)
    counts = None if source.train_counts is None else jnp.asarray(source.train_counts)
    size = cfg.algo.batch_size

    def sample_train(images, key, batch):
        def one(k):
            return supervised_batch(images, k, size, rotations=rotations, counts=counts)

        x, y = jax.vmap(one)(jax.random.split(key, batch))
        return Task((x, y), (x, y))

    classes = source.train_data.shape[0] * (4 if rotations else 1)
    return replace(source, sample_train=sample_train, train_classes=classes)


def _episodic_source(cfg) -> TaskSource:
    t = cfg.task
    if isinstance(t, SinusoidConfig):

        def sample_train(data, key, batch_size):
            return sinusoid.sample_batch_flat(key, batch_size, shots=t.shots, query=t.query)

        @partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))  # one compilation, not one per op
        def heldout(split, num_tasks, shots, query, ways=None):
            return sinusoid.sample_batch_flat(
                sinusoid.heldout_key(split), num_tasks, shots=shots, query=query
            )

        return TaskSource("regression", None, sample_train, heldout)
    if isinstance(t, ImageTaskConfig):
        return image_benchmark_source(cfg)
    return omniglot_task_source(cfg)


HELDOUT_SEEDS = {"val": 1_000_001, "test": 2_000_002}


def omniglot_task_source(cfg) -> TaskSource:
    """Loads (or reads the cache of) Omniglot and checks the task sizes, before any compilation."""
    from metagrad.tasks import omniglot  # Pillow and the data are needed only here

    t = cfg.task
    splits = omniglot.omniglot_splits(
        t.data_dir, cache_dir=t.cache_dir, split=str(t.split), progress=cfg.train.progress
    )
    e = cfg.eval
    eval_ways = e.ways or t.ways
    for name in ("train", "val", "test"):  # raises a clear error for ways/shots/query too large
        shots = t.shots if name == "train" else (e.shots or t.shots)
        query = t.query if name == "train" else (e.query or t.query)
        ways = t.ways if name == "train" else eval_ways
        omniglot.make_sampler(splits[name], ways=ways, shots=shots, query=query)
    train_images = jnp.asarray(splits["train"])

    finish = with_support_context if _support_context(cfg) else (lambda task: task)

    def sample_train(images, key, batch_size):
        keys = jax.random.split(key, batch_size)
        return finish(
            jax.vmap(
                lambda k: omniglot.sample_task(images, k, ways=t.ways, shots=t.shots, query=t.query)
            )(keys)
        )

    def heldout(split, num_tasks, shots, query, ways=None):
        ways = ways or eval_ways
        sampler = omniglot.make_sampler(splits[split], ways=ways, shots=shots, query=query)
        return finish(sampler.sample_batch(jax.random.key(HELDOUT_SEEDS[split]), num_tasks))

    return TaskSource("classification", train_images, sample_train, heldout)


def _support_context(cfg) -> bool:
    """The "support" batch-norm policy normalises query images with support statistics, so the
    query batches carry the support images (metagrad.nn.losses.forward)."""
    return getattr(cfg.model, "bn_policy", None) == BNPolicy.support


def image_benchmark_source(cfg) -> TaskSource:
    """Reads (or finds the cache of) an image benchmark, checks the task sizes and chooses the
    sampling path (on the device, or streamed from the host), before any compilation."""
    from metagrad.experiment.image_source import image_task_source
    from metagrad.tasks.augment import AugmentOptions
    from metagrad.tasks.imageset import load_image_dataset

    t, e = cfg.task, cfg.eval
    if t.name == "folder" and len(t.classes.as_dict()) < 3:
        missing = [s for s in ("train", "val", "test") if s not in t.classes.as_dict()]
        raise ConfigError(
            f"task.classes.{missing[0]}=null: task=folder needs a split file per split (one "
            "class folder name per line): task.classes.train=... task.classes.val=... "
            "task.classes.test=..."
        )
    data_dir = t.data_dir or os.path.join(os.environ.get("METAGRAD_DATA", "data"), t.name)
    data = load_image_dataset(
        t.name, data_dir, cache_dir=t.cache_dir, expected=t.expected(), **t.reader_options()
    )
    a = t.augment
    budget = None if t.device_budget_mb is None else int(t.device_budget_mb * 2**20)
    source = image_task_source(
        data,
        ways=t.ways,
        shots=t.shots,
        query=t.query,
        eval_shots=e.shots or t.shots,
        eval_query=e.query or t.query,
        eval_ways=e.ways or t.ways,
        meta_batch_size=cfg.train.meta_batch_size,
        sampling=str(t.sampling),
        device_budget_bytes=budget,
        augment=AugmentOptions(a.crop_padding, a.flip, a.color_jitter) if a.enabled else None,
        support_context=_support_context(cfg),
        prefetch=t.prefetch,
    )
    counts = np.asarray(data.counts["train"])
    source.train_counts = None if np.all(counts == counts.max()) else counts
    source.info = dict(
        dataset=data.name,
        data_dir=str(data_dir),
        layout=data.layout,
        fingerprint=data.fingerprint,
        classes={s: len(c) for s, c in data.classes.items()},
        images={s: int(np.sum(n)) for s, n in data.counts.items()},
        sampling="host" if source.stream is not None else "device",
    )
    return source


def build_model(cfg, key: jax.Array) -> Model:
    m, steps = cfg.model, cfg.inner.steps
    rngs = nnx.Rngs(params=key)
    if not isinstance(m, Conv4Config | ResNet12Config):  # the MLPs
        cls = (
            partial(mnn.QuantMLP, **m.quant_kwargs()) if isinstance(m, MLPQuantConfig) else mnn.MLP
        )
        # Under one jit: eager initialisers compile every primitive on its own (seconds on CPU).
        module = nnx.jit(lambda k: cls(1, tuple(m.hidden), 1, rngs=nnx.Rngs(params=k)))(key)
        params, apply = mnn.functional(module)
        apply = mixed_precision(apply, str(cfg.train.precision))
        return Model(params, apply, mnn.mse_loss(apply), None, False)
    in_channels = type(cfg.task).IN_CHANNELS
    # ProtoNets and the closed-form heads fit their classifier to each support set: no head.
    ways = None if cfg.algo.EMBEDDING else cfg.task.ways
    common = dict(
        conv_impl=str(m.conv_impl), bn_policy=str(m.bn_policy), steps=max(steps, 1), rngs=rngs
    )
    if isinstance(m, ResNet12Config):
        module = mnn.ResNet12(in_channels, ways, widths=tuple(m.widths), **common)
    elif isinstance(m, Conv4QuantConfig):
        conv_kw = dict(hidden=m.channels, downsample=str(m.downsample), **common)
        module = mnn.QuantConv4(in_channels, ways, **conv_kw, **m.quant_kwargs())
    else:
        module = mnn.Conv4(
            in_channels,
            ways,
            hidden=m.channels,
            downsample=str(m.downsample),
            pool=str(m.pool),
            maxpool_padding=str(m.maxpool_padding),
            image_size=_image_size(cfg.task),
            **common,
        )
    params, apply = mnn.functional(module)
    apply = mixed_precision(apply, str(cfg.train.precision))  # float32: apply itself
    if cfg.algo.EMBEDDING:  # these estimators take the embedding where others take a loss
        return Model(params, apply, apply, None, False)
    step_arg = m.bn_policy == BNPolicy.per_step
    return Model(
        params,
        apply,
        mnn.cross_entropy_loss(apply),
        mnn.accuracy(apply),
        step_arg,
        scores_fn=mnn.cross_entropy_and_accuracy(apply),
    )


def _image_size(task) -> int:
    return task.image_size() if isinstance(task, ImageTaskConfig) else type(task).IMAGE_SIZE


def inner_mask(cfg, params):
    """Which parameters adapt (ANIL: the head; optionally not batch norm), or None for all."""
    a = cfg.algo
    if a.HEAD_ONLY or not a.adapts_batchnorm:
        return mnn.adapt_mask(params, head_only=a.HEAD_ONLY, adapt_batchnorm=a.adapts_batchnorm)
    return None


def build_estimator(cfg, model: Model, *, steps: int | None = None) -> MetaGradEstimator:
    """The estimator of ``algo`` (``cfg.algo.estimator_name()``, the registry's ``algo.name``
    unless ``algo.grad_mode`` picks another): the inner loop the config describes and the
    algorithm's own keywords (``cfg.algo.estimator_kwargs()``); ``steps`` overrides
    ``inner.steps`` (Proto-MAML evaluated at another step count)."""
    a, inner = cfg.algo, cfg.inner
    steps = inner.steps if steps is None else steps
    if a.EMBEDDING:
        kw = a.estimator_kwargs()
        if a.INNER_LOOP:
            kw.update(steps=steps, lr=inner.lr, remat=inner.remat)
        return make_estimator(a.name, **kw)
    kw = dict(
        steps=steps,
        remat=inner.remat,
        metrics_fn=model.metrics_fn,
        mask=inner_mask(cfg, model.params),
        **a.estimator_kwargs(),
    )
    if not a.learns_lr:  # learned rates come from MetaParams.lr (initial_meta_params)
        kw["lr"] = inner.lr
    if a.PASSES_STEP:
        kw["step_arg"] = model.step_arg
    if isinstance(a, IMAMLConfig) and a.curvature == Curvature.gauss_newton:
        # the loss split as output_loss(apply(params, x), y)
        kw.update(predict_fn=model.apply, output_loss=_output_loss(cfg))
    name = a.estimator_name()
    if name in ESTIMATORS:
        return make_estimator(name, **kw)
    return getattr(estimators, name)(**kw)  # a grad_mode's estimator (es)


def _output_loss(cfg) -> Callable:
    """The model's loss as a function of its outputs and targets (what `mnn.mse_loss` and
    `mnn.cross_entropy_loss` apply), for iMAML's Gauss-Newton curvature."""
    if isinstance(cfg.task, SinusoidConfig):
        return lambda z, y: jnp.mean((z - y) ** 2)
    return lambda z, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))


def build_optimizer(cfg) -> optax.GradientTransformation:
    o = cfg.outer
    lr = o.lr
    if o.schedule == Schedule.cosine:
        lr = optax.cosine_decay_schedule(
            o.lr, decay_steps=max(cfg.train.steps, 1), alpha=o.min_lr_ratio
        )
    elif o.schedule == Schedule.linear:  # Reptile's annealed outer step size
        lr = optax.linear_schedule(o.lr, o.lr * o.min_lr_ratio, max(cfg.train.steps, 1))
    opt = optax.adam(lr) if o.optimizer == OuterOptimizer.adam else optax.sgd(lr)
    if o.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), opt)
    if o.clip_value is not None:
        opt = optax.chain(optax.clip(o.clip_value), opt)
    return opt


def initial_meta_params(cfg, model: Model, source: TaskSource | None = None) -> MetaParams:
    """The model's initial parameters and, for Meta-SGD and MAML++, learned inner rates
    initialised at ``inner.lr`` (per entry or per tensor, per step for MAML++); for R2D2 and the
    SVM, ``{"backbone": params, "head": their learned head}``; for the fine-tuning baselines,
    ``{"backbone": params, "classifier": ...}`` over the ``source``'s training classes."""
    a = cfg.algo
    if isinstance(a, FinetuneConfig):
        from metagrad.estimators.finetune import init_classifier

        if source is None or source.train_classes is None:
            raise ValueError("algo=finetune: initial_meta_params needs the task source")
        batch = jax.eval_shape(lambda: source.sample_train(source.train_data, jax.random.key(0), 1))
        x = jax.ShapeDtypeStruct((1, *batch.support[0].shape[2:]), jnp.float32)
        dim = jax.eval_shape(model.apply, model.params, x).shape[-1]
        key = jax.random.key(cfg.seed + 2)  # seed: the model, seed + 1: the task stream
        classifier = init_classifier(key, dim, source.train_classes, cosine=a.cosine)
        return MetaParams({"backbone": model.params, "classifier": classifier})
    head = a.initial_head() if a.EMBEDDING else None
    if head is not None:  # R2D2's and the SVM's learned scale (and lambda) beside the backbone
        return MetaParams({"backbone": model.params, "head": head})
    if not a.learns_lr:
        return MetaParams(model.params)
    steps = cfg.inner.steps if a.per_step_rates else None
    rates = learned_rates(
        model.params, cfg.inner.lr, per_element=a.per_element_rates, steps=steps, dtype=jnp.float32
    )
    return MetaParams(model.params, rates)


def resolve_task_batching(cfg) -> str | int:
    """``train.task_batching``; ``auto`` is :func:`metagrad.outer.default_task_batching`."""
    tb = str(cfg.train.task_batching)
    if tb == "auto":
        return default_task_batching(jax.default_backend(), convolutional=_convolutional(cfg))
    return int(tb) if tb.isdigit() else tb


def resolve_compiler_options(cfg) -> dict:
    """XLA's options for the training chunk: :func:`metagrad.outer.default_compiler_options`
    for the model's kind on this backend."""
    return default_compiler_options(jax.default_backend(), convolutional=_convolutional(cfg))


def _convolutional(cfg) -> bool:
    return isinstance(cfg.model, Conv4Config | ResNet12Config)
