r"""Mixed precision: a model's matrix products and convolutions (``bf16``), or the whole model
(``bf16_full``), in bfloat16; every parameter, gradient and optimizer state in float32 (the
master-weights scheme).

:func:`mixed_precision` wraps a model's pure ``apply(params, x, ...)``. With ``"bf16"``, every
``dot_general`` and ``conv_general_dilated`` inside it whose operands are wider floats (dense
layers, convolutions, the ``patches`` convolutions' products) takes its operands rounded to
bfloat16 and accumulates in float32 (``preferred_element_type=float32``); batch norm,
activations, pooling, the loss and every reduction stay float32. With ``"bf16_full"`` the
params and inputs are cast to bf16 on the way in, so every operation and every activation the
backward pass keeps is bf16 (reductions still accumulate in float32, as ``jnp.mean`` does for
16-bit floats), and the outputs are cast back. In both, the params passed in, the inner loop's
gradients (taken with respect to float32 params, through the cast), the adapted params, the
meta-gradient and the optimizer state are float32: nothing outside ``apply`` changes dtype.

Why, measured on second-order MAML through Conv4 (``experiments/bench/precision.py``, the
README's "Mixed precision"):

- No loss scaling. bfloat16 has float32's 8-bit exponent (smallest normal :math:`1.2 \cdot
  10^{-38}`), so the small second-order terms (Hessian-vector products of the inner step) do
  not underflow; loss scaling is fp16's remedy for its 5-bit exponent and buys nothing here.
  1,000 sinusoid meta-steps give no non-finite value in either mode (``tests/test_precision.py``).
- Accumulation in float32. A product sums up to ``9 C`` taps times the batch; the operands are
  rounded once, the sum is not (``bf16``'s results stay float32; XLA's bf16 products on CPU and
  GPU accumulate in float32 too).
- Batch norm, softmax cross-entropy and reductions in float32 (``bf16``). Their backward passes
  subtract nearly equal numbers (batch norm's :math:`dy - \overline{dy} -
  \hat{x}\,\overline{dy\,\hat{x}}`, orthogonal to the batch means), and second-order MAML
  differentiates them once more: with batch norm in bf16 (``bf16_full``) the Conv4
  meta-gradient's error against float64 was 0.55, with ``bf16`` 0.32.
- Master params in float32, also in the inner loop. :math:`\phi - \alpha g` in bf16 drops every
  update below :math:`2^{-9} |\phi|` (a weight of 0.1 ignores updates under 2e-4): inner steps
  and Adam's outer steps (about 1e-3 relative) would round away. The gradient of a float32
  param through the cast is float32, so the inner SGD update runs in float32 by construction.

What no arithmetic recovers is the rounding of the operands (relative :math:`2^{-9}`): ReLU
networks' (meta-)gradients jump where a unit crosses zero, and at bf16's resolution many do.
On Conv4 at its initialisation, float64 arithmetic on params and images rounded to bf16 once
is 0.36 off the float64 meta-gradient; ``bf16`` (0.32) is at that floor. On a smooth model the
bf16 second-order meta-gradient is within 1e-2 of float64 (the tests).

``bf16``'s backward products take the float32 cotangent against the saved bf16 operand: the
saved operands are bf16, the cotangents that second-order terms sum are float32. It keeps
batch norm's float32 activations, so it saves a fifth of the stored activations; ``bf16_full``
halves them.

Products inside ``lax.scan``, ``lax.cond``, ``jax.checkpoint`` or custom-derivative rules of
the model stay as they are under ``bf16`` (nested ``jax.jit`` calls are followed);
:func:`matmul_dtypes` lists what a wrapped function computes in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

PRECISIONS = ("float32", "bf16", "bf16_full")
"""The names ``train.precision`` accepts: ``float32`` (as written), ``bf16`` (products in bf16,
the rest float32) and ``bf16_full`` (the whole model in bf16: half the stored activations)."""

COMPUTE_DTYPES = {"bf16": jnp.bfloat16, "bf16_full": jnp.bfloat16}

_PRODUCTS = (prims.dot_general_p, prims.conv_general_dilated_p)
_ACCUMULATE = jnp.float32


def check_precision(precision: str) -> None:
    """Raises ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`.

    Example:
        >>> check_precision("fp16")
        Traceback (most recent call last):
        ValueError: precision must be one of ('float32', 'bf16', 'bf16_full'), got 'fp16'
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def mixed_precision(apply: Callable, precision: str = "bf16") -> Callable:
    r"""``apply`` with its matrix products and convolutions (or everything) in ``precision``.

    ``"float32"`` returns ``apply`` itself. ``"bf16_full"`` casts the params and floating
    inputs to bfloat16 and the floating outputs back to float32: every operation of the model,
    batch norm included, and every activation the backward pass keeps are bf16 (half the
    activation memory), at a larger meta-gradient error (README, "Mixed precision").
    ``"bf16"`` returns a function with ``apply``'s
    signature that, for every product :math:`y = x W` (or convolution) of floating operands,
    computes

    .. math:: y = \operatorname{bf16}(x)\,\operatorname{bf16}(W)
              \quad \text{(float32 accumulation and result)}

    and runs everything else as ``apply`` does (float32). Its outputs keep ``apply``'s dtypes,
    its gradients with respect to float32 params are float32, so a loss built on it
    (``metagrad.nn.cross_entropy_loss(mixed_precision(apply))``) drops into any estimator and
    the inner loop's adapted params stay float32. Differentiable to any order.

    Example:
        >>> f = mixed_precision(lambda w, x: jnp.tanh(x @ w))
        >>> w, x = jnp.full((3, 2), 0.1), jnp.ones((4, 3))
        >>> f(w, x).dtype, jax.grad(lambda w: f(w, x).sum())(w).dtype
        (dtype('float32'), dtype('float32'))
        >>> matmul_dtypes(f, w, x)  # (primitive, operand dtypes, result dtype)
        [('dot_general', ('bfloat16', 'bfloat16'), 'float32')]
        >>> mixed_precision(jnp.dot, "float32") is jnp.dot
        True
        >>> matmul_dtypes(mixed_precision(lambda w, x: jnp.tanh(x @ w), "bf16_full"), w, x)
        [('dot_general', ('bfloat16', 'bfloat16'), 'bfloat16')]
    """
    check_precision(precision)
    if precision == "float32":
        return apply
    if precision == "bf16_full":
        return _cast_all(apply, COMPUTE_DTYPES[precision])
    return _wrap(apply, COMPUTE_DTYPES[precision], _ACCUMULATE)


def _cast_all(apply: Callable, dtype) -> Callable:
    """``bf16_full``: params and floating inputs cast to ``dtype`` on the way in, floating
    outputs to float32 on the way out, so the model's every operation and stored activation is
    ``dtype``; reductions (``jnp.mean``, ``jnp.sum``) still accumulate in float32, as JAX does
    for 16-bit floats, and the loss on the float32 outputs is float32."""

    def cast(tree, to):
        def one(x):
            if _is_array(x) and jnp.issubdtype(jnp.result_type(x), jnp.floating):
                return jnp.asarray(x).astype(to)
            return x

        return jax.tree.map(one, tree)

    def full(*args, **kwargs):
        out = apply(*cast(args, dtype), **cast(kwargs, dtype))
        return cast(out, jnp.float32)

    full.__wrapped__ = apply
    return full


def _wrap(apply: Callable, dtype, accumulate) -> Callable:
    """``apply`` evaluated with its products on ``dtype`` operands, summed in ``accumulate``."""

    def mixed(*args, **kwargs):
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

        def call(*values):
            full = list(leaves)
            for i, v in zip(dynamic, values, strict=True):
                full[i] = v
            a, kw = jax.tree.unflatten(treedef, full)
            return apply(*a, **kw)

        values = [leaves[i] for i in dynamic]
        closed, out_shape = jax.make_jaxpr(call, return_shape=True)(*values)
        outs = _eval_cast(closed.jaxpr, closed.consts, values, dtype, accumulate)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    mixed.__wrapped__ = apply
    return mixed


def rounded_reference(apply: Callable, precision: str = "bf16") -> Callable:
    r"""The exact-arithmetic twin of ``mixed_precision(apply, precision)``: the same products
    on the same operands rounded to ``precision``, computed in float64, for tests (run it under
    ``jax.enable_x64``, with float64 params and inputs).

    The difference between the two is what float32 accumulation and the float32 elementwise
    work add; the difference between this and ``apply`` in float64 is what rounding the
    operands costs, which no choice of accumulation recovers.

    Example:
        >>> with jax.enable_x64(True):
        ...     w = jnp.array([[1 + 2.0**-10]])  # not a bfloat16 number
        ...     float(rounded_reference(lambda w, x: x @ w)(w, jnp.ones((1, 1)))[0, 0])
        1.0
    """
    check_precision(precision)
    if precision != "bf16":
        raise ValueError(f"rounded_reference is the twin of precision='bf16', got {precision!r}")
    return _wrap(apply, COMPUTE_DTYPES[precision], jnp.float64)


def matmul_dtypes(fn: Callable, *args, **kwargs) -> list[tuple[str, tuple[str, ...], str]]:
    """``(primitive, operand dtypes, result dtype)`` of every product and convolution that
    ``fn(*args, **kwargs)`` computes, nested ``jax.jit`` calls included, in program order.

    Example:
        >>> matmul_dtypes(lambda w, x: x @ w, jnp.ones((3, 2)), jnp.ones((4, 3)))
        [('dot_general', ('float32', 'float32'), 'float32')]
    """
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    found: list[tuple[str, tuple[str, ...], str]] = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive in _PRODUCTS:
                ins = tuple(str(v.aval.dtype) for v in eqn.invars)
                found.append((eqn.primitive.name, ins, str(eqn.outvars[0].aval.dtype)))
            for sub in jcore.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(closed.jaxpr)
    return found


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _narrows(x, dtype) -> bool:
    """Whether ``x`` is a floating array wider than ``dtype`` (the operands to round)."""
    dt = jnp.result_type(x)
    return jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits > jnp.finfo(dtype).bits


def _eval_cast(jaxpr, consts, args, dtype, accumulate) -> list:
    """Evaluates ``jaxpr`` as :func:`jax.core.eval_jaxpr` does, binding each product and
    convolution on ``dtype`` operands summed in ``accumulate``; nested ``jit`` calls are
    evaluated the same way, inline. With a float64 ``accumulate`` the rounded operands are
    widened back (a product of two bfloat16 numbers is exact in float64)."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        prim = eqn.primitive
        if prim in _PRODUCTS and all(_narrows(x, dtype) for x in invals):
            params = dict(eqn.params, preferred_element_type=accumulate)
            ops = [x.astype(dtype) for x in invals]
            if accumulate == jnp.float64:
                ops = [x.astype(accumulate) for x in ops]
            out = prim.bind(*ops, **params)
            outs = [out.astype(eqn.outvars[0].aval.dtype)]
        elif prim is prims.jit_p:
            sub = eqn.params["jaxpr"]
            outs = _eval_cast(sub.jaxpr, sub.consts, invals, dtype, accumulate)
        else:
            ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
            params = prim.get_bind_params(eqn.params)
            if ctx is None:
                outs = prim.bind(*invals, **params)
            else:
                with ctx:
                    outs = prim.bind(*invals, **params)
            if not prim.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


__all__ = [  # and the constants PRECISIONS, COMPUTE_DTYPES
    "check_precision",
    "matmul_dtypes",
    "mixed_precision",
    "rounded_reference",
]
