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
from metagrad.implicit import SOLVES, implicit_diff, implicit_vjp, solve_linear

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
        return (i < 5000) & (mg.implicit._rel_norm(optimality(x, theta, data), 1.0) > 1e-13)

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


@pytest.mark.parametrize("solve", SOLVES)
def test_ridge_hypergradient_equals_closed_form(solve, key, x64):
    train, val = ridge_data(key)
    lam = jnp.array([0.05, 0.2, 1.0, 0.5])
    expected = closed_form_hypergrad(lam, train, val)
    with jax.checking_leaks():
        got = hypergrad_fn(solve)(lam, train, val)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)
    assert float(jnp.max(jnp.abs(expected))) > 1e-3  # not a trivially zero gradient


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
