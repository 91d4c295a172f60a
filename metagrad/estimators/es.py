r"""Zero-order meta-gradients: antithetic evolution strategies (ES) and persistent ES (PES).

Both need only values of the meta-objective, so they apply where autodiff does not: quantized
or discrete inner loops, simulators, non-differentiable metrics. Both report the standard error
of their estimate (:class:`metagrad.Estimate`), so a user can see how many samples are enough.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad._types import MetaParams, MetricsFn, PyTree  # noqa: F401 (MetaParams: examples)
from metagrad.autodiff import Estimate
from metagrad.estimators.base import InnerLoop, MetaGradEstimator, adaptation_metrics, query_loss


def _check(sigma, num_samples, who: str) -> None:
    if not (isinstance(sigma, int | float) and np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{who}: sigma must be a positive finite number, got {sigma!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{who}: num_samples must be a positive int, got {num_samples!r}")


def _normal_like(key: jax.Array, tree: PyTree, num: int) -> PyTree:
    """``num`` standard normal draws shaped like ``tree`` (a leading axis of ``num``)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [
        jax.random.normal(k, (num,) + jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, draws)


def _mean_and_stderr(samples: PyTree) -> Estimate:
    """The mean over the leading axis and its standard error ``sd / sqrt(n)`` (0 for n = 1)."""
    n = jax.tree.leaves(samples)[0].shape[0]
    mean = jax.tree.map(lambda s: jnp.mean(s, axis=0), samples)
    if n == 1:
        return Estimate(mean, jax.tree.map(jnp.zeros_like, mean))
    stderr = jax.tree.map(lambda s: jnp.std(s, axis=0, ddof=1) / np.sqrt(n), samples)
    return Estimate(mean, stderr)


def es_grad(
    f: Callable[[PyTree], jax.Array],
    x: PyTree,
    key: jax.Array,
    *,
    sigma: float,
    num_samples: int,
) -> Estimate:
    r"""The antithetic evolution-strategies estimate of :math:`\nabla f(x)`, with its standard
    error.

    .. math:: \hat g = \frac1N \sum_{i=1}^N \frac{f(x + \sigma\epsilon_i) - f(x - \sigma\epsilon_i)}
              {2\sigma}\,\epsilon_i, \qquad \epsilon_i \sim \mathcal N(0, I)

    unbiased for the gradient of the Gaussian-smoothed :math:`\mathbb E f(x + \sigma\epsilon)`
    (for a quadratic :math:`f`, of :math:`f` itself). ``num_samples`` is :math:`N`, the number
    of antithetic pairs (:math:`2N` evaluations of ``f``, vectorised with ``vmap``).

    Returns:
        :class:`metagrad.Estimate`: ``mean`` :math:`\hat g` (shaped like ``x``) and ``stderr``,
        the standard error of each entry (the sample sd of the :math:`N` terms over
        :math:`\sqrt N`); the variance of the estimate is ``stderr ** 2``.

    Example:
        For :math:`f(x) = \|x\|^2` the antithetic difference is exact, so 4096 samples land
        close to :math:`\nabla f(1, -2) = (2, -4)`, within the reported error:

        >>> est = es_grad(lambda x: jnp.sum(x**2), jnp.array([1.0, -2.0]), jax.random.key(0),
        ...               sigma=0.1, num_samples=4096)
        >>> [round(float(g)) for g in est.mean]
        [2, -4]
        >>> bool(jnp.all(jnp.abs(est.mean - jnp.array([2.0, -4.0])) < 3 * est.stderr))
        True
    """
    _check(sigma, num_samples, "es_grad")
    eps = _normal_like(key, x, num_samples)

    def term(e):
        shift = lambda s: jax.tree.map(lambda xi, ei: xi + s * sigma * ei, x, e)
        diff = (f(shift(1.0)) - f(shift(-1.0))) / (2 * sigma)
        return jax.tree.map(lambda ei: diff * ei, e)

    return _mean_and_stderr(jax.vmap(term)(eps))


def es(
    sigma: float,
    num_samples: int,
    *,
    steps: int,
    lr=None,
    seed: int = 0,
    metrics_fn: MetricsFn | None = None,
    name: str = "es",
    **inner_kwargs,
) -> MetaGradEstimator:
    r"""Antithetic ES on the unrolled meta-objective: no derivative of the inner loop is taken.

    .. math:: \mathcal L(\theta) = L\big(\operatorname{adapt}(\theta; S); Q\big), \qquad
              g = \frac1N \sum_i \frac{\mathcal L(\theta + \sigma\epsilon_i) -
              \mathcal L(\theta - \sigma\epsilon_i)}{2\sigma}\epsilon_i

    (:func:`es_grad`) over every meta-parameter (the params and any learned rates). The inner
    loop is :func:`metagrad.adapt`'s with its keywords, so it may be non-differentiable
    (quantized, discrete). The noise key is ``fold_in(key(seed), step)``: fresh each outer step,
    shared by the tasks of one batch (common random numbers). The metrics add ``es_stderr``, the
    norm of the estimate's standard error :math:`\sqrt{\sum_j \mathrm{se}_j^2}`.

    Example:
        :math:`\mathcal L(p) = (0.8p - 1.6)^2` after one step (see :func:`metagrad.maml`) is
        quadratic, so ES is unbiased for MAML's :math:`-2.56` at :math:`p = 0`:

        >>> from metagrad import Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> est = es(0.1, 4096, steps=1, lr=0.1)
        >>> (loss, m), g = est.value_and_grad(loss_fn, MetaParams(jnp.array(0.0)), task, 0)
        >>> round(float(g.params), 1), bool(m["es_stderr"] < 0.1)
        (-2.6, True)
    """
    _check(sigma, num_samples, "es")
    inner = InnerLoop(steps=steps, lr=lr, **inner_kwargs)

    def value(loss_fn, meta_params, task):
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=True)
        return query_loss(loss_fn, inner, adapted, task.query, max(steps - 1, 0)), adapted

    def objective(loss_fn, meta_params, task, step):
        loss, adapted = value(loss_fn, meta_params, task)
        return loss, adaptation_metrics(
            loss_fn, inner, meta_params, adapted, task, metrics_fn, loss
        )

    def value_and_grad(loss_fn, meta_params, task, step):
        inner.rates(meta_params)  # checks meta_params
        meta_params = lax.stop_gradient(meta_params)
        key = jax.random.fold_in(jax.random.key(seed), step)
        f = lambda mp: value(loss_fn, mp, task)[0]
        est = es_grad(f, meta_params, key, sigma=sigma, num_samples=num_samples)
        loss, metrics = objective(loss_fn, meta_params, task, step)
        sq = sum(jnp.sum(s**2) for s in jax.tree.leaves(est.stderr))
        metrics["es_stderr"] = jnp.sqrt(sq)
        return (loss, metrics), est.mean

    return MetaGradEstimator(name, objective, value_and_grad, inner)


