"""The autodiff toolkit against closed forms, float64 finite differences and compositions.

Tests whose oracle needs float64 (finite differences, rtol below 1e-6) request ``x64``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg


def cubic(x):
    return x**3 + 2 * x**2 - 3 * x + 1


@pytest.mark.parametrize("order,expected", [(0, 1.0), (1, 4.0), (2, 10.0), (3, 6.0), (4, 0.0)])
def test_derivative_tutorial_numbers(order, expected):
    assert float(mg.derivative(cubic, order)(1.0)) == expected


def test_derivative_matches_central_differences(key, x64):
    f = lambda x: jnp.sin(2.0 * x) * jnp.exp(-0.3 * x) + x**2 / 7
    xs = jax.random.uniform(key, (5,), minval=-2.0, maxval=2.0, dtype=jnp.float64)
    h = 1e-4
    for order in (1, 2, 3):
        lower = mg.derivative(f, order - 1)
        fd = (jax.vmap(lower)(xs + h) - jax.vmap(lower)(xs - h)) / (2 * h)
        np.testing.assert_allclose(jax.vmap(mg.derivative(f, order))(xs), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_derivative_rejects_bad_order(bad):
    with pytest.raises(ValueError, match="order"):
        mg.derivative(cubic, bad)


def test_hessian_of_dot_is_2I():
    H = mg.hessian(lambda x: x @ x)(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(H, 2 * np.eye(3))


def _pytree_fn(p):
    return jnp.sum(jnp.tanh(p["w"] @ p["b"])) + jnp.sum(p["w"] ** 3) * jnp.sum(p["b"] ** 2)


def _random_tree(key):
    k1, k2 = jax.random.split(key)
    return {
        "w": jax.random.normal(k1, (3, 2), jnp.float64),
        "b": jax.random.normal(k2, (2,), jnp.float64),
    }


@pytest.mark.slow
def test_hessian_pytree_blocks_match_flat_hessian(key, x64):
    p = _random_tree(key)
    flat, unravel = ravel_pytree(p)
    H_flat = jax.hessian(lambda z: _pytree_fn(unravel(z)))(flat)
    H = mg.hessian(_pytree_fn)(p)
    assert H["w"]["b"].shape == (3, 2, 2)
    # ravel_pytree orders the leaves by key: b (2 entries), then w (6 entries).
    np.testing.assert_allclose(H["b"]["b"], H_flat[:2, :2], rtol=1e-10)
    np.testing.assert_allclose(H["w"]["b"].reshape(6, 2), H_flat[2:, :2], rtol=1e-10)
    np.testing.assert_allclose(H["w"]["w"].reshape(6, 6), H_flat[2:, 2:], rtol=1e-10)


def test_hvp_equals_hessian_times_v_on_pytrees(key, x64):
    k1, k2 = jax.random.split(key)
    p, v = _random_tree(k1), _random_tree(k2)
    flat_p, unravel = ravel_pytree(p)
    flat_v, _ = ravel_pytree(v)
    H = jax.hessian(lambda z: _pytree_fn(unravel(z)))(flat_p)
    got, _ = ravel_pytree(mg.hvp(_pytree_fn, p, v))
    np.testing.assert_allclose(got, H @ flat_v, rtol=1e-10, atol=1e-12)


def test_hvp_rejects_mismatched_direction():
    with pytest.raises(ValueError, match="structure"):
        mg.hvp(_pytree_fn, {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}, {"w": jnp.ones((3, 2))})
    with pytest.raises(ValueError, match="shape"):
        mg.hvp(lambda x: jnp.sum(x**2), jnp.ones(3), jnp.ones(2))


@pytest.mark.slow
def test_gnvp_equals_JT_H_J_v(key, x64):
    k1, k2, k3 = jax.random.split(key, 3)
    W = jax.random.normal(k1, (4, 3), jnp.float64)
    predict = lambda x: jnp.tanh(W @ x)
    loss = lambda z: jnp.sum(jnp.log1p(jnp.exp(z))) + jnp.sum(z**4)
    x = jax.random.normal(k2, (3,), jnp.float64)
    v = jax.random.normal(k3, (3,), jnp.float64)
    J = jax.jacfwd(predict)(x)
    H_loss = jax.hessian(loss)(predict(x))
    np.testing.assert_allclose(mg.gnvp(predict, loss, x, v), J.T @ H_loss @ J @ v, rtol=1e-10)


@pytest.mark.parametrize(
    "num_samples",
    [pytest.param(16, marks=pytest.mark.slow), 64, pytest.param(256, marks=pytest.mark.slow)],
)
def test_hutchinson_within_four_standard_errors(key, num_samples, x64):
    k_a, k_est = jax.random.split(key)
    A = jax.random.normal(k_a, (5, 5), jnp.float64)
    A = A + A.T  # a symmetric, non-diagonal Hessian so the estimate has variance
    f = lambda p: 0.5 * p["x"] @ A @ p["x"] + jnp.sum(p["y"] ** 4)
    p = {"x": jnp.ones(5, jnp.float64), "y": jnp.linspace(-1.0, 1.0, 3)}
    trace_exact = jnp.trace(A) + jnp.sum(12 * p["y"] ** 2)
    tr = mg.hutchinson_trace(f, p, k_est, num_samples=num_samples)
    assert float(tr.stderr) > 0
    assert abs(float(tr.mean - trace_exact)) <= 4 * float(tr.stderr)
    diag = mg.hutchinson_diagonal(f, p, k_est, num_samples=num_samples)
    assert np.all(np.abs(diag.mean["x"] - jnp.diag(A)) <= 4 * diag.stderr["x"] + 1e-12)
    np.testing.assert_allclose(diag.mean["y"], 12 * p["y"] ** 2)  # diagonal block: exact


def test_hutchinson_rejects_too_few_samples(key):
    with pytest.raises(ValueError, match="num_samples"):
        mg.hutchinson_trace(lambda x: jnp.sum(x**2), jnp.ones(2), key, num_samples=1)


# The JAX tutorial's TD(0) example (NumPy float64: JAX takes them as float64 under the x64
# fixture, where the tests compare at rtol 1e-12).
THETA = np.array([0.1, -0.1, 0.0])
S_TM1 = np.array([1.0, 2.0, -1.0])
S_T = np.array([2.0, 1.0, 0.0])
value_fn = lambda theta, s: jnp.dot(theta, s)


def test_td0_semi_gradient_and_naive_gradient_tutorial_numbers(x64):
    semi = jax.grad(lambda th: mg.td_loss(value_fn, th, S_TM1, 1.0, S_T))(THETA)
    naive = jax.grad(lambda th: mg.td_loss(value_fn, th, S_TM1, 1.0, S_T, semi_gradient=False))(
        THETA
    )
    np.testing.assert_allclose(semi, [-2.4, -4.8, 2.4], rtol=1e-12)
    np.testing.assert_allclose(naive, [2.4, -2.4, 2.4], rtol=1e-12)


def test_td0_per_example_gradients_tutorial_batch(x64):
    loss = lambda th, s_tm1, r_t, s_t: mg.td_loss(value_fn, th, s_tm1, r_t, s_t)
    batched = lambda x: jnp.stack([x, x])
    grads = mg.per_example_grads(loss, in_axes=(None, 0, 0, 0))(
        THETA, batched(S_TM1), jnp.array([1.0, 1.0]), batched(S_T)
    )
    np.testing.assert_allclose(grads, [[-2.4, -4.8, 2.4]] * 2, rtol=1e-12)


def _mlp_loss(params, x, y):
    h = jnp.tanh(x @ params["w1"])
    pred = h @ params["w2"]
    return jnp.mean((pred - y) ** 2), pred


def test_per_example_grads_equal_python_loop(key, x64):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"w1": jax.random.normal(k1, (3, 4)), "w2": jax.random.normal(k2, (4,))}
    xs = jax.random.normal(k3, (6, 3))
    ys = jax.random.normal(k4, (6,))
    grads, preds = mg.per_example_grads(_mlp_loss, in_axes=(None, 0, 0), has_aux=True)(
        params, xs, ys
    )
    for b in range(xs.shape[0]):
        g_b, pred_b = jax.grad(_mlp_loss, has_aux=True)(params, xs[b], ys[b])
        np.testing.assert_allclose(preds[b], pred_b, rtol=1e-12)
        for name in params:
            np.testing.assert_allclose(grads[name][b], g_b[name], rtol=1e-10)


def test_per_example_norms_and_clipping(key, x64):
    grads = {
        "a": jax.random.normal(key, (4, 3)) * jnp.array([[0.01], [1.0], [10.0], [3.0]]),
        "b": jnp.arange(8.0).reshape(4, 2),
    }
    norms = mg.per_example_grad_norms(grads)
    np.testing.assert_allclose(
        norms,
        [np.sqrt(np.sum(grads["a"][i] ** 2) + np.sum(grads["b"][i] ** 2)) for i in range(4)],
        rtol=1e-12,
    )
    clipped = mg.clip_per_example(grads, 2.0)
    clipped_norms = mg.per_example_grad_norms(clipped)
    np.testing.assert_allclose(clipped_norms, np.minimum(norms, 2.0), rtol=1e-12)
    for i in range(4):  # direction is kept
        scale = min(1.0, 2.0 / float(norms[i]))
        np.testing.assert_allclose(clipped["a"][i], grads["a"][i] * scale, rtol=1e-12)
    with pytest.raises(ValueError, match="max_norm"):
        mg.clip_per_example(grads, 0.0)
