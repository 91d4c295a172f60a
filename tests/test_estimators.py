"""The estimators package: the registry, typed meta-parameters, refused conflicts, the inner
loop each estimator owns (evaluation adapts exactly as training does), and the three faults an
independent check found (support batch norm, MAML++ weight precision, optax.adam's eps_root)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import metagrad as mg
from metagrad import MetaParams, Task
from metagrad.estimators import ESTIMATORS, make_estimator, msl_weights
from metagrad.experiment.evaluation import make_curve_fn
from metagrad.nn import MLP, Conv4, MetaBatchNorm, cross_entropy_loss, functional, mse_loss
from metagrad.nn.losses import with_support_context
from metagrad.tasks import sinusoid

CONF = Path(__file__).resolve().parents[1] / "conf"


def _sinusoid_setup(key, hidden=(8,), num_tasks=4):
    params, apply = functional(MLP(1, hidden, 1, rngs=nnx.Rngs(params=key)))
    tasks = sinusoid.sample_batch_flat(jax.random.fold_in(key, 1), num_tasks, shots=5, query=7)
    return params, mse_loss(apply), tasks


def test_one_registry_holds_every_cli_algorithm():
    cli_algos = {p.stem for p in (CONF / "algo").glob("*.yaml")}
    assert cli_algos == set(ESTIMATORS)
    assert make_estimator("anil", steps=1, lr=0.1).name == "anil"
    assert make_estimator("metasgd", steps=1).inner.learns_lr
    with pytest.raises(ValueError, match="unknown meta-gradient estimator 'nope'"):
        make_estimator("nope", steps=1)


# Each algorithm as the CLI builds it: (name, kwargs, learned rates as (per_element, steps)).
ALGOS = [
    ("maml", dict(steps=2, lr=0.05), None),
    ("fomaml", dict(steps=2, lr=0.05), None),
    ("anil", dict(steps=2, lr=0.05), None),
    ("metasgd", dict(steps=2), (True, None)),
    ("mamlpp", dict(steps=3, per_step=True, anneal_steps=10), (False, 3)),
    ("reptile", dict(steps=2, lr=0.05), None),
    ("imaml", dict(steps=3, lr=0.05, reg=2.0), None),
]


@pytest.mark.parametrize("name,kwargs,rates", ALGOS, ids=[a[0] for a in ALGOS])
def test_evaluation_curve_at_training_steps_equals_training_objective(key, name, kwargs, rates):
    params, loss_fn, tasks = _sinusoid_setup(key)
    est = make_estimator(name, **kwargs)
    lr = None
    if rates is not None:
        lr = mg.learned_rates(params, 0.05, per_element=rates[0], steps=rates[1])
        # Distinct rates per step and entry, so a mis-indexed rate would show.
        lr = jax.tree.map(lambda a: a * (1 + jnp.arange(a.size).reshape(a.shape) / 10), lr)
    mp = MetaParams(params, lr)
    _, metrics = jax.vmap(lambda t: est.objective(loss_fn, mp, t, 0))(tasks)
    steps = est.inner.steps
    curves = make_curve_fn(est, loss_fn, None, steps=steps + 2, batch_size=2)(mp, tasks)
    np.testing.assert_allclose(curves["loss"][:, steps], metrics["loss_post"], rtol=1e-5)
    np.testing.assert_allclose(curves["loss"][:, 0], metrics["loss_pre"], rtol=1e-6)


def test_meta_params_must_be_typed(key):
    params, loss_fn, _ = _sinusoid_setup(key)
    learner = mg.meta_learner(loss_fn, mg.maml(steps=1, lr=0.1), optax.sgd(0.1))
    bare = r"must be metagrad.MetaParams.*got a dict with keys \[.head., .hidden_0.\]"
    with pytest.raises(TypeError, match=bare):
        learner.init(params)  # the model's bare params dict
    with pytest.raises(TypeError, match=r"keys \['lr', 'params'\]"):
        learner.init({"params": params, "lr": 0.1})
    with pytest.raises(TypeError, match="got a ndarray|got a ArrayImpl|got a Array"):
        learner.init(jnp.zeros(3))
    assert int(learner.init(MetaParams(params)).step) == 0


def test_learned_rates_with_an_inner_optimizer_is_an_error_not_a_zero_gradient(key):
    params, loss_fn, _ = _sinusoid_setup(key)
    est = mg.maml(steps=1, optimizer=optax.sgd(0.1))
    learner = mg.meta_learner(loss_fn, est, optax.sgd(0.1))
    with pytest.raises(ValueError, match="learned rates would get no gradient"):
        learner.init(MetaParams(params, mg.learned_rates(params, 0.1)))


def test_conflicting_settings_are_refused():
    with pytest.raises(ValueError, match="either lr .* or optimizer, not both"):
        mg.maml(steps=1, lr=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="learns its inner rates"):
        mg.metasgd(steps=1, lr=0.1)
    with pytest.raises(ValueError, match="first-order by definition"):
        mg.fomaml(steps=1, lr=0.1, first_order=False)
    with pytest.raises(ValueError, match="does not meta-learn inner rates"):
        mg.reptile(steps=1)
    with pytest.raises(ValueError, match="does not meta-learn inner rates"):
        mg.imaml(steps=1)
    params = jnp.zeros(2)
    learned = MetaParams(params, mg.learned_rates(params, 0.1))
    # An explicit lr=0.0 is not silently replaced by the learned rates, nor the reverse.
    with pytest.raises(ValueError, match=r"built with lr=0.0 and meta_params.lr"):
        mg.maml(steps=1, lr=0.0).check(learned)
    with pytest.raises(ValueError, match="learns its inner rates"):
        mg.maml(steps=1).check(MetaParams(params))


@pytest.mark.slow
def test_support_batch_norm_policy_normalises_queries_with_support_statistics(key):
    """Against a hand computation: one MetaBatchNorm(policy="support") and a linear head."""

    class BNHead(nnx.Module):
        def __init__(self, rngs):
            self.norm = MetaBatchNorm(3, policy="support")
            self.head = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, x, stats_rows=None):
            return self.head(self.norm(x, stats_rows=stats_rows))

    params, apply = functional(BNHead(nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), params)
    k1, k2 = jax.random.split(key)
    xs, xq = jax.random.normal(k1, (5, 3)) * 2 + 1, jax.random.normal(k2, (6, 3)) - 3
    ys, yq = jnp.arange(5) % 4, jnp.arange(6) % 4
    task = with_support_context(Task((xs, ys), (xq, yq)))
    loss = cross_entropy_loss(apply)(params, task.query)

    xs64, xq64 = np.asarray(xs, np.float64), np.asarray(xq, np.float64)
    mu, var = xs64.mean(0), xs64.var(0)  # support rows only
    norm = params["norm"]
    h = (xq64 - mu) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"]) + np.asarray(norm["bias"])
    logits = h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[np.arange(6), np.asarray(yq)].mean()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # The transductive loss (query statistics) is a different number.
    assert abs(float(cross_entropy_loss(apply)(params, (xq, yq))) - expected) > 1e-3


@pytest.mark.slow
def test_conv4_support_policy_is_not_transductive(key):
    """Each query image's prediction depends on the support set, never on the other queries."""
    params, apply = functional(Conv4(1, 3, hidden=4, bn_policy="support", rngs=nnx.Rngs(0)))
    k1, k2 = jax.random.split(key)
    xs, xq = jax.random.normal(k1, (3, 16, 16, 1)), jax.random.normal(k2, (4, 16, 16, 1))
    yq = jnp.arange(4) % 3
    loss = jax.jit(cross_entropy_loss(apply))  # one compilation per shape, not one per op
    whole = jax.jit(jax.vmap(lambda x, y: loss(params, (x[None], y[None], xs))))(xq, yq)
    together = loss(params, (xq, yq, xs))
    np.testing.assert_allclose(float(together), float(whole.mean()), rtol=1e-5)
    assert abs(float(loss(params, (xq, yq))) - float(together)) > 1e-4


