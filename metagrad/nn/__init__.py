"""Flax models, the `(params, apply)` adapters (Flax NNX, Flax Linen, Equinox), the stateful NNX
adapter (batch-norm running statistics, dropout) and losses in the engine's form."""

from metagrad.nn.adapter import (
    adapt_mask,
    from_equinox,
    from_linen,
    from_nnx,
    functional,
    functional_linen,
)
from metagrad.nn.conv import conv2d, default_conv_impl
from metagrad.nn.losses import accuracy, cross_entropy_and_accuracy, cross_entropy_loss, mse_loss
from metagrad.nn.models import MLP, Conv4, MetaBatchNorm
from metagrad.nn.quant import QuantConv, QuantConv4, QuantDense, QuantMLP
from metagrad.nn.resnet import ResNet12
from metagrad.nn.stateful import (
    StatefulApply,
    StatefulModel,
    adapt_stateful,
    dropout_key,
    from_nnx_stateful,
    per_step_state,
    stateful_estimator,
    stateful_meta_grad,
    stateful_meta_loss,
)

__all__ = [
    "MLP",
    "Conv4",
    "MetaBatchNorm",
    "QuantConv",
    "QuantConv4",
    "QuantDense",
    "QuantMLP",
    "ResNet12",
    "StatefulApply",
    "StatefulModel",
    "accuracy",
    "adapt_mask",
    "adapt_stateful",
    "conv2d",
    "cross_entropy_and_accuracy",
    "cross_entropy_loss",
    "default_conv_impl",
    "dropout_key",
    "from_equinox",
    "from_linen",
    "from_nnx",
    "from_nnx_stateful",
    "functional",
    "functional_linen",
    "mse_loss",
    "per_step_state",
    "stateful_estimator",
    "stateful_meta_grad",
    "stateful_meta_loss",
]
