"""``algo=maml algo.grad_mode=...``: each mode builds the library's estimator for it, with the
config's keywords, so that the CLI compares the differentiation modes on one task. The oracle
is the estimator called directly (`metagrad.maml`, `metagrad.truncated`, `metagrad.imaml`,
`metagrad.es`) on the same tiny sinusoid task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad as mg
from experiments._hydra import compose_config
from metagrad.experiment import build
from metagrad.experiment.config import ConfigError

STEPS, LR = 2, 0.05
DIRECT = {
    "second_order": lambda: mg.maml(steps=STEPS, lr=LR),
    "first_order": lambda: mg.maml(steps=STEPS, lr=LR, first_order=True),
    "truncated": lambda: mg.truncated(1, steps=STEPS, lr=LR),
    "implicit": lambda: mg.imaml(steps=STEPS, lr=LR, reg=2.0, cg_iters=3, cg_tol=0.0),
    "es": lambda: mg.es(0.05, 8, steps=STEPS, lr=LR),
}


@pytest.fixture(scope="module")
def sinusoid_task():
    from metagrad.tasks import sinusoid

    return sinusoid.sample_batch_flat(jax.random.key(0), 1, shots=5, query=5)


# One mode in the quick lane; each is a few compilations (seconds on two cores).
MODES = [pytest.param(m, marks=[] if m == "truncated" else [pytest.mark.slow]) for m in DIRECT]


@pytest.mark.parametrize("mode", MODES)
def test_each_grad_mode_is_the_librarys_estimator(mode, sinusoid_task):
    cfg = compose_config(
        [
            "model.hidden=[4]",
            f"inner.steps={STEPS}",
            f"inner.lr={LR}",
            f"algo.grad_mode={mode}",
            "algo.truncate=1",
            "algo.implicit_reg=2.0",
            "algo.cg_iters=3",
            "algo.cg_tol=0.0",
            "algo.es_sigma=0.05",
            "algo.es_samples=8",
        ]
    )
    model = build.build_model(cfg, jax.random.key(1))
    ours = build.build_estimator(cfg, model)
    task = jax.tree.map(lambda x: x[0], sinusoid_task)
    meta = build.initial_meta_params(cfg, model)
    (loss, _), grad = jax.jit(ours.value_and_grad, static_argnums=0)(model.loss_fn, meta, task, 0)
    (loss_d, _), grad_d = jax.jit(DIRECT[mode]().value_and_grad, static_argnums=0)(
        model.loss_fn, meta, task, 0
    )
    np.testing.assert_allclose(loss, loss_d, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_d), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))


@pytest.mark.slow
def test_modes_that_differ_give_different_gradients(sinusoid_task):
    """The oracle above could pass with every mode built alike: second order and first order
    must differ on a curved loss (with two inner steps)."""
    task = jax.tree.map(lambda x: x[0], sinusoid_task)
    cfg = compose_config(["model.hidden=[4]", f"inner.steps={STEPS}", f"inner.lr={LR}"])
    model = build.build_model(cfg, jax.random.key(1))
    meta = build.initial_meta_params(cfg, model)
    grads = {
        m: jax.tree.leaves(
            jax.jit(DIRECT[m]().value_and_grad, static_argnums=0)(model.loss_fn, meta, task, 0)[1]
        )
        for m in ("second_order", "first_order")
    }
    assert any(
        not np.allclose(a, b)
        for a, b in zip(grads["second_order"], grads["first_order"], strict=True)
    )


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["algo.grad_mode=es", "algo.first_order=true"], "algo.first_order"),
        (["algo.grad_mode=implicit", "algo.learn_lr=true"], "algo.learn_lr"),
        (["algo.grad_mode=es", "algo.es_samples=0"], "algo.es_samples"),
        (["algo.grad_mode=backprop"], "algo.grad_mode"),
    ],
)
def test_bad_grad_mode_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert str(info.value).startswith(key), str(info.value)