@pytest.mark.slow
def test_mamlpp_weights_follow_the_parameters_precision(key):
    with jax.enable_x64(True):
        w = msl_weights(3, steps=4, anneal_steps=7, dtype=jnp.float64)
        assert w.dtype == jnp.float64
        n, progress = 4, 3 / 7
        expected = [max(1 / n - progress / n, 0.03 / n)] * 3
        expected.append(min(1 / n + progress * (n - 1) / n, 1 - (n - 1) * 0.03 / n))
        np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-15, atol=0)
        # The objective in float64 is the float64-weighted multi-step loss, to 1e-14.
        params, loss_fn, tasks = _sinusoid_setup(key, num_tasks=1)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        task = jax.tree.map(lambda x: x[0].astype(jnp.float64), tasks)
        est = mg.mamlpp(steps=4, lr=0.05, anneal_steps=7)
        loss, _ = est.objective(loss_fn, MetaParams(params), task, 3)
        _, traj = est.adapt(loss_fn, MetaParams(params), task.support, return_trajectory=True)
        per_step = [loss_fn(jax.tree.map(lambda t, i=i: t[i], traj), task.query) for i in range(4)]
        np.testing.assert_allclose(float(loss), float(np.dot(expected, per_step)), rtol=1e-14)


@pytest.mark.slow
def test_adam_without_eps_root_is_refused_and_with_it_is_finite(key):
    # Why: d(adam update)/d(gradient) at a zero gradient is NaN (sqrt(v) at v = 0).
    adam = optax.adam(0.1)
    p = jnp.ones(2)
    d_update = jax.jacfwd(lambda g: adam.update(g, adam.init(p), p)[0])(jnp.zeros(2))
    assert np.isnan(np.asarray(d_update)).any()
    with pytest.raises(ValueError, match="eps_root=1e-8"):
        mg.maml(steps=1, optimizer=adam)
    with pytest.raises(ValueError, match="no derivative at a zero gradient"):
        mg.adapt(lambda w, b: jnp.sum(w * b), p, p, steps=1, optimizer=adam)
    mg.maml(steps=1, optimizer=adam, first_order=True)  # not differentiated through: fine
    # With eps_root > 0, a model whose support gradient has exact zeros (a dead ReLU unit)
    # gets a finite meta-gradient that matches finite differences.
    safe = mg.maml(steps=2, optimizer=optax.adam(0.05, eps_root=1e-8))
    relu = lambda w, b: jnp.mean((jax.nn.relu(b[0] @ w) - b[1]) ** 2)
    x = jax.random.normal(key, (6, 3))
    w = jnp.array([[0.5, -1.0], [0.3, -1.0], [-0.2, -1.0]])  # the second unit is dead on x > 0
    x = jnp.abs(x)
    task = Task((x, jnp.ones((6, 2))), (x + 0.1, jnp.ones((6, 2))))
    _, g = safe.value_and_grad(relu, MetaParams(w), task, 0)
    assert np.isfinite(np.asarray(g.params)).all()
    assert mg.check_meta_grad(safe, relu, MetaParams(w), task, eps=1e-6) < 1e-5
