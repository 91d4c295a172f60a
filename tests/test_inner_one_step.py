"""A one-step inner loop runs without a scan (`metagrad.inner.unroll_steps`): the same values and
meta-gradients as a scan, and under vmap the step uses the shared parameters unbatched (one
product for all tasks, not a broadcast per task)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg
from metagrad.inner import unroll_steps

# In the full run (CI), not the quick lane: float64 compilations of every estimator.
pytestmark = [pytest.mark.usefixtures("x64"), pytest.mark.slow]


def step_fn(carry, i_x):
    i, x = i_x
    new = jnp.sin(carry) * x + i
    return new, new**2


@pytest.mark.parametrize("steps", [0, 1, 2, 5])
@pytest.mark.parametrize("remat", [False, True])
def test_peeled_scan_and_python_loop_agree(steps, remat):
    carry0, xs = jnp.array([0.3, -1.2]), jnp.linspace(0.5, 1.5, steps)
    runs = [
        unroll_steps(
            step_fn, carry0, xs, steps=steps, remat=remat, python_loop=loop, loop_one_step=one
        )
        for loop, one in ((False, True), (False, False), (True, True))
    ]
    for carry, outs in runs[1:]:
        np.testing.assert_allclose(carry, runs[0][0], rtol=1e-13)
        if steps == 0:
            assert outs is None and runs[0][1] is None
        else:
            assert outs.shape == (steps, 2)
            np.testing.assert_allclose(outs, runs[0][1], rtol=1e-13)


def loss_fn(w, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ w) - y) ** 2)


def _tasks(n_tasks=3, n=4, d=3):
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (n_tasks, n, d))
    y = jax.random.normal(ks[1], (n_tasks, n, 2))
    return mg.Task((x, y), (x + 0.5, y)), jax.random.normal(ks[2], (d, 2))


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradients_under_vmap_equal_the_per_task_loop(steps):
    tasks, w = _tasks()
    est = mg.maml(steps=steps, lr=0.3)
    one = lambda t: est.value_and_grad(loss_fn, mg.MetaParams(w), t, 0)[1].params
    batched = jax.vmap(one)(tasks)
    for i in range(3):
        task_i = jax.tree.map(lambda a, i=i: a[i], tasks)
        np.testing.assert_allclose(batched[i], one(task_i), rtol=1e-12)
    # and against float64 central differences of the meta-objective
    assert mg.check_meta_grad(est, loss_fn, mg.MetaParams(w), task_i) < 1e-6


def test_a_vmapped_single_step_multiplies_by_the_shared_weights_once():
    tasks, w = _tasks()
    adapt = lambda t: mg.adapt(loss_fn, w, t.support, steps=1, lr=0.3)
    jaxpr = jax.make_jaxpr(jax.vmap(adapt))(tasks)
    first_dot = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general")
    # the support batch (3 tasks, 4 rows, 3 features) against the unbatched (3, 2) weights
    assert [v.aval.shape for v in first_dot.invars] == [(3, 4, 3), (3, 2)]
