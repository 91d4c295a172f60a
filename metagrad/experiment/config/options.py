"""The options of the config groups ``task``, ``model`` and ``algo``: one dataclass each
(``conf/<group>/<option>.yaml`` extends it as its schema), and the registry `GROUP_OPTIONS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from metagrad.experiment.config.base import (
    BNPolicy,
    ChannelOrder,
    ConvImpl,
    Curvature,
    Distance,
    Downsample,
    GradMode,
    Node,
    Option,
    Padding,
    Pool,
    Quantizer,
    Sampling,
    Split,
    TieredLayout,
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

    IN_CHANNELS: ClassVar[int] = 1
    IMAGE_SIZE: ClassVar[int] = 28

    def check(self):
        super().check()
        self.need("ways", lambda v: is_int(v) and v >= 2, "must be at least 2")


@dataclass
class AugmentConfig(Node):
    """``task.augment``: on-device augmentation of training tasks (off in the MAML presets, as in
    the papers); see `metagrad.tasks.augment`."""

    KEY: ClassVar[str] = "task.augment"
    crop_padding: int = 0  # random crop after zero-padding this many pixels per side
    flip: bool = False  # random horizontal flip
    color_jitter: float = 0.0  # brightness, contrast and saturation factors in [1 - j, 1 + j]

    def check(self):
        super().check()
        self.need("crop_padding", nonneg_int, "must be a non-negative integer")
        self.need("flip", lambda v: isinstance(v, bool), "must be true or false")
        self.need("color_jitter", lambda v: finite(v) and 0 <= v < 1, "must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.color_jitter)


@dataclass
class SplitFilesConfig(Node):
    """``task.classes``: a split file of one's own per split (one class per line), replacing the
    list that ships with metagrad; null keeps the shipped list."""

    KEY: ClassVar[str] = "task.classes"
    train: str | None = None
    val: str | None = None
    test: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {s: getattr(self, s) for s in ("train", "val", "test") if getattr(self, s)}


@dataclass
class ImageTaskConfig(TaskConfig):
    """What every image benchmark shares (`metagrad.tasks.imageset`): N-way K-shot tasks from the
    files in ``data_dir`` (nothing is downloaded), checked against the split lists that ship with
    metagrad unless ``classes`` or ``images_per_class`` say otherwise."""

    IN_CHANNELS: ClassVar[int] = 3
    IMAGE_SIZE: ClassVar[int] = 84
    ways: int = 5
    shots: int = 1
    query: int = 15
    data_dir: str | None = None  # default $METAGRAD_DATA/<name>
    cache_dir: str | None = None  # default $METAGRAD_CACHE or ~/.cache/metagrad
    classes: SplitFilesConfig = field(default_factory=SplitFilesConfig)
    images_per_class: int | None = None  # accept a copy with this many images per class
    sampling: Sampling = Sampling.auto
    device_budget_mb: float | None = None  # default: a fraction of the device's free memory
    prefetch: int = 2  # host streaming: chunks gathered ahead of the compiled one (0: none)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self):
        super().check()
        self.need("ways", lambda v: is_int(v) and v >= 2, "must be at least 2")
        self.need("images_per_class", optional(positive_int), "must be a positive int or null")
        self.need("device_budget_mb", optional(lambda v: finite(v) and v > 0), "must be > 0")
        self.need("prefetch", nonneg_int, "must be a non-negative integer")

    def image_size(self) -> int:
        """The side of the square images the reader returns (and the model sees)."""
        return self.IMAGE_SIZE

    def expected(self) -> dict | None:
        """The reader's ``expected=``: None for the shipped lists at their standard counts."""
        out = {}
        if self.classes.as_dict():
            out["classes"] = self.classes.as_dict()
        if self.images_per_class is not None:
            out["images_per_class"] = self.images_per_class
        return out or None

    def reader_options(self) -> dict:
        return {}


@dataclass
class MiniImageNetConfig(ImageTaskConfig):
    """``task/miniimagenet``: Ravi & Larochelle's split, 64/16/20 classes x 600, 84x84 RGB."""

    NAME: ClassVar[str] = "miniimagenet"
    name: str = "miniimagenet"


