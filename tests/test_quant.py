"""Quantizers and quantized layers against plain reference quantizations, the LSQ paper's
gradient, closed-form straight-through derivatives, and MAML meta-gradients against float64
finite differences of the straight-through surrogate."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams, quant
from metagrad.estimators import MetaGradEstimator, maml
from metagrad.nn import MLP, Conv4, conv2d, functional, mse_loss
from metagrad.nn.quant import QuantConv, QuantConv4, QuantDense, QuantMLP

# The oracles compare in float64: bit-level references, the LSQ paper's gradient at rtol 1e-12,
# finite differences of the straight-through surrogate.
pytestmark = pytest.mark.usefixtures("x64")


def np_rng(key):
    """A NumPy generator seeded by the test's key: test data without compiling JAX's RNG."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def sym_range(bits):
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def reference_uniform(x, bits, *, symmetric, axis):
    """Textbook quantize-dequantize with plain rounding: no stop_gradient, no straight-through."""
    red = tuple(i for i in range(x.ndim) if axis is None or i != axis % x.ndim)
    if symmetric and bits == 1:
        s = jnp.mean(jnp.abs(x), axis=red, keepdims=True)
        return s * jnp.where(x >= 0, 1.0, -1.0), s
    if symmetric:
        lo, hi = sym_range(bits)
        s = jnp.max(jnp.abs(x), axis=red, keepdims=True) / hi
        return s * jnp.round(jnp.clip(x / s, lo, hi)), s
    n = 2**bits - 1
    mn = jnp.minimum(jnp.min(x, axis=red, keepdims=True), 0)
    mx = jnp.maximum(jnp.max(x, axis=red, keepdims=True), 0)
    s = (mx - mn) / n
    z = jnp.clip(jnp.round(-mn / s), 0, n)
    return s * (jnp.clip(jnp.round(x / s) + z, 0, n) - z), s


# --- forward values ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, -1])
def test_data_scaled_uniform_is_the_reference_and_on_the_grid(key, bits, symmetric, axis):
    x = jnp.asarray(np_rng(key).normal(size=(200, 3)) * np.array([1.0, 3.0, 0.2]) + 0.4)
    q = quant.uniform(x, bits, symmetric=symmetric, axis=axis)
    ref, s = reference_uniform(x, bits, symmetric=symmetric, axis=axis)
    np.testing.assert_array_equal(q, ref)  # bit for bit
    q, s = np.asarray(q), np.broadcast_to(np.asarray(s), (1, 3))
    for c in range(3):
        cols = q if axis is None else q[:, c]
        levels = np.unique(cols)
        assert len(levels) <= 2**bits
        assert len(levels) >= (2 if bits < 3 else 3)  # not collapsed
        codes = levels / s[0, c]
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-9)  # multiples of the scale
    if bits > 1:  # the range covers the data: error at most half a step (plus the zero-point shift)
        err = np.abs(q - np.asarray(x)) / s
        assert err.max() <= (0.5 if symmetric else 1.0) + 1e-9


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_given_scale_forward_is_bitwise_the_plain_quantization(key, dtype):
    x = jnp.asarray(np_rng(key).normal(size=(100, 3)) * 2, dtype)
    all_bits = (2, 3, 8, 16)
    jitted = jax.jit(lambda x: [quant.uniform(x, b, scale=0.05) for b in all_bits])(x)
    for bits, q_jit in zip(all_bits, jitted, strict=True):
        lo, hi = sym_range(bits)
        s = jnp.asarray(0.05, dtype)
        want = s * jnp.round(jnp.clip(x / s, lo, hi))
        q = quant.uniform(x, bits, scale=0.05)
        assert q.dtype == dtype
        np.testing.assert_array_equal(q, want)
        np.testing.assert_array_equal(q_jit, want)
    # per channel, asymmetric with a zero point, scale given as (3,) or (1, 3)
    s = jnp.array([0.1, 0.2, 0.05], dtype)
    z = jnp.array([3, 8, 0])
    want = s * (jnp.clip(jnp.round(x / s) + z, 0, 15) - z)
    for scale in (s, s[None]):
        got = quant.uniform(x, 4, symmetric=False, axis=-1, scale=scale, zero_point=z)
        np.testing.assert_array_equal(got, want.astype(dtype))
    # LSQ is the signed grid [-2^(b-1), 2^(b-1) - 1]
    want = 0.05 * jnp.round(jnp.clip(x / 0.05, -8, 7))
    np.testing.assert_array_equal(quant.lsq(x, 0.05, 4), want.astype(dtype))


