"""The root `Config`: the chosen task, model and algorithm options and the nodes every run has
(``inner``, ``outer``, ``train``, ``eval``, ``distributed``), and `validate`, the one check
of a whole config: each node's ranges again, then the rules that tie nodes together."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar

from metagrad.experiment.config.base import (
    BNPolicy,
    CheckpointChoice,
    ConfigError,
    Node,
    OuterOptimizer,
    Padding,
    Pool,
    Precision,
    Schedule,
    finite,
    is_int,
    nonneg_int,
    optional,
    positive_int,
)
from metagrad.experiment.config.options import (
    GROUP_OPTIONS,
    AlgoConfig,
    Conv4QuantConfig,
    MAMLConfig,
    MLPConfig,
    ModelConfig,
    SinusoidConfig,
    TaskConfig,
)

SEED_MAX = 2**63 - 2  # the run draws from PRNG keys seed and seed + 1, both int64


@dataclass
class InnerLoopConfig(Node):
    KEY: ClassVar[str] = "inner"
    steps: int = 1
    lr: float = 0.01  # the SGD rate (the learned rates' initial value)
    remat: bool = False  # jax.checkpoint each inner step: memory for compute

    def check(self):
        self.need("steps", nonneg_int, "must be >= 0")
        self.need("lr", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")


@dataclass
class OuterLoopConfig(Node):
    KEY: ClassVar[str] = "outer"
    lr: float = 1e-3
    optimizer: OuterOptimizer = OuterOptimizer.adam
    clip_norm: float | None = None  # global-norm clipping of the meta-gradient
    clip_value: float | None = None  # each entry clipped to [-v, v] (Finn et al.'s mini-ImageNet)
    schedule: Schedule = Schedule.constant
    min_lr_ratio: float = 0.0  # cosine, linear: final lr / initial lr

    def check(self):
        self.need("lr", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("clip_norm", optional(lambda v: finite(v) and v > 0), "must be positive or null")
        self.need("clip_value", optional(lambda v: finite(v) and v > 0), "must be positive or null")
        self.need("min_lr_ratio", lambda v: finite(v) and 0 <= v <= 1, "must be in [0, 1]")


def _task_batching(v) -> bool:
    return v in ("auto", "vmap", "map") or (str(v).isdigit() and int(v) >= 1)


@dataclass
class TrainLoopConfig(Node):
    KEY: ClassVar[str] = "train"
    steps: int = 20_000
    meta_batch_size: int = 25
    chunk_steps: int = 1000  # meta-steps per compiled call (lax.scan)
    eval_every: int = 5000  # validation (and best checkpoint) every N meta-steps
    checkpoint_every: int = 5000
    resume: bool = False
    task_batching: str = "auto"  # auto | vmap | map | <int chunk of vmapped tasks>
    devices: str = "1"  # "1" or "all": shard the task axis across local devices
    progress: bool = True
    tensorboard: bool = False  # also TensorBoard event files (the tensorboard extra)
    # Also a Weights & Biases run (the wandb extra), in <run>/wandb: the log's numbers as its
    # history (step = meta-step), the test metrics as its summary, the resolved config as its
    # config; a resume continues the same wandb run. WANDB_MODE=offline writes it locally only.
    wandb: bool = False
    wandb_project: str = "metagrad"
    wandb_entity: str | None = None  # null: the account's default entity
    wandb_group: str | None = None  # e.g. one group per sweep
    wandb_tags: list[str] = field(default_factory=list)
    wandb_name: str | None = None  # null: the run directory's name
    # [a, b]: a jax.profiler trace (TensorBoard/XProf, Perfetto) of meta-steps a..b-1 in
    # <run>/profile; it spans the whole compiled chunks (train.chunk_steps) that hold them.
    profile_steps: list[int] | None = None
    memory_check: bool = True  # refuse a compiled step that needs more memory than there is
    # A -m sweep's runs that differ only in batchable keys (metagrad.experiment.batched:
    # seed, inner.lr, outer.lr, the L2 terms) train as one compiled program, at most this many
    # runs each; 1: every run its own program.
    parallel_runs: int = 8
    # float32; bf16: the model's products and convolutions on bfloat16 operands with float32
    # accumulation (batch norm, loss in float32); bf16_full: the whole model in bfloat16. The
    # parameters, meta-gradients and optimizer state stay float32 (metagrad.precision).
    precision: Precision = Precision.float32
    # How a batched program goes over its runs: vmap (one wide program: accelerators), map (one
    # run after another inside the program, each run's working set in cache: CPUs), auto.
    run_batching: str = "auto"
    # XLA's persistent compilation cache: a second run of the same program starts without
    # recompiling; in compile_cache_dir, null: the user's ($XDG_CACHE_HOME/metagrad/xla).
    compile_cache: bool = True
    compile_cache_dir: str | None = None

    def check(self):
        self.need("steps", nonneg_int, "must be >= 0")
        self.need("parallel_runs", positive_int, "must be a positive integer")
        runs = ("auto", "vmap", "map")
        self.need("run_batching", lambda v: v in runs, "must be auto, vmap or map")
        self.need("meta_batch_size", positive_int, "must be a positive integer")
        self.need("chunk_steps", positive_int, "must be a positive integer")
        chunk = self.chunk_steps
        for name in ("eval_every", "checkpoint_every"):
            self.need(
                name,
                lambda v: positive_int(v) and v % chunk == 0,
                f"must be a positive multiple of train.chunk_steps={chunk} (saves and validation "
                "happen between compiled chunks)",
            )
        self.need("task_batching", _task_batching, "must be auto, vmap, map or a positive integer")
        self.need(
            "devices",
            lambda v: str(v) == "all" or (str(v).isdigit() and int(v) >= 1),
            "must be a positive integer or 'all'",
        )
        self.need("wandb_project", lambda v: isinstance(v, str) and v != "", "must be a name")
        for name in ("wandb_entity", "wandb_group", "wandb_name"):
            self.need(name, optional(lambda v: isinstance(v, str) and v != ""), "must be a name")
        self.need(
            "wandb_tags",
            lambda v: all(isinstance(t, str) and 0 < len(t) <= 64 for t in v),
            "must be a list of tags of 1 to 64 characters (wandb's limit)",
        )
        self.need(
            "profile_steps",
            optional(lambda v: len(v) == 2 and all(nonneg_int(i) for i in v) and v[0] < v[1]),
            "must be [a, b], meta-steps a..b-1 with 0 <= a < b, or null",
        )


@dataclass
class EvalConfig(Node):
    KEY: ClassVar[str] = "eval"
    tasks: int = 600
    val_tasks: int = 200
    ways: int | None = None  # default: task.ways (another only where no head is trained)
    shots: int | None = None  # default: task.shots
    query: int | None = 100  # default (null): task.query
    inner_steps: int | None = None  # default: inner.steps
    curve_steps: int = 10
    checkpoint: CheckpointChoice = CheckpointChoice.best
    batch_size: int = 100  # tasks evaluated per vmapped chunk
    figure: bool = True

    def check(self):
        for name in ("tasks", "val_tasks", "batch_size"):
            self.need(name, positive_int, "must be a positive integer")
        for name in ("ways", "shots", "query"):
            self.need(name, optional(positive_int), "must be a positive integer or null")
        self.need("inner_steps", optional(nonneg_int), "must be >= 0 or null")
        self.need("curve_steps", nonneg_int, "must be >= 0")


@dataclass
class DistributedConfig(Node):
    """Multi-host training (`metagrad.experiment.distributed`): ``jax.distributed.initialize``'s
    arguments; null lets JAX detect them from the cluster (SLURM, Open MPI)."""

    KEY: ClassVar[str] = "distributed"
    enabled: bool = False
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None  # this process's devices, e.g. [0] for one GPU

    def check(self):
        if not self.enabled:
            return
        self.need(
            "coordinator_address",
            optional(lambda v: ":" in v and v.rsplit(":", 1)[1].isdigit()),
            "must be 'host:port' or null",
        )
        self.need("num_processes", optional(lambda v: is_int(v) and v >= 1), "must be >= 1 or null")
        n = self.num_processes
        self.need(
            "process_id",
            optional(lambda v: is_int(v) and v >= 0 and (n is None or v < n)),
            f"must be in 0..distributed.num_processes-1 ({n}) or null",
        )
        self.need(
            "local_device_ids",
            optional(lambda v: len(v) > 0 and all(is_int(i) and i >= 0 for i in v)),
            "must be a non-empty list of device ids >= 0 or null",
        )


@dataclass
class Config(Node):
    """A whole run. ``task``, ``model`` and ``algo`` hold one option's dataclass each."""

    seed: int = 0
    task: TaskConfig = field(default_factory=SinusoidConfig)
    model: ModelConfig = field(default_factory=MLPConfig)
    algo: AlgoConfig = field(default_factory=MAMLConfig)
    inner: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    outer: OuterLoopConfig = field(default_factory=OuterLoopConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self):
        self.need(
            "seed",
            lambda v: is_int(v) and 0 <= v <= SEED_MAX,
            "must be an integer in 0..2**63-2 (the run also draws from seed + 1)",
        )