# --- persistent evolution strategies ----------------------------------------------------------


class PESState(NamedTuple):
    """The particles of :func:`pes`: ``states`` (each particle's unroll state, a leading axis of
    ``2 * num_samples``) and ``xi``, the sum of each particle's perturbations so far."""

    states: Any
    xi: PyTree


class PES(NamedTuple):
    """:func:`pes`'s ``(init, update)`` pair."""

    init: Callable
    update: Callable


def pes(
    unroll: Callable[[Any, PyTree], tuple[Any, jax.Array]], *, sigma: float, num_samples: int
) -> PES:
    r"""Persistent evolution strategies (Vicol et al. 2021): unbiased gradients of a long unroll
    split into truncations.

    ``unroll(state, theta) -> (state, loss)`` runs one truncation. Truncated ES differentiates
    each truncation alone and is biased (it ignores :math:`\theta`'s effect through the state it
    starts from); PES keeps :math:`2N` particles with their own states and perturbations
    :math:`\pm\epsilon_{t,i}`, and weights each truncation's loss by the sum
    :math:`\xi_{t,i} = \sum_{\tau \le t} \epsilon_{\tau,i}` of all the perturbations that
    particle has seen:

    .. math:: \hat g_t = \frac{1}{N} \sum_{i=1}^{N} \frac{\xi_{t,i}\,
              \big(L_t(s^+_i, \theta + \epsilon_{t,i}) - L_t(s^-_i, \theta - \epsilon_{t,i})\big)}
              {2\sigma^2}, \qquad \epsilon_{t,i} \sim \mathcal N(0, \sigma^2 I)

    (antithetic pairs :math:`\pm`). With :math:`\theta` held fixed,
    :math:`\sum_{t \le T} \hat g_t` is unbiased for the gradient of the Gaussian-smoothed total
    loss :math:`\sum_{t \le T} L_t` of the whole unroll.

    Returns:
        :class:`PES` ``(init, update)``: ``init(theta, state0) -> PESState`` (every particle
        starts at ``state0``, with :math:`\xi = 0` shaped like ``theta``);
        ``update(pes_state, theta, key) -> (pes_state, Estimate)``, the estimate
        :math:`\hat g_t` and its standard error over the :math:`N` pairs. Call ``init`` again
        to start a new unroll.

    Example:
        :math:`s_{t+1} = s_t + \theta` from 0 with :math:`L_t = s_{t+1}^2` over two truncations
        of one step: :math:`\sum_t L_t = \theta^2 + 4\theta^2`, whose gradient at 1 is 10:

        >>> unroll = lambda s, th: (s + th, (s + th) ** 2)
        >>> init, update = pes(unroll, sigma=0.1, num_samples=4096)
        >>> state, total = init(jnp.array(1.0), jnp.array(0.0)), 0.0
        >>> for t in range(2):
        ...     state, est = update(state, jnp.array(1.0), jax.random.key(t))
        ...     total += est.mean
        >>> round(float(total))
        10
    """
    _check(sigma, num_samples, "pes")
    particles = 2 * num_samples

    def init(theta: PyTree, state0) -> PESState:
        states = jax.tree.map(lambda s: jnp.broadcast_to(s, (particles,) + jnp.shape(s)), state0)
        return PESState(states, _zeros_particles(theta, particles))

    def update(pes_state: PESState, theta: PyTree, key: jax.Array):
        eps = jax.tree.map(lambda e: sigma * e, _normal_like(key, theta, num_samples))
        pert = jax.tree.map(lambda e: jnp.concatenate([e, -e]), eps)
        xi = jax.tree.map(jnp.add, pes_state.xi, pert)
        shifted = jax.tree.map(lambda t, p: t + p, theta, pert)
        states, losses = jax.vmap(unroll)(pes_state.states, shifted)
        diff = losses[:num_samples] - losses[num_samples:]
        terms = jax.tree.map(
            lambda x: x[:num_samples] * diff.reshape((-1,) + (1,) * (x.ndim - 1)) / (2 * sigma**2),
            xi,
        )
        return PESState(states, xi), _mean_and_stderr(terms)

    return PES(init, update)


def _zeros_particles(theta: PyTree, particles: int) -> PyTree:
    return jax.tree.map(lambda t: jnp.zeros((particles,) + jnp.shape(t), jnp.result_type(t)), theta)


__all__ = ["PES", "PESState", "es", "es_grad", "pes"]