def test_binary_and_ternary_forward(key):
    x = jnp.array([-2.0, -0.5, -0.0, 0.0, 0.3, 1.7])
    np.testing.assert_array_equal(quant.binary(x), [-1, -1, 1, 1, 1, 1])  # sign(0) = +1
    np.testing.assert_array_equal(quant.binary(x, scale=0.5), [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5])
    assert quant.uniform(x, 1, scale=0.5).tolist() == quant.binary(x, scale=0.5).tolist()
    w = np_rng(key).normal(size=(50, 4)) * np.array([1.0, 0.1, 5.0, 2.0])
    for axis in (None, -1):
        q = np.asarray(jax.jit(lambda w, a=axis: quant.ternary(w, axis=a))(jnp.asarray(w)))
        cols = [(w, q)] if axis is None else [(w[:, c], q[:, c]) for c in range(4)]
        for wc, qc in cols:  # TWN: Delta = 0.7 mean|w|, alpha = mean of |w| above Delta
            delta = 0.7 * np.mean(np.abs(wc))
            alpha = np.mean(np.abs(wc)[np.abs(wc) > delta])
            np.testing.assert_allclose(qc, alpha * np.sign(wc) * (np.abs(wc) > delta), rtol=1e-12)
            assert len(np.unique(qc)) == 3


@pytest.mark.slow
def test_stochastic_rounding_is_unbiased_and_uses_the_key(key):
    k1, k2 = jax.random.split(key)
    n = 4000  # samples of each of 9 values: one draw of u per element
    x = jnp.tile(jnp.linspace(-0.62, 0.55, 9), (n, 1))
    q = np.asarray(quant.uniform(x, 4, scale=0.1, key=k1))
    u = jax.random.uniform(k1, x.shape, x.dtype)  # floor(x / s + u), u drawn from the key
    np.testing.assert_array_equal(q, 0.1 * jnp.clip(jnp.floor(jnp.clip(x / 0.1, -7, 7) + u), -7, 7))
    lo, hi = np.floor(np.asarray(x) / 0.1) * 0.1, np.ceil(np.asarray(x) / 0.1) * 0.1
    assert np.all(np.isclose(q, lo) | np.isclose(q, hi))  # a neighbouring level
    np.testing.assert_allclose(q.mean(axis=0), x[0], atol=4 * 0.05 / np.sqrt(n))  # E = x
    assert np.abs(q.mean(axis=0) - quant.uniform(x[0], 4, scale=0.1)).max() > 0.01  # not nearest
    np.testing.assert_array_equal(q, quant.uniform(x, 4, scale=0.1, key=k1))  # the key decides
    assert not np.array_equal(q, quant.uniform(x, 4, scale=0.1, key=k2))
    # BinaryConnect's stochastic binarisation: P(+1) = (x + 1) / 2 on [-1, 1]
    xb = jnp.array([-1.5, -0.6, 0.0, 0.4, 2.0, -1.0, 1.0, -0.2, 0.8])
    b = np.asarray(quant.binary(jnp.tile(xb, (n, 1)), key=k2))  # same shape: one RNG program
    assert set(np.unique(b)) <= {-1.0, 1.0}
    np.testing.assert_allclose((b == 1).mean(axis=0), np.clip((xb + 1) / 2, 0, 1), atol=0.04)
    g = jax.grad(lambda x: quant.uniform(x, 4, scale=0.1, key=k1).sum())(x)
    np.testing.assert_array_equal(g, np.abs(np.asarray(x) / 0.1) <= 7)


