"""straight_through: exact forward values, identity gradient, consistent higher derivatives."""

import jax
import jax.numpy as jnp
import numpy as np

import metagrad as mg


def test_round_tutorial_numbers():
    st_round = mg.straight_through(jnp.round)
    assert float(jnp.round(3.2)) == 3.0 and float(jax.grad(jnp.round)(3.2)) == 0.0
    assert float(st_round(3.2)) == 3.0 and float(jax.grad(st_round)(3.2)) == 1.0


def test_forward_value_is_bit_exact(key):
    x = jax.random.normal(key, (10_000,), jnp.float32) * 1e3
    for f in (jnp.round, jnp.sign, lambda z: jnp.round(z * 7.3) / 7.3):
        np.testing.assert_array_equal(mg.straight_through(f)(x), f(x))
    # The form x + sg(f(x) - x) is not exact when f(x) is far from x; ours still is.
    x = x / 1e3
    far = lambda z: jnp.round(z * 1000) / 7
    naive = x + jax.lax.stop_gradient(far(x) - x)
    assert np.any(np.asarray(naive) != np.asarray(far(x)))
    np.testing.assert_array_equal(mg.straight_through(far)(x), far(x))


def test_second_derivative_is_consistent_not_silently_zero():
    # loss(x) = q(x)^2 with q = straight_through(round): surrogate derivative 2 q(x) * 1,
    # second derivative of the surrogate: d/dx [2 q(x)] = 2 * dq/dx = 2.
    q = mg.straight_through(jnp.round)
    loss = lambda x: q(x) ** 2
    assert float(jax.grad(loss)(2.7)) == 6.0
    assert float(jax.grad(jax.grad(loss))(2.7)) == 2.0
    assert float(mg.hessian(lambda x: jnp.sum(q(x) ** 2))(jnp.array([2.7, -1.2]))[0, 0]) == 2.0


def test_signed_zero_is_kept_bit_for_bit():
    # (x - sg(x)) + sg(f(x)) turns f's -0.0 into +0.0 (0 + -0 = +0); ours subtracts the zero.
    x = jnp.array([1.0, -2.0, 0.0, -0.0], jnp.float32)
    f = lambda z: -0.0 * jnp.abs(z)
    out = mg.straight_through(f)(x)
    np.testing.assert_array_equal(np.signbit(out), np.signbit(f(x)))
    assert bool(np.all(np.signbit(out)))
