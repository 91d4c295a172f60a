"""Closed-form and convex heads: R2D2 against numpy's least squares, the SVM dual against its KKT
conditions, implicit gradients against float64 finite differences of the solution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad import MetaParams, Task, check_meta_grad
from metagrad.estimators.heads import (
    kkt_residual,
    project_rows,
    r2d2,
    r2d2_head,
    ridge_solve,
    svm,
    svm_dual,
    svm_head,
    with_ones,
)


def embed_fn(w, x):
    return jnp.tanh(x @ w)


def toy_task(key, ways=3, shots=2, query=2, d=3):
    ks, kq, km = jax.random.split(key, 3)
    means = 1.5 * jax.random.normal(km, (ways, d))
    ys = jnp.repeat(jnp.arange(ways), shots)
    yq = jnp.repeat(jnp.arange(ways), query)
    xs = means[ys] + jax.random.normal(ks, (ways * shots, d))
    xq = means[yq] + jax.random.normal(kq, (ways * query, d))
    return Task((xs, ys), (xq, yq))


def numpy_ce(logits, y):
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), np.asarray(y)].mean()


# ----------------------------------------------------------------------------------- R2D2


@pytest.mark.parametrize(
    "d", [4, pytest.param(12, marks=pytest.mark.slow)]
)  # fewer and more features than support rows
def test_ridge_woodbury_equals_lstsq_on_the_augmented_system(key, x64, d):
    n, k, lam = 6, 3, 0.7
    x = with_ones(jax.random.normal(key, (n, d)))
    y = np.eye(k)[np.arange(n) % k]
    w = ridge_solve(x, jnp.asarray(y), lam)
    # min |XW - Y|^2 + lam |W|^2 is least squares on [X; sqrt(lam) I] W = [Y; 0].
    a = np.vstack([np.asarray(x), np.sqrt(lam) * np.eye(d + 1)])
    b = np.vstack([y, np.zeros((d + 1, k))])
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(w, want, atol=1e-8, rtol=0)


@pytest.mark.slow
def test_r2d2_loss_equals_numpy(key, x64):
    w = jax.random.normal(key, (3, 4))
    task = toy_task(jax.random.fold_in(key, 1))
    head = {"scale": jnp.array(3.0), "bias": jnp.array(0.2), "log_lambda": jnp.log(0.5)}
    loss, metrics = r2d2().objective(embed_fn, MetaParams({"backbone": w, "head": head}), task, 0)
    zs = np.hstack([np.tanh(task.support[0] @ w), np.ones((6, 1))])
    zq = np.hstack([np.tanh(task.query[0] @ w), np.ones((6, 1))])
    y = np.eye(3)[np.asarray(task.support[1])]
    a = np.vstack([zs, np.sqrt(0.5) * np.eye(5)])
    ridge = np.linalg.lstsq(a, np.vstack([y, np.zeros((5, 3))]), rcond=None)[0]
    logits = 3.0 * zq @ ridge + 0.2
    np.testing.assert_allclose(loss, numpy_ce(logits, task.query[1]), rtol=1e-10)
    want_acc = np.mean(logits.argmax(1) == np.asarray(task.query[1]))
    assert float(metrics["acc_post"]) == pytest.approx(want_acc)
    # Fixed lambda, and any number of ways, give the same loss.
    fixed = {"backbone": w, "head": {"scale": head["scale"], "bias": head["bias"]}}
    loss_fixed = r2d2(lam=0.5, ways=3).objective(embed_fn, MetaParams(fixed), task, 0)[0]
    np.testing.assert_allclose(loss_fixed, loss, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("lam", [None, 2.0])
def test_r2d2_meta_gradient_matches_finite_differences(key, x64, lam):
    w = jax.random.normal(key, (3, 4))
    task = toy_task(jax.random.fold_in(key, 1))
    head = r2d2_head(scale=2.0, bias=0.1, lam=0.5 if lam is None else None)
    mp = MetaParams({"backbone": w, "head": head})
    assert check_meta_grad(r2d2(lam=lam), embed_fn, mp, task) < 1e-7


def test_r2d2_refuses_inconsistent_lambda_and_params():
    task = toy_task(jax.random.key(0))
    mp = MetaParams({"backbone": jnp.ones((3, 2)), "head": r2d2_head()})
    with pytest.raises(ValueError, match="lambda is either learned"):
        r2d2(lam=1.0).objective(embed_fn, mp, task, 0)
    with pytest.raises(ValueError, match=r"needs MetaParams\(\{'backbone'"):
        r2d2().objective(embed_fn, MetaParams(jnp.ones((3, 2))), task, 0)
    with pytest.raises(ValueError, match="lam must be positive"):
        r2d2(lam=0.0)


# ------------------------------------------------------------------------------------ SVM


@pytest.mark.slow
def test_projection_is_the_nearest_feasible_point(key, x64):
    """Against a brute-force check: feasible, and no feasible direction improves the distance
    (the projection's optimality conditions), for random rows and bounds."""
    v = 2 * jax.random.normal(key, (50, 4))
    labels = jnp.arange(50) % 3  # class 3 absent
    upper = 0.3 * jax.nn.one_hot(labels, 4)
    present = jnp.array([True, True, True, False])
    a = project_rows(v, upper, present)
    assert np.all(np.asarray(a) <= np.asarray(upper) + 1e-12)
    np.testing.assert_allclose(a.sum(1), 0, atol=1e-12)
    np.testing.assert_array_equal(a[:, 3], 0)
    # KKT of min |a - v|^2/2: a - v = -tau on free coordinates, a - v <= -tau at the bound.
    g = np.asarray(a - v)[:, :3]
    free = np.asarray(a)[:, :3] < np.asarray(upper)[:, :3] - 1e-12
    assert free.any(1).all()
    top = np.where(free, g, -np.inf).max(1, keepdims=True)
    np.testing.assert_allclose(np.where(free, g, top), np.broadcast_to(top, g.shape), atol=1e-12)
    assert np.all(g <= top + 1e-12)


@pytest.mark.parametrize("c, ways", [pytest.param(0.1, 3, marks=pytest.mark.slow), (1.0, None)])
def test_svm_dual_satisfies_kkt(key, x64, c, ways):
    task = toy_task(key, ways=3, shots=3, d=5)
    x = embed_fn(jax.random.normal(jax.random.fold_in(key, 1), (5, 6)), task.support[0])
    k = 9 if ways is None else ways
    a = svm_dual(x, task.support[1], k, c=c, iters=500)
    res = kkt_residual(x, task.support[1], a, k, c=c)
    assert max(res.values()) < 1e-5, res
    assert np.abs(np.asarray(a)).max() > 1e-3  # not the trivial point


@pytest.mark.slow
def test_svm_implicit_gradient_matches_finite_differences_of_the_solution(key, x64):
    task = toy_task(key, ways=3, shots=2, d=4)
    x = embed_fn(jax.random.normal(jax.random.fold_in(key, 1), (4, 5)), task.support[0])
    y = task.support[1]
    weights = jax.random.normal(jax.random.fold_in(key, 2), (6, 3))
    solution = jax.jit(lambda x: svm_dual(x, y, 3, c=0.5, iters=3000))
    f = lambda x: jnp.sum(weights * solution(x))
    g = jax.grad(f)(x)
    eps = 1e-6
    for i in range(4):
        v = jax.random.normal(jax.random.fold_in(key, 10 + i), x.shape)
        fd = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
        assert abs(float(jnp.vdot(g, v)) - float(fd)) <= 1e-4 * max(abs(float(fd)), 1e-3)


@pytest.mark.slow
def test_svm_any_ways_equals_fixed_ways_and_gradient_checks(key, x64):
    w = jax.random.normal(key, (3, 4))
    task = toy_task(jax.random.fold_in(key, 1))
    mp = MetaParams({"backbone": w, "head": svm_head(scale=3.0)})
    loss3 = svm(ways=3, iters=1000).objective(embed_fn, mp, task, 0)[0]
    loss_any = svm(iters=1000).objective(embed_fn, mp, task, 0)[0]
    np.testing.assert_allclose(loss_any, loss3, rtol=1e-8)
    assert check_meta_grad(svm(ways=3, iters=1000), embed_fn, mp, task) < 1e-5


def test_svm_bad_arguments():
    with pytest.raises(ValueError, match="c > 0"):
        svm(c=0.0)
    with pytest.raises(ValueError, match="iters must be"):
        svm(iters=0)
    mp = MetaParams({"backbone": jnp.ones((3, 2)), "head": r2d2_head()})
    with pytest.raises(ValueError, match="unknown head parameters"):
        svm().objective(embed_fn, mp, toy_task(jax.random.key(0)), 0)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["r2d2", "svm"])
