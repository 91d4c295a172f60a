"""Prototypical Networks and Proto-MAML: logits against numpy, meta-gradients against float64
finite differences, Proto-MAML at zero steps against ProtoNets, and the head-less backbones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metagrad import MetaParams, Task, check_meta_grad, meta_learner
from metagrad import nn as mnn
from metagrad.estimators.protonet import (
    embed,
    evaluate_tasks,
    proto_head,
    protomaml,
    protonet,
    prototypes,
)
from metagrad.inner import adapt


def mlp_embed(params, x):
    return jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])


def mlp_params(key, d_in=3, hidden=5, d_out=4):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, hidden)),
        "w2": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden),
    }


def toy_task(key, ways=3, shots=2, query=2, d=3):
    ks, kq, km = jax.random.split(key, 3)
    means = 2 * jax.random.normal(km, (ways, d))
    ys = jnp.repeat(jnp.arange(ways), shots)
    yq = jnp.repeat(jnp.arange(ways), query)
    xs = means[ys] + jax.random.normal(ks, (ways * shots, d))
    xq = means[yq] + jax.random.normal(kq, (ways * query, d))
    return Task((xs, ys), (xq, yq))


def numpy_logits(zs, ys, zq, ways, distance="euclidean", scale=1.0):
    zs, zq = np.asarray(zs, np.float64), np.asarray(zq, np.float64)
    c = np.stack([zs[np.asarray(ys) == k].mean(0) for k in range(ways)])
    if distance == "euclidean":
        return -scale * ((zq[:, None, :] - c[None]) ** 2).sum(-1)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    return scale * unit(zq) @ unit(c).T


def numpy_ce(logits, y):
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), np.asarray(y)].mean()


@pytest.mark.parametrize(
    "distance, scale", [("euclidean", None), pytest.param("cosine", 7.0, marks=pytest.mark.slow)]
)
def test_protonet_loss_and_accuracy_equal_numpy(key, x64, distance, scale):
    params = mlp_params(key)
    task = toy_task(jax.random.fold_in(key, 1))
    zs, zq = mlp_embed(params, task.support[0]), mlp_embed(params, task.query[0])
    want = numpy_logits(zs, task.support[1], zq, 3, distance, 1.0 if scale is None else scale)
    for ways in (3, None):  # fixed ways, and any number of ways (absent labels masked)
        est = protonet(distance=distance, scale=scale, ways=ways)
        loss, metrics = est.objective(mlp_embed, MetaParams(params), task, 0)
        np.testing.assert_allclose(loss, numpy_ce(want, task.query[1]), rtol=1e-12)
        acc = np.mean(want.argmax(1) == np.asarray(task.query[1]))
        assert float(metrics["acc_post"]) == pytest.approx(acc)


def test_prototypes_are_class_means_and_absent_classes_are_masked(x64):
    z = jnp.arange(12.0).reshape(4, 3)
    c, n = prototypes(z, jnp.array([1, 0, 1, 1]), 3)
    np.testing.assert_array_equal(c[1], z[jnp.array([0, 2, 3])].mean(0))
    np.testing.assert_array_equal(c[0], z[1])
    assert n.tolist() == [1.0, 3.0, 0.0]


@pytest.mark.parametrize("distance", ["euclidean", pytest.param("cosine", marks=pytest.mark.slow)])
def test_protonet_meta_gradient_matches_finite_differences(key, x64, distance):
    params = mlp_params(key)
    task = toy_task(jax.random.fold_in(key, 1))
    err = check_meta_grad(protonet(distance=distance), mlp_embed, MetaParams(params), task)
    assert err < 1e-7


@pytest.mark.slow
def test_protomaml_zero_steps_equals_protonet(key, x64):
    params = mlp_params(key)
    task = toy_task(jax.random.fold_in(key, 1))
    mp = MetaParams(params)
    (l_pm, m_pm), g_pm = protomaml(steps=0, lr=0.1).value_and_grad(mlp_embed, mp, task, 0)
    (l_pn, m_pn), g_pn = protonet().value_and_grad(mlp_embed, mp, task, 0)
    np.testing.assert_allclose(l_pm, l_pn, rtol=1e-12)
    assert float(m_pm["acc_post"]) == float(m_pn["acc_post"])
    for a, b in zip(jax.tree.leaves(g_pm), jax.tree.leaves(g_pn), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # The head's form: 2 c.z - |c|^2 = -|z - c|^2 + |z|^2, a constant per query row.
    zs, zq = mlp_embed(params, task.support[0]), mlp_embed(params, task.query[0])
    head = proto_head(prototypes(zs, task.support[1], 3)[0])
    linear = zq @ head["kernel"] + head["bias"]
    euclid = numpy_logits(zs, task.support[1], zq, 3)
    np.testing.assert_allclose(
        linear - euclid, np.sum(np.asarray(zq) ** 2, 1)[:, None] + 0 * euclid
    )


@pytest.mark.parametrize("head_only_adapt", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_protomaml_meta_gradient_matches_finite_differences(key, x64, head_only_adapt):
    params = mlp_params(key)
    task = toy_task(jax.random.fold_in(key, 1))
    est = protomaml(steps=2, lr=0.3, head_only_adapt=head_only_adapt)
    assert check_meta_grad(est, mlp_embed, MetaParams(params), task) < 1e-6


@pytest.mark.slow
def test_first_order_protomaml_is_the_composition_with_inner_gradients_stopped(key, x64):
    """fo-Proto-MAML's gradient is dL/dphi_T at the adapted parameters, pulled back through the
    prototype-initialised phi_0(theta) only (computed here as that composition)."""
    params = mlp_params(key)
    task = toy_task(jax.random.fold_in(key, 1))
    (_, _), g = protomaml(steps=2, lr=0.3, first_order=True).value_and_grad(
        mlp_embed, MetaParams(params), task, 0
    )

    def phi0(theta):
        zs, ys = embed(mlp_embed, theta, task.support)
        return {"body": theta, "head": proto_head(prototypes(zs, ys, 3)[0])}

    def head_loss(phi, batch):
        z = mlp_embed(phi["body"], batch[0])
        logits = z @ phi["head"]["kernel"] + phi["head"]["bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    start, pull_back = jax.vjp(phi0, params)
    phi_t = adapt(head_loss, start, task.support, steps=2, lr=0.3)
    (want,) = pull_back(jax.grad(head_loss)(phi_t, task.query))
    for a, b in zip(jax.tree.leaves(g.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # ...and it is not the second-order gradient.
    err = check_meta_grad(
        protomaml(steps=2, lr=0.3, first_order=True), mlp_embed, MetaParams(params), task
    )
    assert err > 1e-4


@pytest.mark.slow
def test_support_context_normalises_the_query_with_support_statistics(key, x64):
    """A query batch (x, y, x_support) embeds x after the support rows with stats_rows."""

    def bn_embed(w, x, stats_rows=None):
        h = x @ w
        ref = h if stats_rows is None else h[:stats_rows]
        return (h - ref.mean(0)) / ref.std(0)

    w = jax.random.normal(key, (3, 4))
    task = toy_task(jax.random.fold_in(key, 1))
    (xs, _), (xq, yq) = task.support, task.query
    z, _ = embed(bn_embed, w, (xq, yq, xs))
    h = xq @ w
    np.testing.assert_allclose(z, (h - (xs @ w).mean(0)) / (xs @ w).std(0), rtol=1e-12)
    context = Task(task.support, (xq, yq, xs))
    loss_ctx = protonet().objective(bn_embed, MetaParams(w), context, 0)[0]
    loss_own = protonet().objective(bn_embed, MetaParams(w), task, 0)[0]
    assert not np.isclose(loss_ctx, loss_own)  # the query's own statistics differ


@pytest.mark.slow
def test_meta_learner_trains_protonet_with_any_task_batching(key):
    params = mlp_params(key)
    keys = jax.random.split(jax.random.fold_in(key, 1), 4)
    tasks = jax.vmap(toy_task)(keys)
    state = {}
    for how in ("vmap", "map"):
        learner = meta_learner(mlp_embed, protonet(), optax.adam(0.05), task_batching=how)
        s = learner.init(MetaParams(params))
        first = None
        for _ in range(10):
            s, metrics = learner.update(s, tasks)
            first = metrics["meta_loss"] if first is None else first
        assert float(metrics["meta_loss"]) < float(first)
        state[how] = s
    for a, b in zip(jax.tree.leaves(state["vmap"]), jax.tree.leaves(state["map"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    out = evaluate_tasks(protonet(), mlp_embed, state["map"].meta_params, tasks, batch_size=3)
    loss_0 = protonet().objective(
        mlp_embed, state["map"].meta_params, jax.tree.map(lambda t: t[0], tasks), 0
    )
    np.testing.assert_allclose(out["loss"][0], loss_0[0], rtol=1e-5)
    assert out["acc"].shape == (4,)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="distance must be one of"):
        protonet(distance="l1")
    with pytest.raises(ValueError, match="ways must be a positive int"):
        protonet(ways=0)
    with pytest.raises(ValueError, match="does not meta-learn inner rates"):
        protomaml(steps=1, lr=None)
    with pytest.raises(ValueError, match="steps must be"):
        protomaml(steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="no derivative at a zero gradient"):
        protomaml(steps=1, lr=None, optimizer=optax.adam(1e-2))  # second order through sqrt(0)
    with pytest.raises(TypeError, match="MetaParams"):
        protonet().objective(mlp_embed, {"w": 1}, toy_task(jax.random.key(0)), 0)
    with pytest.raises(ValueError, match="num_classes must be a positive int, or None"):
        mnn.Conv4(1, 0, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------- head-less backbones


def _headless_matches_full(make, x):
    full, body = make(5), make(None)
    assert body.head is None
    p_full, f_full = mnn.functional(full)
    p_body, f_body = mnn.functional(body)
    assert sorted(p_full) == sorted([*p_body, "head"])
    run = jax.jit(lambda pf, pb, x: (f_full(pf, x), f_body(pb, x)))
    logits, z = run(p_full, p_body, x)
    np.testing.assert_allclose(
        logits, z @ p_full["head"]["kernel"] + p_full["head"]["bias"], rtol=1e-5, atol=1e-5
    )
    return z


@pytest.mark.slow
def test_headless_conv4_and_resnet12_return_the_full_models_features(key):
    x = jax.random.normal(key, (3, 16, 16, 1))
    z = _headless_matches_full(lambda n: mnn.Conv4(1, n, hidden=4, rngs=nnx.Rngs(0)), x)
    assert z.shape == (3, 4)
    z = _headless_matches_full(
        lambda n: mnn.Conv4(
            1, n, hidden=2, downsample="maxpool", pool="flatten", image_size=16, rngs=nnx.Rngs(0)
        ),
        x,
    )
    assert z.shape == (3, 2)  # 16 -> 8 -> 4 -> 2 -> 1, flattened
    z = _headless_matches_full(
        lambda n: mnn.ResNet12(1, n, widths=(2, 2, 2, 3), conv_impl="lax", rngs=nnx.Rngs(0)), x
    )
    assert z.shape == (3, 3)


# ---------------------------------------------------------------------- real data: Omniglot


def omniglot_meta_train(omniglot_dir, estimator, wrap, *, steps, num_tasks, train_ways=20):
    """Meta-trains ``estimator`` with a head-less Conv4 on Omniglot through `meta_learner`
    (``train_ways``-way 1-shot, 5 queries per class, 4 tasks a step, Adam 1e-3), then tests it
    on ``num_tasks`` 5-way 1-shot tasks (15 queries) of the meta-test characters. ``wrap``
    turns the embedding's params into the estimator's MetaParams. Returns (mean accuracy, its
    95% half-width, training seconds)."""
    import time

    from metagrad.tasks.omniglot import make_sampler, omniglot_splits

    splits = omniglot_splits(omniglot_dir)
    train = make_sampler(splits["train"], ways=train_ways, shots=1, query=5)
    test = make_sampler(splits["test"], ways=5, shots=1, query=15)
    module = nnx.jit(lambda: mnn.Conv4(1, None, rngs=nnx.Rngs(0)))()
    params, apply = mnn.functional(module)
    learner = meta_learner(apply, estimator, optax.adam(1e-3))
    state = learner.init(wrap(params))
    key = jax.random.key(0)
    start = time.perf_counter()
    for _ in range(steps):
        key, sub = jax.random.split(key)
        state, _ = learner.update(state, train.sample_batch(sub, 4))
    train_s = time.perf_counter() - start
    tasks = test.sample_batch(jax.random.key(2_000_002), num_tasks)
    acc = np.asarray(
        evaluate_tasks(estimator, apply, state.meta_params, tasks, batch_size=50)["acc"]
    )
    return acc.mean(), 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)), train_s


def omniglot_budget(*, opt_in: bool = False) -> tuple[int, int]:
    """(steps, test tasks): short in the slow lane; ``METAGRAD_OMNIGLOT_STEPS`` and
    ``METAGRAD_OMNIGLOT_TASKS`` give the longer runs whose numbers the issue report quotes.
    An ``opt_in`` check (the other heads: the full suite's time is bounded) runs only when
    ``METAGRAD_OMNIGLOT_STEPS`` is set."""
    import os

    if opt_in and "METAGRAD_OMNIGLOT_STEPS" not in os.environ:
        pytest.skip("opt-in Omniglot run: set METAGRAD_OMNIGLOT_STEPS (e.g. 300)")
    return (
        int(os.environ.get("METAGRAD_OMNIGLOT_STEPS", 60)),
        int(os.environ.get("METAGRAD_OMNIGLOT_TASKS", 100)),
    )


@pytest.mark.slow
def test_protonet_learns_omniglot_5way_1shot(omniglot_dir):
    """ProtoNets, trained at 20 ways (Snell et al. train at 60), tested at 5-way 1-shot:
    ``METAGRAD_OMNIGLOT_STEPS=300 METAGRAD_OMNIGLOT_TASKS=600 pytest -s -m slow
    tests/test_protonet.py -k omniglot``."""
    steps, num_tasks = omniglot_budget()
    acc, ci, secs = omniglot_meta_train(
        omniglot_dir, protonet(), MetaParams, steps=steps, num_tasks=num_tasks
    )
    print(
        f"\nProtoNets Conv4, 20-way 1-shot training, {steps} steps x 4 tasks ({secs:.0f} s); "
        f"Omniglot test 5-way 1-shot, {num_tasks} tasks: {100 * acc:.2f} +- {100 * ci:.2f} %"
    )
    assert acc > 0.6  # chance is 0.2; 82% after the default 60 steps, 94.7% after 300
