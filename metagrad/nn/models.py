"""Flax NNX models for meta-learning. Every model names its last layer ``head`` (for ANIL)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metagrad.nn.conv import CONV_IMPLS, conv2d

BN_POLICIES = ("transductive", "per_step", "support")
POOL_PADDINGS = ("SAME", "VALID")
CONV4_POOLS = ("mean", "flatten")


class MLP(nnx.Module):
    """A ReLU MLP; the sinusoid model of Finn et al. is ``MLP(1, (40, 40), 1)``.

    Initialisation: Flax's defaults, kernels LeCun-normal (variance 1 / fan_in), biases zero.
    Layers are ``hidden_0``, ``hidden_1``, ..., and ``head``.

    Example:
        >>> MLP(1, (40, 40), 1, rngs=nnx.Rngs(0))(jnp.zeros((7, 1))).shape
        (7, 1)
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], out_features: int, *, rngs: nnx.Rngs
    ):
        sizes = [in_features, *hidden]
        self.num_hidden = len(hidden)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            setattr(self, f"hidden_{i}", nnx.Linear(a, b, rngs=rngs))
        self.head = nnx.Linear(sizes[-1], out_features, rngs=rngs)

    def __call__(self, x: jax.Array, **_) -> jax.Array:
        for i in range(self.num_hidden):
            x = jax.nn.relu(getattr(self, f"hidden_{i}")(x))
        return self.head(x)


class MetaBatchNorm(nnx.Module):
    r"""Batch norm with an explicit meta-learning policy and no hidden running statistics.

    :math:`y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta` with :math:`\mu, \sigma^2`
    over batch and space of the current forward pass:

    - ``"transductive"`` (original MAML; default): the statistics of the batch being processed,
      at train and test time.
    - ``"per_step"`` (MAML++): as transductive, with separate :math:`\gamma, \beta` for each inner
      step (shape ``(steps, C)``; call with ``step=i``, clamped to the last).
    - ``"support"``: statistics from the first ``stats_rows`` rows only: call with the support set
      and the query concatenated and ``stats_rows = len(support)``, so that each query example is
      normalised with support statistics alone (non-transductive evaluation).

    Example:
        >>> bn = MetaBatchNorm(1)
        >>> x = jnp.array([[1.0], [3.0], [5.0]])
        >>> [round(v, 3) for v in bn(x).ravel().tolist()]  # mean 3, variance 8/3
        [-1.225, 0.0, 1.225]
        >>> [round(v, 3) for v in bn(x, stats_rows=2).ravel().tolist()]  # mean 2, variance 1
        [-1.0, 1.0, 3.0]
        >>> bn = MetaBatchNorm(1, policy="per_step", steps=2)  # a scale and bias per step
        >>> bn.scale.shape
        (2, 1)
    """

    def __init__(
        self, features: int, *, policy: str = "transductive", steps: int = 1, epsilon: float = 1e-5
    ):
        if policy not in BN_POLICIES:
            raise ValueError(f"batch-norm policy must be one of {BN_POLICIES}, got {policy!r}")
        shape = (steps, features) if policy == "per_step" else (features,)
        self.policy, self.epsilon = policy, epsilon
        self.scale = nnx.Param(jnp.ones(shape))
        self.bias = nnx.Param(jnp.zeros(shape))

    def __call__(self, x, *, step=None, stats_rows: int | None = None):
        axes = tuple(range(x.ndim - 1))
        ref = x[:stats_rows] if stats_rows is not None else x
        mean = jnp.mean(ref, axis=axes)
        var = jnp.mean(jnp.square(ref - mean), axis=axes)
        scale, bias = self.scale[...], self.bias[...]
        if self.policy == "per_step":
            i = jnp.minimum(0 if step is None else step, scale.shape[0] - 1)
            scale, bias = scale[i], bias[i]
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def check_conv4_args(
    downsample: str, conv_impl: str, pool: str = "mean", maxpool_padding: str = "SAME"
) -> None:
    if downsample not in ("strided", "maxpool"):
        raise ValueError(f"downsample must be 'strided' or 'maxpool', got {downsample!r}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
    if pool not in CONV4_POOLS:
        raise ValueError(f"pool must be one of {CONV4_POOLS}, got {pool!r}")
    if maxpool_padding not in POOL_PADDINGS:
        raise ValueError(f"maxpool_padding must be one of {POOL_PADDINGS}, got {maxpool_padding!r}")


def check_num_classes(num_classes) -> None:
    """``num_classes`` is a positive int, or None for a head-less embedding."""
    if num_classes is None:
        return
    if isinstance(num_classes, bool) or not hasattr(num_classes, "__index__") or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive int, or None for a head-less embedding; "
            f"got {num_classes!r}"
        )


def conv4_feature_size(size: int, *, downsample: str, maxpool_padding: str = "SAME") -> int:
    """The side of Conv4's last feature map for a ``size x size`` input (four 2x down-samplings:
    ``ceil(s / 2)`` for stride 2 and ``SAME`` max-pool, ``floor(s / 2)`` for ``VALID`` max-pool).

    Example:
        >>> conv4_feature_size(84, downsample="maxpool", maxpool_padding="VALID")  # Finn et al.
        5
        >>> conv4_feature_size(84, downsample="maxpool")  # SAME pads 21 to 22: 42, 21, 11, 6
        6
    """
    for _ in range(4):
        floor = downsample == "maxpool" and maxpool_padding == "VALID"
        size = size // 2 if floor else -(-size // 2)
    return size


