"""The meta-learning engine against closed forms, float64 finite differences and compositions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import metagrad as mg
import metagrad.nn
from metagrad import MetaParams, Task
from metagrad.estimators import make_estimator, maml, mamlpp, msl_weights
from metagrad.outer import batch_value_and_grad

# Every oracle here (closed forms at rtol 1e-10, float64 finite differences) needs float64.
pytestmark = pytest.mark.usefixtures("x64")

# --- linear regression: every MAML variant has a closed form -------------------------------------


def lstsq(w, batch):
    X, y = batch
    return jnp.mean((X @ w - y) ** 2)


def _quad_terms(batch):
    X, y = batch
    n = X.shape[0]
    return 2 / n * X.T @ X, 2 / n * X.T @ y  # grad = A w - b, Hessian = A


def linear_task(key, n=6, d=3):
    ks = jax.random.split(key, 4)
    Xs, Xq = jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (n, d))
    w_true = jax.random.normal(ks[2], (d,))
    return Task((Xs, Xs @ w_true + 0.1 * jax.random.normal(ks[3], (n,))), (Xq, Xq @ w_true))


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_maml_closed_form_on_linear_regression(key, steps):
    task = linear_task(key)
    w0, lr = jnp.array([0.3, -0.2, 0.5]), 0.05
    A_s, b_s = _quad_terms(task.support)
    A_q, b_q = _quad_terms(task.query)
    M = jnp.eye(3) - lr * A_s
    w = w0
    for _ in range(steps):
        w = M @ w + lr * b_s
    expected_maml = jnp.linalg.matrix_power(M, steps).T @ (A_q @ w - b_q)
    expected_fomaml = A_q @ w - b_q
    g = jax.grad(lambda p: mg.meta_loss(lstsq, p, task.support, task.query, steps=steps, lr=lr))(w0)
    np.testing.assert_allclose(g, expected_maml, rtol=1e-10)
    g_fo = jax.grad(
        lambda p: mg.meta_loss(
            lstsq, p, task.support, task.query, steps=steps, lr=lr, first_order=True
        )
    )(w0)
    np.testing.assert_allclose(g_fo, expected_fomaml, rtol=1e-10)
    assert np.linalg.norm(g - g_fo) > 1e-3 * np.linalg.norm(g)  # the Hessian term matters here


def test_meta_loss_equals_tutorial_meta_loss_fn(key):
    task = linear_task(key)
    lr = 0.1

    def meta_loss_fn(params, data):  # the JAX tutorial's five lines
        grads = jax.grad(lstsq)(params, data)
        return lstsq(params - lr * grads, data)

    w = jnp.array([0.1, 0.2, -0.3])
    ours = lambda p: mg.meta_loss(lstsq, p, task.support, task.support, steps=1, lr=lr)
    np.testing.assert_allclose(ours(w), meta_loss_fn(w, task.support), rtol=1e-14)
    np.testing.assert_allclose(
        jax.grad(ours)(w), jax.grad(meta_loss_fn)(w, task.support), rtol=1e-12
    )


# --- a small MLP: finite differences -------------------------------------------------------------


def mlp_apply(p, x, step=None):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


mlp_loss = mg.nn.mse_loss(mlp_apply)


def mlp_params(key, d=2, h=5):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d, h)),
        "b1": jnp.zeros(h),
        "w2": jax.random.normal(k2, (h, 1)) / 2,
        "b2": jnp.zeros(1),
    }


def mlp_task(key, n=5, d=2):
    ks = jax.random.split(key, 4)
    return Task(
        (jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (n, 1))),
        (jax.random.normal(ks[2], (n, d)), jax.random.normal(ks[3], (n, 1))),
    )


@pytest.mark.parametrize(
    "steps", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)]
)
def test_maml_matches_finite_differences_on_mlp(key, steps):
    k1, k2 = jax.random.split(key)
    meta_params, task = MetaParams(mlp_params(k1)), mlp_task(k2)
    err = mg.check_meta_grad(maml(steps=steps, lr=0.3), mlp_loss, meta_params, task)
    assert err < 1e-6
    err_fo = mg.check_meta_grad(
        maml(steps=steps, lr=0.3, first_order=True), mlp_loss, meta_params, task
    )
    assert err_fo > 1e-3  # check_meta_grad exposes a first-order meta-gradient


@pytest.mark.slow
def test_learned_rates_metasgd_and_per_step_match_finite_differences(key):
    k1, k2 = jax.random.split(key)
    params, task = mlp_params(k1), mlp_task(k2)
    elementwise = jax.tree.map(
        lambda p: jnp.full(p.shape, 0.2) + 0.05 * jnp.arange(p.size).reshape(p.shape) / p.size,
        params,
    )
    assert (
        mg.check_meta_grad(maml(steps=2), mlp_loss, MetaParams(params, lr=elementwise), task) < 1e-6
    )
    per_step = jax.tree.map(lambda p: jnp.array([0.3, 0.1]).reshape((2,) + (1,) * p.ndim), params)
    est = maml(steps=2, per_step=True)
    assert mg.check_meta_grad(est, mlp_loss, MetaParams(params, lr=per_step), task) < 1e-6


def test_per_step_lr_vector_equals_unrolled_sgd_steps(key):
    k1, k2 = jax.random.split(key)
    params, task = mlp_params(k1), mlp_task(k2)
    got = mg.adapt(mlp_loss, params, task.support, steps=2, lr=jnp.array([0.3, 0.1]), per_step=True)
    want = mg.sgd_step(
        mlp_loss, mg.sgd_step(mlp_loss, params, task.support, 0.3), task.support, 0.1
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_anil_mask_adapts_head_only_and_matches_finite_differences(key):
    k1, k2 = jax.random.split(key)
    params, task = mlp_params(k1), mlp_task(k2)
    mask = {"w1": False, "b1": False, "w2": True, "b2": True}
    adapted = mg.adapt(mlp_loss, params, task.support, steps=2, lr=0.3, mask=mask)
    np.testing.assert_array_equal(adapted["w1"], params["w1"])
    assert not np.allclose(adapted["w2"], params["w2"])
    assert (
        mg.check_meta_grad(maml(steps=2, lr=0.3, mask=mask), mlp_loss, MetaParams(params), task)
        < 1e-6
    )


def test_optax_inner_optimizer_is_differentiable(key):
    k1, k2 = jax.random.split(key)
    # eps_root > 0: Adam's sqrt(v + eps_root) has no second derivative at v = 0 otherwise
    # (check_inner_optimizer refuses the default eps_root=0 for second-order adaptation).
    est = maml(steps=3, optimizer=optax.adam(0.05, eps_root=1e-8))
    meta_params, task = MetaParams(mlp_params(k1)), mlp_task(k2)
    assert mg.check_meta_grad(est, mlp_loss, meta_params, task) < 1e-5


@pytest.mark.slow  # 4-6 s: several second-order programs to compile
def test_mamlpp_multi_step_loss_matches_finite_differences_and_weights(key):
    k1, k2 = jax.random.split(key)
    params, task = mlp_params(k1), mlp_task(k2)
    lr = jax.tree.map(lambda p: jnp.full((3,) + (1,) * p.ndim, 0.2), params)
    est = mamlpp(steps=3, per_step=True, anneal_steps=100)
    for step in (0, 50, 200):
        assert mg.check_meta_grad(est, mlp_loss, MetaParams(params, lr=lr), task, step=step) < 1e-6
    w = np.stack([msl_weights(t, steps=3, anneal_steps=100) for t in range(0, 300, 50)])
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[0], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(w[1], [1 / 6, 1 / 6, 2 / 3], rtol=1e-6)  # halfway
    np.testing.assert_allclose(w[-1], [0.01, 0.01, 0.98], rtol=1e-5)
    # Derivative-order annealing: first-order until the switch, exactly fomaml's direction.
    est_fo_first = mamlpp(steps=3, per_step=True, anneal_steps=100, first_order_until=10)
    mp = MetaParams(params, lr=lr)
    _, g_early = est_fo_first.value_and_grad(mlp_loss, mp, task, jnp.asarray(5))
    _, g_late = est_fo_first.value_and_grad(mlp_loss, mp, task, jnp.asarray(10))
    _, g_so = est.value_and_grad(mlp_loss, mp, task, jnp.asarray(10))
    assert not np.allclose(g_early.params["w1"], g_so.params["w1"])
    np.testing.assert_allclose(g_late.params["w1"], g_so.params["w1"], rtol=1e-10)


@pytest.mark.slow
def test_reptile_direction_is_mean_parameter_difference(key):
    k1, k2 = jax.random.split(key)
    params = mlp_params(k1)
    tasks = jax.vmap(mlp_task)(jax.random.split(k2, 3))
    steps, lr = 4, 0.1
    est = make_estimator("reptile", steps=steps, lr=lr)
    _, g = batch_value_and_grad(est, mlp_loss, MetaParams(params), tasks, 0)
    supports = [jax.tree.map(lambda x, t=t: x[t], tasks.support) for t in range(3)]
    adapted = [mg.adapt(mlp_loss, params, s, steps=steps, lr=lr) for s in supports]
    for name in params:
        want = np.mean([(params[name] - a[name]) / (steps * lr) for a in adapted], axis=0)
        np.testing.assert_allclose(g.params[name], want, rtol=1e-10)


# --- iMAML ---------------------------------------------------------------------------------------


def _imaml_closed_form(task, theta, reg):
    """The proximal solution phi* and the exact implicit gradient for linear least squares."""
    A_s, b_s = _quad_terms(task.support)
    A_q, b_q = _quad_terms(task.query)
    phi = jnp.linalg.solve(A_s + reg * jnp.eye(3), b_s + reg * theta)
    return phi, jnp.linalg.solve(jnp.eye(3) + A_s / reg, A_q @ phi - b_q)


def test_imaml_equals_closed_form_implicit_gradient(key):
    task = linear_task(key, n=8)
    theta, reg = jnp.array([0.3, -0.2, 0.5]), 2.0
    phi, expected = _imaml_closed_form(task, theta, reg)
    est = make_estimator("imaml", steps=400, lr=0.1, reg=reg, cg_iters=10, cg_tol=1e-12)
    (loss, _), g = est.value_and_grad(lstsq, MetaParams(theta), task, 0)
    np.testing.assert_allclose(g.params, expected, rtol=1e-8)
    np.testing.assert_allclose(loss, lstsq(phi, task.query), rtol=1e-10)
    (_, metrics), _ = est.value_and_grad(lstsq, MetaParams(theta), task, 0)
    assert metrics["cg_residual"] < 1e-10 and metrics["inner_residual"] < 1e-10


def test_imaml_residual_metrics_equal_closed_form(key):
    # One inner step and one CG iteration, so neither residual is zero: both have closed forms.
    task = linear_task(key, n=8)
    theta, reg, lr = jnp.array([0.3, -0.2, 0.5]), 2.0, 0.1
    A_s, b_s = _quad_terms(task.support)
    A_q, b_q = _quad_terms(task.query)
    grad_theta = A_s @ theta - b_s
    phi = theta - lr * grad_theta
    inner_res = jnp.linalg.norm(A_s @ phi - b_s + reg * (phi - theta)) / jnp.linalg.norm(grad_theta)
    A = jnp.eye(3) + A_s / reg
    b = A_q @ phi - b_q
    x1 = (b @ b) / (b @ A @ b) * b  # CG's first iterate from zero
    cg_res = jnp.linalg.norm(A @ x1 - b) / jnp.linalg.norm(b)
    est = make_estimator("imaml", steps=1, lr=lr, reg=reg, cg_iters=1, cg_tol=1e-12)
    (_, metrics), g = est.value_and_grad(lstsq, MetaParams(theta), task, 0)
    np.testing.assert_allclose(g.params, x1, rtol=1e-10)
    np.testing.assert_allclose(metrics["inner_residual"], inner_res, rtol=1e-10)
    np.testing.assert_allclose(metrics["cg_residual"], cg_res, rtol=1e-8)
    assert 0.01 < float(metrics["cg_residual"]) < 1 and 0.01 < float(inner_res) < 1


def test_imaml_gauss_newton_equals_closed_form_on_linear_model(key):
    # For a linear model the Gauss-Newton matrix is the Hessian: the same closed form.
    task = linear_task(key, n=8)
    theta, reg = jnp.array([0.3, -0.2, 0.5]), 2.0
    phi, expected = _imaml_closed_form(task, theta, reg)
    est = make_estimator(
        "imaml", steps=400, lr=0.1, reg=reg, cg_iters=10, cg_tol=1e-12,
        curvature="gauss_newton", predict_fn=lambda w, X: X @ w,
        output_loss=lambda z, y: jnp.mean((z - y) ** 2),
    )  # fmt: skip
    (_, metrics), g = est.value_and_grad(lstsq, MetaParams(theta), task, 0)
    np.testing.assert_allclose(g.params, expected, rtol=1e-8)
    assert metrics["cg_residual"] < 1e-10


@pytest.mark.slow  # 4-6 s: several second-order programs to compile
def test_imaml_gauss_newton_equals_dense_solve_on_mlp(key):
    # g = (I + J^T (2/n) J / reg)^{-1} grad L(phi; Q), with J the Jacobian of the outputs at phi.
    k1, k2 = jax.random.split(key)
    params, task, reg = mlp_params(k1), mlp_task(k2), 0.7
    est = make_estimator(
        "imaml", steps=3, lr=0.1, reg=reg, cg_iters=50, cg_tol=1e-14,
        curvature="gauss_newton", predict_fn=mlp_apply,
        output_loss=lambda z, y: jnp.mean((z - y) ** 2),
    )  # fmt: skip
    (_, metrics), g = est.value_and_grad(mlp_loss, MetaParams(params), task, 0)
    flat, unravel = ravel_pytree(params)
    prox = lambda p, b: mlp_loss(p, b) + 0.5 * reg * jnp.sum((ravel_pytree(p)[0] - flat) ** 2)
    phi = mg.adapt(prox, params, task.support, steps=3, lr=0.1)
    phi_flat = ravel_pytree(phi)[0]
    x, y = task.support
    J = jax.jacfwd(lambda f: mlp_apply(unravel(f), x).ravel())(phi_flat)
    G = 2.0 / y.size * J.T @ J
    g_query = ravel_pytree(jax.grad(mlp_loss)(phi, task.query))[0]
    expected = jnp.linalg.solve(jnp.eye(flat.size) + G / reg, g_query)
    np.testing.assert_allclose(ravel_pytree(g.params)[0], expected, rtol=1e-8)
    # ... and it differs from the Hessian version (the MLP's H != G away from interpolation).
    _, g_h = make_estimator(
        "imaml", steps=3, lr=0.1, reg=reg, cg_iters=50, cg_tol=1e-14
    ).value_and_grad(mlp_loss, MetaParams(params), task, 0)
    assert not np.allclose(ravel_pytree(g_h.params)[0], expected, rtol=1e-4)


def test_imaml_rejects_bad_curvature():
    with pytest.raises(ValueError, match="curvature must be"):
        make_estimator("imaml", steps=1, lr=0.1, curvature="fisher")
    with pytest.raises(ValueError, match="needs predict_fn"):
        make_estimator("imaml", steps=1, lr=0.1, curvature="gauss_newton")


def test_imaml_matches_finite_differences_when_converged(key):
    k1, k2 = jax.random.split(key)
    est = make_estimator("imaml", steps=300, lr=0.2, reg=3.0, cg_iters=40, cg_tol=1e-12)
    err = mg.check_meta_grad(est, mlp_loss, MetaParams(mlp_params(k1)), mlp_task(k2))
    assert err < 1e-5


# --- equivalent compositions ---------------------------------------------------------------------


def _grads(est, meta_params, tasks, task_batching="vmap"):
    return batch_value_and_grad(est, mlp_loss, meta_params, tasks, 0, task_batching=task_batching)[
        1
    ]


@pytest.mark.slow  # 4-6 s: several second-order programs to compile
def test_remat_unroll_and_task_batching_give_the_same_meta_gradients(key):
    k1, k2 = jax.random.split(key)
    mp = MetaParams(mlp_params(k1))
    tasks = jax.vmap(mlp_task)(jax.random.split(k2, 4))
    ref = _grads(maml(steps=3, lr=0.2), mp, tasks)
    variants = [
        _grads(maml(steps=3, lr=0.2, remat=True), mp, tasks),
        _grads(maml(steps=3, lr=0.2, unroll=True), mp, tasks),
        _grads(maml(steps=3, lr=0.2), mp, tasks, "map"),
        _grads(maml(steps=3, lr=0.2), mp, tasks, 2),
    ]
    for v in variants:
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(v), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_trajectory_ends_at_adapted_params(key):
    k1, k2 = jax.random.split(key)
    params, task = mlp_params(k1), mlp_task(k2)
    adapted, traj = mg.adapt(
        mlp_loss, params, task.support, steps=3, lr=0.2, return_trajectory=True
    )
    assert traj["w1"].shape == (3,) + params["w1"].shape
    np.testing.assert_array_equal(traj["w1"][-1], adapted["w1"])
    one = mg.adapt(mlp_loss, params, task.support, steps=1, lr=0.2)
    np.testing.assert_allclose(traj["w1"][0], one["w1"], rtol=1e-12)


def test_meta_learner_step_applies_optimizer_to_mean_meta_gradient(key):
    k1, k2 = jax.random.split(key)
    mp = MetaParams(mlp_params(k1))
    tasks = jax.vmap(mlp_task)(jax.random.split(k2, 3))
    est = maml(steps=1, lr=0.2)
    learner = mg.meta_learner(mlp_loss, est, optax.sgd(0.5))
    state, metrics = learner.update(learner.init(mp), tasks)
    g = _grads(est, mp, tasks)
    for a, b, c in zip(
        jax.tree.leaves(state.meta_params), jax.tree.leaves(mp), jax.tree.leaves(g), strict=True
    ):
        np.testing.assert_allclose(a, b - 0.5 * c, rtol=1e-10)
    assert int(state.step) == 1
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(g), rtol=1e-10)
    np.testing.assert_allclose(metrics["loss_post"], metrics["meta_loss"], rtol=1e-10)


# --- bad input: clear errors before tracing ------------------------------------------------------


def test_invalid_arguments_raise_clear_errors():
    p = {"a": jnp.ones(2), "b": jnp.ones(3)}
    loss = lambda p, b: jnp.sum(p["a"]) + jnp.sum(p["b"])
    with pytest.raises(ValueError, match="steps"):
        mg.adapt(loss, p, None, steps=-1, lr=0.1)
    with pytest.raises(ValueError, match="structure"):
        mg.adapt(loss, p, None, steps=1, lr={"a": 0.1})
    with pytest.raises(ValueError, match="broadcast"):
        mg.adapt(loss, p, None, steps=1, lr={"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="per_step"):
        mg.adapt(loss, p, None, steps=2, lr=jnp.ones(2))
    with pytest.raises(ValueError, match="leading axis"):
        mg.adapt(loss, p, None, steps=2, lr={"a": jnp.ones(2), "b": jnp.ones(3)}, per_step=True)
    with pytest.raises(ValueError, match="unknown meta-gradient estimator 'mamal'"):
        make_estimator("mamal", steps=1, lr=0.1)
    with pytest.raises(ValueError, match="either lr"):
        mg.adapt(loss, p, None, steps=1, lr=0.1, optimizer=optax.sgd(0.1))
    with pytest.raises(ValueError, match="task_batching"):
        mg.meta_learner(loss, maml(steps=1, lr=0.1), optax.sgd(0.1), task_batching="pmap")
    with pytest.raises(ValueError, match="mask"):
        mg.adapt(loss, p, None, steps=1, lr=0.1, mask={"a": False, "b": False})


# --- memory: XLA's compiled memory analysis ------------------------------------------------------


def _temp_bytes(est, steps):
    params = mlp_params(jax.random.key(0), d=8, h=64)
    task = mlp_task(jax.random.key(1), n=64, d=8)
    fn = jax.jit(lambda mp: est.value_and_grad(mlp_loss, mp, task, 0)[1])
    return fn.lower(MetaParams(params)).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_and_imaml_memory():
    plain = _temp_bytes(maml(steps=10, lr=0.1), 10)
    remat = _temp_bytes(maml(steps=10, lr=0.1, remat=True), 10)
    assert remat < plain
    imaml2 = _temp_bytes(make_estimator("imaml", steps=2, lr=0.1), 2)
    imaml10 = _temp_bytes(make_estimator("imaml", steps=10, lr=0.1), 10)
    assert imaml10 <= imaml2


def test_default_compiler_options_compile_and_keep_the_values():
    from metagrad.outer import default_compiler_options

    assert default_compiler_options("cpu", convolutional=True) == {}
    assert default_compiler_options("gpu") == {} == default_compiler_options("tpu")
    options = default_compiler_options()  # this backend's: an unknown option would not compile
    f = lambda x: jnp.sum(jnp.tanh(x @ x.T), axis=0)
    x = jax.random.normal(jax.random.key(0), (10, 40))
    compiled = jax.jit(f).lower(x).compile(compiler_options=options or None)
    np.testing.assert_allclose(compiled(x), jax.jit(f)(x), rtol=1e-12)


def test_default_task_batching_is_map_only_for_convolutions_on_cpu():
    from metagrad.outer import default_task_batching

    assert default_task_batching("cpu", convolutional=True) == "map"
    assert default_task_batching("cpu", convolutional=False) == "vmap"
    assert default_task_batching("gpu", convolutional=True) == "vmap"
    assert default_task_batching("tpu", convolutional=True) == "vmap"
