r"""Fake quantizers with straight-through gradients (pure JAX).

Every quantizer returns the dequantized value :math:`\hat x` (quantize, then dequantize) exactly,
and is built from ordinary JAX pieces around :func:`metagrad.straight_through`, so its
derivatives of every order are defined and consistent (never a ``custom_vjp``, which gives
silently wrong second derivatives; see ``DESIGN.md``). The derivative conventions:

**Given scale** (fixed or learned) :math:`s > 0`, integer range :math:`[l, h]`: the value is

.. math:: \hat x = s \operatorname{round}(v), \qquad v = \operatorname{clip}(x / s, l, h),

and the derivatives, of every order, are those of the piecewise-linear surrogate

.. math:: \tilde q(x, s) = \operatorname{clip}(x, l s, h s) + s\, c, \qquad
          c = \operatorname{sg}\big(\operatorname{round}(v) - v\big)

(:math:`\operatorname{sg}` = ``stop_gradient``): :math:`\hat x` is
``straight_through`` applied to :math:`\tilde q`, :math:`(\tilde q - \operatorname{sg}(\tilde q))
+ \operatorname{sg}(\hat x)`, exact in the forward pass. That is, exactly (also under ``jit``):

- :math:`\partial\hat x / \partial x = 1` on the closed range :math:`l s \le x \le h s`, else 0;
- :math:`\partial\hat x / \partial s = \operatorname{round}(x/s) - x/s` inside, :math:`l`
  (:math:`= -Q_n`) or :math:`h` (:math:`= Q_p`) outside: the LSQ gradient (Esser et al. 2020),
  times the gradient scale :math:`g` when one is given (:func:`scale_grad`);
- every second derivative of :math:`\hat x` is zero, so e.g.
  :math:`\partial^2 \hat x^2 / \partial x^2 = 2 (\partial\hat x / \partial x)^2` is 2 inside the
  range and 0 outside, and
  :math:`\partial^2 \hat x^2 / \partial s^2 = 2 (\partial\hat x / \partial s)^2`.

Exactly on the range's edge (:math:`x = h s`) the :math:`x`-derivative is 1 and the
:math:`s`-derivative the inside formula's 0 (the LSQ paper assigns :math:`Q_p` there).

**Scale computed from the data** (max-abs, min-max, mean-abs; TWN's threshold): the statistics
are constants to derivatives (``stop_gradient``) and the whole quantizer is one straight-through
estimator, :math:`\hat x = x + c` with :math:`c = q(x_0) - x_0` fixed: derivative 1 everywhere
(max-abs and min-max ranges contain the data anyway), every higher derivative zero.

Rounding is to nearest, ties to even (``jnp.round``); with a ``key``, it is stochastic,
:math:`\lfloor v + u \rfloor` with :math:`u \sim U[0, 1)` (unbiased: :math:`E = v`), with the
same derivatives. ``bits`` is a Python int from 1 to 16; a symmetric 1-bit grid is binary
(:math:`\{-s, +s\}`, with :math:`\operatorname{sign}(0) = +1`). Scales may be per tensor
(``axis=None``) or per channel (``axis``: the axis or axes that keep their own scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad.stop_gradient import straight_through

BITS_RANGE = (1, 16)
Axis = int | Sequence[int] | None


# --- validation ------------------------------------------------------------------------------


def _check_bits(bits) -> int:
    lo, hi = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not lo <= bits <= hi:
        raise ValueError(
            f"bits must be a Python int from {lo} to {hi} (1 means binary), got {bits!r}"
        )
    return int(bits)


def _concrete(a) -> np.ndarray | None:
    """``a`` as a NumPy array when its value is known now; ``None`` for a tracer under jit/grad."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _keep_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, int | np.integer) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, int | np.integer) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis must be None, an int or ints in [-{ndim}, {ndim}) for an "
                f"input of {ndim} dimensions, got {axis!r}"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis has repeated entries: {axis!r}")
    return tuple(sorted(out))


def _reduce_axes(ndim: int, keep: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i not in keep)


