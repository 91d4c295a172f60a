"""What every config node shares: `ConfigError`, the Enums of the choices, and `Node`, whose
``__post_init__`` coerces the Enum fields and runs the node's own range checks."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import ClassVar

MISSING = "???"  # OmegaConf's marker of a value still to be set (the group schemas' `name`)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


ConfigError.__module__ = "metagrad.experiment.config"  # its public home


# ---------------------------------------------------------------------------------------------
# The choices. OmegaConf checks them when Hydra composes (a string is matched by name; names
# and values agree); they compare equal to their strings, so the builders pass them on as is.


class Split(StrEnum):
    finn = "finn"  # Finn et al.'s characters: 1100 train, 100 val, 423 test
    alphabet = "alphabet"  # whole alphabets: background set for training, evaluation set split


class Downsample(StrEnum):
    strided = "strided"
    maxpool = "maxpool"


class Pool(StrEnum):
    mean = "mean"  # global mean over space (Finn et al.'s Omniglot model)
    flatten = "flatten"  # the feature map flattened (Finn et al.'s mini-ImageNet model)


class Padding(StrEnum):
    SAME = "SAME"
    VALID = "VALID"  # Finn et al.'s max-pool: 84 -> 42 -> 21 -> 10 -> 5


class Sampling(StrEnum):
    auto = "auto"  # on the device when the training split fits the budget, else from the host
    device = "device"
    host = "host"  # host streaming from the memory-mapped cache, prefetched to the device


class GradMode(StrEnum):
    """How ``algo=maml`` differentiates through its inner loop."""

    second_order = "second_order"  # backprop through every inner step (MAML)
    first_order = "first_order"  # the inner gradients constants (FOMAML)
    truncated = "truncated"  # backprop through the last algo.truncate steps only
    implicit = "implicit"  # the proximal problem's implicit gradient (iMAML's)
    es = "es"  # antithetic evolution strategies on the unrolled objective (zero order)


class Distance(StrEnum):
    euclidean = "euclidean"  # squared, Snell et al.'s
    cosine = "cosine"


class TieredLayout(StrEnum):
    png = "png"  # Ren et al.'s {split}_images_png.pkl
    npz = "npz"  # the common re-packs


class ChannelOrder(StrEnum):
    bgr = "bgr"
    rgb = "rgb"


class ConvImpl(StrEnum):
    auto = "auto"
    lax = "lax"
    patches = "patches"


class BNPolicy(StrEnum):
    transductive = "transductive"  # each batch's own statistics (MAML's original)
    per_step = "per_step"  # MAML++: scales and biases per inner step
    support = "support"  # the query normalised with support statistics only


class Precision(StrEnum):
    """``train.precision``: how the model computes (metagrad.precision); the parameters, the
    meta-gradients and the optimizer state stay float32 in every mode."""

    float32 = "float32"
    bf16 = "bf16"  # products and convolutions on bfloat16 operands, float32 accumulation
    bf16_full = "bf16_full"  # the whole model in bfloat16 (half the stored activations)


class Quantizer(StrEnum):
    uniform = "uniform"
    ternary = "ternary"
    lsq = "lsq"


class Curvature(StrEnum):
    hessian = "hessian"
    gauss_newton = "gauss_newton"  # positive semi-definite: CG is well posed


class OuterOptimizer(StrEnum):
    adam = "adam"
    sgd = "sgd"


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"  # Reptile's annealed outer step size


class CheckpointChoice(StrEnum):
    best = "best"  # the best validation objective
    last = "last"


# ---------------------------------------------------------------------------------------------
# The checks every node shares.


def show(value) -> str:
    return repr(value.value if isinstance(value, Enum) else value)


def finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def positive_int(v) -> bool:
    return is_int(v) and v > 0


def nonneg_int(v) -> bool:
    return is_int(v) and v >= 0


def optional(ok):
    return lambda v: v is None or ok(v)


def _enum_types(cls) -> dict[str, type[Enum]]:
    """The Enum-typed fields of a config dataclass (cached on the class)."""
    cached = cls.__dict__.get("_enum_fields")
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {
            f.name: hints[f.name]
            for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Enum)
        }
        cls._enum_fields = cached
    return cached


@dataclass
class Node:
    """A config node: ``KEY`` is its place in `Config` (the prefix of its error messages)."""

    KEY: ClassVar[str] = ""

    def __post_init__(self):  # OmegaConf.to_object calls it too, so the CLI runs the same checks
        for name, enum in _enum_types(type(self)).items():
            setattr(self, name, self._choice(name, enum))
        self.check()

    def _choice(self, name: str, enum: type[Enum]) -> Enum:
        value = getattr(self, name)
        try:
            return enum(value)
        except ValueError:
            choices = ", ".join(e.value for e in enum)
            raise ConfigError(
                f"{self.KEY}.{name}={show(value)}: must be one of {choices}"
            ) from None

    def need(self, name: str, ok, what: str) -> None:
        """Raises `ConfigError` naming ``KEY.name`` unless ``ok(value)``."""
        value = getattr(self, name)
        try:
            good = ok(value)
        except TypeError:  # a value of the wrong type set from Python
            good = False
        if not good:
            key = f"{self.KEY}.{name}" if self.KEY else name
            raise ConfigError(f"{key}={show(value)}: {what}")

    def check(self) -> None:
        """This node's own ranges (nothing here looks at another node)."""

    def check_all(self) -> None:
        """`check` and the Enum fields, without changing the node (for `validate`)."""
        for name, enum in _enum_types(type(self)).items():
            self._choice(name, enum)
        self.check()


@dataclass
class Option(Node):
    """An option of the group ``KEY``: ``name`` is the option's (``NAME``), not a free choice."""

    NAME: ClassVar[str] = ""
    name: str = MISSING

    def check(self):
        self.need(
            "name",
            lambda v: v == self.NAME,
            f"is set by choosing {self.KEY}={self.NAME}; choose the option itself instead "
            f"({self.KEY}=<option>)",
        )
