"""2-D convolution with a choice of implementation, chosen per backend.

XLA's CPU convolution gradients are slow (and a convolution with per-task weights under `vmap`
becomes a grouped convolution, slower still). Built as nine shifted, strided slices of the padded
input followed by one matrix product, the convolution and all its derivatives are plain slices
and dots, which CPU XLA runs fast and which batch cleanly under `vmap`. On GPU `lax.conv` is
cuDNN's and stays the default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "lax", "patches")


def default_conv_impl(backend: str | None = None) -> str:
    """``"patches"`` on CPU, ``"lax"`` elsewhere."""
    return "patches" if (backend or jax.default_backend()) == "cpu" else "lax"


def _same_padding(size: int, k: int, stride: int) -> tuple[int, int, int]:
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
        impl: ``"lax"`` (``lax.conv_general_dilated``), ``"patches"`` (slices + one dot) or
            ``"auto"`` (:func:`default_conv_impl`). Both give the same values and derivatives.

    Example:
        >>> x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))
        >>> conv2d(x, w, impl="patches")[0, :, :, 0].tolist()
        [[4.0, 6.0, 6.0, 4.0], [6.0, 9.0, 9.0, 6.0], [6.0, 9.0, 9.0, 6.0], [4.0, 6.0, 6.0, 4.0]]
    """
    if impl == "auto":
        impl = default_conv_impl()
    if impl == "lax":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    if impl != "patches":
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    n, h, w, c = x.shape
    kh, kw, _, f = kernel.shape
    oh, top, bottom = _same_padding(h, kh, stride)
    ow, left, right = _same_padding(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    patches = [
        xp[:, a : a + (oh - 1) * stride + 1 : stride, b : b + (ow - 1) * stride + 1 : stride, :]
        for a in range(kh)
        for b in range(kw)
    ]
    patches = jnp.concatenate(patches, axis=-1)  # (N, oh, ow, kh*kw*C), ordered as HWI
    return jnp.dot(patches, kernel.reshape(kh * kw * c, f))