# --- derivatives -------------------------------------------------------------------------------

# NumPy float64, so that the tests (under x64) see float64 inputs, not float32 made at import.
X = np.array([-1.2, -0.95, -0.31, -0.29, -0.05, 0.0, 0.12, 0.29, 0.31, 0.44, 0.7, 1.3])

# (name, quantizer of x, clipping range of x/s, scale)
GIVEN = [
    ("uniform-3", lambda x: quant.uniform(x, 3, scale=0.1), (-3, 3), 0.1),
    (
        "asym-3-zp2",
        lambda x: quant.uniform(x, 3, symmetric=False, scale=0.1, zero_point=2),
        (-2, 5),
        0.1,
    ),
    ("lsq-3", lambda x: quant.lsq(x, 0.1, 3), (-4, 3), 0.1),
    ("lsq-unsigned-2", lambda x: quant.lsq(x, 0.1, 2, signed=False), (0, 3), 0.1),
    ("binary", lambda x: quant.binary(x), (-1, 1), 1.0),
    ("binary-0.3", lambda x: quant.binary(x, scale=0.3), (-1, 1), 0.3),
]
DATA = [
    ("uniform-4", lambda x: quant.uniform(x, 4)),
    ("uniform-1", lambda x: quant.uniform(x, 1)),
    ("asym-2", lambda x: quant.uniform(x, 2, symmetric=False)),
    ("ternary", lambda x: quant.ternary(x)),
]


def derivatives(q):
    """x -> (q', Hessian of sum q^2, gradient of sum q^2, q), in one compiled program."""
    return jax.jit(
        lambda x: (
            jax.grad(lambda x: q(x).sum())(x),
            jax.hessian(lambda x: jnp.sum(q(x) ** 2))(x),
            jax.grad(lambda x: jnp.sum(q(x) ** 2))(x),
            q(x),
        )
    )


@pytest.mark.parametrize("name,q,rng,s", GIVEN, ids=[g[0] for g in GIVEN])
def test_gradient_is_identity_inside_the_range_and_zero_outside(name, q, rng, s):
    inside = (np.asarray(X) / s >= rng[0]) & (np.asarray(X) / s <= rng[1])
    assert 0 < inside.sum() < len(X)  # both cases occur
    grad, hess, grad_sq, value = derivatives(q)(X)
    np.testing.assert_array_equal(grad, inside.astype(float))
    # second order: d^2/dx^2 q(x)^2 = 2 q'(x)^2 + 2 q q'' = 2 inside, 0 outside (not silently 0)
    np.testing.assert_array_equal(hess, np.diag(2.0 * inside))
    np.testing.assert_allclose(grad_sq, 2 * value * inside, rtol=1e-15)


@pytest.mark.parametrize("name,q", DATA, ids=[d[0] for d in DATA])
def test_data_derived_scale_is_a_plain_straight_through(name, q):
    grad, hess, grad_sq, value = derivatives(q)(X)
    np.testing.assert_array_equal(grad, np.ones(len(X)))
    np.testing.assert_array_equal(hess, 2 * np.eye(len(X)))
    np.testing.assert_allclose(grad_sq, 2 * value, rtol=1e-15)
    np.testing.assert_allclose(q(X), value, rtol=1e-12)  # jit may move an ulp


def test_per_channel_given_scale_clips_per_channel():
    x = jnp.stack([X, X], axis=-1)
    g = jax.grad(lambda x: quant.uniform(x, 3, axis=-1, scale=jnp.array([0.1, 0.5])).sum())(x)
    np.testing.assert_array_equal(g[:, 0], np.abs(np.asarray(X)) <= 0.3)
    np.testing.assert_array_equal(g[:, 1], np.ones(len(X)))  # range 1.5 covers X


