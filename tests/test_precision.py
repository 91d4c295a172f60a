"""Mixed precision (metagrad.precision): bf16 products with float32 accumulation, float32
everything else; master params, meta-gradients and optimizer state in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.flatten_util import ravel_pytree

import metagrad as mg
from metagrad import nn as mnn
from metagrad.precision import (
    PRECISIONS,
    check_precision,
    matmul_dtypes,
    mixed_precision,
    rounded_reference,
)
from metagrad.tasks import sinusoid

# In the full run (CI), not the quick lane: a compilation of a model in each precision per test.
pytestmark = pytest.mark.slow


def _cast(tree, dtype):
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _rel(a, b) -> float:
    a, b = (
        np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
        for t in (a, b)
    )
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _meta_grad(estimator, loss_fn, params, task):
    f = jax.jit(lambda p, t: estimator.value_and_grad(loss_fn, mg.MetaParams(p), t, 0)[1].params)
    return f(params, task)


def _conv4(seed=0, hidden=4):
    return mnn.functional(mnn.Conv4(1, 5, hidden=hidden, conv_impl="patches", rngs=nnx.Rngs(seed)))


def _image_task(key, size, shots=1, query=5, ways=5):
    k1, k2 = jax.random.split(key)
    xs = jax.random.normal(k1, (ways * shots, size, size, 1))
    xq = jax.random.normal(k2, (ways * query, size, size, 1))
    ys, yq = jnp.repeat(jnp.arange(ways), shots), jnp.repeat(jnp.arange(ways), query)
    return mg.Task((xs, ys), (xq, yq))


# ------------------------------------------------------------------------------ names, identity


def test_float32_is_the_identity(key):
    params, apply = _conv4()
    assert mixed_precision(apply, "float32") is apply
    x = jax.random.normal(key, (5, 8, 8, 1))
    np.testing.assert_array_equal(mixed_precision(apply, "float32")(params, x), apply(params, x))


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", "float64", "", None, 16])
def test_unknown_precision_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match=r"precision must be one of \('float32', 'bf16', "):
        mixed_precision(lambda p, x: x, bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision(bad)
    assert PRECISIONS == ("float32", "bf16", "bf16_full")
    with pytest.raises(ValueError, match="twin of precision='bf16'"):
        rounded_reference(lambda p, x: x, "float32")


# ------------------------------------------------------------------------------ what runs in bf16


def test_every_product_of_conv4_runs_on_bf16_operands_into_float32(key):
    params, apply = _conv4()
    x = jax.random.normal(key, (5, 8, 8, 1))
    plain, mixed = matmul_dtypes(apply, params, x), matmul_dtypes(mixed_precision(apply), params, x)
    assert len(plain) == len(mixed) >= 5  # four convolutions' products and the head
    assert all(ins == ("float32", "float32") for _, ins, _ in plain)
    assert all(ins == ("bfloat16", "bfloat16") and out == "float32" for _, ins, out in mixed)
    # Nothing else is bf16: each bf16 value is a rounded operand feeding a product.
    jaxpr = jax.make_jaxpr(mixed_precision(apply))(params, x).jaxpr
    bf16_eqns = [e for e in jaxpr.eqns if any(v.aval.dtype == jnp.bfloat16 for v in e.outvars)]
    assert bf16_eqns and all(e.primitive.name == "convert_element_type" for e in bf16_eqns)
    out = mixed_precision(apply)(params, x)
    assert out.dtype == jnp.float32
    assert 0 < _rel(out, apply(params, x)) < 0.05  # rounded, not wrong


def test_bf16_full_runs_the_whole_model_in_bf16(key):
    """Every floating value inside the model is bf16 (batch norm included), the logits come
    back float32, and the backward pass keeps bf16 activations only."""
    params, apply = _conv4()
    x = jax.random.normal(key, (5, 8, 8, 1))
    full = mixed_precision(apply, "bf16_full")
    products = matmul_dtypes(full, params, x)
    assert products and all(p[1:] == (("bfloat16", "bfloat16"), "bfloat16") for p in products)
    jaxpr = jax.make_jaxpr(full)(params, x).jaxpr
    rsqrt = [e.outvars[0].aval.dtype for e in jaxpr.eqns if e.primitive.name == "rsqrt"]
    assert len(rsqrt) == 4 and all(d == jnp.bfloat16 for d in rsqrt)  # batch norm in bf16
    assert full(params, x).dtype == jnp.float32
    from jax._src.ad_checkpoint import saved_residuals  # JAX's print_saved_residuals' data

    loss = lambda p: jnp.sum(full(p, x) ** 2)  # noqa: E731
    kept: dict[str, int] = {}
    for aval, why in saved_residuals(loss, params):
        if "argument" not in why:
            kept[str(aval.dtype)] = kept.get(str(aval.dtype), 0) + aval.size * aval.dtype.itemsize
    assert kept.get("float32", 0) <= full(params, x).nbytes, kept  # the float32 logits alone
    assert kept["bfloat16"] > 20 * full(params, x).nbytes, kept


def test_products_inside_nested_jit_are_cast_too():
    inner = jax.jit(lambda w, x: x @ w)
    f = mixed_precision(lambda w, x: jnp.sum(inner(w, x) @ w.T))
    [(_, a, _), (_, b, _)] = matmul_dtypes(f, jnp.ones((3, 3)), jnp.ones((2, 3)))
    assert a == b == ("bfloat16", "bfloat16")


def test_integer_products_are_left_alone():
    f = mixed_precision(lambda a, b: a @ b)
    a = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    assert matmul_dtypes(f, a, a.T) == [("dot_general", ("int32", "int32"), "int32")]
    np.testing.assert_array_equal(f(a, a.T), a @ a.T)


# ----------------------------------------------------------------------- float32 masters and state


@pytest.mark.parametrize("precision", ["bf16", "bf16_full"])
def test_master_params_meta_gradients_and_optimizer_state_stay_float32(key, precision):
    params, apply = mnn.functional(mnn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    loss_fn = mnn.mse_loss(mixed_precision(apply, precision))
    est = mg.maml(steps=1, lr=0.01)
    tasks = sinusoid.sample_batch_flat(key, 4, shots=10, query=10)
    _, grads = jax.jit(lambda mp, t: mg.batch_value_and_grad(est, loss_fn, mp, t, 0))(
        mg.MetaParams(params), tasks
    )
    learner = mg.meta_learner(loss_fn, est, optax.adam(1e-3))
    state, metrics = learner.update(learner.init(mg.MetaParams(params)), tasks)
    for tree in (grads, state.meta_params, state.opt_state, metrics):
        dtypes = {x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, dtypes


@pytest.mark.parametrize("precision", ["bf16", "bf16_full"])
def test_inner_updates_below_bf16_resolution_are_kept(key, precision):
    """The adapted params are float32: an update of 1e-4 relative survives, where
    ``phi - lr * g`` in bfloat16 would round it away (bf16 resolves 2^-8 = 3.9e-3)."""
    params, apply = mnn.functional(mnn.MLP(1, (8,), 1, rngs=nnx.Rngs(0)))
    loss_fn = mnn.mse_loss(mixed_precision(apply, precision))
    x = jax.random.normal(key, (10, 1))
    batch = (x, jnp.sin(x))
    grads = jax.grad(loss_fn)(params, batch)
    lr = 1e-4 / float(jnp.max(jnp.abs(ravel_pytree(grads)[0])))  # largest update 1e-4
    adapted = mg.adapt(loss_fn, params, batch, steps=1, lr=lr)
    step = jax.tree.map(lambda a, p: a - p, adapted, params)
    scale = float(jnp.max(jnp.abs(ravel_pytree(params)[0])))  # float32's rounding of a - p
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(adapted))
    np.testing.assert_allclose(
        ravel_pytree(step)[0], -lr * ravel_pytree(grads)[0], rtol=1e-3, atol=2e-7 * scale
    )
    # the same step in bf16 loses most of it
    bf = jax.tree.map(
        lambda p, g: (
            (p.astype(jnp.bfloat16) - (lr * g).astype(jnp.bfloat16)).astype(jnp.float32)
            - p.astype(jnp.bfloat16).astype(jnp.float32)
        ),
        params,
        grads,
    )
    assert float(jnp.mean(ravel_pytree(bf)[0] == 0)) > 0.5


# ----------------------------------------------------------------------------- meta-gradients


def _tanh_mlp(p, x):
    for name in ("hidden_0", "hidden_1"):
        x = jnp.tanh(x @ p[name]["kernel"] + p[name]["bias"])
    return x @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("precision", ["bf16", "bf16_full"])
def test_second_order_meta_gradient_of_a_smooth_model_within_1e_2_of_float64(key, precision):
    """A tanh MLP 1-40-40-1 on a sinusoid task (no kinks): the bf16 second-order meta-gradient
    (two inner steps) against float64."""
    params, _ = mnn.functional(mnn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    est = mg.maml(steps=2, lr=0.1)
    task = jax.tree.map(lambda a: a[0], sinusoid.sample_batch_flat(key, 1, shots=10, query=10))
    with jax.enable_x64(True):
        g64 = _meta_grad(
            est, mnn.mse_loss(_tanh_mlp), _cast(params, jnp.float64), _cast(task, jnp.float64)
        )
    g32 = _meta_grad(est, mnn.mse_loss(_tanh_mlp), params, task)
    mixed = mixed_precision(_tanh_mlp, precision)
    g16 = _meta_grad(est, mnn.mse_loss(mixed), params, task)
    fo16 = _meta_grad(mg.fomaml(steps=2, lr=0.1), mnn.mse_loss(mixed), params, task)
    assert _rel(g32, g64) < 1e-5
    assert _rel(g16, g64) < 1e-2, _rel(g16, g64)
    assert _rel(fo16, g64) > 3 * _rel(g16, g64)  # the second-order term is there


@pytest.mark.slow  # about 40 s on the loaded 2-core machine (float64 second-order Conv4)
def test_conv4_second_order_meta_gradient_in_bf16(key):
    """Conv4 5-way 1-shot (16x16, 8 channels), second-order MAML, one inner step at 0.4.

    Oracle: the same operands rounded to bf16, products and everything else in float64
    (`rounded_reference`): bf16 with float32 accumulation is within 1e-2 of it, while dropping
    the second-order term (first-order MAML) is off by far more. Against plain float64 the
    error is larger and is the meta-gradient's own sensitivity to rounding its weights (the
    README's "Mixed precision": float64 arithmetic on bf16-rounded weights is as far off)."""
    params, apply = _conv4(hidden=8)
    task = _image_task(key, 16)
    est = mg.maml(steps=1, lr=0.4)
    with jax.enable_x64(True):
        ref = _meta_grad(
            est,
            mnn.cross_entropy_loss(rounded_reference(apply)),
            _cast(params, jnp.float64),
            _cast(task, jnp.float64),
        )
    g16 = _meta_grad(est, mnn.cross_entropy_loss(mixed_precision(apply)), params, task)
    first_order = _meta_grad(
        mg.fomaml(steps=1, lr=0.4), mnn.cross_entropy_loss(mixed_precision(apply)), params, task
    )
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g16))
    assert bool(jnp.all(jnp.isfinite(ravel_pytree(g16)[0])))
    err = _rel(g16, ref)
    assert err < 1e-2, err
    assert _rel(first_order, ref) > 10 * err


