"""Flax models, the `(params, apply)` adapters (Flax NNX, Flax Linen, Equinox) and losses in the
engine's form."""

from metagrad.nn.adapter import (
    adapt_mask,
    from_equinox,
    from_linen,
    from_nnx,
    functional,
    functional_linen,
)
from metagrad.nn.conv import conv2d, default_conv_impl
from metagrad.nn.losses import accuracy, cross_entropy_loss, mse_loss
from metagrad.nn.models import MLP, Conv4, MetaBatchNorm
from metagrad.nn.quant import QuantConv, QuantConv4, QuantDense, QuantMLP
from metagrad.nn.resnet import ResNet12

__all__ = [
    "MLP",
    "Conv4",
    "MetaBatchNorm",
    "QuantConv",
    "QuantConv4",
    "QuantDense",
    "QuantMLP",
    "ResNet12",
    "accuracy",
    "adapt_mask",
    "conv2d",
    "cross_entropy_loss",
    "default_conv_impl",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "functional",
    "functional_linen",
    "mse_loss",
]