def _per_channel(x, arr, keep, name: str) -> jax.Array:
    """``arr`` reshaped to broadcast against ``x``; its shape is the kept axes' sizes, with or
    without the reduced axes as ones."""
    arr = jnp.asarray(arr)
    full = tuple(x.shape[i] if i in keep else 1 for i in range(x.ndim))
    kept = tuple(x.shape[i] for i in keep)
    if arr.shape == kept or arr.shape == full:
        return arr.reshape(full)
    how = "per tensor (axis=None)" if not keep else f"per channel along axes {keep}"
    raise ValueError(
        f"{name} of shape {arr.shape} does not fit an input of shape {x.shape} "
        f"quantized {how}: expected shape {kept} or {full}"
    )


def _given_scale(x, scale, keep) -> jax.Array:
    s = _per_channel(x, scale, keep, "scale")
    c = _concrete(s)
    if c is not None and not np.all(c > 0):
        raise ValueError(
            f"scale must be positive, got {c.ravel()[:8].tolist()}" + ("..." if c.size > 8 else "")
        )
    return s.astype(x.dtype)


def _check_grad_scale(g):
    if isinstance(g, bool) or not isinstance(g, int | float | np.floating) or not 0 < g < math.inf:
        raise ValueError(f"grad_scale must be a positive finite float, got {g!r}")
    return float(g)


# --- the grid --------------------------------------------------------------------------------


def _clip(v, lo, hi):
    """``clip`` whose derivative is 1 on the closed range [lo, hi] and 0 outside (``jnp.clip``
    gives 1/2 at the ends)."""
    return jnp.where(v < lo, lo, jnp.where(v > hi, hi, v)).astype(v.dtype)


def _codes(v, lo, hi, binary: bool, u):
    """Forward only (always under ``stop_gradient``): the integer code of a clipped ``v``."""
    if binary:  # the grid {-1, +1}
        if u is None:
            return jnp.where(v >= 0, 1, -1).astype(v.dtype)
        return 2 * jnp.clip(jnp.floor((v + 1) / 2 + u), 0, 1) - 1  # P(+1) = (v + 1) / 2
    if u is None:
        return jnp.round(v)
    return jnp.clip(jnp.floor(v + u), lo, hi)  # the clip guards v + u rounding up to h + 1


def _grid(x, s, lo, hi, binary: bool, u):
    """The given-scale quantizer: the value ``s * code(clip(x / s, lo, hi))``, the derivatives of
    the surrogate ``clip(x, lo s, hi s) + s * sg(code - clip(x / s, lo, hi))``."""
    v = _clip(x / s, lo, hi)
    codes = lax.stop_gradient(_codes(v, lo, hi, binary, u))
    surrogate = _clip(x, lo * s, hi * s) + s * lax.stop_gradient(codes - v)
    return straight_through(lambda _: s * codes)(surrogate)


def _int_range(bits: int, symmetric: bool):
    """``(lo, hi, binary)`` of the integer grid before any zero point."""
    if symmetric:
        if bits == 1:
            return -1, 1, True
        qp = 2 ** (bits - 1) - 1
        return -qp, qp, False
    return 0, 2**bits - 1, False


def _calibrate(x, bits: int, symmetric: bool, keep):
    """Data-derived ``(scale, lo, hi)``, constants to derivatives."""
    x = lax.stop_gradient(x)
    red = _reduce_axes(x.ndim, keep)
    if symmetric:
        lo, hi, binary = _int_range(bits, True)
        a = jnp.abs(x)
        if binary:
            s = jnp.mean(a, axis=red, keepdims=True)
        else:
            s = jnp.max(a, axis=red, keepdims=True) / hi
        return jnp.where(s > 0, s, jnp.ones_like(s)), lo, hi
    n = 2**bits - 1
    mn = jnp.minimum(jnp.min(x, axis=red, keepdims=True), 0)
    mx = jnp.maximum(jnp.max(x, axis=red, keepdims=True), 0)
    s = (mx - mn) / n
    s = jnp.where(s > 0, s, jnp.ones_like(s))
    z = jnp.clip(jnp.round(-mn / s), 0, n)
    return s, -z, n - z


# --- public quantizers -----------------------------------------------------------------------


