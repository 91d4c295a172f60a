"""The options of the config groups ``task``, ``model`` and ``algo``: one dataclass each
(``conf/<group>/<option>.yaml`` extends it as its schema), and the registry `GROUP_OPTIONS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from metagrad.experiment.config.base import (
    BNPolicy,
    ConvImpl,
    Curvature,
    Downsample,
    Node,
    Option,
    Quantizer,
    Split,
    finite,
    is_int,
    nonneg_int,
    optional,
    positive_int,
)

# ---------------------------------------------------------------------------------------------
# task/: one dataclass per option.


@dataclass
class TaskConfig(Option):
    """What every task option has."""

    KEY: ClassVar[str] = "task"
    shots: int = 10  # K support examples (per class for classification)
    query: int = 10  # query examples (per class for classification)

    def check(self):
        super().check()
        self.need("shots", positive_int, "must be a positive integer")
        self.need("query", positive_int, "must be a positive integer")


@dataclass
class SinusoidConfig(TaskConfig):
    """``task/sinusoid``: regression on :math:`A \\sin(x - \\varphi)` (Finn et al. 2017)."""

    NAME: ClassVar[str] = "sinusoid"
    name: str = "sinusoid"


@dataclass
class OmniglotConfig(TaskConfig):
    """``task/omniglot``: N-way K-shot character classification."""

    NAME: ClassVar[str] = "omniglot"
    name: str = "omniglot"
    shots: int = 1
    query: int = 1
    ways: int = 5
    data_dir: str | None = None  # default $METAGRAD_DATA/omniglot
    cache_dir: str | None = None  # default $METAGRAD_CACHE or ~/.cache/metagrad
    split: Split = Split.finn

    def check(self):
        super().check()
        self.need("ways", lambda v: is_int(v) and v >= 2, "must be at least 2")


# ---------------------------------------------------------------------------------------------
# model/


@dataclass
class ModelConfig(Option):
    KEY: ClassVar[str] = "model"


@dataclass
class MLPConfig(ModelConfig):
    """``model/mlp``: the sinusoid MLP of Finn et al. (2017), 1-40-40-1 with ReLU."""

    NAME: ClassVar[str] = "mlp"
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])

    def check(self):
        super().check()
        self.need(
            "hidden",
            lambda v: all(positive_int(h) for h in v),
            "every layer width must be a positive integer",
        )


@dataclass
class Conv4Config(ModelConfig):
    """``model/conv4``: 4 x (3x3 conv, batch norm, ReLU, 2x down), mean over space, head."""

    NAME: ClassVar[str] = "conv4"
    name: str = "conv4"
    channels: int = 64
    downsample: Downsample = Downsample.strided
    conv_impl: ConvImpl = ConvImpl.auto
    bn_policy: BNPolicy = BNPolicy.transductive

    def check(self):
        super().check()
        self.need("channels", positive_int, "must be a positive integer")


@dataclass
class _Quantized(Node):
    """The straight-through quantization settings of the ``*_quant`` models."""

    weight_bits: int | None = 4
    act_bits: int | None = None
    quantizer: Quantizer = Quantizer.uniform

    def check(self):
        super().check()
        bits = optional(lambda v: is_int(v) and 1 <= v <= 16)
        self.need("weight_bits", bits, "must be 1..16 or null")
        self.need("act_bits", bits, "must be 1..16 or null")
        self.need(
            "weight_bits",
            lambda v: self.quantizer != Quantizer.ternary or v == 2,
            "model.quantizer=ternary gives 3 levels: needs 2",
        )
        self.need(
            "weight_bits",
            lambda v: self.quantizer != Quantizer.lsq or v is not None,
            "model.quantizer=lsq learns a step size for quantized weights: needs 1..16",
        )

    def quant_kwargs(self) -> dict:
        """The keywords of `metagrad.nn.QuantMLP` and `metagrad.nn.QuantConv4`."""
        return dict(
            weight_bits=self.weight_bits, act_bits=self.act_bits, quantizer=str(self.quantizer)
        )


@dataclass
class MLPQuantConfig(_Quantized, MLPConfig):
    """``model/mlp_quant``: the sinusoid MLP with quantized weights (and activations)."""

    NAME: ClassVar[str] = "mlp_quant"
    name: str = "mlp_quant"


@dataclass
class Conv4QuantConfig(_Quantized, Conv4Config):
    """``model/conv4_quant``: Conv4 with quantized weights (and activations)."""

    NAME: ClassVar[str] = "conv4_quant"
    name: str = "conv4_quant"


# ---------------------------------------------------------------------------------------------
# algo/: each option knows the keywords of its estimator in `metagrad.estimators.ESTIMATORS`.


@dataclass
class AlgoConfig(Option):
    KEY: ClassVar[str] = "algo"
    HEAD_ONLY: ClassVar[bool] = False  # ANIL: only the head adapts
    PASSES_STEP: ClassVar[bool] = False  # the inner loop passes its step index to the model
    MIN_INNER_STEPS: ClassVar[int] = 0

    @property
    def learns_lr(self) -> bool:
        """The inner rates are meta-parameters (`MetaParams.lr`), not ``inner.lr``."""
        return False

    @property
    def per_step_rates(self) -> bool:
        """One inner rate per step."""
        return False

    @property
    def per_element_rates(self) -> bool:
        """Learned rates: one per parameter entry (else one per tensor)."""
        return False

    @property
    def adapts_batchnorm(self) -> bool:
        return True

    def estimator_kwargs(self) -> dict:
        """This algorithm's own keywords of ``make_estimator(name, ...)`` (the inner loop's
        steps, rate, mask and remat are `metagrad.experiment.build`'s)."""
        return {}