def test_range_is_closed_at_its_edges():
    # x = h s exactly (0.75 = 3 * 0.25): inside, so dq/dx = 1 (jnp.clip would give 1/2), and
    # dq/ds is the inside formula's round(3) - 3 = 0
    edges = jnp.array([-0.75, 0.75])
    np.testing.assert_array_equal(
        jax.grad(lambda x: quant.uniform(x, 3, scale=0.25).sum())(edges), [1.0, 1.0]
    )
    np.testing.assert_array_equal(
        jax.jacfwd(lambda s: quant.uniform(edges, 3, scale=s))(0.25), [0.0, 0.0]
    )


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, False), (1, True)])
def test_lsq_scale_gradient_is_the_papers(key, bits, signed):
    rng = np_rng(key)
    x = jnp.asarray(rng.normal(size=(40, 3)) * 0.6)
    s = jnp.array([0.13, 0.07, 0.21])
    if signed and bits == 1:
        qn, qp = 1, 1
    elif signed:
        qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    else:
        qn, qp = 0, 2**bits - 1
    v = np.asarray(x) / np.asarray(s)
    inner = (np.sign(v) + (v == 0)) if bits == 1 and signed else np.round(v)
    dq_ds = np.where(v < -qn, -qn, np.where(v > qp, qp, -v + inner))  # the LSQ paper's formula
    assert np.any(v < -qn) or np.any(v > qp)
    g = 1 / np.sqrt(40 * qp)  # elements per scale: 40 rows
    q = lambda x, s: quant.lsq(x, s, bits, signed=signed, axis=-1)
    cot = jnp.asarray(rng.normal(size=x.shape))

    @jax.jit
    def derivatives(x, s):
        return (
            jax.jacfwd(lambda s: q(x, s))(s),  # (40, 3, 3): channel c depends on s[c] only
            jax.grad(lambda s: jnp.sum(cot * q(x, s)))(s),
            jax.hessian(lambda s: jnp.sum(q(x, s) ** 2))(s),
        )

    jac, grad, hess = derivatives(x, s)
    np.testing.assert_allclose(jnp.einsum("ncc->nc", jac), g * dq_ds, rtol=1e-12, atol=1e-14)
    assert np.count_nonzero(np.asarray(jac)) == np.count_nonzero(dq_ds)
    np.testing.assert_allclose(grad, g * np.sum(cot * dq_ds, axis=0), rtol=1e-11)
    # second order: d^2/ds^2 sum q^2 = 2 sum (dq/ds)^2, as q is linear in s piecewise
    np.testing.assert_allclose(jnp.diag(hess), 2 * np.sum((g * dq_ds) ** 2, axis=0), rtol=1e-9)
    np.testing.assert_allclose(
        quant.lsq_init(x, bits, signed=signed, axis=-1),
        2 * np.mean(np.abs(np.asarray(x)), axis=0) / np.sqrt(qp),
        rtol=1e-12,
    )


