"""2-D convolution with a choice of implementation, chosen per backend.

XLA's CPU convolutions are fast forward, but the convolutions that autodiff makes of them are not:
second-order MAML on Conv4 spends over 90% of its time in the weight-gradient ("filter-grad")
convolutions, and a convolution with per-task weights under `vmap` becomes a grouped convolution,
slower still. Built as shifted, strided slices of the padded input followed by one matrix
product ("patches", im2col), the convolution and all its derivatives are plain slices, pads and
dots, which CPU XLA runs fast (the dots go to its YNNPACK/XNNPACK kernels) and which batch cleanly
under `vmap`. On GPU `lax.conv` is cuDNN's and stays the default.

A patch matrix is 9/4 (stride 2) to 9 (stride 1) times its input, and it is slow once it outgrows
the cache: the patches and product of a 300-image Conv4 layer took 11x those of a 75-image one.
That is why, on CPU, ``lax.map`` over tasks (one task's patches at a time) beats ``vmap`` here.

The patch matrix is laid out by input width. Wide inputs (``C > SMALL_C``) use one row of
``kh * kw * C`` taps per output pixel, ``P`` of shape ``(N*oh*ow, K)``, so that the forward
product ``P W`` and the input gradient ``dY W^T`` are canonical row-major products. Narrow inputs
(Conv4's first layer, ``C = 1``) use the transposed, channel-major matrix ``(K, N*oh*ow)``: their
weight gradient ``P^T dY`` is then a canonical product too, where the row layout made XLA copy
the large ``dY`` into a transposed layout and run a slow strided-operand dot (measured on a 2-core
CPU: second-order MAML steps on Conv4 1.12-1.15x faster with ``lax.map`` over tasks, 1.06-1.09x
with ``vmap``; the channel-major layout is slower for wide layers, 0.96x and 0.74x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ("auto", "lax", "patches")

# Inputs with at most this many channels use the channel-major patch matrix (measured on CPU,
# forward + backward of a 75-image 28x28 stride-2 layer: 1.9x faster at C = 1, 1.3x at C = 16,
# equal at C = 64, where second-order MAML is slower with it).
SMALL_C = 16


def default_conv_impl(backend: str | None = None) -> str:
    """``"patches"`` on CPU, ``"lax"`` elsewhere (cuDNN on GPU).

    Example:
        >>> default_conv_impl("cpu"), default_conv_impl("gpu")
        ('patches', 'lax')
    """
    return "patches" if (backend or jax.default_backend()) == "cpu" else "lax"


def _same_padding(size: int, k: int, stride: int) -> tuple[int, int, int]:
    """``(output size, low pad, high pad)`` of TensorFlow/XLA ``SAME`` padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, impl: str = "auto") -> jax.Array:
    r"""``SAME``-padded 2-D convolution (cross-correlation), NHWC input, HWIO kernel.

    .. math:: y_{n,i,j,f} = \sum_{a,b,c} x^{pad}_{n,\, s i + a,\, s j + b,\, c}\; w_{a,b,c,f}

    Args:
        x: ``(N, H, W, C)``.
        kernel: ``(kh, kw, C, F)``.
        stride: the same stride along both spatial axes.
        impl: ``"lax"`` (``lax.conv_general_dilated``), ``"patches"`` (strided slices of the
            padded input and one matrix product) or ``"auto"`` (:func:`default_conv_impl`).
            All give the same values and derivatives of every order, up to rounding.

    Example:
        >>> x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))
        >>> conv2d(x, w, impl="patches")[0, :, :, 0].tolist()
        [[4.0, 6.0, 6.0, 4.0], [6.0, 9.0, 9.0, 6.0], [6.0, 9.0, 9.0, 6.0], [4.0, 6.0, 6.0, 4.0]]
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = default_conv_impl()
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d needs x (N, H, W, C) and kernel (kh, kw, C, F); got shapes "
            f"{x.shape} and {kernel.shape}"
        )
    if isinstance(stride, bool) or not isinstance(stride, int | np.integer) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    stride = int(stride)
    if impl == "lax":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if x.shape[-1] <= SMALL_C:
        return _conv_patches_channel_major(x, kernel, stride)
    return _conv_patches_rows(x, kernel, stride)


def _taps(xp: jax.Array, kh: int, kw: int, oh: int, ow: int, stride: int, axes: tuple[int, int]):
    """The ``kh * kw`` strided windows of the padded input along spatial ``axes``, in HW order."""
    ax_h, ax_w = axes
    out = []
    for a in range(kh):
        for b in range(kw):
            index = [slice(None)] * xp.ndim
            index[ax_h] = slice(a, a + (oh - 1) * stride + 1, stride)
            index[ax_w] = slice(b, b + (ow - 1) * stride + 1, stride)
            out.append(xp[tuple(index)])
    return out


def _conv_patches_rows(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """im2col with one row of ``kh * kw * C`` taps per output pixel: ``(N, oh, ow, K) @ (K, F)``."""
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, top, bottom = _same_padding(h, kh, stride)
    ow, left, right = _same_padding(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = jnp.concatenate(_taps(xp, kh, kw, oh, ow, stride, (1, 2)), axis=-1)  # HWI order
    return jnp.dot(patches, kernel.reshape(kh * kw * c, f))


def _conv_patches_channel_major(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """im2col as a ``(K, N*oh*ow)`` matrix (taps, then channels, on the rows): ``P^T W``."""
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, top, bottom = _same_padding(h, kh, stride)
    ow, left, right = _same_padding(w, kw, stride)
    xc = jnp.moveaxis(x, -1, 0)  # (C, N, H, W); free for C = 1
    xp = jnp.pad(xc, ((0, 0), (0, 0), (top, bottom), (left, right)))
    pt = jnp.stack(_taps(xp, kh, kw, oh, ow, stride, (2, 3)))  # (kh*kw, C, N, oh, ow)
    pt = pt.reshape(kh * kw * c, n * oh * ow)  # rows ordered as the HWI kernel's
    y = lax.dot_general(pt, kernel.reshape(kh * kw * c, f), (((0,), (0,)), ((), ())))
    return y.reshape(n, oh, ow, f)