def validate(cfg: Config) -> None:
    """Checks a whole `Config` and raises `ConfigError` naming the first bad key.

    Each node's ranges again (``__post_init__`` ran them at construction, but attributes may
    have been set since), then the rules that tie nodes together. Runs before any data is
    loaded or anything is compiled.

    Example:
        >>> from metagrad.experiment.config import ReptileConfig
        >>> cfg = Config(algo=ReptileConfig())
        >>> cfg.inner.steps = 0
        >>> validate(cfg)
        Traceback (most recent call last):
        metagrad.experiment.config.ConfigError: inner.steps=0: reptile needs at least one step
    """
    if not isinstance(cfg, Config):
        raise TypeError(
            f"validate takes a metagrad.experiment.Config, got {type(cfg).__name__}; a config "
            "composed by Hydra becomes one with OmegaConf.to_object(cfg)"
        )
    cfg.check_all()
    for key, options in GROUP_OPTIONS.items():
        node = getattr(cfg, key)
        if not isinstance(node, tuple(options.values())):
            raise ConfigError(
                f"{key}={type(node).__name__}: must be one of the {key} options "
                f"({', '.join(c.__name__ for c in options.values())})"
            )
    for node in (cfg.task, cfg.model, cfg.algo, cfg.inner, cfg.outer, cfg.train, cfg.eval):
        node.check_all()
    cfg.distributed.check_all()
    _cross_checks(cfg)