@dataclass
class _SGDAlgo(AlgoConfig):
    """An algorithm whose inner loop may leave batch norm out of the adaptation."""

    adapt_batchnorm: bool = True

    @property
    def adapts_batchnorm(self) -> bool:
        return self.adapt_batchnorm


@dataclass
class _RateShape(_SGDAlgo):
    """SGD inner rates, optionally one per parameter entry and one per step."""

    PASSES_STEP: ClassVar[bool] = True
    lr_per_element: bool = False  # learned rates: one per parameter entry (else one per tensor)
    per_step_lr: bool = False  # one rate per inner step

    @property
    def per_step_rates(self) -> bool:
        return self.per_step_lr

    @property
    def per_element_rates(self) -> bool:
        return self.lr_per_element

    def estimator_kwargs(self) -> dict:
        return dict(per_step=self.per_step_lr)


@dataclass
class _Rates(_RateShape):
    """The MAML family: SGD rates fixed at ``inner.lr`` or meta-learned from it."""

    learn_lr: bool = False  # the inner rates are meta-parameters, initialised at inner.lr

    @property
    def learns_lr(self) -> bool:
        return self.learn_lr


@dataclass
class MAMLConfig(_Rates):
    """``algo/maml``: second-order MAML (Finn et al. 2017); ``first_order=true`` is FOMAML."""

    NAME: ClassVar[str] = "maml"
    name: str = "maml"
    first_order: bool = False

    def estimator_kwargs(self) -> dict:
        return dict(super().estimator_kwargs(), first_order=self.first_order)


@dataclass
class FOMAMLConfig(_Rates):
    """``algo/fomaml``: first-order MAML, the inner gradients constants to the outer one."""

    NAME: ClassVar[str] = "fomaml"
    name: str = "fomaml"


@dataclass
class ANILConfig(_Rates):
    """``algo/anil``: ANIL (Raghu et al. 2020), only the head adapts in the inner loop."""

    NAME: ClassVar[str] = "anil"
    HEAD_ONLY: ClassVar[bool] = True
    name: str = "anil"
    first_order: bool = False

    def estimator_kwargs(self) -> dict:
        return dict(super().estimator_kwargs(), first_order=self.first_order)


@dataclass
class MetaSGDConfig(_RateShape):
    """``algo/metasgd``: Meta-SGD (Li et al. 2017), one meta-learned inner rate per parameter
    entry (per tensor with ``lr_per_element=false``), initialised at ``inner.lr``."""

    NAME: ClassVar[str] = "metasgd"
    name: str = "metasgd"
    lr_per_element: bool = True
    per_step_lr: bool = False

    @property
    def learns_lr(self) -> bool:
        return True


@dataclass
class MAMLppConfig(_Rates):
    """``algo/mamlpp``: MAML++ (Antoniou et al. 2019), learned per-layer per-step rates (LSLR),
    the multi-step loss with annealed weights, derivative-order annealing."""

    NAME: ClassVar[str] = "mamlpp"
    MIN_INNER_STEPS: ClassVar[int] = 1
    name: str = "mamlpp"
    learn_lr: bool = True
    per_step_lr: bool = True
    msl_anneal_steps: int = 5000  # multi-step-loss annealing, in meta-steps
    first_order_until: int = 0  # first-order gradients until this meta-step

    def check(self):
        super().check()
        self.need("msl_anneal_steps", nonneg_int, "must be >= 0")
        self.need("first_order_until", nonneg_int, "must be >= 0")

    def estimator_kwargs(self) -> dict:
        return dict(
            super().estimator_kwargs(),
            anneal_steps=self.msl_anneal_steps,
            first_order_until=self.first_order_until,
        )


@dataclass
class ReptileConfig(_SGDAlgo):
    """``algo/reptile``: Reptile (Nichol et al. 2018), the direction (theta - phi) / (steps lr)."""

    NAME: ClassVar[str] = "reptile"
    MIN_INNER_STEPS: ClassVar[int] = 1
    name: str = "reptile"


@dataclass
class IMAMLConfig(AlgoConfig):
    """``algo/imaml``: iMAML (Rajeswaran et al. 2019), the implicit gradient of the proximal
    inner problem by conjugate gradient."""

    NAME: ClassVar[str] = "imaml"
    MIN_INNER_STEPS: ClassVar[int] = 1
    name: str = "imaml"
    reg: float = 1.0  # lambda, the proximal term's weight
    cg_iters: int = 5
    cg_tol: float = 1e-10
    damping: float = 0.0
    curvature: Curvature = Curvature.hessian  # CG's matrix

    def check(self):
        super().check()
        self.need("reg", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("cg_iters", positive_int, "must be a positive integer")
        self.need("cg_tol", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")
        self.need("damping", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")

    def estimator_kwargs(self) -> dict:
        return dict(
            reg=self.reg,
            cg_iters=self.cg_iters,
            cg_tol=self.cg_tol,
            damping=self.damping,
            curvature=str(self.curvature),
        )


# ---------------------------------------------------------------------------------------------
# The root, and the registry of group options (what `experiments/_hydra.py` stores).

TASKS: dict[str, type[TaskConfig]] = {c.NAME: c for c in (SinusoidConfig, OmniglotConfig)}
MODELS: dict[str, type[ModelConfig]] = {
    c.NAME: c for c in (MLPConfig, Conv4Config, MLPQuantConfig, Conv4QuantConfig)
}
ALGOS: dict[str, type[AlgoConfig]] = {
    c.NAME: c
    for c in (
        MAMLConfig,
        FOMAMLConfig,
        ANILConfig,
        MetaSGDConfig,
        MAMLppConfig,
        ReptileConfig,
        IMAMLConfig,
    )
}
GROUP_OPTIONS: dict[str, dict[str, type[Node]]] = {"task": TASKS, "model": MODELS, "algo": ALGOS}
