"""implicit_diff against closed forms: ridge regression's hypergradient for every linear solver,
under vmap and shard_map; iMAML on implicit_diff against the original iMAML code."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SUBPROCESS_ENV

import metagrad as mg
from metagrad.estimators import implicit as implicit_estimator
from metagrad.implicit import SOLVES, _rel_norm, implicit_diff, implicit_vjp, solve_linear

# --- ridge regression with per-feature L2 and an unregularised bias ----------------------------


def ridge_data(key, n=30, m=20, d=4):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w_true = jax.random.normal(k1, (d,))
    X = jax.random.normal(k2, (n, d))
    Xv = jax.random.normal(k3, (m, d))
    noise = 0.3 * jax.random.normal(k4, (n + m,))
    return (X, X @ w_true + 0.5 + noise[:n]), (Xv, Xv @ w_true + 0.5 + noise[n:])


def train_loss(x, theta, data):
    X, y = data
    residual = X @ x["w"] + x["b"] - y
    return 0.5 * jnp.mean(residual**2) + 0.5 * jnp.sum(theta["l2"] * x["w"] ** 2)


def val_loss(x, data):
    X, y = data
    return 0.5 * jnp.mean((X @ x["w"] + x["b"] - y) ** 2)


optimality = jax.grad(train_loss)


def gradient_descent(init, theta, data):
    """Gradient descent in a while_loop (which reverse mode cannot differentiate) to 1e-13."""
    step = 0.2

    def cond(c):
        x, i = c
        return (i < 5000) & (_rel_norm(optimality(x, theta, data), 1.0) > 1e-13)

    def body(c):
        x, i = c
        g = optimality(x, theta, data)
        return jax.tree.map(lambda a, b: a - step * b, x, g), i + 1

    return jax.lax.while_loop(cond, body, (init, 0))[0]


def closed_form_hypergrad(lam, train, val):
    """d val_loss(x*(lam)) / d lam with x* = A^{-1} c, A = Xa^T Xa / n + diag(lam, 0)."""
    (X, y), (Xv, yv) = train, val
    Xa, Xva = jnp.c_[X, jnp.ones(len(X))], jnp.c_[Xv, jnp.ones(len(Xv))]
    A = Xa.T @ Xa / len(X) + jnp.diag(jnp.r_[lam, 0.0])
    x = jnp.linalg.solve(A, Xa.T @ y / len(X))
    g_val = Xva.T @ (Xva @ x - yv) / len(Xv)
    u = jnp.linalg.solve(A, g_val)  # dx/dlam_j = -A^{-1} e_j x_j
    return -u[:-1] * x[:-1]


def closed_form_val_loss(lam, train, val):
    """val_loss at the exact ridge solution, differentiated by JAX through jnp.linalg.solve."""
    X, y = train
    Xa = jnp.c_[X, jnp.ones(len(X))]
    A = Xa.T @ Xa / len(X) + jnp.diag(jnp.r_[lam, 0.0])
    x = jnp.linalg.solve(A, Xa.T @ y / len(X))
    return val_loss({"w": x[:-1], "b": x[-1]}, val)


SOLVE_KW = {
    "cg": dict(tol=1e-14, maxiter=100),
    "normal_cg": dict(tol=1e-14, maxiter=200),
    "gmres": dict(tol=1e-14, maxiter=100),
    "bicgstab": dict(tol=1e-14, maxiter=100),
    "neumann": dict(tol=1e-15, maxiter=5000, neumann_scale=0.5),
    "dense": {},
}


def hypergrad_fn(solve):
    solver = implicit_diff(optimality, solve=solve, **SOLVE_KW[solve])(gradient_descent)
    d = 4
    init = {"w": jnp.zeros(d), "b": jnp.zeros(())}

    def outer(lam, train, val):
        return val_loss(solver(init, {"l2": lam}, train), val)

    return jax.jit(jax.grad(outer))


def test_every_solver_is_tested():
    assert set(SOLVE_KW) == set(SOLVES)


# The quick lane keeps dense (the cheapest to compile); the others run in the slow lane.
RIDGE_SOLVES = [s if s == "dense" else pytest.param(s, marks=pytest.mark.slow) for s in SOLVES]


@pytest.mark.parametrize("solve", RIDGE_SOLVES)
def test_ridge_hypergradient_equals_closed_form(solve, key, x64):
    train, val = ridge_data(key)
    lam = jnp.array([0.05, 0.2, 1.0, 0.5])
    expected = closed_form_hypergrad(lam, train, val)
    with jax.checking_leaks():
        got = hypergrad_fn(solve)(lam, train, val)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)
    assert float(jnp.max(jnp.abs(expected))) > 1e-3  # not a trivially zero gradient


@pytest.mark.slow  # seconds of compilation; the quick lane keeps the dense ridge test
def test_vmap_over_tasks_equals_a_loop(key, x64):
    keys = jax.random.split(key, 8)
    trains, vals = jax.vmap(ridge_data)(keys)
    lam = jnp.array([0.05, 0.2, 1.0, 0.5])
    fn = hypergrad_fn("cg")
    with jax.checking_leaks():
        batched = jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)))(lam, trains, vals)
    for t in range(8):
        pick = lambda tree, t=t: jax.tree.map(lambda a: a[t], tree)
        want = closed_form_hypergrad(lam, pick(trains), pick(vals))
        np.testing.assert_allclose(batched[t], fn(lam, pick(trains), pick(vals)), rtol=1e-12)
        np.testing.assert_allclose(batched[t], want, rtol=1e-8, atol=1e-12)


@pytest.mark.slow  # 4 s
def test_gradient_with_respect_to_data_and_pytree_theta(key, x64):
    # theta may be any pytree and several arguments: d val / d X_train by the IFT equals the
    # derivative through the exact closed-form solve.
    train, val = ridge_data(key, n=10, m=6, d=2)
    lam = jnp.array([0.3, 0.7])
    solver = implicit_diff(optimality, solve="dense")(gradient_descent)
    init = {"w": jnp.zeros(2), "b": jnp.zeros(())}
    got = jax.grad(lambda X: val_loss(solver(init, {"l2": lam}, (X, train[1])), val))(train[0])

    def exact(X):
        Xa = jnp.c_[X, jnp.ones(len(X))]
        A = Xa.T @ Xa / len(X) + jnp.diag(jnp.r_[lam, 0.0])
        x = jnp.linalg.solve(A, Xa.T @ train[1] / len(X))
        return val_loss({"w": x[:-1], "b": x[-1]}, val)

    np.testing.assert_allclose(got, jax.grad(exact)(train[0]), rtol=1e-8, atol=1e-12)


@pytest.mark.slow  # 3 s
def test_non_symmetric_fixed_point(x64):
    # F(x, t) = x - tanh(W x + t): a fixed point with a non-symmetric Jacobian; oracle: the
    # derivative of the explicit dense IFT formula.
    W = jnp.array([[0.3, -0.4, 0.1], [0.2, 0.1, -0.3], [-0.1, 0.4, 0.2]])
    F = lambda x, t: x - jnp.tanh(W @ x + t)
    t = jnp.array([0.5, -0.2, 0.3])

    def fixed_point(init, t):
        return jax.lax.fori_loop(0, 200, lambda i, x: jnp.tanh(W @ x + t), init)

    x = fixed_point(jnp.zeros(3), t)
    A, B = jax.jacobian(F, 0)(x, t), jax.jacobian(F, 1)(x, t)
    v = jnp.array([1.0, 2.0, -1.0])
    expected = -B.T @ jnp.linalg.solve(A.T, v)
    for solve in ("normal_cg", "gmres", "bicgstab", "neumann", "dense"):
        kw = {k: w for k, w in SOLVE_KW[solve].items() if k != "neumann_scale"}
        solver = implicit_diff(F, solve=solve, **kw)(fixed_point)
        got = jax.grad(lambda t, s=solver: s(jnp.zeros(3), t) @ v)(t)
        np.testing.assert_allclose(got, expected, rtol=1e-8, err_msg=solve)


@pytest.mark.slow  # seconds of compilation; the quick lane keeps the dense ridge test
def test_metrics_and_aux(x64):
    f = lambda x, lam: 0.5 * (x - 3.0) ** 2 + 0.5 * lam * x**2

    def few_steps(init, lam):
        x = jax.lax.fori_loop(0, 3, lambda i, x: x - 0.3 * jax.grad(f)(x, lam), init)
        return x, {"steps": 3}

    solver = implicit_diff(jax.grad(f), has_aux=True, return_metrics=True)(few_steps)
    (x, aux), metrics = solver(0.0, 1.0)
    np.testing.assert_allclose(metrics["optimality_residual"], abs(2 * x - 3.0), rtol=1e-12)
    assert aux["steps"] == 3 and metrics["optimality_residual"] > 0.1  # 3 steps: not converged
    # Gradients come from the IFT at the point the solver returned: -x / (1 + lam).
    g = jax.grad(lambda lam: solver(0.0, lam)[0][0])(1.0)
    np.testing.assert_allclose(g, -x / 2.0, rtol=1e-12)


@pytest.mark.slow  # seconds of compilation; the quick lane keeps the dense ridge test
def test_solve_linear_reports_residual_and_neumann_terms(x64):
    M = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    b = jnp.array([1.0, -1.0])
    u, m = solve_linear(lambda v: M @ v, b, solve="neumann", maxiter=3, neumann_scale=0.4)
    # Three terms of alpha sum_k (I - alpha M)^k b:
    T = jnp.eye(2) - 0.4 * M
    want = 0.4 * (b + T @ b + T @ T @ b)
    np.testing.assert_allclose(u, want, rtol=1e-12)
    assert int(m["solve_iterations"]) == 3
    np.testing.assert_allclose(
        m["solve_residual"], jnp.linalg.norm(M @ want - b) / jnp.linalg.norm(b), rtol=1e-10
    )
    u, m = solve_linear(lambda v: M @ v, b, solve="cg", ridge=0.5, tol=1e-14)
    np.testing.assert_allclose(u, jnp.linalg.solve(M + 0.5 * jnp.eye(2), b), rtol=1e-10)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="solve must be one of"):
        implicit_diff(lambda x: x, solve="lu")
    with pytest.raises(ValueError, match="maxiter"):
        implicit_diff(lambda x: x, maxiter=0)
    with pytest.raises(ValueError, match="ridge"):
        implicit_diff(lambda x: x, ridge=-1.0)
    with pytest.raises(ValueError, match="needs A's JVP"):
        implicit_vjp(lambda x: x, 1.0, (), 1.0, solve="normal_cg", matvec=lambda u: u)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_implicit as ti

    assert len(jax.devices()) == 4, jax.devices()
    trains, vals = jax.vmap(ti.ridge_data)(jax.random.split(jax.random.key(3), 8))
    lam = jnp.array([0.05, 0.2, 1.0, 0.5])
    fn = ti.hypergrad_fn("cg")
    loop = np.stack([
        fn(lam, *jax.tree.map(lambda a: a[t], (trains, vals))) for t in range(8)])
    mesh = jax.make_mesh((4,), ("tasks",))
    put = lambda tree: jax.device_put(tree, NamedSharding(mesh, P("tasks")))
    smap = lambda f, lam_spec: jax.jit(jax.shard_map(
        f, mesh=mesh, in_specs=(lam_spec, P("tasks"), P("tasks")), out_specs=P("tasks")))
    with jax.checking_leaks():
        # Per-task hyperparameters (sharded with the tasks): one hypergradient per task.
        per_task = smap(jax.vmap(fn), P("tasks"))(put(jnp.tile(lam, (8, 1))), put(trains),
                                                  put(vals))
        # One replicated lam: JAX's gradient of a replicated input is summed over the shards
        # (psum, the transpose of the cast to varying), here the sum over all 8 tasks.
        summed = smap(lambda l, tr, va: jax.vmap(fn, in_axes=(None, 0, 0))(l, tr, va).sum(0)[None],
                      P())(lam, put(trains), put(vals))
    np.testing.assert_allclose(np.asarray(per_task), loop, rtol=1e-12)
    for t in range(8):
        want = ti.closed_form_hypergrad(lam, *jax.tree.map(lambda a: a[t], (trains, vals)))
        np.testing.assert_allclose(loop[t], want, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(np.asarray(summed), np.tile(loop.sum(0), (4, 1)), rtol=1e-10)
    # ... which is what JAX gives for a solve it differentiates itself (jnp.linalg.solve).
    direct = jax.grad(ti.closed_form_val_loss)
    direct_summed = smap(
        lambda l, tr, va: jax.vmap(direct, in_axes=(None, 0, 0))(l, tr, va).sum(0)[None], P()
    )(lam, put(trains), put(vals))
    np.testing.assert_allclose(np.asarray(summed), np.asarray(direct_summed), rtol=1e-8)
    print("OK", len(per_task.sharding.device_set))
""")