def _cross_checks(cfg: Config) -> None:
    task, model, algo, steps = cfg.task, cfg.model, cfg.algo, cfg.inner.steps
    if isinstance(task, SinusoidConfig) != isinstance(model, MLPConfig):
        raise ConfigError(
            f"model.name={model.name!r}: task {task.name} needs "
            f"{'an mlp' if isinstance(task, SinusoidConfig) else 'a conv4 or resnet12'} model"
        )
    if algo.EMBEDDING and isinstance(task, SinusoidConfig):
        raise ConfigError(
            f"algo={algo.name}: fits a classifier to each support set, so it needs a "
            "classification task (task=omniglot or an image benchmark), not sinusoid"
        )
    if algo.EMBEDDING and isinstance(model, Conv4QuantConfig):
        raise ConfigError(
            f"model=conv4_quant: algo={algo.name} needs a head-less conv4 or resnet12"
        )
    ways = cfg.eval.ways
    if ways is not None and not (algo.EMBEDDING and ways >= 2 and hasattr(task, "ways")):
        raise ConfigError(
            f"eval.ways={ways}: testing at another number of ways than task.ways needs a "
            "classification task and an algorithm without a trained head (protonet, protomaml, "
            "r2d2, svm), and at least 2"
        )
    if isinstance(model, Conv4QuantConfig) and (
        model.pool != Pool.mean or model.maxpool_padding != Padding.SAME
    ):
        raise ConfigError(
            f"model.pool={model.pool.value!r}: conv4_quant pools by the mean over space only"
        )
    if steps < algo.MIN_INNER_STEPS:
        raise ConfigError(f"inner.steps={steps!r}: {algo.name} needs at least one step")
    if algo.per_step_rates and steps < 1:
        raise ConfigError(
            f"inner.steps={steps!r}: algo.per_step_lr=true needs at least one inner step"
        )
    if getattr(model, "bn_policy", None) == BNPolicy.per_step and not algo.PASSES_STEP:
        raise ConfigError(
            "model.bn_policy='per_step': batch norm per inner step needs an algorithm whose "
            f"inner loop passes the step (maml, fomaml, anil, metasgd, mamlpp), not {algo.name}"
        )
    if cfg.distributed.enabled and str(cfg.train.devices) != "all":
        raise ConfigError(
            f"train.devices={cfg.train.devices!r}: distributed.enabled=true needs 'all'"
        )
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboardX") is None:
        raise ConfigError(
            "train.tensorboard=True: needs the tensorboardX package: "
            "pip install 'metagrad[tensorboard]'"
        )
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.wandb=True: needs the wandb package: pip install 'metagrad[wandb]'"
        )