def test_scale_grad_is_exact_forward_and_scales_the_gradient(key):
    x = jnp.asarray(np_rng(key).normal(size=1000) * 1e3, jnp.float32)
    np.testing.assert_array_equal(quant.scale_grad(x, 0.3), x)
    grad = jax.grad(lambda x: quant.scale_grad(x, 0.3).sum())(x)
    np.testing.assert_allclose(grad, 0.3, rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    x = jnp.ones((4, 3))
    for bits in (0, 17, -1, 2.0, True, "8", None):
        with pytest.raises(ValueError, match="bits must be a Python int from 1 to 16"):
            quant.uniform(x, bits)
    with pytest.raises(ValueError, match="bits"):
        quant.lsq(x, 0.1, 17)
    with pytest.raises(ValueError, match=r"expected shape \(\) or \(1, 1\)"):
        quant.uniform(x, 4, scale=jnp.ones(3))
    with pytest.raises(ValueError, match=r"expected shape \(3,\) or \(1, 3\)"):
        quant.uniform(x, 4, axis=-1, scale=jnp.ones(4))
    with pytest.raises(ValueError, match="does not fit"):  # the shape is checked under jit too
        jax.jit(lambda s: quant.lsq(x, s, 4))(jnp.ones(2))
    for scale in (0.0, -0.1, jnp.array([0.1, -0.2, 0.3]), np.nan):
        with pytest.raises(ValueError, match="scale must be positive"):
            quant.uniform(x, 4, axis=-1 if jnp.ndim(scale) else None, scale=scale)
    with pytest.raises(ValueError, match="scale must be positive"):
        quant.binary(x, scale=0.0)
    with pytest.raises(ValueError, match="symmetric=False"):
        quant.uniform(x, 4, scale=0.1, zero_point=2)
    with pytest.raises(ValueError, match=r"integer in \[0, 15\]"):
        quant.uniform(x, 4, symmetric=False, scale=0.1, zero_point=16)
    with pytest.raises(ValueError, match="given scale"):
        quant.uniform(x, 4, grad_scale=0.1)
    with pytest.raises(ValueError, match="axis"):
        quant.uniform(x, 4, axis=2)
    with pytest.raises(ValueError, match="threshold"):
        quant.ternary(x, threshold=0.0)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        QuantDense(3, 2, quantizer="log", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_bits=2"):
        QuantDense(3, 2, quantizer="ternary", weight_bits=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass weight_bits"):
        QuantDense(3, 2, quantizer="lsq", weight_bits=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="act_bits: bits must be"):
        QuantConv(3, 2, act_bits=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="weight_bits: bits must be"):
        QuantMLP(1, (4,), 1, edge_bits=32, rngs=nnx.Rngs(0))


# --- layers ------------------------------------------------------------------------------------


def test_quant_dense_through_functional(key):
    x = jnp.asarray(np_rng(key).normal(size=(5, 3)))
    params, apply = functional(QuantDense(3, 2, weight_bits=3, act_bits=4, rngs=nnx.Rngs(1)))
    assert sorted(params) == ["bias", "kernel"]
    params = jax.tree.map(lambda p: jnp.asarray(p, x.dtype) + 0.1, params)  # apply uses these
    apply = jax.jit(apply)
    y, want = jax.jit(
        lambda p, x: (
            apply(p, x),
            quant.uniform(x, 4, symmetric=False, axis=0) @ quant.uniform(p["kernel"], 3)
            + p["bias"],
        )
    )(params, x)
    np.testing.assert_allclose(y, want, rtol=1e-12)
    assert not np.allclose(y, x @ params["kernel"] + params["bias"], rtol=1e-3)
    # per example: a row's output does not depend on the other rows
    np.testing.assert_allclose(apply(params, x.at[0].mul(10.0))[1:], y[1:], rtol=1e-12)
    # LSQ: the learned scale is a parameter with the paper's init and a gradient
    params, apply = functional(
        QuantDense(3, 2, weight_bits=3, quantizer="lsq", per_channel=True, rngs=nnx.Rngs(1))
    )
    assert sorted(params) == ["bias", "kernel", "weight_scale"]
    assert params["weight_scale"].shape == (2,)
    s0 = 2 * np.mean(np.abs(params["kernel"]), axis=0) / np.sqrt(3)  # 2 mean|w| / sqrt(Qp)
    np.testing.assert_allclose(params["weight_scale"], s0, rtol=1e-6)
    g = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, x) ** 2)))(params)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
    assert np.all(g["weight_scale"] != 0)
    tern, apply_t = functional(
        QuantDense(3, 4, weight_bits=2, quantizer="ternary", rngs=nnx.Rngs(0))
    )
    w_used = jax.jit(jax.jacfwd(lambda x1: apply_t(tern, x1)))(jnp.ones(3))  # the effective kernel
    assert len(np.unique(np.round(np.asarray(w_used), 12))) <= 3


def test_quant_conv_matches_float_conv_at_16_bits(key):
    x = jnp.asarray(np_rng(key).normal(size=(2, 6, 6, 3)))
    params, apply16 = functional(
        QuantConv(3, 4, stride=2, weight_bits=16, act_bits=16, rngs=nnx.Rngs(1))
    )
    _, apply2 = functional(QuantConv(3, 4, stride=2, weight_bits=2, act_bits=2, rngs=nnx.Rngs(1)))
    y16, y2, want = jax.jit(
        lambda p, x: (apply16(p, x), apply2(p, x), conv2d(x, p["kernel"], stride=2))
    )(params, x)
    np.testing.assert_allclose(y16, want, rtol=1e-3, atol=1e-3)
    assert not np.allclose(y2, want, atol=1e-2)  # 2 bits does change it