@dataclass
class TieredImageNetConfig(ImageTaskConfig):
    """``task/tieredimagenet``: Ren et al.'s 351/97/160 classes, 84x84 RGB (~16 GB: streamed
    from the host unless it fits ``device_budget_mb``)."""

    NAME: ClassVar[str] = "tieredimagenet"
    name: str = "tieredimagenet"
    layout: TieredLayout | None = None  # png (the release) | npz (a re-pack); null: what is there
    npz_channels: ChannelOrder = ChannelOrder.bgr  # the release's decompress script writes BGR

    def reader_options(self) -> dict:
        layout = None if self.layout is None else str(self.layout)
        return {"layout": layout, "npz_channels": str(self.npz_channels)}


@dataclass
class CIFARFSConfig(ImageTaskConfig):
    """``task/cifarfs``: Bertinetto et al.'s 64/16/20 CIFAR-100 classes x 600, 32x32 RGB."""

    NAME: ClassVar[str] = "cifarfs"
    name: str = "cifarfs"
    IMAGE_SIZE: ClassVar[int] = 32


@dataclass
class FC100Config(ImageTaskConfig):
    """``task/fc100``: Oreshkin et al.'s 60/20/20 CIFAR-100 classes by super-class, 32x32 RGB."""

    NAME: ClassVar[str] = "fc100"
    name: str = "fc100"
    IMAGE_SIZE: ClassVar[int] = 32


@dataclass
class CUBConfig(ImageTaskConfig):
    """``task/cub``: CUB-200-2011, Chen et al.'s 100/50/50 split, resized to 84x84 RGB."""

    NAME: ClassVar[str] = "cub"
    name: str = "cub"


@dataclass
class FolderConfig(ImageTaskConfig):
    """``task/folder``: any ``data_dir/<class>/<image>`` folder with the user's split files
    (``task.classes.train`` / ``val`` / ``test``, all three required), resized to
    ``image_size``."""

    NAME: ClassVar[str] = "folder"
    name: str = "folder"
    size: int = 84  # images are resized to size x size

    def check(self):
        super().check()
        self.need("size", lambda v: is_int(v) and v >= 8, "must be an int >= 8")

    def image_size(self) -> int:
        return self.size

    def reader_options(self) -> dict:
        return {"image_size": (self.size, self.size)}


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
    pool: Pool = Pool.mean
    maxpool_padding: Padding = Padding.SAME

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


@dataclass
class ResNet12Config(ModelConfig):
    """``model/resnet12``: ResNet-12 of MetaOptNet and RFS (`metagrad.nn.ResNet12`), widths
    64-160-320-640 by default. Rematerialising its inner loop is ``inner.remat=true``."""

    NAME: ClassVar[str] = "resnet12"
    name: str = "resnet12"
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])
    conv_impl: ConvImpl = ConvImpl.auto
    bn_policy: BNPolicy = BNPolicy.transductive

    def check(self):
        super().check()
        self.need(
            "widths",
            lambda v: len(v) == 4 and all(positive_int(w) for w in v),
            "must be four positive integers (one per block)",
        )


# ---------------------------------------------------------------------------------------------
# algo/: each option knows the keywords of its estimator in `metagrad.estimators.ESTIMATORS`.


