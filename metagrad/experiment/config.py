"""The experiment configuration: typed dataclasses (Hydra's structured-config schema) and the
value checks that run before anything is built or compiled.

Hydra-free: `experiments/` registers these dataclasses in Hydra's ConfigStore; library users
can build a `Config` directly and call `metagrad.train.train`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

ALGOS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "imaml")
TASKS = ("sinusoid", "omniglot")
MODELS = ("mlp", "conv4", "mlp_quant", "conv4_quant")


@dataclass
class TaskConfig:
    name: str = "sinusoid"
    shots: int = 10  # K support examples (per class for classification)
    query: int = 10  # query examples (per class for classification)
    ways: int = 5  # classification only
    data_dir: str | None = None  # omniglot: default $METAGRAD_DATA/omniglot
    cache_dir: str | None = None  # omniglot: default $METAGRAD_CACHE or ~/.cache/metagrad
    split: str = "finn"  # omniglot: "finn" (1100/100/423 characters) or "alphabet"


@dataclass
class ModelConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])  # mlp
    channels: int = 64  # conv4
    downsample: str = "strided"  # conv4: strided | maxpool
    conv_impl: str = "auto"  # conv4: auto | lax | patches
    bn_policy: str = "transductive"  # conv4: transductive | per_step | support
    weight_bits: int | None = None  # *_quant
    act_bits: int | None = None  # *_quant
    quantizer: str = "uniform"  # *_quant: uniform | ternary | lsq


@dataclass
class AlgoConfig:
    name: str = "maml"
    first_order: bool = False
    learn_lr: bool = False  # Meta-SGD / MAML++: inner rates are meta-parameters
    lr_per_element: bool = False  # Meta-SGD: one rate per parameter entry (else per tensor)
    per_step_lr: bool = False  # MAML++: a rate per inner step
    head_only: bool = False  # ANIL
    adapt_batchnorm: bool = True
    msl_anneal_steps: int = 10_000  # MAML++ multi-step-loss annealing, in meta-steps
    first_order_until: int = 0  # MAML++ derivative-order annealing, in meta-steps
    reg: float = 1.0  # iMAML's lambda
    cg_iters: int = 5
    cg_tol: float = 1e-10
    damping: float = 0.0
    curvature: str = "hessian"  # iMAML's CG matrix: hessian | gauss_newton (PSD)


@dataclass
class InnerLoopConfig:
    steps: int = 1
    lr: float = 0.01
    remat: bool = False


@dataclass
class OuterLoopConfig:
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    clip_norm: float | None = None  # global-norm clipping of the meta-gradient
    schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.0  # cosine, linear: final lr / initial lr


@dataclass
class TrainLoopConfig:
    steps: int = 10_000
    meta_batch_size: int = 25
    chunk_steps: int = 500  # meta-steps per compiled call (lax.scan)
    eval_every: int = 2_000  # validation (and best checkpoint) every N meta-steps
    checkpoint_every: int = 5_000
    resume: bool = False
    task_batching: str = "auto"  # auto | vmap | map | <int chunk of vmapped tasks>
    devices: str = "1"  # "1" or "all": shard the task axis across local devices
    progress: bool = True
    tensorboard: bool = False  # also write TensorBoard event files (the tensorboard extra)


@dataclass
class EvalConfig:
    tasks: int = 600
    val_tasks: int = 100
    shots: int | None = None  # default: task.shots
    query: int | None = None  # default: task.query
    inner_steps: int | None = None  # default: inner.steps
    curve_steps: int = 10
    checkpoint: str = "best"  # best | last
    batch_size: int = 100  # tasks evaluated per vmapped chunk
    figure: bool = True


@dataclass
class DistributedConfig:
    """Multi-host training (`metagrad.distributed`): ``jax.distributed.initialize``'s arguments;
    null lets JAX detect them from the cluster (SLURM, Open MPI)."""

    enabled: bool = False
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None  # this process's devices, e.g. [0] for one GPU


@dataclass
class Config:
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    inner: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    outer: OuterLoopConfig = field(default_factory=OuterLoopConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _get(cfg: Any, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def validate(cfg: Any) -> None:
    """Checks values (types are Hydra's job) and raises `ConfigError` naming the first bad key.

    Runs before any data is loaded or anything is compiled.
    """

    def need(key: str, ok, what: str):
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: {what}")

    positive = lambda v: v is not None and v > 0
    need("task.name", lambda v: v in TASKS, f"must be one of {TASKS}")
    need("model.name", lambda v: v in MODELS, f"must be one of {MODELS}")
    need("algo.name", lambda v: v in ALGOS, f"must be one of {ALGOS}")
    need("task.shots", positive, "must be a positive integer")
    need("task.query", positive, "must be a positive integer")
    need("task.ways", lambda v: v >= 2, "must be at least 2")
    need("task.split", lambda v: v in ("finn", "alphabet"), "must be 'finn' or 'alphabet'")
    need("inner.steps", lambda v: v >= 0, "must be >= 0")
    need("inner.lr", lambda v: v >= 0, "must be >= 0")
    need("outer.lr", positive, "must be positive")
    need("outer.optimizer", lambda v: v in ("adam", "sgd"), "must be 'adam' or 'sgd'")
    need(
        "outer.schedule",
        lambda v: v in ("constant", "cosine", "linear"),
        "must be constant, cosine or linear",
    )
    need("outer.clip_norm", lambda v: v is None or v > 0, "must be positive or null")
    need("train.steps", lambda v: v >= 0, "must be >= 0")
    need("train.meta_batch_size", positive, "must be a positive integer")
    need("train.chunk_steps", positive, "must be a positive integer")
    chunk = _get(cfg, "train.chunk_steps")
    for key in ("train.eval_every", "train.checkpoint_every"):
        need(
            key,
            lambda v: v > 0 and v % chunk == 0,
            f"must be a positive multiple of train.chunk_steps={chunk} (saves and validation "
            "happen between compiled chunks)",
        )
    need(
        "train.task_batching",
        lambda v: v in ("auto", "vmap", "map") or str(v).isdigit(),
        "must be auto, vmap, map or a positive integer",
    )
    need(
        "train.devices",
        lambda v: str(v) == "all" or (str(v).isdigit() and int(v) >= 1),
        "must be a positive integer or 'all'",
    )
    _validate_distributed(cfg, need)
    need(
        "train.tensorboard",
        lambda v: not v or importlib.util.find_spec("tensorboardX") is not None,
        "needs the tensorboardX package: pip install 'metagrad[tensorboard]'",
    )
    need("eval.tasks", positive, "must be a positive integer")
    need("eval.val_tasks", positive, "must be a positive integer")
    need("eval.shots", lambda v: v is None or v > 0, "must be a positive integer or null")
    need("eval.query", lambda v: v is None or v > 0, "must be a positive integer or null")
    need("eval.inner_steps", lambda v: v is None or v >= 0, "must be >= 0 or null")
    need("eval.curve_steps", lambda v: v >= 0, "must be >= 0")
    need("eval.checkpoint", lambda v: v in ("best", "last"), "must be 'best' or 'last'")
    need("eval.batch_size", positive, "must be a positive integer")
    need(
        "model.bn_policy",
        lambda v: v in ("transductive", "per_step", "support"),
        "must be transductive, per_step or support",
    )
    need("model.downsample", lambda v: v in ("strided", "maxpool"), "must be strided or maxpool")
    need(
        "model.conv_impl", lambda v: v in ("auto", "lax", "patches"), "must be auto, lax or patches"
    )
    need("model.weight_bits", lambda v: v is None or 1 <= v <= 16, "must be 1..16 or null")
    need("model.act_bits", lambda v: v is None or 1 <= v <= 16, "must be 1..16 or null")
    need(
        "model.quantizer",
        lambda v: v in ("uniform", "ternary", "lsq"),
        "must be uniform, ternary or lsq",
    )
    need("algo.reg", positive, "must be positive")
    need(
        "algo.curvature",
        lambda v: v in ("hessian", "gauss_newton"),
        "must be hessian or gauss_newton",
    )
    algo, task, model = _get(cfg, "algo.name"), _get(cfg, "task.name"), _get(cfg, "model.name")
    if algo in ("reptile", "mamlpp", "imaml") and _get(cfg, "inner.steps") < 1:
        raise ConfigError(
            f"inner.steps={_get(cfg, 'inner.steps')!r}: {algo} needs at least one step"
        )
    if (task == "sinusoid") != model.startswith("mlp"):
        raise ConfigError(
            f"model.name={model!r}: task {task} needs "
            f"{'an mlp' if task == 'sinusoid' else 'a conv4'} model"
        )


def _validate_distributed(cfg: Any, need) -> None:
    if not _get(cfg, "distributed.enabled"):
        return
    need("train.devices", lambda v: str(v) == "all", "distributed.enabled=true needs 'all'")
    need(
        "distributed.coordinator_address",
        lambda v: v is None or (":" in v and v.rsplit(":", 1)[1].isdigit()),
        "must be 'host:port' or null",
    )
    need("distributed.num_processes", lambda v: v is None or v >= 1, "must be >= 1 or null")
    n = _get(cfg, "distributed.num_processes")
    need(
        "distributed.process_id",
        lambda v: v is None or (v >= 0 and (n is None or v < n)),
        f"must be in 0..distributed.num_processes-1 ({n}) or null",
    )
    need(
        "distributed.local_device_ids",
        lambda v: v is None or (len(v) > 0 and all(i >= 0 for i in v)),
        "must be a non-empty list of device ids >= 0 or null",
    )