@pytest.mark.slow
def test_quant_models_reuse_the_float_models_structure(key):
    # QuantMLP / QuantConv4 have MLP / Conv4's parameter names and, for one seed, latent weights.
    x = jnp.asarray(np_rng(key).normal(size=(3, 8, 8, 1)))
    float_params, float_apply = functional(Conv4(1, 2, hidden=4, conv_impl="lax", rngs=nnx.Rngs(0)))
    params, apply = functional(
        QuantConv4(
            1,
            2,
            hidden=4,
            conv_impl="lax",
            weight_bits=16,
            act_bits=16,
            edge_bits=16,
            rngs=nnx.Rngs(0),
        )
    )
    jax.tree.map(np.testing.assert_array_equal, params, float_params)
    y, y_float = jax.jit(lambda p, fp: (apply(p, x), float_apply(fp, x)))(params, float_params)
    np.testing.assert_allclose(y, y_float, rtol=1e-3, atol=1e-3)
    lsq_params, _ = functional(
        QuantConv4(1, 2, hidden=4, weight_bits=4, quantizer="lsq", rngs=nnx.Rngs(0))
    )
    assert "weight_scale" not in lsq_params["block_0"] and "weight_scale" in lsq_params["block_1"]
    assert sorted(lsq_params["head"]) == ["bias", "kernel"]
    mlp_params, _ = functional(MLP(2, (4, 4), 1, rngs=nnx.Rngs(0)))
    qparams, _ = functional(QuantMLP(2, (4, 4), 1, weight_bits=2, act_bits=2, rngs=nnx.Rngs(0)))
    jax.tree.map(np.testing.assert_array_equal, qparams, mlp_params)


# --- MAML through a quantized model: finite differences of the straight-through surrogate -------


def mirror(params, x, sites):
    """QuantMLP(1, (4, 4), 1)'s forward pass written out, its quantizers passed in by site."""
    h = jax.nn.relu(x @ sites["hidden_0/w"](params["hidden_0"]) + params["hidden_0"]["bias"])
    h = sites["hidden_1/x"](h)
    h = jax.nn.relu(h @ sites["hidden_1/w"](params["hidden_1"]) + params["hidden_1"]["bias"])
    return sites["head/x"](h) @ sites["head/w"](params["head"]) + params["head"]["bias"]


# QuantMLP(1, (4, 4), 1, weight_bits=3, act_bits=3, quantizer="lsq"): 8-bit uniform edges, LSQ
# in the middle (signed 3 bits: Qn = 4, Qp = 3, gradient scale 1 / sqrt(16 * 3)), 3-bit per-example
# activations into hidden_1 and 8-bit into the head (the layout QuantMLP documents).
QN, QP, G = 4, 3, 1 / np.sqrt(16 * 3)
SITES = {
    "hidden_0/w": lambda p: quant.uniform(p["kernel"], 8),
    "hidden_1/x": lambda h: quant.uniform(h, 3, symmetric=False, axis=0),
    "hidden_1/w": lambda p: quant.lsq(p["kernel"], p["weight_scale"], 3),
    "head/x": lambda h: quant.uniform(h, 8, symmetric=False, axis=0),
    "head/w": lambda p: quant.uniform(p["kernel"], 8),
}


def record(params, x):
    """The straight-through surrogate's constants at ``params``: each quantizer's offset
    c = q(x0) - x0; for LSQ, the scale s0 and the rounding offset round(v0) - v0, v0 = x0 / s0
    clipped."""
    consts = {}

    def recorder(name, q):
        def rec(a):
            if name == "hidden_1/w":
                v0 = jnp.clip(a["kernel"] / a["weight_scale"], -QN, QP)
                consts[name] = (a["weight_scale"], jnp.round(v0) - v0)
            else:
                consts[name] = q(a) - (a["kernel"] if name.endswith("/w") else a)
            return q(a)

        return rec

    mirror(params, x, {name: recorder(name, q) for name, q in SITES.items()})
    return consts