@dataclass
class AlgoConfig(Option):
    KEY: ClassVar[str] = "algo"
    HEAD_ONLY: ClassVar[bool] = False  # ANIL: only the head adapts
    PASSES_STEP: ClassVar[bool] = False  # the inner loop passes its step index to the model
    MIN_INNER_STEPS: ClassVar[int] = 0
    # Over a head-less embedding, the classifier built from each task's support set
    # (ProtoNets, R2D2, MetaOptNet-SVM, Proto-MAML): classification tasks only.
    EMBEDDING: ClassVar[bool] = False
    INNER_LOOP: ClassVar[bool] = True  # takes the inner loop's steps, rate and remat

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

    def estimator_name(self) -> str:
        """The estimator in `metagrad.estimators` that runs this algorithm."""
        return self.name

    def estimator_kwargs(self) -> dict:
        """This algorithm's own keywords of its estimator (the inner loop's steps, rate, mask
        and remat are `metagrad.experiment.build`'s)."""
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
    """``algo/maml``: second-order MAML (Finn et al. 2017); ``first_order=true`` is FOMAML.

    ``grad_mode`` picks how the meta-gradient goes through the inner loop, so that the CLI
    compares the modes on one task: ``second_order`` (MAML), ``first_order`` (FOMAML, the same
    as ``first_order=true``), ``truncated`` (the last ``truncate`` steps,
    `metagrad.truncated`), ``implicit`` (the proximal problem's implicit gradient with
    ``implicit_reg``, ``cg_iters``, ``cg_tol``, ``damping``: iMAML's estimator) and ``es``
    (antithetic evolution strategies, ``es_sigma``, ``es_samples`` pairs: `metagrad.es`).
    """

    NAME: ClassVar[str] = "maml"
    name: str = "maml"
    first_order: bool = False
    grad_mode: GradMode = GradMode.second_order
    truncate: int = 1  # grad_mode=truncated: backpropagate through this many last steps
    implicit_reg: float = 1.0  # grad_mode=implicit: the proximal term's lambda
    cg_iters: int = 5
    cg_tol: float = 1e-10
    damping: float = 0.0
    es_sigma: float = 0.01  # grad_mode=es: the perturbation's scale
    es_samples: int = 16  # grad_mode=es: antithetic pairs per task

    def check(self):
        super().check()
        mode = GradMode(self.grad_mode)
        self.need(
            "first_order",
            lambda v: not v or mode in (GradMode.second_order, GradMode.first_order),
            f"contradicts algo.grad_mode={mode.value}: set one of them",
        )
        self.need("truncate", nonneg_int, "must be a non-negative integer")
        self.need("implicit_reg", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("cg_iters", positive_int, "must be a positive integer")
        self.need("cg_tol", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")
        self.need("damping", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")
        self.need("es_sigma", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("es_samples", positive_int, "must be a positive integer")
        if mode in (GradMode.implicit, GradMode.es):
            for key in ("learn_lr", "per_step_lr"):
                self.need(key, lambda v: not v, f"is not supported with algo.grad_mode={mode}")

    def estimator_name(self) -> str:
        """The registry's estimator for this ``grad_mode``."""
        return {GradMode.implicit: "imaml", GradMode.es: "es"}.get(self.grad_mode, "maml")

    def estimator_kwargs(self) -> dict:
        mode = self.grad_mode
        if mode == GradMode.implicit:
            return dict(
                reg=self.implicit_reg,
                cg_iters=self.cg_iters,
                cg_tol=self.cg_tol,
                damping=self.damping,
            )
        kw = super().estimator_kwargs()
        if mode == GradMode.es:
            return dict(kw, sigma=self.es_sigma, num_samples=self.es_samples)
        if mode == GradMode.truncated:
            return dict(kw, truncate=self.truncate)
        return dict(kw, first_order=self.first_order or mode == GradMode.first_order)


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


@dataclass
class _EmbeddingAlgo(AlgoConfig):
    """An algorithm whose classifier comes from the support set of each task, over a head-less
    embedding (``metagrad.estimators.protonet`` and ``heads``)."""

    EMBEDDING: ClassVar[bool] = True
    INNER_LOOP: ClassVar[bool] = False

    def initial_head(self) -> dict | None:
        """Learned head parameters beside the backbone's (``{"backbone", "head"}``), or None."""
        return None


@dataclass
class ProtoNetConfig(_EmbeddingAlgo):
    """``algo/protonet``: Prototypical Networks (Snell et al. 2017), logits minus the squared
    distance to each class mean of the support embeddings (or the scaled cosine)."""

    NAME: ClassVar[str] = "protonet"
    name: str = "protonet"
    distance: Distance = Distance.euclidean
    scale: float | None = None  # the logits' scale: default 1 (euclidean), 10 (cosine)

    def check(self):
        super().check()
        self.need("scale", optional(lambda v: finite(v) and v > 0), "must be positive or null")

    def estimator_kwargs(self) -> dict:
        return dict(distance=str(self.distance), scale=self.scale)


@dataclass
class ProtoMAMLConfig(_EmbeddingAlgo):
    """``algo/protomaml``: Proto-MAML (Triantafillou et al. 2020), a linear head initialised from
    the prototypes, then MAML's inner loop (``inner.steps`` at ``inner.lr``)."""

    NAME: ClassVar[str] = "protomaml"
    INNER_LOOP: ClassVar[bool] = True
    name: str = "protomaml"
    first_order: bool = False
    head_only: bool = False  # adapt the head alone (ANIL-style)

    def estimator_kwargs(self) -> dict:
        return dict(first_order=self.first_order, head_only_adapt=self.head_only)


@dataclass
class R2D2Config(_EmbeddingAlgo):
    """``algo/r2d2``: R2D2 (Bertinetto et al. 2019), ridge regression of the support embeddings
    onto one-hot labels in closed form (Woodbury), then a learned scale and bias."""

    NAME: ClassVar[str] = "r2d2"
    name: str = "r2d2"
    lam: float | None = None  # the ridge's lambda; null: learned, from init_lam
    init_lam: float = 1.0
    init_scale: float = 10.0  # the adjust layer's scale at the start
    fit_bias: bool = True

    def check(self):
        super().check()
        self.need("lam", optional(lambda v: finite(v) and v > 0), "must be positive or null")
        self.need("init_lam", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("init_scale", lambda v: finite(v) and v > 0, "must be positive and finite")

    def estimator_kwargs(self) -> dict:
        return dict(lam=self.lam, fit_bias=self.fit_bias)

    def initial_head(self) -> dict:
        from metagrad.estimators.heads import r2d2_head

        return r2d2_head(scale=self.init_scale, lam=None if self.lam is not None else self.init_lam)


@dataclass
class SVMConfig(_EmbeddingAlgo):
    """``algo/svm``: MetaOptNet-SVM (Lee et al. 2019), a Crammer-Singer multi-class SVM fitted to
    the support embeddings in the dual and differentiated implicitly, then a learned scale."""

    NAME: ClassVar[str] = "svm"
    name: str = "svm"
    c: float = 0.1  # the SVM's cost
    kernel_ridge: float = 1.0
    iters: int = 200  # dual solver iterations
    init_scale: float = 1.0

    def check(self):
        super().check()
        self.need("c", lambda v: finite(v) and v > 0, "must be positive and finite")
        self.need("kernel_ridge", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")
        self.need("iters", positive_int, "must be a positive integer")
        self.need("init_scale", lambda v: finite(v) and v > 0, "must be positive and finite")

    def estimator_kwargs(self) -> dict:
        return dict(c=self.c, kernel_ridge=self.kernel_ridge, iters=self.iters)

    def initial_head(self) -> dict:
        from metagrad.estimators.heads import svm_head

        return svm_head(scale=self.init_scale)


@dataclass
class FinetuneConfig(_EmbeddingAlgo):
    """``algo/finetune``: the fine-tuning baselines (Baseline, Chen et al. 2019; Baseline++ with
    ``cosine=true``; RFS, Tian et al. 2020, with ``normalize=true``): supervised pre-training of
    the backbone and a classifier over all training classes (each of ``train.meta_batch_size``
    "tasks" a batch of ``batch_size`` training images with their global labels; Omniglot's
    rotations are classes of their own), then at test a logistic-regression head fitted to each
    task's support embeddings (``probe_l2``, ``probe_iters`` L-BFGS steps)."""

    NAME: ClassVar[str] = "finetune"
    name: str = "finetune"
    batch_size: int = 64  # images per pre-training batch
    cosine: bool = False  # Baseline++'s cosine classifier
    normalize: bool = False  # RFS: unit-length embeddings at test
    probe_l2: float = 0.01
    probe_iters: int = 100

    def check(self):
        super().check()
        self.need("batch_size", positive_int, "must be a positive integer")
        self.need("probe_l2", lambda v: finite(v) and v >= 0, "must be >= 0 and finite")
        self.need("probe_iters", positive_int, "must be a positive integer")

    def estimator_kwargs(self) -> dict:
        return dict(
            cosine=self.cosine, normalize=self.normalize, l2=self.probe_l2, iters=self.probe_iters
        )


# ---------------------------------------------------------------------------------------------
# The root, and the registry of group options (what `experiments/_hydra.py` stores).

IMAGE_TASKS: tuple[type[ImageTaskConfig], ...] = (
    MiniImageNetConfig,
    TieredImageNetConfig,
    CIFARFSConfig,
    FC100Config,
    CUBConfig,
    FolderConfig,
)
TASKS: dict[str, type[TaskConfig]] = {
    c.NAME: c for c in (SinusoidConfig, OmniglotConfig, *IMAGE_TASKS)
}
MODELS: dict[str, type[ModelConfig]] = {
    c.NAME: c for c in (MLPConfig, Conv4Config, MLPQuantConfig, Conv4QuantConfig, ResNet12Config)
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
        ProtoNetConfig,
        ProtoMAMLConfig,
        R2D2Config,
        SVMConfig,
        FinetuneConfig,
    )
}
GROUP_OPTIONS: dict[str, dict[str, type[Node]]] = {"task": TASKS, "model": MODELS, "algo": ALGOS}
