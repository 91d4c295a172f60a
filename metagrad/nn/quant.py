"""Quantized Flax NNX layers and models: full-precision latent weights, fake-quantized forward.

Every layer keeps its weights in full precision (``nnx.Param``) and quantizes them, and optionally
its inputs, on the way in, with the straight-through quantizers of :mod:`metagrad.quant`; so
through :func:`metagrad.nn.functional` they are meta-learned like the float layers, to any order
(a learned LSQ scale is just another parameter). Per layer:

- ``weight_bits``: ``None`` (full precision) or 1 to 16 bits; 1 is binary.
- ``quantizer``: how weights are quantized:

  - ``"uniform"``: symmetric, max-abs scale computed from the weights (mean-abs for 1 bit, the
    binary weights of XNOR-Net); the gradient is the identity.
  - ``"ternary"``: TWN's :math:`\\{-\\alpha, 0, \\alpha\\}` with threshold :math:`0.7\\,E|w|`
    (``weight_bits`` must be 2); the gradient is the identity.
  - ``"lsq"``: LSQ with a learned step size ``weight_scale`` (an ``nnx.Param``, initialised to
    :math:`2\\,\\operatorname{mean}|w| / \\sqrt{Q_p}`, gradient scale :math:`1/\\sqrt{N_W Q_p}`);
    the gradient is the identity inside the clipping range and zero outside.

- ``per_channel``: one scale per output channel (the kernel's last axis) instead of one per
  tensor.
- ``act_bits``: ``None`` (full precision) or 1 to 16 bits for the layer's input: asymmetric
  min-max quantization with the range of each example's own values (per example, like per-token
  dynamic quantization), so a prediction never depends on the other examples of the batch; the
  gradient is the identity.

Biases stay in full precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from metagrad import quant
from metagrad.nn.conv import CONV_IMPLS, conv2d
from metagrad.nn.models import MLP, Conv4, ConvBlock, check_conv4_args

QUANTIZERS = ("uniform", "ternary", "lsq")


def _check_optional_bits(bits, name: str):
    if bits is not None:
        try:
            quant._check_bits(bits)
        except ValueError as e:
            raise ValueError(f"{name}: {e} (or None for full precision)") from None
    return bits


class _Quantizes:
    """The quantization settings shared by the quantized layers (a mixin)."""

    @staticmethod
    def _check_quant(*, weight_bits, act_bits, quantizer: str):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        _check_optional_bits(weight_bits, "weight_bits")
        _check_optional_bits(act_bits, "act_bits")
        if quantizer == "ternary" and weight_bits != 2:
            raise ValueError(
                f"quantizer='ternary' gives 3 levels (2 bits): pass weight_bits=2, "
                f"got {weight_bits!r}"
            )
        if quantizer == "lsq" and weight_bits is None:
            raise ValueError(
                "quantizer='lsq' learns a step size for quantized weights: pass "
                "weight_bits (1 to 16)"
            )

    def _init_quant(
        self, kernel: jax.Array, *, weight_bits, act_bits, quantizer: str, per_channel: bool
    ):
        """Stores the settings (checked by ``_check_quant`` before any initialisation)."""
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.quantizer, self.per_channel = quantizer, per_channel
        if quantizer == "lsq":
            self.weight_scale = nnx.Param(quant.lsq_init(kernel, weight_bits, axis=self._w_axis()))

    def _w_axis(self):
        return -1 if self.per_channel else None

    def quantize_weight(self, w: jax.Array) -> jax.Array:
        """The kernel as the forward pass uses it."""
        if self.weight_bits is None:
            return w
        if self.quantizer == "uniform":
            return quant.uniform(w, self.weight_bits, axis=self._w_axis())
        if self.quantizer == "ternary":
            return quant.ternary(w, axis=self._w_axis())
        return quant.lsq(w, self.weight_scale[...], self.weight_bits, axis=self._w_axis())

    def quantize_input(self, x: jax.Array, *, example_axes) -> jax.Array:
        """The input as the forward pass uses it (per-example min-max range)."""
        if self.act_bits is None:
            return x
        return quant.uniform(x, self.act_bits, symmetric=False, axis=example_axes)


class QuantDense(nnx.Linear, _Quantizes):
    r"""A dense layer with quantized weights (and optionally inputs): :math:`y = Q_a(x) Q_w(W) + b`.

    A subclass of ``nnx.Linear`` (same parameters ``kernel`` and ``bias``, same initialisation
    and RNG use), plus ``weight_scale`` when ``quantizer="lsq"``. See the module docstring for
    the options. The input's leading axes are examples (each quantized with its own range).

    Example:
        >>> layer = QuantDense(3, 2, weight_bits=4, act_bits=8, rngs=nnx.Rngs(0))
        >>> nnx.jit(lambda m, x: m(x))(layer, jnp.ones((5, 3))).shape
        (5, 2)
        >>> sorted(nnx.to_pure_dict(nnx.state(QuantDense(3, 2, quantizer="lsq", rngs=nnx.Rngs(0)))))
        ['bias', 'kernel', 'weight_scale']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_bits: int | None = 8,
        act_bits: int | None = None,
        quantizer: str = "uniform",
        per_channel: bool = False,
        rngs: nnx.Rngs,
        **linear_kwargs,
    ):
        self._check_quant(weight_bits=weight_bits, act_bits=act_bits, quantizer=quantizer)
        super().__init__(in_features, out_features, rngs=rngs, **linear_kwargs)
        self._init_quant(
            self.kernel[...],
            weight_bits=weight_bits,
            act_bits=act_bits,
            quantizer=quantizer,
            per_channel=per_channel,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        x = self.quantize_input(x, example_axes=tuple(range(x.ndim - 1)))
        y = self.dot_general(
            x,
            self.quantize_weight(kernel),
            (((x.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
        )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class QuantConv(nnx.Module, _Quantizes):
    r"""A ``SAME``-padded convolution (NHWC, HWIO kernel) with quantized weights and inputs.

    :math:`y = \operatorname{conv}(Q_a(x), Q_w(K))` by :func:`metagrad.nn.conv2d` (so
    ``conv_impl`` chooses the same implementations), bias-free by default like
    ``ConvBlock``'s (a batch norm follows); kernel Glorot-uniform. Options as in the module
    docstring; inputs are quantized per example (the leading axis).

    Example:
        >>> conv = QuantConv(1, 4, weight_bits=4, act_bits=4, rngs=nnx.Rngs(0))
        >>> nnx.jit(lambda m, x: m(x))(conv, jnp.ones((2, 6, 6, 1))).shape
        (2, 6, 6, 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        use_bias: bool = False,
        weight_bits: int | None = 8,
        act_bits: int | None = None,
        quantizer: str = "uniform",
        per_channel: bool = False,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self._check_quant(weight_bits=weight_bits, act_bits=act_bits, quantizer=quantizer)
        init = jax.nn.initializers.glorot_uniform()
        self.kernel = nnx.Param(
            init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels))
        )
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if use_bias else None
        self.stride, self.conv_impl = stride, conv_impl
        self._init_quant(
            self.kernel[...],
            weight_bits=weight_bits,
            act_bits=act_bits,
            quantizer=quantizer,
            per_channel=per_channel,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.quantize_input(x, example_axes=0)
        y = conv2d(
            x, self.quantize_weight(self.kernel[...]), stride=self.stride, impl=self.conv_impl
        )
        return y if self.bias is None else y + self.bias[...]


class QuantConvBlock(ConvBlock, _Quantizes):
    """``ConvBlock`` (3x3 conv, batch norm, ReLU, 2x down) with a quantized convolution.

    Same parameters (``kernel``, ``norm``) and initialisation as ``ConvBlock``, plus
    ``weight_scale`` for LSQ.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        downsample: str,
        conv_impl: str,
        bn_policy: str,
        steps: int,
        weight_bits: int | None,
        act_bits: int | None,
        quantizer: str,
        per_channel: bool,
        rngs: nnx.Rngs,
    ):
        self._check_quant(weight_bits=weight_bits, act_bits=act_bits, quantizer=quantizer)
        super().__init__(
            in_ch,
            out_ch,
            downsample=downsample,
            conv_impl=conv_impl,
            bn_policy=bn_policy,
            steps=steps,
            rngs=rngs,
        )
        self._init_quant(
            self.kernel[...],
            weight_bits=weight_bits,
            act_bits=act_bits,
            quantizer=quantizer,
            per_channel=per_channel,
        )

    def _conv(self, x):
        stride = 2 if self.downsample == "strided" else 1
        return conv2d(
            self.quantize_input(x, example_axes=0),
            self.quantize_weight(self.kernel[...]),
            stride=stride,
            impl=self.conv_impl,
        )


def _edge(edge_bits):
    return {"weight_bits": edge_bits, "quantizer": "uniform"}


class QuantMLP(MLP):
    """``MLP`` with quantized layers: ``hidden_0``, ``hidden_1``, ..., ``head`` (`QuantDense`).

    Common practice (as in DoReFa-Net and LSQ) keeps the first and last layers at higher
    precision. Here the first layer's input (the data) is never quantized, and the first layer's
    weights and the head's weights (and, when ``act_bits`` is set, the head's input) use 8-bit
    uniform quantization, ``edge_bits`` (``None``: full precision). The layers in between use
    ``weight_bits``, ``act_bits`` and ``quantizer``. Same parameter names, initialisation and
    RNG use as ``MLP`` (same seed, same latent weights), so ANIL's ``head`` mask applies.

    Example:
        >>> model = QuantMLP(1, (8, 8), 1, weight_bits=4, act_bits=4, rngs=nnx.Rngs(0))
        >>> nnx.jit(lambda m, x: m(x))(model, jnp.zeros((7, 1))).shape
        (7, 1)
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        weight_bits: int | None = 8,
        act_bits: int | None = None,
        quantizer: str = "uniform",
        per_channel: bool = False,
        edge_bits: int | None = 8,
        rngs: nnx.Rngs,
    ):
        sizes = [in_features, *hidden]
        self.num_hidden = len(hidden)
        mid = {"weight_bits": weight_bits, "act_bits": act_bits, "quantizer": quantizer}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            cfg = dict(_edge(edge_bits), act_bits=None) if i == 0 else mid
            layer = QuantDense(a, b, per_channel=per_channel, rngs=rngs, **cfg)
            setattr(self, f"hidden_{i}", layer)
        self.head = QuantDense(
            sizes[-1],
            out_features,
            per_channel=per_channel,
            rngs=rngs,
            act_bits=None if act_bits is None else edge_bits,
            **_edge(edge_bits),
        )


class QuantConv4(Conv4):
    """``Conv4`` with quantized convolutions: ``block_0`` ... ``block_3`` (each ``kernel`` and a
    ``MetaBatchNorm`` ``norm``) and a ``QuantDense`` ``head``.

    As in `QuantMLP`, the first block's input is not quantized, the first block's kernel and the
    head (weights, and input when ``act_bits`` is set) use ``edge_bits`` (8-bit uniform; ``None``:
    full precision), and blocks 1 to 3 use ``weight_bits``, ``act_bits`` and ``quantizer``.
    Batch-norm parameters stay in full precision. Same parameter names, initialisation and RNG
    use as ``Conv4``; the forward pass is ``Conv4``'s.

    Example:
        >>> model = QuantConv4(1, 5, hidden=8, weight_bits=4, act_bits=4, rngs=nnx.Rngs(0))
        >>> nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 16, 16, 1))).shape
        (2, 5)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden: int = 64,
        downsample: str = "strided",
        conv_impl: str = "auto",
        bn_policy: str = "transductive",
        steps: int = 1,
        weight_bits: int | None = 8,
        act_bits: int | None = None,
        quantizer: str = "uniform",
        per_channel: bool = False,
        edge_bits: int | None = 8,
        rngs: nnx.Rngs,
    ):
        check_conv4_args(downsample, conv_impl)
        chans = [in_channels, hidden, hidden, hidden, hidden]
        mid = {"weight_bits": weight_bits, "act_bits": act_bits, "quantizer": quantizer}
        for i in range(4):
            cfg = dict(_edge(edge_bits), act_bits=None) if i == 0 else mid
            setattr(
                self,
                f"block_{i}",
                QuantConvBlock(
                    chans[i],
                    chans[i + 1],
                    downsample=downsample,
                    conv_impl=conv_impl,
                    bn_policy=bn_policy,
                    steps=steps,
                    per_channel=per_channel,
                    rngs=rngs,
                    **cfg,
                ),
            )
        self.head = QuantDense(
            hidden,
            num_classes,
            per_channel=per_channel,
            rngs=rngs,
            act_bits=None if act_bits is None else edge_bits,
            **_edge(edge_bits),
        )


__all__ = ["QUANTIZERS", "QuantConv", "QuantConv4", "QuantConvBlock", "QuantDense", "QuantMLP"]
