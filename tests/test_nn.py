"""Models and adapters: functional forms equal the modules, batch-norm policies do what they say,
and meta-gradients through Conv4 match finite differences."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams
from metagrad import nn as mnn
from metagrad.estimators import maml, mamlpp


def test_functional_equals_module_and_is_pure(key):
    model = mnn.MLP(1, (8, 8), 1, rngs=nnx.Rngs(0))
    params, apply = mnn.functional(model)
    x = jax.random.normal(key, (5, 1))
    np.testing.assert_array_equal(apply(params, x), model(x))
    shifted = jax.tree.map(lambda p: p + 1.0, params)
    assert not np.allclose(apply(shifted, x), model(x))
    np.testing.assert_array_equal(apply(params, x), model(x))  # the module itself is untouched
    assert sorted(params) == ["head", "hidden_0", "hidden_1"]


def test_functional_linen_matches_apply(key, x64):
    params, apply = mnn.functional_linen(linen.Dense(3), key, jnp.ones((1, 2)))
    x = jax.random.normal(key, (4, 2))
    np.testing.assert_allclose(apply(params, x), x @ params["kernel"] + params["bias"], rtol=1e-12)


def test_adapt_mask_for_anil_and_frozen_batchnorm():
    params, _ = mnn.functional(mnn.Conv4(1, 2, hidden=4, rngs=nnx.Rngs(0)))
    anil = jax.tree_util.tree_leaves_with_path(mnn.adapt_mask(params, head_only=True))
    assert all(m == (mg.inner.path_str(p).startswith("head")) for p, m in anil)
    frozen_bn = jax.tree_util.tree_leaves_with_path(mnn.adapt_mask(params, adapt_batchnorm=False))
    assert all(m == ("norm" not in mg.inner.path_str(p)) for p, m in frozen_bn)
    assert any(not m for _, m in frozen_bn) and any(m for _, m in frozen_bn)


def test_transductive_batchnorm_normalises_the_current_batch(key, x64):
    bn = mnn.MetaBatchNorm(3)
    x = 3.0 + 2.0 * jax.random.normal(key, (64, 4, 4, 3))
    y = bn(x)
    np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-10)
    np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)


def test_support_batchnorm_is_not_transductive(key, x64):
    bn = mnn.MetaBatchNorm(2, policy="support")
    k1, k2 = jax.random.split(key)
    support = jax.random.normal(k1, (6, 2))
    query = jax.random.normal(k2, (4, 2))
    out = bn(jnp.concatenate([support, query]), stats_rows=6)[6:]
    mean, var = support.mean(0), support.var(0)
    np.testing.assert_allclose(out, (query - mean) / jnp.sqrt(var + 1e-5), rtol=1e-10)
    changed = query.at[1:].set(100.0)  # other query examples must not matter
    out2 = bn(jnp.concatenate([support, changed]), stats_rows=6)[6:]
    np.testing.assert_allclose(out2[0], out[0], rtol=1e-12)


def test_per_step_batchnorm_uses_its_steps_affine_weights(key):
    bn = mnn.MetaBatchNorm(2, policy="per_step", steps=3)
    params, apply = mnn.functional(bn)
    assert params["scale"].shape == (3, 2)
    x = jax.random.normal(key, (8, 2))
    g = jax.grad(lambda p: jnp.sum(apply(p, x, step=1) ** 3))(params)
    assert np.all(g["scale"][jnp.array([0, 2])] == 0) and np.any(g["scale"][1] != 0)
    np.testing.assert_array_equal(apply(params, x, step=7), apply(params, x, step=2))  # clamped


def _conv_task(key, ways=2, shots=2, size=4):
    k1, k2 = jax.random.split(key)
    labels = jnp.repeat(jnp.arange(ways), shots)
    return mg.Task(
        (jax.random.normal(k1, (ways * shots, size, size, 1)), labels),
        (jax.random.normal(k2, (ways * shots, size, size, 1)), labels),
    )


@pytest.mark.parametrize(
    "policy", ["transductive", pytest.param("per_step", marks=pytest.mark.slow)]
)
def test_conv4_meta_gradients_match_finite_differences(key, policy):
    model = mnn.Conv4(1, 2, hidden=2, bn_policy=policy, steps=2, rngs=nnx.Rngs(1))
    params, apply = mnn.functional(model)
    loss = mnn.cross_entropy_loss(apply)
    task = _conv_task(key)
    if policy == "per_step":
        est = mamlpp(steps=2, lr=0.3, step_arg=True, anneal_steps=10)
    else:
        est = maml(steps=2, lr=0.3)
    # A small step: ReLU kinks sit close to the point in a net this small (eps=1e-5 crossed one).
    err = mg.check_meta_grad(est, loss, MetaParams(params), task, num_directions=4, eps=1e-7)
    assert err < 1e-5


def test_losses_and_accuracy():
    apply = lambda p, x: x * p
    logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = jnp.array([0, 1, 1])
    assert float(mnn.accuracy(apply)(1.0, (logits, y))["acc"]) == pytest.approx(2 / 3)
    expected = -np.mean([jax.nn.log_softmax(logits[i])[y[i]] for i in range(3)])
    assert float(mnn.cross_entropy_loss(apply)(1.0, (logits, y))) == pytest.approx(float(expected))