def scale_grad(x: jax.Array, g) -> jax.Array:
    r"""Gradient scaling: the value of ``x``, the gradient times ``g`` (LSQ's ``grad_scale``).

    .. math:: y = \operatorname{sg}(x) + g\,\big(x - \operatorname{sg}(x)\big), \qquad
              y = x, \quad \partial y / \partial x = g, \quad \partial^2 y / \partial x^2 = 0

    Bit-exact in the forward pass (:math:`g \cdot 0 = 0`), unlike LSQ's published
    ``(x - x g).detach() + x g``.

    Example:
        >>> float(scale_grad(3.0, 0.25)), float(jax.grad(lambda s: scale_grad(s, 0.25))(3.0))
        (3.0, 0.25)
    """
    x = _as_float(x)
    sg = lax.stop_gradient(x)
    return sg + jnp.asarray(g, x.dtype) * (x - sg)


def uniform(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    axis: Axis = None,
    scale=None,
    zero_point=None,
    grad_scale: float | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""Uniform fake quantization: :math:`\hat x = s \lfloor \operatorname{clip}(x/s, l, h) \rceil`.

    (:math:`\lfloor\cdot\rceil` rounds to nearest, ties to even, or stochastically with a
    ``key``.) The integer range :math:`[l, h]` has at most :math:`2^b` levels (:math:`b` =
    ``bits``):

    - symmetric (zero point 0): :math:`l = -h`, :math:`h = 2^{b-1} - 1` (:math:`2^b - 1`
      levels); for :math:`b = 1` the binary grid :math:`\{-s, +s\}` (see :func:`binary`);
    - asymmetric: codes :math:`0 \dots 2^b - 1` around an integer zero point :math:`z`, i.e.
      :math:`l = -z`, :math:`h = 2^b - 1 - z` (:math:`z = 0`: the unsigned grid for ReLU outputs;
      :math:`z = 2^{b-1}`: LSQ's signed grid).

    The scale :math:`s` is

    - computed from the data when ``scale`` is ``None``: symmetric max-abs
      :math:`s = \max|x| / h` (mean-abs :math:`s = \operatorname{mean}|x|` for 1 bit, the
      L2-optimal binary scale of XNOR-Net), or asymmetric min-max
      :math:`s = (\max(x, 0) - \min(x, 0)) / (2^b - 1)`,
      :math:`z = \operatorname{round}(-\min(x, 0)/s)`;
      the statistics are constants to derivatives and the gradient is the identity;
    - given (``scale``, a positive array): a constant or a learned parameter; the gradient is the
      identity on the range and zero outside it, and a learned scale gets the LSQ gradient,
      scaled by ``grad_scale`` (:func:`lsq` chooses it as the paper does).

    See the module docstring for the derivatives of every order.

    Args:
        x: the array to quantize.
        bits: an int from 1 to 16.
        symmetric: zero point 0 (max-abs scale) or an asymmetric grid (min-max scale).
        axis: ``None`` for one scale per tensor, or the axis (axes) with a scale per entry,
            e.g. ``-1`` for a kernel's output channels.
        scale: ``None`` (from the data) or a positive array of shape ``()`` per tensor, or
            the kept axes' sizes (with or without the other axes as ones) per channel.
        zero_point: with ``symmetric=False`` and a given scale: an integer in
            :math:`[0, 2^b - 1]`, scalar or shaped as ``scale`` (default 0).
        grad_scale: with a given scale: :math:`g`, the factor on the scale's gradient.
        key: a PRNG key for stochastic rounding; ``None`` rounds to nearest (ties to even).

    Raises:
        ValueError: ``bits`` outside 1..16, a scale of the wrong shape, a non-positive scale or
            an out-of-range zero point (checked when their values are concrete), or options that
            do not go together.

    Example:
        >>> uniform(jnp.array([0.3, -1.2, 0.8]), 3, scale=0.25).tolist()  # h = 3
        [0.25, -0.75, 0.75]
        >>> uniform(jnp.array([-1.0, 0.1, 2.0]), 2, symmetric=False).tolist()  # s = 1, z = 1
        [-1.0, 0.0, 2.0]
        >>> jax.grad(lambda x: uniform(x, 3, scale=0.25).sum())(jnp.array([0.3, -1.2])).tolist()
        [1.0, 0.0]
    """
    bits = _check_bits(bits)
    x = _as_float(x)
    keep = _keep_axes(x.ndim, axis)
    u = None if key is None else jax.random.uniform(key, x.shape, x.dtype)
    if scale is None:
        if zero_point is not None or grad_scale is not None:
            raise ValueError(
                "zero_point and grad_scale go with a given scale; with scale=None "
                "the range is computed from the data"
            )

        def fake_quant(y):
            s, lo, hi = _calibrate(y, bits, symmetric, keep)
            return _grid(y, s, lo, hi, symmetric and bits == 1, u)

        return straight_through(fake_quant)(x)
    s = _given_scale(x, scale, keep)
    if grad_scale is not None:
        s = scale_grad(s, _check_grad_scale(grad_scale))
    lo, hi, binary = _int_range(bits, symmetric)
    if zero_point is not None:
        if symmetric:
            raise ValueError(
                "zero_point needs symmetric=False (a symmetric grid's zero point is 0)"
            )
        z = jnp.asarray(zero_point)
        if z.ndim:
            z = _per_channel(x, z, keep, "zero_point")
        c = _concrete(z)
        if c is not None and not (np.all(c == np.round(c)) and np.all((c >= 0) & (c <= hi))):
            raise ValueError(
                f"zero_point must be an integer in [0, {hi}] for {bits} bits, "
                f"got {c.ravel()[:8].tolist()}"
            )
        z = lax.stop_gradient(z).astype(x.dtype)
        lo, hi = lo - z, hi - z
    return _grid(x, s, lo, hi, binary, u)


def binary(
    x: jax.Array, *, scale=1.0, axis: Axis = None, key: jax.Array | None = None
) -> jax.Array:
    r"""Binary quantization: :math:`\hat x = s \operatorname{sign}(x)`, and :math:`+s` at 0.

    With the default :math:`s = 1` this is BinaryConnect (Courbariaux et al. 2015) with the
    straight-through estimator of hard-tanh (Hubara et al. 2016):

    .. math:: \frac{\partial \hat x}{\partial x} = 1_{|x| \le s}, \qquad
              \frac{\partial \hat x}{\partial s} = \operatorname{sign}(x) - \frac{x}{s}
              \ \text{inside}, \quad \operatorname{sign}(x)\ \text{outside}

    and zero second derivatives. With a ``key`` it is BinaryConnect's stochastic binarisation,
    :math:`P(\hat x = +s) = \operatorname{clip}((x/s + 1)/2, 0, 1)` (hard sigmoid), with the same
    derivatives. It is ``uniform(x, 1, scale=scale, axis=axis, key=key)``; for the
    data-derived mean-abs scale (XNOR-Net's binary weights) use ``uniform(x, 1)``.

    Example:
        >>> x = jnp.array([-2.0, -0.5, 0.0, 0.5])
        >>> binary(x).tolist(), jax.grad(lambda x: binary(x).sum())(x).tolist()
        ([-1.0, -1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0])
    """
    return uniform(x, 1, scale=scale, axis=axis, key=key)


def ternary(x: jax.Array, *, threshold: float = 0.7, axis: Axis = None) -> jax.Array:
    r"""Ternary weights (TWN, Li et al. 2016): :math:`\hat x \in \{-\alpha, 0, +\alpha\}`.

    .. math:: \Delta = t \cdot \operatorname{mean}|x|, \qquad
              \alpha = \operatorname{mean}_{|x_i| > \Delta} |x_i|, \qquad
              \hat x = \alpha \operatorname{sign}(x)\, 1_{|x| > \Delta}

    with :math:`t` = ``threshold``: TWN's approximation :math:`\Delta^* \approx 0.7\,E|x|` of
    the L2-optimal threshold. :math:`\Delta` and :math:`\alpha` are statistics of the data
    (per tensor, or per channel with ``axis``), constants to derivatives, and the gradient is
    TWN's plain straight-through identity (no clipping); higher derivatives are zero.

    Example:
        >>> ternary(jnp.array([-1.5, -0.2, 0.1, 0.5, 1.0])).tolist()  # Delta 0.462, alpha 1
        [-1.0, 0.0, 0.0, 1.0, 1.0]
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
        raise ValueError(f"threshold must be a positive float, got {threshold!r}")
    x = _as_float(x)
    red = _reduce_axes(x.ndim, _keep_axes(x.ndim, axis))

    def fake_quant(y):
        a = jnp.abs(y)
        delta = threshold * jnp.mean(a, axis=red, keepdims=True)
        mask = a > delta
        count = jnp.sum(mask, axis=red, keepdims=True)
        alpha = jnp.sum(jnp.where(mask, a, 0), axis=red, keepdims=True) / jnp.maximum(count, 1)
        return jnp.where(mask, alpha * jnp.sign(y), 0).astype(y.dtype)

    return straight_through(fake_quant)(x)


def _lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """LSQ's :math:`(Q_n, Q_p)`."""
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return 1, 1  # the binary grid {-s, +s}
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def lsq_init(x: jax.Array, bits: int, *, signed: bool = True, axis: Axis = None) -> jax.Array:
    r"""LSQ's initial step size :math:`s_0 = 2\,\operatorname{mean}|x| / \sqrt{Q_p}`.

    Shape ``()`` per tensor, or the kept axes' sizes with ``axis``: the shape :func:`lsq` takes.

    Example:
        >>> float(lsq_init(jnp.array([1.0, -3.0]), 3))  # 2 * 2 / sqrt(3) ...
        2.309...
    """
    bits = _check_bits(bits)
    x = _as_float(x)
    keep = _keep_axes(x.ndim, axis)
    _, qp = _lsq_range(bits, signed)
    m = jnp.mean(jnp.abs(x), axis=_reduce_axes(x.ndim, keep))
    return 2 * m / math.sqrt(qp)


def lsq(
    x: jax.Array,
    scale,
    bits: int,
    *,
    signed: bool = True,
    axis: Axis = None,
    grad_scale: float | None = None,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""Learned step size quantization (LSQ, Esser et al. 2020) with a learned ``scale``.

    .. math:: \hat x = s\,\operatorname{round}\big(\operatorname{clip}(x/s, -Q_n, Q_p)\big), \qquad
              \frac{\partial \hat x}{\partial s} = g \cdot \begin{cases}
              -x/s + \operatorname{round}(x/s) & -Q_n \le x/s \le Q_p \\
              -Q_n & x/s < -Q_n \\ Q_p & x/s > Q_p \end{cases}

    with :math:`\partial \hat x / \partial x = 1` inside the range and 0 outside, and
    :math:`g = 1/\sqrt{N Q_p}` (:math:`N` the number of elements sharing a scale) unless
    ``grad_scale`` is given. Signed: :math:`Q_n = 2^{b-1}`, :math:`Q_p = 2^{b-1} - 1` (binary
    :math:`Q_n = Q_p = 1` for 1 bit); unsigned: :math:`Q_n = 0`, :math:`Q_p = 2^b - 1`. It is
    :func:`uniform` with a given scale and an asymmetric grid (zero point :math:`Q_n`).
    Initialise ``scale`` with :func:`lsq_init`; it is an ordinary parameter (meta-learnable).

    Example:
        >>> x = jnp.array([0.2, 0.9, -2.0])
        >>> lsq(x, 0.5, 2).tolist()  # Qn = 2, Qp = 1
        [0.0, 0.5, -1.0]
        >>> g = 1 / (3 * 1) ** 0.5  # the default gradient scale
        >>> [round(d / g, 6) for d in jax.jacfwd(lambda s: lsq(x, s, 2))(0.5).tolist()]
        [-0.4, 1.0, -2.0]
    """
    bits = _check_bits(bits)
    x = _as_float(x)
    keep = _keep_axes(x.ndim, axis)
    qn, qp = _lsq_range(bits, signed)
    if grad_scale is None:
        per_scale = math.prod(x.shape[i] for i in _reduce_axes(x.ndim, keep))
        grad_scale = 1.0 / math.sqrt(per_scale * qp)
    if signed and bits == 1:
        return uniform(x, 1, axis=axis, scale=scale, grad_scale=grad_scale, key=key)
    return uniform(
        x,
        bits,
        symmetric=False,
        axis=axis,
        scale=scale,
        zero_point=qn,
        grad_scale=grad_scale,
        key=key,
    )


__all__ = ["BITS_RANGE", "binary", "lsq", "lsq_init", "scale_grad", "ternary", "uniform"]