class ConvBlock(nnx.Module):
    """3x3 convolution (bias-free: batch norm's bias replaces it), batch norm, ReLU, 2x down.

    ``maxpool_padding`` is the 2x2 max-pool's padding: ``"SAME"`` (default) keeps
    ``ceil(s / 2)``, ``"VALID"`` (Finn et al.'s code) ``floor(s / 2)``.
    """

    maxpool_padding = "SAME"  # the default, also for subclasses that do not pass it

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        downsample: str,
        conv_impl: str,
        bn_policy: str,
        steps: int,
        maxpool_padding: str = "SAME",
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.glorot_uniform()
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, in_ch, out_ch)))
        self.norm = MetaBatchNorm(out_ch, policy=bn_policy, steps=steps)
        self.downsample, self.conv_impl = downsample, conv_impl
        self.maxpool_padding = maxpool_padding

    def _conv(self, x):
        stride = 2 if self.downsample == "strided" else 1
        return conv2d(x, self.kernel[...], stride=stride, impl=self.conv_impl)

    def __call__(self, x, *, step=None, stats_rows=None):
        x = self._conv(x)
        x = jax.nn.relu(self.norm(x, step=step, stats_rows=stats_rows))
        if self.downsample == "maxpool":
            x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding=self.maxpool_padding)
        return x


class Conv4(nnx.Module):
    """The Conv4 of the MAML paper: four blocks of 3x3 conv (64 filters), batch norm, ReLU and
    2x2 down-sampling (stride 2 by default, as Finn et al. did for Omniglot; ``"maxpool"`` as
    for miniImageNet), features averaged over space (``pool="mean"``, default) or flattened
    (``pool="flatten"``, which needs ``image_size``), then a linear ``head``.

    Finn et al.'s mini-ImageNet model is ``Conv4(3, 5, hidden=32, downsample="maxpool",
    pool="flatten", maxpool_padding="VALID", image_size=84)``::

        84x84x3 -> 4 x [3x3 conv 32 (SAME), BN, ReLU, 2x2 max-pool (VALID)]
                -> 42, 21, 10, 5 -> 5x5x32 = 800 features, flattened -> head Linear(800, 5)

    with 28512 conv weights (3*3*3*32 + 3*3*3*32*32), 256 batch-norm scales and biases and
    4005 head weights, 32773 in all. (Their TensorFlow code has a conv bias and a batch norm with
    a bias and no scale, also 32773; here batch norm's bias replaces the conv bias.) Their
    max-pool is ``VALID``; with the default ``"SAME"`` padding, 84 gives 6x6 features.

    Initialisation: convolution kernels Glorot-uniform (as Finn et al.'s code), head LeCun-normal,
    batch-norm scale 1 and bias 0. Inputs are NHWC.

    ``num_classes=None`` builds the embedding alone (no ``head``): the model returns the pooled
    or flattened features, ``(N, features)``, with ``features`` as :attr:`features` says
    (``hidden``, or ``side * side * hidden`` flattened). This is the backbone of the metric and
    closed-form heads (Prototypical Networks, R2D2, MetaOptNet) and of fine-tuning baselines.

    Example:
        >>> model = Conv4(1, 5, hidden=8, rngs=nnx.Rngs(0))  # 64 filters by default
        >>> nnx.jit(lambda m, x: m(x))(model, jnp.zeros((10, 28, 28, 1))).shape  # one compile
        (10, 5)
        >>> paper = nnx.eval_shape(lambda: Conv4(3, 5, hidden=32, downsample="maxpool",
        ...     pool="flatten", maxpool_padding="VALID", image_size=84, rngs=nnx.Rngs(0)))
        >>> paper.head.kernel.shape
        (800, 5)
        >>> embed = Conv4(1, None, hidden=8, rngs=nnx.Rngs(0))  # head-less: the 8 features
        >>> nnx.jit(lambda m, x: m(x))(embed, jnp.zeros((10, 28, 28, 1))).shape, embed.features
        ((10, 8), 8)
    """

    pool = "mean"  # the default, also for subclasses that do not pass it

    def __init__(
        self,
        in_channels: int,
        num_classes: int | None,
        *,
        hidden: int = 64,
        downsample: str = "strided",
        conv_impl: str = "auto",
        bn_policy: str = "transductive",
        steps: int = 1,
        pool: str = "mean",
        maxpool_padding: str = "SAME",
        image_size: int | None = None,
        rngs: nnx.Rngs,
    ):
        check_conv4_args(downsample, conv_impl, pool, maxpool_padding)
        features = hidden
        if pool == "flatten":
            if image_size is None:
                raise ValueError("pool='flatten' needs image_size (the input's height = width)")
            side = conv4_feature_size(
                image_size, downsample=downsample, maxpool_padding=maxpool_padding
            )
            features = side * side * hidden
        self.pool = pool
        chans = [in_channels, hidden, hidden, hidden, hidden]
        for i in range(4):
            setattr(
                self,
                f"block_{i}",
                ConvBlock(
                    chans[i],
                    chans[i + 1],
                    downsample=downsample,
                    conv_impl=conv_impl,
                    bn_policy=bn_policy,
                    steps=steps,
                    maxpool_padding=maxpool_padding,
                    rngs=rngs,
                ),
            )
        self.features = features
        check_num_classes(num_classes)
        self.head = None if num_classes is None else nnx.Linear(features, num_classes, rngs=rngs)

    def __call__(self, x, *, step=None, stats_rows=None):
        for i in range(4):
            x = getattr(self, f"block_{i}")(x, step=step, stats_rows=stats_rows)
        if self.pool == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            x = jnp.mean(x, axis=(1, 2))
        # getattr: subclasses (QuantConv4) set their own head and no `features`.
        head = getattr(self, "head", None)
        return x if head is None else head(x)
