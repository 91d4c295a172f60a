"""Fine-tuning baselines: the fitted head is at the optimum of its objective, the cosine head and
the pre-training loss equal numpy, the supervised batches carry the right global labels."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metagrad import MetaParams, Task
from metagrad.estimators.finetune import (
    classifier_logits,
    finetune,
    fit_logistic_head,
    init_classifier,
    pretrain_loss,
    pretrain_step,
    probe,
    supervised_batch,
)
from metagrad.estimators.protonet import evaluate_tasks


def clusters(key, ways=3, per_class=3, d=4, spread=1.0):
    km, kx = jax.random.split(key)
    means = 2 * jax.random.normal(km, (ways, d))
    y = jnp.repeat(jnp.arange(ways), per_class)
    return means[y] + spread * jax.random.normal(kx, (ways * per_class, d)), y


def head_objective(head, z, y, l2, cosine=False, scale=None, num_classes=3):
    logits = classifier_logits(head, z, cosine=cosine, scale=scale)
    present = jnp.sum(jax.nn.one_hot(y, num_classes), 0) > 0
    logits = jnp.where(present, logits, -jnp.inf)
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return ce + 0.5 * l2 * jnp.sum(head["kernel"] ** 2)


@pytest.mark.slow  # the doctests of fit_logistic_head and probe run in the quick lane
@pytest.mark.parametrize("num_classes", [3, 9])  # 9: six absent classes, masked
def test_fitted_logistic_head_is_at_the_optimum(key, x64, num_classes):
    z, y = clusters(key)
    fit = jax.jit(partial(fit_logistic_head, l2=0.1, iters=100), static_argnums=2)
    head = fit(z, y, num_classes)
    grads = jax.grad(head_objective)(head, z, y, 0.1, num_classes=num_classes)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) < 1e-7
    np.testing.assert_array_equal(head["kernel"][:, 3:], 0)  # absent classes untouched
    # The optimum is a minimum: a perturbation raises the objective.
    value = head_objective(head, z, y, 0.1, num_classes=num_classes)
    bumped = jax.tree.map(lambda a: a + 1e-3, head)
    assert head_objective(bumped, z, y, 0.1, num_classes=num_classes) > value


@pytest.mark.slow
def test_cosine_head_equals_numpy_and_its_fit_is_stationary(key, x64):
    z, y = clusters(key)
    head = init_classifier(jax.random.fold_in(key, 1), 4, 3, cosine=True)
    got = classifier_logits(head, z, cosine=True, scale=5.0)
    w, zz = np.asarray(head["kernel"]), np.asarray(z)
    want = (
        5.0
        * (zz / np.linalg.norm(zz, axis=1, keepdims=True))
        @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert set(head) == {"kernel"}  # Baseline++'s classifier has no bias
    fit = jax.jit(partial(fit_logistic_head, l2=0.1, iters=200, cosine=True), static_argnums=2)
    fitted = fit(z, y, 3)
    g = jax.grad(head_objective)(fitted, z, y, 0.0, cosine=True)  # no L2 on a cosine head
    assert float(jnp.max(jnp.abs(g["kernel"]))) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("cosine", [False, True])
def test_finetune_estimator_gradient_is_pretrainings_by_finite_differences(key, x64, cosine):
    """``finetune().value_and_grad`` is the gradient of the pre-training loss (central
    differences along random directions, float64), and its ``objective`` is the probe of the
    backbone alone."""
    x, y = clusters(key, ways=5, per_class=2)
    params = {
        "backbone": jax.random.normal(jax.random.fold_in(key, 1), (4, 3)),
        "classifier": init_classifier(jax.random.fold_in(key, 2), 3, 5, cosine=cosine),
    }
    embed_fn = lambda w, x: jnp.tanh(x @ w)
    est = finetune(cosine=cosine)
    batch = Task((x, y), (x, y))
    (loss, _), grad = est.value_and_grad(embed_fn, MetaParams(params), batch, 0)
    loss_fn = pretrain_loss(embed_fn, cosine=cosine)
    np.testing.assert_allclose(loss, loss_fn(params, (x, y)), rtol=1e-12)
    flat, unravel = ravel_pytree(params)
    g = ravel_pytree(grad.params)[0]
    eps = 1e-6
    for i in range(4):
        d = jax.random.normal(jax.random.fold_in(key, 10 + i), flat.shape)
        plus = loss_fn(unravel(flat + eps * d), (x, y))
        minus = loss_fn(unravel(flat - eps * d), (x, y))
        np.testing.assert_allclose((plus - minus) / (2 * eps), g @ d, rtol=1e-6, atol=1e-9)
    task = Task((x[::2], y[::2]), (x[1::2], y[1::2]))
    got = est.objective(embed_fn, MetaParams(params), task, 0)[0]
    want = probe(cosine=cosine)(embed_fn, MetaParams(params["backbone"]), task, 0)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.slow
def test_pretrain_loss_and_step_equal_a_direct_computation(key, x64):
    x, y = clusters(key, ways=5, per_class=2)
    params = {
        "backbone": jax.random.normal(jax.random.fold_in(key, 1), (4, 3)),
        "classifier": init_classifier(jax.random.fold_in(key, 2), 3, 5),
    }
    embed_fn = lambda w, x: jnp.tanh(x @ w)
    loss_fn = pretrain_loss(embed_fn)
    z = np.tanh(np.asarray(x) @ np.asarray(params["backbone"]))
    logits = z @ np.asarray(params["classifier"]["kernel"]) + np.asarray(
        params["classifier"]["bias"]
    )
    logits -= logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = -logp[np.arange(10), np.asarray(y)].mean()
    np.testing.assert_allclose(loss_fn(params, (x, y)), want, rtol=1e-12)
    opt = optax.sgd(0.5)
    step = pretrain_step(loss_fn, opt)
    new, _, loss = step(params, opt.init(params), (x, y))
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    grads = jax.grad(loss_fn)(params, (x, y))
    for a, b, g in zip(
        jax.tree.leaves(new), jax.tree.leaves(params), jax.tree.leaves(grads), strict=True
    ):
        np.testing.assert_allclose(a, b - 0.5 * g, rtol=1e-12)


@pytest.mark.slow
def test_supervised_batch_labels_name_the_class_and_rotation(key):
    base = jax.random.randint(key, (6, 1, 8, 8), 0, 256).astype(jnp.uint8)
    images = jnp.repeat(base, 5, axis=1)  # every drawing of a class is the class's pattern
    sample = jax.jit(supervised_batch, static_argnums=2, static_argnames="rotations")
    x, y = sample(images, jax.random.fold_in(key, 1), 64, rotations=True)
    assert x.shape == (64, 8, 8, 1) and bool((y < 24).all())
    for xi, yi in zip(np.asarray(x), np.asarray(y), strict=True):
        want = np.rot90(np.asarray(base[yi // 4, 0]), yi % 4) / 255.0
        np.testing.assert_allclose(xi[..., 0], want, rtol=1e-6)
    assert len(set(np.asarray(y).tolist())) > 12  # many classes and rotations drawn
    x, y = sample(jnp.zeros((3, 4, 5, 5, 3)), key, 7)  # RGB, no rotations
    assert x.shape == (7, 5, 5, 3) and bool((y < 3).all())
    with pytest.raises(ValueError, match="images must be"):
        supervised_batch(jnp.zeros((3, 4, 5)), key, 2)


@pytest.mark.slow
def test_probe_returns_query_accuracy_of_the_fitted_head(key, x64):
    embed_fn = lambda w, x: x @ w
    keys = jax.random.split(key, 4)

    def task(k):
        x, y = clusters(k, ways=3, per_class=4, spread=0.3)
        return Task((x[::2], y[::2]), (x[1::2], y[1::2]))

    tasks = jax.vmap(task)(keys)
    mp = MetaParams(jnp.eye(4))
    out = evaluate_tasks(probe(l2=0.1), embed_fn, mp, tasks)
    for i in range(4):
        t = jax.tree.map(lambda a, i=i: a[i], tasks)
        head = fit_logistic_head(t.support[0], t.support[1], 6, l2=0.1)
        acc = np.mean(
            np.asarray(classifier_logits(head, t.query[0])[:, :3].argmax(1)) == t.query[1]
        )
        assert float(out["acc"][i]) == pytest.approx(acc)
    assert float(out["acc"].mean()) > 0.8  # well-separated clusters
    # The backbone is frozen: no gradient flows through the probe.
    g = jax.grad(
        lambda w: probe()(embed_fn, MetaParams(w), jax.tree.map(lambda a: a[0], tasks), 0)[0]
    )(jnp.eye(4))
    np.testing.assert_array_equal(g, 0)


@pytest.mark.slow
def test_finetune_baseline_on_omniglot(omniglot_dir):
    """The fine-tuning baseline end to end: a head-less Conv4 and a linear classifier over all
    4 x 1100 training classes pre-trained on (image, global label) batches of 256, then a
    logistic-regression probe (RFS-style unit-length features) on 5-way 1-shot test tasks:
    ``METAGRAD_OMNIGLOT_STEPS=300 METAGRAD_OMNIGLOT_TASKS=600 pytest -s -m slow
    tests/test_finetune.py -k omniglot``."""
    import time

    from flax import nnx
    from test_protonet import omniglot_budget

    from metagrad import nn as mnn
    from metagrad.tasks.omniglot import make_sampler, omniglot_splits

    steps, num_tasks = omniglot_budget(opt_in=True)
    splits = omniglot_splits(omniglot_dir)
    images = jnp.asarray(splits["train"])
    num_classes = 4 * images.shape[0]
    body, apply = mnn.functional(nnx.jit(lambda: mnn.Conv4(1, None, rngs=nnx.Rngs(0)))())
    params = {
        "backbone": body,
        "classifier": init_classifier(jax.random.key(1), 64, num_classes),
    }
    opt = optax.adam(1e-3)
    step, state = pretrain_step(pretrain_loss(apply), opt), opt.init(params)
    sample = jax.jit(supervised_batch, static_argnums=2, static_argnames="rotations")
    key = jax.random.key(0)
    start = time.perf_counter()
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, state, loss = step(params, state, sample(images, sub, 256, rotations=True))
    secs = time.perf_counter() - start
    tasks = make_sampler(splits["test"], ways=5, shots=1, query=15).sample_batch(
        jax.random.key(2_000_002), num_tasks
    )
    out = evaluate_tasks(probe(normalize=True), apply, MetaParams(params["backbone"]), tasks)
    acc = np.asarray(out["acc"])
    ci = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc))
    print(
        f"\nfine-tuning baseline Conv4, pre-trained {steps} steps x 256 images over "
        f"{num_classes} classes ({secs:.0f} s, last loss {float(loss):.3f}); probe on Omniglot "
        f"test 5-way 1-shot, {num_tasks} tasks: {100 * acc.mean():.2f} +- {100 * ci:.2f} %"
    )
    assert acc.mean() > 0.5  # chance is 0.2; 68% after 300 steps (far from converged)