def surrogate_sites(consts):
    """Each quantizer q replaced by x + c; LSQ by s (clip(x / s) + c), the scale's gradient
    scaled by g about s0: the smooth function whose derivatives straight-through gives."""
    sites = {
        n: (lambda p, c=c: p["kernel"] + c) if n.endswith("/w") else (lambda h, c=c: h + c)
        for n, c in consts.items()
        if n != "hidden_1/w"
    }
    s0, c = consts["hidden_1/w"]

    def lsq_surrogate(p):
        s = s0 + G * (p["weight_scale"] - s0)
        return s * (jnp.clip(p["kernel"] / s, -QN, QP) + c)

    return dict(sites, **{"hidden_1/w": lsq_surrogate})


@pytest.mark.slow
def test_maml_through_quant_mlp_matches_finite_differences_of_the_surrogate(key):
    steps, lr = 2, 0.3
    params, apply = functional(
        QuantMLP(1, (4, 4), 1, weight_bits=3, act_bits=3, quantizer="lsq", rngs=nnx.Rngs(0))
    )
    rng = np_rng(key)
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(jnp.float64, params))
    theta = unravel(flat + 0.1 * rng.normal(size=flat.shape))  # nonzero biases: no ReLU kinks
    xs, xq = jnp.asarray(rng.uniform(-3, 3, size=(6, 1))), jnp.asarray(rng.normal(size=(5, 1)))
    support, query = (xs, jnp.sin(xs)), (xq, jnp.sin(xq) + 0.1)
    task = mg.Task(support, query)
    loss_fn = mse_loss(apply)

    def surrogate_loss(p, batch, c):
        x, y = batch
        return jnp.mean((mirror(p, x, surrogate_sites(c)) - y) ** 2)

    def surrogate_meta_loss(theta, consts):
        p = theta
        for c in consts[:steps]:
            p = mg.sgd_step(lambda p, b, c=c: surrogate_loss(p, b, c), p, support, lr)
        return surrogate_loss(p, query, consts[steps])

    @jax.jit
    def at_theta(theta):
        # the surrogate's constants along the straight-through trajectory theta -> phi1 -> phi2
        phi1 = mg.sgd_step(loss_fn, theta, support, lr)
        phi2 = mg.sgd_step(loss_fn, phi1, support, lr)
        consts = [record(theta, xs), record(phi1, xs), record(phi2, xq)]
        return (
            consts,
            mirror(theta, xs, SITES),
            apply(theta, xs),
            surrogate_meta_loss(theta, consts),
            jax.grad(loss_fn)(phi2, query),
        )

    consts, mirrored, model_out, surrogate_value, g_first_order = at_theta(theta)
    np.testing.assert_allclose(mirrored, model_out, rtol=1e-12)  # the test's mirror is the model
    vg = jax.jit(maml(steps=steps, lr=lr).value_and_grad, static_argnums=0)
    (loss, _), g = vg(loss_fn, MetaParams(theta), task, jnp.asarray(0))  # as check_meta_grad does
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(g))
    np.testing.assert_allclose(surrogate_value, loss, rtol=1e-12)  # the surrogate passes through
    surrogate = lambda loss_fn, mp, task, step: (surrogate_meta_loss(mp.params, consts), {})
    checked = MetaGradEstimator("straight-through vs surrogate", surrogate, vg)
    assert mg.check_meta_grad(checked, loss_fn, MetaParams(theta), task) < 1e-6
    # the check sees the second-order terms through the quantizers: first-order MAML's gradient
    # (the query gradient at phi2) is far from this one, so it would fail the check
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
    assert np.linalg.norm(flat(g_first_order) - flat(g)) > 1e-2 * np.linalg.norm(flat(g))
    assert np.all(g.params["hidden_1"]["weight_scale"] != 0)  # the scale is meta-learned
