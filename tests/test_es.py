"""Zero-order estimators against analytic gradients: antithetic ES on a quadratic (cosine and
an unbiased mean over seeds), the `es` estimator on MAML's closed form, PES unbiased on a
100-step unroll where truncated ES is not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import metagrad as mg
from metagrad import MetaParams, Task
from metagrad.estimators.es import es, es_grad, pes


def quadratic(d, key):
    k1, k2, k3 = jax.random.split(key, 3)
    M = jax.random.normal(k1, (d, d))
    A = M @ M.T / d + jnp.eye(d)
    b, x = jax.random.normal(k2, (d,)), jax.random.normal(k3, (d,))
    f = lambda z: 0.5 * z @ A @ z + b @ z + jnp.sum(jnp.sin(0.0 * z))
    return f, x, A @ x + b


def cosine(a, b):
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def in_95_region(estimates, truth) -> tuple[bool, float]:
    """Hotelling's T^2 test that the mean of ``estimates`` (seeds x d) is ``truth``: whether
    ``truth`` lies in the 95% confidence region of the mean, and T^2 over its critical value."""
    estimates = np.asarray(estimates, np.float64)
    n, d = estimates.shape
    diff = estimates.mean(0) - np.asarray(truth)
    cov = np.cov(estimates, rowvar=False).reshape(d, d)
    t2 = n * diff @ np.linalg.solve(cov, diff)
    critical = (n - 1) * d / (n - d) * stats.f.ppf(0.95, d, n - d)
    return bool(t2 <= critical), float(t2 / critical)


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_antithetic_es_cosine_with_the_gradient_of_a_quadratic(key, x64):
    f, x, grad = quadratic(10, key)
    est = jax.jit(lambda k: es_grad(f, x, k, sigma=0.1, num_samples=4096))(jax.random.key(1))
    assert cosine(est.mean, grad) > 0.99
    # The reported standard error is that of the mean: the error is within a few of them.
    assert float(jnp.max(jnp.abs(est.mean - grad) / est.stderr)) < 4.5


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_antithetic_es_mean_over_seeds_is_unbiased_and_its_stderr_honest(key, x64):
    f, x, grad = quadratic(4, key)
    run = jax.jit(jax.vmap(lambda k: es_grad(f, x, k, sigma=0.5, num_samples=64)))
    est = run(jax.random.split(jax.random.key(2), 256))
    ok, ratio = in_95_region(est.mean, grad)
    assert ok, ratio
    # The per-seed stderr predicts the spread over seeds (256 seeds: within 20%).
    np.testing.assert_allclose(np.mean(est.stderr, 0), np.std(est.mean, 0, ddof=1), rtol=0.2)


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_es_estimator_matches_maml_on_linear_regression(key, x64):
    # MAML's objective on a linear model is quadratic in theta: ES is unbiased for its gradient.
    ks = jax.random.split(key, 3)
    X, Xq = jax.random.normal(ks[0], (8, 3)), jax.random.normal(ks[1], (8, 3))
    w = jax.random.normal(ks[2], (3,))
    task = Task((X, X @ w), (Xq, Xq @ w))
    loss_fn = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
    mp = MetaParams(jnp.array([0.3, -0.2, 0.5]))
    _, want = mg.maml(steps=2, lr=0.1).value_and_grad(loss_fn, mp, task, 0)
    est = es(0.1, 4096, steps=2, lr=0.1)
    vg = jax.jit(est.value_and_grad, static_argnums=0)
    (loss, metrics), g = vg(loss_fn, mp, task, 0)
    assert cosine(g.params, want.params) > 0.99
    assert 0 < float(metrics["es_stderr"]) < 0.1 * float(jnp.linalg.norm(want.params))
    np.testing.assert_allclose(loss, est.objective(loss_fn, mp, task, 0)[0], rtol=1e-12)
    _, g_next = vg(loss_fn, mp, task, 1)  # fresh noise at the next outer step
    assert not np.allclose(g_next.params, g.params)


# --- PES on a 100-step unroll ---------------------------------------------------------------------

STEPS, TRUNCATION = 100, 10


def toy_unroll(state, theta):
    """TRUNCATION steps of s <- 0.9 s + theta_0 + theta_1 cos(0.3 t), loss (s - 1)^2 / STEPS."""

    def step(carry, _):
        s, t = carry
        s = 0.9 * s + theta[0] + theta[1] * jnp.cos(0.3 * t)
        return (s, t + 1), (s - 1.0) ** 2 / STEPS

    state, losses = jax.lax.scan(step, state, None, length=TRUNCATION)
    return state, jnp.sum(losses)


def total_loss(theta):
    state, total = (jnp.array(0.0), jnp.array(0.0)), 0.0
    for _ in range(STEPS // TRUNCATION):
        state, loss = toy_unroll(state, theta)
        total = total + loss
    return total


def pes_total(key, theta, *, sigma=0.3, num_samples=8):
    """PES summed over the 10 truncations of one unroll (theta fixed)."""
    init, update = pes(toy_unroll, sigma=sigma, num_samples=num_samples)
    pes_state = init(theta, (jnp.array(0.0), jnp.array(0.0)))

    def body(pes_state, k):
        pes_state, est = update(pes_state, theta, k)
        return pes_state, est.mean

    _, grads = jax.lax.scan(body, pes_state, jax.random.split(key, STEPS // TRUNCATION))
    return grads.sum(0)


def truncated_es_total(key, theta, *, sigma=0.3, num_samples=8):
    """Truncated ES: each truncation's ES gradient from the unperturbed state (biased)."""
    state, total = (jnp.array(0.0), jnp.array(0.0)), 0.0
    for k in jax.random.split(key, STEPS // TRUNCATION):
        f = lambda th, state=state: toy_unroll(state, th)[1]
        total = total + es_grad(f, theta, k, sigma=sigma, num_samples=num_samples).mean
        state, _ = toy_unroll(state, theta)
    return total


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_pes_is_unbiased_on_a_100_step_unroll_and_truncated_es_is_not(x64):
    theta = jnp.array([0.05, 0.3])
    truth = jax.grad(total_loss)(theta)
    keys = jax.random.split(jax.random.key(5), 64)
    pes_grads = jax.jit(jax.vmap(lambda k: pes_total(k, theta)))(keys)
    ok, ratio = in_95_region(pes_grads, truth)
    assert ok, (ratio, pes_grads.mean(0), truth)
    tes_grads = jax.jit(jax.vmap(lambda k: truncated_es_total(k, theta)))(keys)
    ok, ratio = in_95_region(tes_grads, truth)
    assert not ok and ratio > 10, ratio  # far outside: the bias the persistent xi removes


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_pes_reports_its_stderr(x64):
    init, update = pes(toy_unroll, sigma=0.3, num_samples=16)
    state = init(jnp.zeros(2), (jnp.array(0.0), jnp.array(0.0)))
    state, est = update(state, jnp.array([0.05, 0.3]), jax.random.key(0))
    assert est.mean.shape == (2,) and bool(jnp.all(est.stderr > 0))
    assert state.xi.shape == (32, 2) and state.states[0].shape == (32,)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="sigma must be a positive"):
        es(0.0, 8, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        es_grad(lambda x: x, 1.0, jax.random.key(0), sigma=0.1, num_samples=0)
    with pytest.raises(ValueError, match="sigma must be a positive"):
        pes(toy_unroll, sigma=-1.0, num_samples=4)
