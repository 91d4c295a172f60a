r"""Closed-form and convex heads fitted to the support embeddings, as meta-gradient estimators:
R2D2's ridge regression (Bertinetto et al. 2019) and MetaOptNet's multi-class SVM (Lee et al.
2019), both differentiable with respect to the embedding.

As for :func:`metagrad.estimators.protonet.protonet`, the first argument of ``objective`` and
``value_and_grad`` is the embedding ``embed_fn(params, x) -> (n, d)``. The meta-parameters are
``MetaParams({"backbone": embedding params, "head": head params})``: the head's own learned
scalars (R2D2's scale, bias and optionally :math:`\log\lambda`; the SVM's logit scale), built by
:func:`r2d2_head` and :func:`svm_head`. Metrics: ``loss_post``, ``acc_post``.

The SVM's dual is solved by accelerated projected gradient (no QP package) and differentiated
implicitly through its fixed-point (KKT) conditions with ``jax.lax.custom_root``: the backward
pass is one linear solve of size ``n_support * ways``, whatever the number of solver steps.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad._types import MetaParams
from metagrad.estimators.base import MetaGradEstimator, check_meta_params
from metagrad.estimators.protonet import (
    _check_ways,
    _num_classes,
    _vg,
    classification_metrics,
    embed,
)

# --- R2D2: ridge regression in the Woodbury form ------------------------------------------------


def ridge_solve(x: jax.Array, y: jax.Array, lam) -> jax.Array:
    r"""Ridge regression weights in the Woodbury (support-sized) form.

    .. math:: W = \arg\min_W \|X W - Y\|^2 + \lambda \|W\|^2
              = X^\top (X X^\top + \lambda I_n)^{-1} Y

    an ``n x n`` Cholesky solve for ``n`` support rows, instead of the ``d x d`` of
    :math:`(X^\top X + \lambda I_d)^{-1} X^\top Y`.

    Args:
        x: ``(n, d)``; y: ``(n, K)``; lam: :math:`\lambda > 0`.

    Returns:
        ``(d, K)``.

    Example:
        >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
        >>> w = ridge_solve(x, jnp.eye(2), 1.0)  # 1 / (1 + 1) and 2 / (4 + 1)
        >>> [[round(v, 6) for v in row] for row in w.tolist()]
        [[0.5, 0.0], [0.0, 0.4]]
    """
    gram = x @ x.T + lam * jnp.eye(x.shape[0], dtype=x.dtype)
    return x.T @ jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(gram), y)


def with_ones(z: jax.Array) -> jax.Array:
    """``[z, 1]``: a column of ones for the bias (regularised with the weights, as R2D2).

    Example:
        >>> with_ones(jnp.zeros((2, 1))).tolist()
        [[0.0, 1.0], [0.0, 1.0]]
    """
    return jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)


def r2d2_head(*, scale: float = 1.0, bias: float = 0.0, lam: float | None = 1.0) -> dict:
    r"""R2D2's learned head parameters: the adjust layer's ``scale`` :math:`\alpha` and ``bias``
    :math:`\beta` (logits :math:`\alpha\, \hat Y + \beta`) and, unless ``lam=None``,
    ``log_lambda`` (:math:`\lambda` learned, as Bertinetto et al.; with ``lam=None`` the
    estimator's fixed ``lam`` is used). Bertinetto et al.'s code starts the scale at 1e-4 on
    their unnormalised features; 1 suits normalised ones.

    Example:
        >>> sorted(r2d2_head()), r2d2_head(lam=None)["scale"].tolist()
        (['bias', 'log_lambda', 'scale'], 1.0)
    """
    head = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    if lam is not None:
        if not lam > 0:
            raise ValueError(f"lam must be positive, got {lam!r}")
        head["log_lambda"] = jnp.asarray(np.log(lam), jnp.float32)
    return head


def _split(meta_params: MetaParams, name: str, keys: tuple[str, ...]):
    check_meta_params(meta_params)
    p = meta_params.params
    if not (isinstance(p, dict) and set(p) == {"backbone", "head"}):
        got = sorted(p) if isinstance(p, dict) else type(p).__name__
        raise ValueError(
            f"{name} needs MetaParams({{'backbone': embedding params, 'head': {name}_head()}}); "
            f"got params {got}"
        )
    extra = set(p["head"]) - set(keys)
    if extra:
        raise ValueError(f"{name}: unknown head parameters {sorted(extra)}; expected {keys}")
    return p["backbone"], p["head"]


def r2d2(
    *, lam: float | None = None, ways: int | None = None, fit_bias: bool = True, name="r2d2"
) -> MetaGradEstimator:
    r"""R2D2 (Bertinetto et al. 2019): ridge regression onto one-hot labels, fitted in closed
    form to the support embeddings, then a learned affine "adjust" layer.

    .. math:: \tilde X = [f_\theta(x_S), 1], \quad
              W = \tilde X^\top (\tilde X \tilde X^\top + \lambda I)^{-1} Y_S, \quad
              \text{logits} = \alpha\, [f_\theta(x_Q), 1]\, W + \beta

    (:func:`ridge_solve`). :math:`\alpha, \beta` and, if the head has ``log_lambda``,
    :math:`\lambda` are meta-parameters (:func:`r2d2_head`); otherwise ``lam`` is fixed.

    Args:
        lam: fixed :math:`\lambda`; must be None when the head learns ``log_lambda``.
        ways: the number of classes, or None for any (absent labels masked out).
        fit_bias: append the column of ones (R2D2's bias).

    Example:
        >>> from metagrad import MetaParams, Task
        >>> embed_fn = lambda w, x: jnp.tanh(x @ w)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.2]])
        >>> task = Task((x[:2], jnp.array([0, 1])), (x[2:], jnp.array([0])))
        >>> mp = MetaParams({"backbone": jnp.eye(2), "head": r2d2_head(scale=5.0)})
        >>> vg = jax.jit(r2d2().value_and_grad, static_argnums=0)  # one compilation
        >>> (loss, m), g = vg(embed_fn, mp, task, 0)
        >>> float(m["acc_post"]), sorted(g.params["head"])
        (1.0, ['bias', 'log_lambda', 'scale'])
    """
    _check_ways(ways)
    if lam is not None and not lam > 0:
        raise ValueError(f"lam must be positive or None (learned), got {lam!r}")

    def objective(embed_fn, meta_params, task, step):
        theta, head = _split(meta_params, "r2d2", ("scale", "bias", "log_lambda"))
        if ("log_lambda" in head) == (lam is not None):
            raise ValueError(
                "r2d2: lambda is either learned (the head has log_lambda, lam=None) or fixed "
                f"(lam=..., a head without log_lambda); got lam={lam!r} and head keys "
                f"{sorted(head)}"
            )
        reg = jnp.exp(head["log_lambda"]) if lam is None else lam
        zs, ys = embed(embed_fn, theta, task.support)
        zq, yq = embed(embed_fn, theta, task.query)
        num = _num_classes(ways, task.support)
        onehot = jax.nn.one_hot(ys, num, dtype=zs.dtype)
        if fit_bias:
            zs, zq = with_ones(zs), with_ones(zq)
        w = ridge_solve(zs, onehot, reg)
        logits = head["scale"] * (zq @ w) + head["bias"]
        logits = jnp.where(jnp.sum(onehot, 0) > 0, logits, -jnp.inf)
        return classification_metrics(logits, yq)

    return MetaGradEstimator(name, objective, _vg(objective), None)


# --- MetaOptNet: the Crammer-Singer multi-class SVM in the dual ---------------------------------


def project_rows(v: jax.Array, upper: jax.Array, present: jax.Array) -> jax.Array:
    r"""Euclidean projection of each row of ``v`` onto
    :math:`\{a : a \le u,\ \sum_k a_k = 0,\ a_k = 0 \text{ for absent } k\}`.

    The solution is :math:`a_k = \min(v_k - \tau, u_k)` on present classes, with :math:`\tau`
    the root of :math:`\sum_k \min(v_k - \tau, u_k) = 0`; sorting the breakpoints
    :math:`t_k = v_k - u_k` finds it exactly (the free set is a prefix, as for the simplex). The
    result is piecewise linear in ``v`` and autodiff gives its Jacobian.

    Args:
        v, upper: ``(n, K)``; every row of ``upper`` must have a positive sum over present
            classes (the SVM's ``C`` at the true class, 0 elsewhere).
        present: ``(K,)`` bools.

    Example:
        Projecting onto the sum-zero plane alone gives (4/3, -2/3, -2/3), above the bound 0.5:

        >>> v, u = jnp.array([[2.0, 0.0, 0.0]]), jnp.array([[0.5, 0.0, 0.0]])
        >>> project_rows(v, u, jnp.array([True, True, True])).tolist()
        [[0.5, -0.25, -0.25]]
    """
    t = jnp.where(present, v - upper, jnp.inf)  # absent classes are never free
    u = jnp.where(present, upper, 0.0)
    ts, vs, us = lax.sort((t, v, u), dimension=1, num_keys=1)  # one sort, values carried
    j = jnp.arange(1, v.shape[1] + 1, dtype=v.dtype)
    # tau_j: the root if the first j sorted breakpoints are free, the others at their bounds.
    taus = (jnp.cumsum(vs, axis=1) + jnp.sum(u, axis=1, keepdims=True) - jnp.cumsum(us, axis=1)) / j
    rho = v.shape[1] - 1 - jnp.argmax((taus > ts)[:, ::-1], axis=1)  # the last j that is free
    tau = jnp.take_along_axis(taus, rho[:, None], axis=1)
    return jnp.where(t < tau, v - tau, u)


class SVMProblem:
    r"""The dual of the Crammer-Singer SVM on support embeddings :math:`X` (MetaOptNet's):

    .. math:: \min_A\ \tfrac12 \operatorname{tr}(A^\top (X X^\top + r I) A)
              - \operatorname{tr}(A^\top Y)
              \quad\text{s.t.}\quad A \le C\, Y,\ \ A \mathbf 1 = 0

    with :math:`Y` the one-hot labels ``(n, K)`` and :math:`r` MetaOptNet's ``kernel_ridge``
    (they add :math:`I` to the kernel, which makes the dual strongly convex). The class weights
    are :math:`w_k = \sum_i A_{ik} x_i`, so query logits are :math:`X_Q X^\top A`.

    Example:
        >>> x, onehot = jnp.array([[1.0], [-1.0]]), jnp.eye(2)
        >>> prob = SVMProblem(x, onehot, jnp.array([True, True]), 1.0, 0.0)
        >>> prob.q.tolist(), float(prob.lipschitz)  # X X^T and its largest eigenvalue
        ([[1.0, -1.0], [-1.0, 1.0]], 2.0)
        >>> prob.step(jnp.zeros((2, 2))).tolist()  # from 0: (Y - 0) / L projected to sum 0
        [[0.25, -0.25], [-0.25, 0.25]]
    """

    def __init__(self, x, onehot, present, c, kernel_ridge):
        self.x, self.onehot, self.present = x, onehot, present
        self.q = x @ x.T + kernel_ridge * jnp.eye(x.shape[0], dtype=x.dtype)
        self.upper = c * onehot
        # The step 1/L of projected gradient; a constant to the derivatives.
        self.lipschitz = lax.stop_gradient(jnp.linalg.eigvalsh(self.q)[-1])

    def grad(self, a):
        return self.q @ a - self.onehot

    def step(self, a):
        """One projected-gradient step: its fixed points are the dual's solutions."""
        return project_rows(a - self.grad(a) / self.lipschitz, self.upper, self.present)


def svm_dual(
    x: jax.Array,
    y: jax.Array,
    num_classes: int,
    *,
    c: float = 0.1,
    kernel_ridge: float = 1.0,
    iters: int = 200,
) -> jax.Array:
    r"""The solution :math:`A^*` ``(n, K)`` of the Crammer-Singer dual (:class:`SVMProblem`),
    by ``iters`` steps of FISTA (accelerated projected gradient) from 0, differentiated
    implicitly: ``jax.lax.custom_root`` on :math:`F(A) = A - \Pi(A - \nabla f(A) / L)`, whose
    root is the solution, so that

    .. math:: \frac{\partial A^*}{\partial X} = -\Big(\frac{\partial F}{\partial A}\Big)^{-1}
              \frac{\partial F}{\partial X}

    (a dense solve of size ``n * K``; exact at the solution, so run enough ``iters``).
    Classes absent from ``y`` get zero columns.

    Example:
        >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
        >>> a = svm_dual(x, jnp.array([0, 1]), 2, c=10.0, kernel_ridge=0.0)
        >>> [[round(v, 4) for v in row] for row in a.tolist()]  # w_0 = -w_1 = (0.5, 0)
        [[0.25, -0.25], [-0.25, 0.25]]
    """
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    present = jnp.sum(onehot, axis=0) > 0

    def problem(x):
        return SVMProblem(x, onehot, present, c, kernel_ridge)

    def optimality(a):
        return a - problem(x).step(a)

    def solve(_, a0):
        prob = problem(lax.stop_gradient(x))

        def body(_, carry):
            a, z, t = carry
            a_next = prob.step(z)
            t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
            return a_next, a_next + ((t - 1) / t_next) * (a_next - a), t_next

        one = jnp.ones((), x.dtype)
        return lax.fori_loop(0, iters, body, (a0, a0, one))[0]

    def tangent_solve(g, b):
        n = b.size
        basis = jnp.eye(n, dtype=b.dtype).reshape((n, *b.shape))
        matrix = jax.vmap(g)(basis).reshape(n, n).T  # column i is g(e_i)
        return jnp.linalg.solve(matrix, b.ravel()).reshape(b.shape)

    return lax.custom_root(optimality, jnp.zeros_like(onehot), solve, tangent_solve)


def kkt_residual(x, y, a, num_classes: int, *, c: float = 0.1, kernel_ridge: float = 1.0) -> dict:
    r"""How far ``a`` is from satisfying the dual's KKT conditions (all zero at the solution).

    With :math:`G = \nabla f(A)` and :math:`\nu_i = \max_k G_{ik}` over present classes, the
    conditions are primal feasibility (``upper``: :math:`\max(A - C Y, 0)`, ``sum``:
    :math:`|A \mathbf 1|`, ``absent``: :math:`|A_{ik}|` for absent classes) and stationarity
    with complementary slackness, :math:`(C Y - A)_{ik} (\nu_i - G_{ik}) = 0` with both factors
    :math:`\ge 0` (``complementarity``).

    Example:
        >>> x, y = jnp.array([[1.0, 0.0], [-1.0, 0.0]]), jnp.array([0, 1])
        >>> a = svm_dual(x, y, 2, c=10.0, kernel_ridge=0.0)
        >>> all(v < 1e-5 for v in kkt_residual(x, y, a, 2, c=10.0, kernel_ridge=0.0).values())
        True
    """
    out = _kkt(x, y, a, num_classes, c, kernel_ridge)
    return {k: float(v) for k, v in out.items()}


@partial(jax.jit, static_argnums=(3, 4, 5))
def _kkt(x, y, a, num_classes, c, kernel_ridge):
    onehot = jax.nn.one_hot(y, num_classes, dtype=x.dtype)
    present = jnp.sum(onehot, axis=0) > 0
    prob = SVMProblem(x, onehot, present, c, kernel_ridge)
    g = prob.grad(a)
    nu = jnp.max(jnp.where(present, g, -jnp.inf), axis=1, keepdims=True)
    slack = jnp.where(present, (prob.upper - a) * (nu - g), 0.0)
    return {
        "upper": jnp.max(jnp.maximum(a - prob.upper, 0.0)),
        "sum": jnp.max(jnp.abs(jnp.sum(a, axis=1))),
        "absent": jnp.max(jnp.where(present, 0.0, jnp.abs(a))),
        "complementarity": jnp.max(jnp.abs(slack)),
    }


def svm_head(*, scale: float = 1.0) -> dict:
    """MetaOptNet's learned logit scale (their ``ClassificationHead``'s, initialised at 1).

    Example:
        >>> svm_head()["scale"].tolist()
        1.0
    """
    return {"scale": jnp.asarray(scale, jnp.float32)}


def svm(
    *,
    c: float = 0.1,
    kernel_ridge: float = 1.0,
    iters: int = 200,
    ways: int | None = None,
    name: str = "svm",
) -> MetaGradEstimator:
    r"""MetaOptNet-SVM (Lee et al. 2019): a Crammer-Singer multi-class linear SVM fitted to the
    support embeddings in the dual (:func:`svm_dual`), differentiated implicitly.

    .. math:: A^* = \arg\min_{A \le C Y,\ A 1 = 0}\ \tfrac12 \operatorname{tr}(A^\top
              (X_S X_S^\top + r I) A) - \operatorname{tr}(A^\top Y), \qquad
              \text{logits} = s\, X_Q X_S^\top A^*

    with :math:`X = f_\theta(x)` and :math:`s` the learned scale (:func:`svm_head`). MetaOptNet
    uses ``c=0.1`` and adds the identity to the kernel (``kernel_ridge=1``). Keep
    ``kernel_ridge > 0``: it makes the dual strongly convex, so the implicit gradient's linear
    system is non-singular even when the support embeddings are linearly dependent (more
    support examples than features); the gradient is exact only at a converged solution.

    Args:
        c: the SVM's :math:`C`. kernel_ridge: :math:`r`. iters: FISTA steps of the dual solver.
        ways: the number of classes, or None for any (absent labels get no dual variables and
            no logits).

    Example:
        >>> from metagrad import MetaParams, Task
        >>> embed_fn = lambda w, x: jnp.tanh(x @ w)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.2]])
        >>> task = Task((x[:2], jnp.array([0, 1])), (x[2:], jnp.array([0])))
        >>> mp = MetaParams({"backbone": jnp.eye(2), "head": svm_head(scale=5.0)})
        >>> vg = jax.jit(svm().value_and_grad, static_argnums=0)  # one compilation
        >>> (loss, m), g = vg(embed_fn, mp, task, 0)
        >>> float(m["acc_post"]), g.params["backbone"].shape
        (1.0, (2, 2))
    """
    _check_ways(ways)
    if not c > 0 or kernel_ridge < 0:
        raise ValueError(f"svm needs c > 0 and kernel_ridge >= 0; got c={c!r}, {kernel_ridge=!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")

    def objective(embed_fn, meta_params, task, step):
        theta, head = _split(meta_params, "svm", ("scale",))
        zs, ys = embed(embed_fn, theta, task.support)
        zq, yq = embed(embed_fn, theta, task.query)
        num = _num_classes(ways, task.support)
        a = svm_dual(zs, ys, num, c=c, kernel_ridge=kernel_ridge, iters=iters)
        logits = head["scale"] * ((zq @ zs.T) @ a)
        present = jnp.sum(jax.nn.one_hot(ys, num), axis=0) > 0
        return classification_metrics(jnp.where(present, logits, -jnp.inf), yq)

    return MetaGradEstimator(name, objective, _vg(objective), None)


__all__ = [
    "SVMProblem",
    "kkt_residual",
    "project_rows",
    "r2d2",
    "r2d2_head",
    "ridge_solve",
    "svm",
    "svm_dual",
    "svm_head",
    "with_ones",
]
