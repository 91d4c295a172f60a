"""`stop_gradient` tools: straight-through estimators and the TD(0) semi-gradient (pure JAX)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax


def straight_through(f: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    r"""Straight-through estimator of ``f``: the value of ``f``, the gradient of the identity.

    .. math:: g(x) = \operatorname{sg}\big(f(x)\big) - \big(\operatorname{sg}(x) - x\big)

    where :math:`\operatorname{sg}` is ``lax.stop_gradient``: the tutorial's
    :math:`(x - \operatorname{sg}(x)) + \operatorname{sg}(f(x))`, rearranged so that the exact
    zero is subtracted (:math:`-0 - 0 = -0`, where :math:`0 + (-0) = +0`). Forward, ``g(x) ==
    f(x)`` bit for bit, signed zeros included (for finite ``x``). Backward, :math:`g'(x) = 1`
    and every higher derivative of ``g`` is zero, consistently at every order, because ``g`` is
    an ordinary JAX expression (a ``custom_vjp`` version would differentiate ``f``'s own forward
    rule at second order and silently return zeros there). The form ``x + sg(f(x) - x)`` has
    the same derivatives but is not exact in floating point.

    Args:
        f: an elementwise function (rounding, sign, a quantizer) from an array to an array of
            the same shape.

    Example:
        >>> float(jax.grad(jnp.round)(3.2)), float(jax.grad(straight_through(jnp.round))(3.2))
        (0.0, 1.0)
        >>> float(straight_through(jnp.round)(3.2))
        3.0
    """

    def g(x):
        x = jnp.asarray(x)
        return lax.stop_gradient(f(x)) - (lax.stop_gradient(x) - x)

    return g


def td_loss(
    value_fn: Callable,
    params,
    s_tm1,
    r_t,
    s_t,
    *,
    discount: float = 1.0,
    semi_gradient: bool = True,
) -> jax.Array:
    r"""Squared TD(0) error, with the bootstrapped target under ``stop_gradient`` by default.

    .. math::
        L(\theta) = \big(\operatorname{sg}(r_t + \gamma v_\theta(s_t)) - v_\theta(s_{t-1})\big)^2

    Differentiating ``L`` gives the TD(0) *semi-gradient* update
    :math:`-2\delta\, \nabla v_\theta(s_{t-1})` with
    :math:`\delta = r_t + \gamma v(s_t) - v(s_{t-1})`:
    the target is treated as a label, as in the JAX tutorial. With ``semi_gradient=False`` the
    target is differentiated too (the residual gradient), which is usually not what TD learning
    wants.

    Args:
        value_fn: ``value_fn(params, state) -> scalar``.
        params: the value function's parameters (any pytree).
        s_tm1, r_t, s_t: previous state, reward, next state.
        discount: :math:`\gamma`.
        semi_gradient: stop the gradient through the target.

    Example:
        >>> v = lambda theta, s: jnp.dot(theta, s)
        >>> theta = jnp.array([0.1, -0.1, 0.0])
        >>> args = (theta, jnp.array([1.0, 2.0, -1.0]), 1.0, jnp.array([2.0, 1.0, 0.0]))
        >>> [round(float(g), 4) for g in jax.grad(lambda *a: td_loss(v, *a))(*args)]
        [-2.4, -4.8, 2.4]
    """
    target = r_t + discount * value_fn(params, s_t)
    if semi_gradient:
        target = lax.stop_gradient(target)
    return (target - value_fn(params, s_tm1)) ** 2
