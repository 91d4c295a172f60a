"""The experiment configuration: one typed dataclass per config-group option, Enums for the
choices, range checks in each dataclass's ``__post_init__``, and one cross-field `validate`.

Hydra-free: ``experiments/_hydra.py`` registers these dataclasses in Hydra's ConfigStore as the
schemas of the files in ``conf/`` (``conf/model/mlp.yaml`` extends ``schema/model/mlp``, which is
`MLPConfig`), so a key that does not belong to the chosen option fails when Hydra composes, and
OmegaConf checks the Enums there too. Library users build a `Config` directly:

    >>> cfg = Config(model=MLPConfig(hidden=[8]), algo=ReptileConfig())
    >>> cfg.inner.steps = 5
    >>> validate(cfg)  # ranges again (attributes set after construction) and the cross-field rules

``Config()`` is the default run, the one ``python experiments/train.py`` composes: sinusoid
regression with the 1-40-40-1 MLP and second-order MAML.

Every check raises `ConfigError` with a message that starts with the key,
``key=value: what is wrong``.
"""

from metagrad.experiment.config.base import (
    MISSING,
    BNPolicy,
    CheckpointChoice,
    ConfigError,
    ConvImpl,
    Curvature,
    Downsample,
    OuterOptimizer,
    Padding,
    Pool,
    Quantizer,
    Sampling,
    Schedule,
    Split,
)
from metagrad.experiment.config.options import (
    ALGOS,
    GROUP_OPTIONS,
    IMAGE_TASKS,
    MODELS,
    TASKS,
    AlgoConfig,
    ANILConfig,
    AugmentConfig,
    CIFARFSConfig,
    Conv4Config,
    Conv4QuantConfig,
    CUBConfig,
    FC100Config,
    FolderConfig,
    FOMAMLConfig,
    ImageTaskConfig,
    IMAMLConfig,
    MAMLConfig,
    MAMLppConfig,
    MetaSGDConfig,
    MiniImageNetConfig,
    MLPConfig,
    MLPQuantConfig,
    ModelConfig,
    OmniglotConfig,
    ReptileConfig,
    ResNet12Config,
    SinusoidConfig,
    SplitFilesConfig,
    TaskConfig,
    TieredImageNetConfig,
)
from metagrad.experiment.config.root import (
    Config,
    DistributedConfig,
    EvalConfig,
    InnerLoopConfig,
    OuterLoopConfig,
    TrainLoopConfig,
    validate,
)

__all__ = [
    "ALGOS",
    "ANILConfig",
    "AlgoConfig",
    "AugmentConfig",
    "BNPolicy",
    "CIFARFSConfig",
    "CUBConfig",
    "CheckpointChoice",
    "Config",
    "ConfigError",
    "Conv4Config",
    "Conv4QuantConfig",
    "ConvImpl",
    "Curvature",
    "DistributedConfig",
    "Downsample",
    "EvalConfig",
    "FC100Config",
    "FOMAMLConfig",
    "FolderConfig",
    "GROUP_OPTIONS",
    "IMAGE_TASKS",
    "IMAMLConfig",
    "ImageTaskConfig",
    "InnerLoopConfig",
    "MAMLConfig",
    "MAMLppConfig",
    "MISSING",
    "MLPConfig",
    "MLPQuantConfig",
    "MODELS",
    "MetaSGDConfig",
    "MiniImageNetConfig",
    "ModelConfig",
    "OmniglotConfig",
    "OuterLoopConfig",
    "OuterOptimizer",
    "Padding",
    "Pool",
    "Quantizer",
    "ReptileConfig",
    "ResNet12Config",
    "Sampling",
    "Schedule",
    "SinusoidConfig",
    "Split",
    "SplitFilesConfig",
    "TASKS",
    "TaskConfig",
    "TieredImageNetConfig",
    "TrainLoopConfig",
    "validate",
]