@pytest.mark.slow
def test_shard_map_over_four_host_devices_equals_a_loop():
    env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK 4"


# --- iMAML on implicit_diff against the original iMAML code -------------------------------------


def _mlp_apply(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


_mse = lambda z, y: jnp.mean((z - y) ** 2)
_mlp_loss = lambda p, batch: _mse(_mlp_apply(p, batch[0]), batch[1])


def _mlp_setup():
    ks = jax.random.split(jax.random.key(7), 6)
    params = {
        "w1": jax.random.normal(ks[0], (2, 5)),
        "b1": jnp.zeros(5),
        "w2": jax.random.normal(ks[1], (5, 1)) / 2,
        "b2": jnp.zeros(1),
    }
    task = mg.Task(
        (jax.random.normal(ks[2], (6, 2)), jax.random.normal(ks[3], (6, 1))),
        (jax.random.normal(ks[4], (6, 2)), jax.random.normal(ks[5], (6, 1))),
    )
    return params, task


def _original_imaml(loss_fn, theta, task, *, steps, lr, reg, cg_iters, cg_tol, damping, gn):
    """metagrad's iMAML before it was rebuilt on implicit_diff (commit 08dd2a6), verbatim in
    its math: CG on (I + (H + damping I) / reg) g = grad L(phi; Q)."""
    prox = mg.inner.proximal(loss_fn, theta, reg)
    adapted = jax.lax.stop_gradient(mg.adapt(prox, theta, task.support, steps=steps, lr=lr))
    g_query = jax.grad(loss_fn)(adapted, task.query)

    def matvec(v):
        if gn:
            x, y = task.support
            hv = mg.gnvp(lambda p: _mlp_apply(p, x), lambda z: _mse(z, y), adapted, v)
        else:
            hv = jax.jvp(jax.grad(lambda p: loss_fn(p, task.support)), (adapted,), (v,))[1]
        return jax.tree.map(lambda vi, hvi: vi + (hvi + damping * vi) / reg, v, hv)

    g, _ = jax.scipy.sparse.linalg.cg(matvec, g_query, tol=cg_tol, maxiter=cg_iters)
    residual = jax.tree.map(jnp.subtract, matvec(g), g_query)
    return g, _rel_norm(residual, g_query)


IMAML_CASES = {
    "hessian": dict(steps=5, lr=0.1, reg=2.0, cg_iters=6, cg_tol=1e-12, damping=0.1, gn=False),
    "gauss_newton": dict(steps=4, lr=0.1, reg=1.5, cg_iters=30, cg_tol=1e-14, damping=0.0, gn=True),
}


@pytest.mark.parametrize("case", sorted(IMAML_CASES))
@pytest.mark.slow  # several seconds: second-order programs to compile
def test_imaml_equals_original_imaml(case, x64):
    kw = IMAML_CASES[case]
    params, task = _mlp_setup()
    want, want_res = _original_imaml(_mlp_loss, params, task, **kw)
    gn = kw["gn"]
    est = mg.imaml(
        steps=kw["steps"], lr=kw["lr"], reg=kw["reg"], cg_iters=kw["cg_iters"],
        cg_tol=kw["cg_tol"], damping=kw["damping"],
        curvature="gauss_newton" if gn else "hessian",
        predict_fn=_mlp_apply if gn else None, output_loss=_mse if gn else None,
    )  # fmt: skip
    (_, metrics), g = est.value_and_grad(_mlp_loss, mg.MetaParams(params), task, 0)
    for a, b in zip(jax.tree.leaves(g.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(metrics["cg_residual"], want_res, rtol=1e-6, atol=1e-14)
    if case == "hessian":  # six CG steps: not converged, so the residual is a real number
        assert float(want_res) > 1e-6


@pytest.mark.slow  # several seconds: second-order programs to compile
def test_proximal_imaml_through_implicit_diff_equals_original_imaml(x64):
    # The proximal problem as a user writes it with the decorator: jax.grad of the query loss
    # through the decorated inner solver is iMAML's meta-gradient.
    kw = dict(IMAML_CASES["hessian"], cg_iters=50)
    params, task = _mlp_setup()
    reg, steps, lr = kw["reg"], kw["steps"], kw["lr"]
    optimality = lambda phi, theta: jax.grad(mg.inner.proximal(_mlp_loss, theta, reg))(
        phi, task.support
    )

    @implicit_diff(optimality, solve="cg", tol=1e-14, maxiter=50, ridge=kw["damping"])
    def inner_solver(init, theta):
        prox = mg.inner.proximal(_mlp_loss, theta, reg)
        return mg.adapt(prox, init, task.support, steps=steps, lr=lr)

    got = jax.grad(lambda th: _mlp_loss(inner_solver(th, th), task.query))(params)
    # The original's system I + (H + damping I) / reg is (dF/dphi + damping I) / reg, with
    # dF/dphi = H + reg I: the decorator's ridge is the damping.
    want, _ = _original_imaml(_mlp_loss, params, task, **dict(kw, cg_tol=1e-14))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


# --- the implicit estimator ----------------------------------------------------------------------


def _lstsq(w, batch):
    X, y = batch
    return jnp.mean((X @ w - y) ** 2)


def _linear_task(key, n=8, d=3):
    ks = jax.random.split(key, 4)
    Xs, Xq = jax.random.normal(ks[0], (n, d)), jax.random.normal(ks[1], (n, d))
    w = jax.random.normal(ks[2], (d,))
    return mg.Task((Xs, Xs @ w + 0.1 * jax.random.normal(ks[3], (n,))), (Xq, Xq @ w))


def _proximal_closed_form(task, theta, reg):
    (Xs, ys), (Xq, yq) = task.support, task.query
    A_s, b_s = 2 / len(Xs) * Xs.T @ Xs, 2 / len(Xs) * Xs.T @ ys
    phi = jnp.linalg.solve(A_s + reg * jnp.eye(len(theta)), b_s + reg * theta)
    g_q = 2 / len(Xq) * Xq.T @ (Xq @ phi - yq)
    return phi, jnp.linalg.solve(jnp.eye(len(theta)) + A_s / reg, g_q)


@pytest.mark.slow  # seconds of compilation; the quick lane keeps the dense ridge test
@pytest.mark.parametrize("solve", ["cg", "gmres", "dense"])
def test_implicit_estimator_with_an_inner_loop_equals_closed_form(solve, key, x64):
    task, theta, reg = _linear_task(key), jnp.array([0.3, -0.2, 0.5]), 2.0
    phi, expected = _proximal_closed_form(task, theta, reg)
    est = implicit_estimator(
        inner_solver=mg.InnerLoop(steps=300, lr=0.1), reg=reg, solve=solve, tol=1e-13
    )
    (loss, metrics), g = jax.jit(est.value_and_grad, static_argnums=0)(
        _lstsq, mg.MetaParams(theta), task, 0
    )
    np.testing.assert_allclose(g.params, expected, rtol=1e-8)
    np.testing.assert_allclose(loss, _lstsq(phi, task.query), rtol=1e-10)
    assert metrics["solve_residual"] < 1e-10 and metrics["optimality_residual"] < 1e-10
    np.testing.assert_allclose(
        est.adapt(_lstsq, mg.MetaParams(theta), task.support), phi, rtol=1e-8
    )


@pytest.mark.slow  # several seconds: second-order programs to compile
def test_implicit_estimator_with_a_custom_solver_learns_l2_on_validation(key, x64):
    # Hyperparameter optimisation as a meta-gradient: theta is the per-feature L2 strength, the
    # support set trains the ridge regression, the query set validates. Oracle: the closed form.
    train, val = ridge_data(key)
    lam = jnp.array([0.05, 0.2, 1.0, 0.5])
    init = {"w": jnp.zeros(4), "b": jnp.zeros(())}
    solver = lambda loss_fn, theta, support: gradient_descent(init, {"l2": theta}, support)
    F = lambda loss_fn, phi, theta, support: optimality(phi, {"l2": theta}, support)
    est = implicit_estimator(inner_solver=solver, optimality=F, tol=1e-14, maxiter=50)
    (_, metrics), g = est.value_and_grad(val_loss, mg.MetaParams(lam), mg.Task(train, val), 0)
    np.testing.assert_allclose(g.params, closed_form_hypergrad(lam, train, val), rtol=1e-8)
    assert metrics["optimality_residual"] < 1e-10
    with pytest.raises(ValueError, match="runs as it is"):
        est.adapt(val_loss, mg.MetaParams(lam), train, steps=3)


@pytest.mark.slow  # several seconds: second-order programs to compile
def test_implicit_estimator_matches_finite_differences_when_converged(key, x64):
    params, task = _mlp_setup()
    est = implicit_estimator(
        inner_solver=mg.InnerLoop(steps=300, lr=0.2), reg=3.0, tol=1e-12, maxiter=40
    )
    assert mg.check_meta_grad(est, _mlp_loss, mg.MetaParams(params), task) < 1e-5


def test_implicit_estimator_refuses_bad_settings():
    with pytest.raises(ValueError, match="pass optimality"):
        implicit_estimator(inner_solver=mg.InnerLoop(steps=1, lr=0.1))
    with pytest.raises(ValueError, match="does not meta-learn inner rates"):
        implicit_estimator(inner_solver=mg.InnerLoop(steps=1), reg=1.0)
    with pytest.raises(TypeError, match="inner_solver must be"):
        implicit_estimator(inner_solver=3, reg=1.0)
    with pytest.raises(ValueError, match="solve must be one of"):
        implicit_estimator(inner_solver=mg.InnerLoop(steps=1, lr=0.1), reg=1.0, solve="qr")


# --- compiled memory: XLA's memory analysis ------------------------------------------------------


def _compiled_bytes(est):
    ks = jax.random.split(jax.random.key(0), 6)
    params = {
        "w1": jax.random.normal(ks[0], (8, 64)),
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(ks[1], (64, 1)),
        "b2": jnp.zeros(1),
    }
    task = mg.Task(
        (jax.random.normal(ks[2], (64, 8)), jax.random.normal(ks[3], (64, 1))),
        (jax.random.normal(ks[4], (64, 8)), jax.random.normal(ks[5], (64, 1))),
    )
    fn = jax.jit(lambda mp: est.value_and_grad(_mlp_loss, mp, task, 0)[1])
    m = fn.lower(mg.MetaParams(params)).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


@pytest.mark.slow  # five small programs to compile
def test_implicit_estimator_memory_does_not_grow_with_inner_steps():
    inner = lambda steps: mg.InnerLoop(steps=steps, lr=0.1)
    implicit_bytes = {
        s: _compiled_bytes(implicit_estimator(inner_solver=inner(s), reg=1.0)) for s in (1, 2, 100)
    }
    # Within 5% of one step's (XLA flattens a one-trip loop, which then takes ~13% more; from
    # two steps on the number is the same for any count).
    assert implicit_bytes[100] <= 1.05 * implicit_bytes[1], implicit_bytes
    assert implicit_bytes[100] == implicit_bytes[2], implicit_bytes
    # The control: backpropagating through the unroll keeps every step (~80x at 100 steps).
    maml_1, maml_100 = (_compiled_bytes(mg.maml(steps=s, lr=0.1)) for s in (1, 100))
    assert maml_100 > 10 * maml_1 and maml_100 > 10 * implicit_bytes[100]
