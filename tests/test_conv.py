"""Every convolution implementation equals `lax.conv` in value and derivatives of every order used.

The oracle is `lax.conv_general_dilated` in float64 (conftest's ``x64`` fixture);
`tests/test_engine.py` checks the engine's meta-gradients against finite differences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams
from metagrad.nn import Conv4, conv2d, cross_entropy_loss, default_conv_impl, functional
from metagrad.nn.conv import CONV_IMPLS, SMALL_C
from metagrad.tasks import Task

pytestmark = pytest.mark.usefixtures("x64")  # every comparison is at rtol 1e-10

IMPLS = [i for i in CONV_IMPLS if i not in ("auto", "lax")]
# Second-order MAML through Conv4 is a large program; XLA's backend optimisations and fusion
# emitters take most of its compile time, and these tests check values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _jit(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def assert_close(a, b, rtol=1e-10):
    """Relative error in the 2-norm, leaf by leaf, with a floor of ``rtol`` times the largest leaf
    norm (elementwise tolerances fail on entries that are zero up to rounding)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    scale = max(float(np.linalg.norm(np.asarray(y, np.float64))) for y in b)
    for x, y in zip(a, b, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        err, ref = np.linalg.norm(x - y), np.linalg.norm(y)
        assert err <= rtol * (ref + 1e-4 * scale), f"|a - b| = {err:.3g}, |b| = {ref:.3g}"


def _objective(impl, stride):
    # a non-linear scalar of the output, so second derivatives are not trivially zero
    return lambda x, k: jnp.sum(jnp.tanh(conv2d(x, k, stride=stride, impl=impl)) ** 2)


def _derivatives(impl, stride, x, k, v):
    f = _objective(impl, stride)
    y = conv2d(x, k, stride=stride, impl=impl)
    grads = jax.grad(f, argnums=(0, 1))(x, k)
    # forward-over-reverse (Hessian-vector products, as iMAML's CG takes them) and
    # reverse-over-reverse (as second-order MAML differentiates)
    hvp = jax.jvp(jax.grad(f, argnums=1), (x, k), (jnp.zeros_like(x), v))[1]
    gg = jax.grad(lambda k: jnp.sum(jax.grad(f, argnums=0)(x, k) ** 2))(k)
    return y, grads, hvp, gg


# (N, H, W, C): odd and even sizes, a 1-pixel image, narrow (channel-major) and wide layouts
SHAPES = [(2, 8, 8, 1), (1, 7, 5, 3), (2, 6, 7, SMALL_C + 1), (3, 1, 1, 2)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_derivatives_equal_lax(key, impl, stride, shape):
    def both(key):  # inputs drawn inside the one compiled program: no eager compiles per shape
        kx, kk, kv = jax.random.split(key, 3)
        x = jax.random.normal(kx, shape)
        k = jax.random.normal(kk, (3, 3, shape[-1], 4))
        v = jax.random.normal(kv, k.shape)
        return _derivatives(impl, stride, x, k, v), _derivatives("lax", stride, x, k, v)

    out, ref = _jit(both, key)
    assert out[0].shape == (shape[0], -(-shape[1] // stride), -(-shape[2] // stride), 4)
    assert_close(out, ref)
    assert np.linalg.norm(out[3]) > 1e-6  # second derivatives are not all zero


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_with_per_example_kernels_equals_a_loop(key, impl):
    def both(key):
        kx, kk = jax.random.split(key)
        x = jax.random.normal(kx, (3, 2, 6, 6, 2))
        k = jax.random.normal(kk, (3, 3, 3, 2, 5))
        batched = jax.vmap(lambda x, k: conv2d(x, k, stride=2, impl=impl))(x, k)
        return batched, jnp.stack([conv2d(x[i], k[i], stride=2, impl="lax") for i in range(3)])

    assert_close(*_jit(both, key))


def _tiny_conv4(impl, downsample, hidden):
    model = Conv4(1, 2, hidden=hidden, downsample=downsample, conv_impl=impl, rngs=nnx.Rngs(0))
    params, apply = functional(model)
    return MetaParams(params), cross_entropy_loss(apply)


def _tiny_tasks(key, size=7, meta_batch=2):
    ks, kq = jax.random.split(key)
    xs = jax.random.normal(ks, (meta_batch, 2, size, size, 1))
    xq = jax.random.normal(kq, (meta_batch, 4, size, size, 1))
    ys = jnp.tile(jnp.arange(2), (meta_batch, 1))
    yq = jnp.tile(jnp.array([0, 1, 0, 1]), (meta_batch, 1))
    return Task((xs, ys), (xq, yq))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("downsample", ["strided", "maxpool"])
def test_second_order_maml_meta_gradients_equal_lax(key, impl, downsample):
    """A 7x7 input gives stride-2 convolutions at 7, 4, 2, 1 pixels (strided) or stride-1 ones at
    7, 4, 2, 1 (max-pool); 17 hidden channels put the first layer in the channel-major patch
    layout and the others in the row layout."""

    def meta_value_and_grad(name, tasks):
        meta_params, loss_fn = _tiny_conv4(name, downsample, SMALL_C + 1)
        task_loss = lambda p, t: mg.meta_loss(loss_fn, p, t.support, t.query, steps=1, lr=0.4)
        mean_loss = lambda p, t: jnp.mean(jax.vmap(task_loss, (None, 0))(p, t))
        return jax.value_and_grad(mean_loss)(meta_params.params, tasks)

    def both(key):
        tasks = _tiny_tasks(key)
        return meta_value_and_grad(impl, tasks), meta_value_and_grad("lax", tasks)

    out, ref = _jit(both, key)
    assert_close(out, ref)
    assert optax.tree.norm(out[1]) > 1e-3  # the comparison is not between zeros


def test_bad_impl_name_raises_a_clear_error():
    x, k = jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1))
    with pytest.raises(ValueError, match=r"conv impl must be one of .*'bogus'"):
        conv2d(x, k, impl="bogus")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        Conv4(1, 2, hidden=2, conv_impl="bogus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stride must be a positive int"):
        conv2d(x, k, stride=0)
    with pytest.raises(ValueError, match="kernel"):
        conv2d(x, jnp.ones((3, 3, 2, 1)))


def test_auto_is_the_backend_default():
    assert default_conv_impl("cpu") == "patches"
    assert default_conv_impl("gpu") == default_conv_impl("tpu") == "lax"
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float64).reshape(2, 5, 5, 1)
    k = jnp.linspace(-1, 1, 3 * 3 * 1 * 2).reshape(3, 3, 1, 2)
    np.testing.assert_array_equal(
        conv2d(x, k, stride=2), conv2d(x, k, stride=2, impl=default_conv_impl())
    )
