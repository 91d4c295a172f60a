"""ResNet-12, the few-shot backbone of MetaOptNet (Lee et al., 2019) and RFS (Tian et al., 2020),
built from metagrad's :func:`~metagrad.nn.conv2d` and :class:`~metagrad.nn.MetaBatchNorm`, and
DropBlock (Ghiasi et al., 2018) as a pure, keyed function."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metagrad.nn.conv import CONV_IMPLS, conv2d
from metagrad.nn.models import MetaBatchNorm, check_num_classes

# RFS/MetaOptNet use DropBlock in the last two of the four blocks (dropout in the first two,
# which is not offered here).
DROPBLOCK_BLOCKS = (2, 3)


def dropblock_mask(seeds: jax.Array, block_size: int) -> jax.Array:
    """The keep-mask of DropBlock from its seed mask: each seed drops the ``block_size`` square
    whose top-left corner it is.

    Args:
        seeds: ``(N, H - b + 1, W - b + 1, C)``, 1 where a block starts, 0 elsewhere.
        block_size: ``b``.

    Returns:
        ``(N, H, W, C)``: 0 inside a dropped block, 1 elsewhere.

    Example:
        >>> seeds = jnp.zeros((1, 3, 3, 1)).at[0, 1, 1, 0].set(1.0)
        >>> dropblock_mask(seeds, 2)[0, :, :, 0].astype(int).tolist()
        [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    """
    b = block_size
    padded = jnp.pad(seeds, ((0, 0), (b - 1, b - 1), (b - 1, b - 1), (0, 0)))
    dropped = jax.lax.reduce_window(
        padded, -jnp.inf, jax.lax.max, (1, b, b, 1), (1, 1, 1, 1), "VALID"
    )
    return 1.0 - dropped


def apply_block_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    r"""``x * mask * numel(mask) / sum(mask)``: the kept units rescaled so that the mean
    activation is preserved (as RFS/MetaOptNet; an all-zero mask gives zeros).

    Example:
        >>> apply_block_mask(jnp.ones(4), jnp.array([1.0, 0.0, 1.0, 1.0])).tolist()
        [1.3333333730697632, 0.0, 1.3333333730697632, 1.3333333730697632]
    """
    mask = jax.lax.stop_gradient(mask.astype(x.dtype))
    return x * mask * (mask.size / jnp.maximum(jnp.sum(mask), 1.0))


def dropblock(x: jax.Array, key: jax.Array | None, *, rate: float, block_size: int) -> jax.Array:
    r"""DropBlock (Ghiasi et al., 2018): drop ``block_size`` squares of an NHWC feature map,
    per example and channel, and rescale the rest.

    Block seeds are Bernoulli(:math:`\gamma`) at the :math:`(H - b + 1)(W - b + 1)` corners
    where a whole block fits, with

    .. math:: \gamma = \frac{r}{b^2} \frac{H W}{(H - b + 1)(W - b + 1)}

    so that about a fraction :math:`r` of the units is dropped; then :func:`apply_block_mask`.
    ``b`` is clipped to the feature map's size. Identity when ``key is None`` or ``rate == 0``
    (evaluation).

    Example:
        >>> x = jnp.ones((2, 8, 8, 3))
        >>> bool((dropblock(x, None, rate=0.1, block_size=3) == x).all())
        True
        >>> y = dropblock(x, jax.random.key(0), rate=0.3, block_size=3)
        >>> bool((y == 0).any()), y.shape
        (True, (2, 8, 8, 3))
    """
    if key is None or rate == 0.0:
        return x
    n, h, w, c = x.shape
    b = max(1, min(block_size, h, w))
    corners = (h - b + 1) * (w - b + 1)
    gamma = rate / (b * b) * (h * w) / corners
    seeds = jax.random.bernoulli(key, min(gamma, 1.0), (n, h - b + 1, w - b + 1, c))
    return apply_block_mask(x, dropblock_mask(seeds.astype(x.dtype), b))


class ResBlock(nnx.Module):
    """One ResNet-12 block: three 3x3 conv + BN (leaky ReLU 0.1 after the first two), a 1x1 conv
    + BN shortcut, their sum, leaky ReLU 0.1, a 2x2 max-pool (``VALID``, i.e. ``floor(s / 2)``).

    Parameters: ``conv_0``, ``conv_1``, ``conv_2``, ``conv_shortcut`` (bias-free HWIO kernels) and
    the batch norms ``norm_0``, ``norm_1``, ``norm_2``, ``norm_shortcut``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        conv_impl: str,
        bn_policy: str,
        steps: int,
        rngs: nnx.Rngs,
    ):
        # He-normal on fan-out, as the PyTorch code (kaiming_normal_, mode="fan_out").
        init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        bn = {"policy": bn_policy, "steps": steps}
        self.conv_0 = nnx.Param(init(rngs.params(), (3, 3, in_ch, out_ch)))
        self.norm_0 = MetaBatchNorm(out_ch, **bn)
        self.conv_1 = nnx.Param(init(rngs.params(), (3, 3, out_ch, out_ch)))
        self.norm_1 = MetaBatchNorm(out_ch, **bn)
        self.conv_2 = nnx.Param(init(rngs.params(), (3, 3, out_ch, out_ch)))
        self.norm_2 = MetaBatchNorm(out_ch, **bn)
        self.conv_shortcut = nnx.Param(init(rngs.params(), (1, 1, in_ch, out_ch)))
        self.norm_shortcut = MetaBatchNorm(out_ch, **bn)
        self.conv_impl = conv_impl

    def __call__(self, x, *, step=None, stats_rows=None):
        def conv_bn(h, i):
            h = conv2d(h, getattr(self, f"conv_{i}")[...], impl=self.conv_impl)
            return getattr(self, f"norm_{i}")(h, step=step, stats_rows=stats_rows)

        h = jax.nn.leaky_relu(conv_bn(x, 0), 0.1)
        h = jax.nn.leaky_relu(conv_bn(h, 1), 0.1)
        h = conv_bn(h, 2)
        h = jax.nn.leaky_relu(h + conv_bn(x, "shortcut"), 0.1)
        return nnx.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")