# --------------------------------------------------------------------------- stability in training


@pytest.mark.parametrize("precision", ["bf16", "bf16_full"])
def test_1000_sinusoid_meta_steps_in_bf16_stay_finite(precision):
    """Finn et al.'s sinusoid MAML (MLP 1-40-40-1, meta-batch 25, one step at 0.01, Adam 1e-3)
    in bf16 for 1,000 compiled meta-steps: every loss, gradient norm and parameter is finite,
    and the loss falls."""
    params, apply = mnn.functional(mnn.MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    learner = mg.meta_learner(
        mnn.mse_loss(mixed_precision(apply, precision)),
        mg.maml(steps=1, lr=0.01),
        optax.adam(1e-3),
        jit=False,
    )

    def step(carry, _):
        state, key = carry
        key, sub = jax.random.split(key)
        state, metrics = learner.update(
            state, sinusoid.sample_batch_flat(sub, 25, shots=10, query=10)
        )
        return (state, key), (metrics["meta_loss"], metrics["grad_norm"])

    run = jax.jit(lambda s, k: lax.scan(step, (s, k), None, length=1000))
    (state, _), (losses, norms) = run(learner.init(mg.MetaParams(params)), jax.random.key(0))
    assert bool(jnp.all(jnp.isfinite(losses))) and bool(jnp.all(jnp.isfinite(norms)))
    assert bool(jnp.all(jnp.isfinite(ravel_pytree(state.meta_params)[0])))
    assert state.meta_params.params["head"]["kernel"].dtype == jnp.float32
    assert float(jnp.mean(losses[-100:])) < 0.7 * float(jnp.mean(losses[:100]))
