"""A correctness check users can call: any estimator's meta-gradient against float64 central
finite differences of its own objective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from metagrad._types import LossFn, PyTree, Task
from metagrad.estimators.base import MetaGradEstimator


def check_meta_grad(
    estimator: MetaGradEstimator,
    loss_fn: LossFn,
    meta_params: PyTree,
    task: Task,
    *,
    step: int = 0,
    eps: float = 1e-5,
    num_directions: int | None = None,
    key: jax.Array | None = None,
) -> float:
    r"""Relative error of an estimator's meta-gradient against float64 central finite differences.

    Both are computed in float64. With :math:`\mathcal{L}` the estimator's ``objective`` and
    :math:`g` its meta-gradient, for directions :math:`v_k` (every coordinate by default, or
    ``num_directions`` random unit-length ones):

    .. math:: d_k = \frac{\mathcal{L}(\theta + \epsilon v_k) - \mathcal{L}(\theta - \epsilon v_k)}
              {2\epsilon}, \qquad
              \text{error} = \frac{\|(v_k^\top g)_k - d\|_2}{\max(\|d\|_2, 10^{-30})}

    Second-order MAML gives errors near 1e-8; first-order MAML's error is the relative size of
    the Hessian term it drops, so a silently first-order meta-gradient shows up here.

    Example:
        >>> from metagrad import MetaParams, Task, maml
        >>> loss_fn = lambda p, b: jnp.mean(jnp.sin(p * b[0]) - b[1]) ** 2
        >>> task = Task((jnp.linspace(0, 1, 5), jnp.ones(5)), (jnp.linspace(1, 2, 5), jnp.ones(5)))
        >>> check_meta_grad(maml(steps=2, lr=0.5), loss_fn, MetaParams(jnp.array(0.3)), task) < 1e-6
        True
    """
    estimator.check(meta_params)
    with jax.enable_x64(True):
        mp64 = _to_float64(meta_params)
        task64 = _to_float64(task)
        value_and_grad = jax.jit(lambda mp, t: estimator.value_and_grad(loss_fn, mp, t, step))
        (_, _), grads = value_and_grad(mp64, task64)
        flat, unravel = ravel_pytree(mp64)
        g_flat, _ = ravel_pytree(grads)
        n = flat.shape[0]
        if num_directions is None:
            directions = jnp.eye(n, dtype=jnp.float64)
        else:
            key = jax.random.key(0) if key is None else key
            directions = jax.random.normal(key, (num_directions, n), jnp.float64)
            # Unit length, so eps is the step actually taken (a kink of ReLU is less likely hit).
            directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)
        f = jax.jit(
            lambda x: estimator.objective(loss_fn, unravel(x), task64, jnp.asarray(step))[0]
        )
        fd = lax.map(lambda v: (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps), directions)
        projected = directions @ g_flat
        err = jnp.linalg.norm(projected - fd) / jnp.maximum(jnp.linalg.norm(fd), 1e-30)
        return float(err)


def _to_float64(tree: PyTree) -> PyTree:
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)
