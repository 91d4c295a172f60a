"""The Equinox adapter: meta-gradients against float64 finite differences, MAML equal to the NNX
model's from the same weights, and one-line errors for what it does not handle."""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams, Task, maml
from metagrad._extras import MissingExtraError
from metagrad.nn import MLP, cross_entropy_loss, from_equinox, mse_loss
from metagrad.tasks import sinusoid

eqx = pytest.importorskip("equinox")


def _mlp(key, sizes=(2, 5, 5, 1)):
    return eqx.nn.MLP(sizes[0], sizes[-1], width_size=sizes[1], depth=len(sizes) - 2, key=key)


class EqxConv4(eqx.Module):
    """Conv4 in Equinox's per-example form: an NHWC image in, four 3x3 stride-2 convolutions,
    group norm (stateless) and ReLU, features averaged over space, a linear head."""

    convs: list
    norms: list
    head: eqx.nn.Linear

    def __init__(self, in_channels, num_classes, *, hidden, key):
        keys = jax.random.split(key, 5)
        chans = [in_channels] + [hidden] * 4
        self.convs = [
            eqx.nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, key=keys[i])
            for i in range(4)
        ]
        self.norms = [eqx.nn.GroupNorm(1, hidden) for _ in range(4)]
        self.head = eqx.nn.Linear(hidden, num_classes, key=keys[4])

    def __call__(self, x):
        x = jnp.transpose(x, (2, 0, 1))  # HWC -> CHW, Equinox's layout
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = jax.nn.relu(norm(conv(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def _regression_task(key, n=5, d=2):
    ks = jax.random.split(key, 4)
    normal = jax.random.normal
    return Task(
        (normal(ks[0], (n, d)), normal(ks[1], (n, 1))),
        (normal(ks[2], (n, d)), normal(ks[3], (n, 1))),
    )


def test_params_are_the_inexact_arrays_and_the_rest_stays_static(key):
    class Scaled(eqx.Module):
        linear: eqx.nn.Linear
        counts: jax.Array  # an integer array: not a parameter
        factor: float  # a Python number: static

        def __call__(self, x):
            return self.factor * self.linear(x) + self.counts

    model = Scaled(eqx.nn.Linear(3, 2, key=key), jnp.arange(2), 0.5)
    params, apply = from_equinox(model)
    leaves = jax.tree.leaves(params)
    assert [x.shape for x in leaves] == [(2, 3), (2,)]  # weight and bias only
    x = jnp.ones((4, 3))
    np.testing.assert_allclose(apply(params, x), jax.vmap(model)(x), rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(apply(p, x)))(params)
    np.testing.assert_allclose(g.linear.bias, 0.5 * 4 * jnp.ones(2), rtol=1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("steps", [1, 2])
def test_equinox_mlp_maml_matches_finite_differences(key, steps):
    k1, k2 = jax.random.split(key)
    params, apply = from_equinox(_mlp(k1, sizes=(2, 5, 1)))
    loss_fn, task = mse_loss(apply), _regression_task(k2)
    assert mg.check_meta_grad(maml(steps=steps, lr=0.3), loss_fn, MetaParams(params), task) < 1e-6
    first_order = maml(steps=steps, lr=0.3, first_order=True)
    assert mg.check_meta_grad(first_order, loss_fn, MetaParams(params), task) > 1e-3


@pytest.mark.slow  # about 15 s: second-order MAML through four convolutions, compiled twice
@pytest.mark.usefixtures("x64")
def test_equinox_conv4_maml_matches_finite_differences(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params, apply = from_equinox(EqxConv4(1, 2, hidden=3, key=k1))
    x = jax.random.normal(k2, (6, 7, 7, 1))
    task = Task((x[:2], jnp.arange(2)), (x[2:], jnp.array([0, 1, 1, 0])))
    err = mg.check_meta_grad(
        maml(steps=1, lr=0.4), cross_entropy_loss(apply), MetaParams(params), task,
        num_directions=24, key=k3,
    )  # fmt: skip
    assert err < 1e-6


def _nnx_weights_into_equinox(nnx_params, eqx_model):
    """The Equinox MLP with the NNX MLP's weights (Equinox stores ``(out, in)``, NNX the
    transpose)."""
    layers = [nnx_params[f"hidden_{i}"] for i in range(len(eqx_model.layers) - 1)]
    layers.append(nnx_params["head"])
    return eqx.tree_at(
        lambda m: [leaf for layer in m.layers for leaf in (layer.weight, layer.bias)],
        eqx_model,
        [leaf for p in layers for leaf in (p["kernel"].T, p["bias"])],
    )


@pytest.mark.slow  # about 5 s: two meta-learners compiled
def test_maml_on_sinusoid_equals_the_nnx_mlp_from_the_same_weights(key):
    k_model, k_tasks = jax.random.split(key)
    nnx_params, nnx_apply = mg.nn.functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    eqx_model = _nnx_weights_into_equinox(nnx_params, _mlp(k_model, sizes=(1, 40, 40, 1)))
    eqx_params, eqx_apply = from_equinox(eqx_model)

    def run(apply, params, steps=5):
        learner = mg.meta_learner(mse_loss(apply), maml(steps=1, lr=0.01), optax.adam(1e-2))
        state, losses = learner.init(MetaParams(params)), []
        for k in jax.random.split(k_tasks, steps):
            state, metrics = learner.update(state, sinusoid.sample_batch(k, 4, shots=5, query=5))
            losses.append(float(metrics["meta_loss"]))
        return state.meta_params.params, np.array(losses)

    nnx_final, nnx_losses = run(nnx_apply, nnx_params)
    eqx_final, eqx_losses = run(eqx_apply, eqx_params)
    np.testing.assert_allclose(eqx_losses, nnx_losses, rtol=1e-5)
    assert nnx_losses[-1] < nnx_losses[0]  # it trained: the comparison is not of a constant
    expected = eqx.filter(_nnx_weights_into_equinox(nnx_final, eqx_model), eqx.is_inexact_array)
    for got, want in zip(jax.tree.leaves(eqx_final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_module_with_state_is_refused_in_one_line(key):
    class WithBatchNorm(eqx.Module):
        linear: eqx.nn.Linear
        norm: eqx.nn.BatchNorm

    model = WithBatchNorm(
        eqx.nn.Linear(2, 3, key=key), eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
    )
    refused = r"^from_equinox: WithBatchNorm holds state .*\.norm\."
    with pytest.raises(TypeError, match=refused) as e:
        from_equinox(model)
    assert "\n" not in str(e.value)


@pytest.mark.slow  # a fresh interpreter: about 5 s of imports
def test_importing_metagrad_does_not_import_equinox(subprocess_env):
    code = "import sys, metagrad, metagrad.nn, metagrad.experiment; print('equinox' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_without_equinox_the_error_names_the_pip_command(key, monkeypatch):
    model = _mlp(key)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "equinox" else real(name, *a)
    )
    with pytest.raises(MissingExtraError, match=r"pip install 'metagrad\[equinox\]'") as info:
        from_equinox(model)
    assert "\n" not in str(info.value)