class ResNet12(nnx.Module):
    r"""ResNet-12 of MetaOptNet and RFS, with metagrad's explicit batch-norm policies.

    Architecture (NHWC input, widths ``w = (64, 160, 320, 640)`` by default)::

        for i in 0..3:                                   # block_0 ... block_3
            h = leaky_relu(BN(conv3x3(x, w[i])), 0.1)    # conv_0, norm_0
            h = leaky_relu(BN(conv3x3(h, w[i])), 0.1)    # conv_1, norm_1
            h = BN(conv3x3(h, w[i]))                     # conv_2, norm_2
            x = leaky_relu(h + BN(conv1x1(x, w[i])), 0.1)  # conv_shortcut, norm_shortcut
            x = max_pool_2x2(x)                          # VALID: 84 -> 42 -> 21 -> 10 -> 5
            x = dropblock(x) if DropBlock is on and i in (2, 3)
        logits = head(mean of x over space)              # head: Linear(w[3], num_classes)

    ``num_classes=None`` builds the embedding alone (no ``head``): the model returns the
    ``(N, w[3])`` spatially averaged features, the embedding of MetaOptNet, R2D2-style heads,
    Prototypical Networks and RFS's test-time classifier.

    Convolutions are bias-free (batch norm's bias replaces it), ``SAME``-padded, He-normal
    (fan-out) initialised; batch-norm scale 1, bias 0; the head LeCun-normal. Parameters do not
    depend on the image size (global average pool): 12,424,320 for the default widths with RGB
    input, plus ``641 * num_classes`` in the head.

    Batch norm is :class:`~metagrad.nn.MetaBatchNorm` with ``bn_policy`` (``"transductive"``,
    ``"per_step"`` with ``steps`` and the ``step=`` argument, ``"support"`` with
    ``stats_rows=``), exactly as in ``Conv4``. Every layer is named (``block_i/conv_j``,
    ``block_i/norm_j``, ``head``), so ANIL's ``adapt_mask(head_only=True)`` and
    ``adapt_batchnorm=False`` apply. Rematerialisation of the inner loop needs no model change:
    it is ``adapt(..., remat=True)``.

    DropBlock (off by default): ``drop_rate > 0`` with ``block_size`` drops blocks after the
    max-pool of the last two blocks (where RFS and MetaOptNet use it), and only when a PRNG key
    is passed, ``model(x, key=key)``; without a key (evaluation, or a loss that does not pass
    one) the model is deterministic. The mask is a constant for autodiff.

    Example:
        >>> model = ResNet12(3, 5, widths=(4, 4, 8, 8), rngs=nnx.Rngs(0))
        >>> nnx.jit(lambda m, x: m(x))(model, jnp.zeros((6, 20, 20, 3))).shape
        (6, 5)
        >>> big = nnx.eval_shape(lambda: ResNet12(3, 5, rngs=nnx.Rngs(0)))  # no compute
        >>> big.block_3.conv_2.shape, big.head.kernel.shape
        ((3, 3, 640, 640), (640, 5))
        >>> embed = nnx.eval_shape(lambda: ResNet12(3, None, rngs=nnx.Rngs(0)))  # head-less
        >>> x = jnp.zeros((2, 84, 84, 3))
        >>> embed.head is None, nnx.eval_shape(lambda m, x: m(x), embed, x).shape
        (True, (2, 640))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int | None,
        *,
        widths: Sequence[int] = (64, 160, 320, 640),
        conv_impl: str = "auto",
        bn_policy: str = "transductive",
        steps: int = 1,
        drop_rate: float = 0.0,
        block_size: int = 5,
        rngs: nnx.Rngs,
    ):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        if len(widths) != 4:
            raise ValueError(f"ResNet-12 has 4 blocks; got widths {tuple(widths)}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        check_num_classes(num_classes)
        chans = [in_channels, *widths]
        for i in range(4):
            block = ResBlock(
                chans[i],
                chans[i + 1],
                conv_impl=conv_impl,
                bn_policy=bn_policy,
                steps=steps,
                rngs=rngs,
            )
            setattr(self, f"block_{i}", block)
        self.head = None if num_classes is None else nnx.Linear(widths[-1], num_classes, rngs=rngs)
        self.drop_rate, self.block_size = float(drop_rate), int(block_size)

    def __call__(self, x, *, step=None, stats_rows=None, key: jax.Array | None = None):
        for i in range(4):
            x = getattr(self, f"block_{i}")(x, step=step, stats_rows=stats_rows)
            if i in DROPBLOCK_BLOCKS and key is not None and self.drop_rate > 0.0:
                key, sub = jax.random.split(key)
                x = dropblock(x, sub, rate=self.drop_rate, block_size=self.block_size)
        x = jnp.mean(x, axis=(1, 2))
        return x if self.head is None else self.head(x)


__all__ = ["ResBlock", "ResNet12", "apply_block_mask", "dropblock", "dropblock_mask"]
