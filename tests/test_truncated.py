"""Truncated backpropagation (`metagrad.truncated`, `adapt(..., truncate=k)`): its gradient is
the exact gradient of the truncated objective (finite differences), truncated(steps) is MAML,
truncated(0) is first-order MAML's gradient for theta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg
from metagrad import MetaParams, Task


def apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((apply(p, x) - y) ** 2)


def setup():
    ks = jax.random.split(jax.random.key(11), 6)
    params = {
        "w1": jax.random.normal(ks[0], (2, 4)),
        "b1": 0.1 * jax.random.normal(ks[1], (4,)),
        "w2": jax.random.normal(ks[2], (4, 1)) / 2,
    }
    task = Task(
        (jax.random.normal(ks[3], (6, 2)), jax.random.normal(ks[4], (6, 1))),
        (jax.random.normal(ks[5], (6, 2)), jnp.ones((6, 1))),
    )
    return params, task


def grad_of(est, mp, task):
    return jax.jit(lambda mp: est.value_and_grad(loss_fn, mp, task, 0)[1])(mp)


def central_differences(f, x, eps=1e-6):
    flat, unravel = ravel_pytree(x)
    f = jax.jit(f)
    basis = jnp.eye(flat.size)
    return jnp.stack(
        [(f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps) for e in basis]
    )


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
@pytest.mark.parametrize("k", [1, 2])
def test_truncated_gradient_equals_finite_differences_of_truncated_objective(k, x64):
    # The truncated objective at theta0: J(theta) = L(adapt_k(theta + c); Q), with the first
    # steps' displacement c = phi_n(theta0) - theta0 held fixed (their Jacobian is the identity).
    params, task = setup()
    steps, lr = 4, 0.3
    head = mg.adapt(loss_fn, params, task.support, steps=steps - k, lr=lr)
    shift = jax.tree.map(jnp.subtract, head, params)

    def J(theta):
        start = jax.tree.map(jnp.add, theta, shift)
        return loss_fn(mg.adapt(loss_fn, start, task.support, steps=k, lr=lr), task.query)

    g = grad_of(mg.truncated(k, steps=steps, lr=lr), MetaParams(params), task)
    fd = central_differences(J, params)
    np.testing.assert_allclose(ravel_pytree(g.params)[0], fd, rtol=1e-6, atol=1e-9)
    # ... and it is neither MAML's nor first-order MAML's gradient.
    for other in (mg.maml(steps=steps, lr=lr), mg.fomaml(steps=steps, lr=lr)):
        g_other = ravel_pytree(grad_of(other, MetaParams(params), task).params)[0]
        assert not np.allclose(g_other, fd, rtol=1e-3)


@pytest.mark.slow  # 4-5 s
def test_truncated_learned_rates_get_the_gradient_of_the_last_steps_only(x64):
    # Per-step learned rates: those of the truncated (first) steps get exactly zero, the last
    # step's rate gets d J / d alpha of the truncated objective.
    params, task = setup()
    steps, k = 3, 1
    rates = mg.learned_rates(params, 0.2, per_element=False, steps=steps)
    scale = jnp.array([1.0, 1.2, 0.8])
    rates = jax.tree.map(lambda a: a * scale.reshape((steps,) + (1,) * (a.ndim - 1)), rates)
    mp = MetaParams(params, rates)
    est = mg.truncated(k, steps=steps, lr=None, per_step=True)
    g = grad_of(est, mp, task)
    for leaf in jax.tree.leaves(g.lr):
        np.testing.assert_array_equal(leaf[: steps - k], 0.0)
    head = mg.adapt(loss_fn, params, task.support, steps=steps - k, lr=jax.tree.map(
        lambda a: a[: steps - k], rates), per_step=True)  # fmt: skip

    def J(last_rates):
        lr = jax.tree.map(lambda a: a[None], last_rates)
        out = mg.adapt(loss_fn, head, task.support, steps=1, lr=lr, per_step=True)
        return loss_fn(out, task.query)

    last = jax.tree.map(lambda a: a[steps - 1], rates)
    fd = central_differences(J, last)
    got = ravel_pytree(jax.tree.map(lambda a: a[steps - 1], g.lr))[0]
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # 4-5 s
def test_truncated_all_steps_is_maml_exactly(x64):
    params, task = setup()
    for lr, mp in (
        (0.3, MetaParams(params)),
        (None, MetaParams(params, mg.learned_rates(params, 0.2))),
    ):
        (loss_t, _), g_t = mg.truncated(3, steps=3, lr=lr).value_and_grad(loss_fn, mp, task, 0)
        (loss_m, _), g_m = mg.maml(steps=3, lr=lr).value_and_grad(loss_fn, mp, task, 0)
        assert float(loss_t) == float(loss_m)
        for a, b in zip(jax.tree.leaves(g_t), jax.tree.leaves(g_m), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # seconds of compilation (the quick lane is full)
def test_truncated_zero_is_first_order_maml_for_theta(x64):
    params, task = setup()
    (loss_t, _), g_t = mg.truncated(0, steps=3, lr=0.3).value_and_grad(
        loss_fn, MetaParams(params), task, 0
    )
    (loss_f, _), g_f = mg.fomaml(steps=3, lr=0.3).value_and_grad(
        loss_fn, MetaParams(params), task, 0
    )
    assert float(loss_t) == float(loss_f)  # the straight-through form returns phi exactly
    for a, b in zip(jax.tree.leaves(g_t.params), jax.tree.leaves(g_f.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.slow  # 4-5 s
def test_truncation_keeps_the_trajectory_and_values():
    params, task = setup()
    full, traj = mg.adapt(loss_fn, params, task.support, steps=4, lr=0.3, return_trajectory=True)
    cut, traj_cut = mg.adapt(
        loss_fn, params, task.support, steps=4, lr=0.3, return_trajectory=True, truncate=1
    )
    for a, b in zip(jax.tree.leaves((full, traj)), jax.tree.leaves((cut, traj_cut)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_truncation_is_refused():
    with pytest.raises(ValueError, match="truncate=5 exceeds steps=3"):
        mg.truncated(5, steps=3, lr=0.1)
    with pytest.raises(ValueError, match="non-negative int"):
        mg.truncated(-1, steps=3, lr=0.1)
    with pytest.raises(ValueError, match="non-negative int"):
        mg.adapt(loss_fn, {"w": 0.0}, None, steps=2, lr=0.1, truncate=1.5)
    with pytest.raises(ValueError, match="set by truncated itself"):
        mg.truncated(1, steps=3, lr=0.1, first_order=True)