def test_head_learns_omniglot_5way_1shot(omniglot_dir, algo):
    """R2D2 and MetaOptNet-SVM with a head-less Conv4 on Omniglot, as ProtoNets in
    tests/test_protonet.py (20-way training, 5-way 1-shot test): ``METAGRAD_OMNIGLOT_STEPS=300
    METAGRAD_OMNIGLOT_TASKS=600 pytest -s -m slow tests/test_heads.py -k omniglot``."""
    from test_protonet import omniglot_budget, omniglot_meta_train

    steps, num_tasks = omniglot_budget(opt_in=True)
    estimator, head = (r2d2(), r2d2_head(scale=10.0)) if algo == "r2d2" else (svm(), svm_head())
    acc, ci, secs = omniglot_meta_train(
        omniglot_dir,
        estimator,
        lambda params: MetaParams({"backbone": params, "head": head}),
        steps=steps,
        num_tasks=num_tasks,
    )
    print(
        f"\n{algo} Conv4, 20-way 1-shot training, {steps} steps x 4 tasks ({secs:.0f} s); "
        f"Omniglot test 5-way 1-shot, {num_tasks} tasks: {100 * acc:.2f} +- {100 * ci:.2f} %"
    )
    assert acc > 0.7  # chance is 0.2; after 300 steps: R2D2 93.4%, SVM 87.8%
