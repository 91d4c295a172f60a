"""MAML and the estimators that are MAML with other settings: first-order MAML, Meta-SGD, ANIL."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp  # noqa: F401 (the examples use it)

from metagrad._types import LossFn, MetricsFn, PyTree
from metagrad.estimators.base import InnerLoop, MetaGradEstimator, adaptation_metrics, query_loss
from metagrad.inner import adapt, check_inner_optimizer


def meta_loss(
    loss_fn: LossFn,
    params: PyTree,
    support: Any,
    query: Any,
    *,
    steps: int,
    lr,
    first_order: bool = False,
    **adapt_kwargs,
) -> jax.Array:
    r"""MAML's meta-objective: the query loss after `adapt` on the support set.

    .. math:: \mathcal{L}(\theta) = L\big(\phi(\theta); Q\big), \qquad
              \phi(\theta) = \operatorname{adapt}(\theta; S)

    ``jax.grad`` of this is the MAML meta-gradient (first-order MAML's with ``first_order``).
    Extra keywords go to :func:`metagrad.adapt` (``per_step``, ``mask``, ``optimizer``,
    ``remat``, ``unroll``).

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> batch = (jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0]))
        >>> float(meta_loss(loss_fn, 2.0, batch, batch, steps=1, lr=0.1))  # already optimal
        0.0
    """
    adapted = adapt(
        loss_fn, params, support, steps=steps, lr=lr, first_order=first_order, **adapt_kwargs
    )
    return loss_fn(adapted, query)


def maml(
    *,
    steps: int,
    lr=None,
    first_order: bool = False,
    metrics_fn: MetricsFn | None = None,
    name: str | None = None,
    **inner_kwargs,
) -> MetaGradEstimator:
    r"""MAML (second order) or, with ``first_order=True``, first-order MAML.

    .. math:: g = \nabla_\theta L\big(\phi(\theta); Q\big)
              = \Big(\prod_i (I - \alpha H_i)\Big)^{\!\top} \nabla_\phi L(\phi; Q)

    where :math:`H_i` is the support-loss Hessian at step :math:`i`; first-order MAML drops the
    :math:`\alpha H_i` terms (:math:`g = \nabla_\phi L(\phi; Q)`). With ``lr=None`` (and no
    ``optimizer``) the rates are learned: read from ``MetaParams.lr`` and differentiated too
    (Meta-SGD, :func:`metasgd`). Keywords are :func:`metagrad.adapt`'s.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> est = maml(steps=1, lr=0.1)
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> (loss, _), g = est.value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4)  # d/dp (0.8 p + 0.4 - 2)^2 = 2 (0.8 p - 1.6) 0.8
        -2.56
    """
    inner = InnerLoop(steps=steps, lr=lr, **inner_kwargs)
    if inner.optimizer is not None and not first_order:  # differentiated through
        check_inner_optimizer(inner.optimizer)

    def objective(loss_fn, meta_params, task, step, fo=first_order):
        adapted = inner.run(loss_fn, meta_params, task.support, first_order=fo)
        loss = query_loss(loss_fn, inner, adapted, task.query, max(steps - 1, 0))
        return loss, adaptation_metrics(
            loss_fn, inner, meta_params, adapted, task, metrics_fn, loss
        )

    def value_and_grad(loss_fn, meta_params, task, step):
        return jax.value_and_grad(objective, argnums=1, has_aux=True)(
            loss_fn, meta_params, task, step
        )

    exact = lambda loss_fn, meta_params, task, step: objective(
        loss_fn, meta_params, task, step, False
    )
    name = name or ("fomaml" if first_order else "maml")
    return MetaGradEstimator(name, exact, value_and_grad, inner)


def fomaml(**kwargs) -> MetaGradEstimator:
    r"""First-order MAML: :func:`maml` with ``first_order=True``.

    .. math:: g = \nabla_\phi L(\phi; Q) \big|_{\phi = \phi(\theta)}

    Example:
        One step on :math:`L(p) = (p - 2)^2` from :math:`p = 0` with :math:`\alpha = 0.1`
        reaches :math:`\phi = 0.4`; the gradient there is :math:`2 (0.4 - 2) = -3.2`, where
        :func:`maml` gives :math:`(1 - \alpha H)(-3.2) = 0.8 \cdot (-3.2) = -2.56`.

        >>> from metagrad import MetaParams, Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> (loss, _), g = fomaml(steps=1, lr=0.1).value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4)
        -3.2
    """
    if kwargs.pop("first_order", True) is not True:
        raise ValueError("fomaml is first-order by definition; use maml for second order")
    return maml(first_order=True, **kwargs)


def truncated(k: int, *, steps: int, **kwargs) -> MetaGradEstimator:
    r"""Truncated backpropagation: :func:`maml` differentiated through its last ``k`` inner steps.

    .. math:: g = \Big(\prod_{i = n}^{\text{steps} - 1} (I - \alpha H_i)\Big)^{\!\top}
              \nabla_\phi L(\phi; Q), \qquad n = \text{steps} - k

    The first :math:`n` steps run off the tape and count as first order (identity Jacobian; see
    :func:`metagrad.adapt`'s ``truncate``), so memory grows with ``k``, not ``steps``.
    ``truncated(steps)`` is :func:`maml` exactly; ``truncated(0)`` gives first-order MAML's
    gradient with respect to :math:`\theta` (learned rates get none). Keywords are
    :func:`maml`'s.

    Example:
        Two steps with :math:`\alpha = 0.1` on :math:`L(p) = (p - 2)^2` (:math:`H = 2`) from
        :math:`p = 0` reach :math:`\phi = 0.72`; truncated to the last step,
        :math:`g = (1 - 0.2) \cdot 2 (0.72 - 2) = -2.048` (MAML: :math:`0.8^2 \cdot (-2.56)`):

        >>> from metagrad import MetaParams, Task
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> _, g = truncated(1, steps=2, lr=0.1).value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> round(float(g.params), 4)
        -2.048
    """
    for key in ("truncate", "first_order"):
        if kwargs.get(key) not in (None, False):
            raise ValueError(f"truncated: {key}= is set by truncated itself")
        kwargs.pop(key, None)
    return maml(steps=steps, truncate=k, name=kwargs.pop("name", "truncated"), **kwargs)


def metasgd(*, steps: int, **kwargs) -> MetaGradEstimator:
    r"""Meta-SGD (Li et al. 2017): MAML whose inner rates :math:`\alpha` are meta-parameters.

    .. math:: \phi = \theta - \alpha \odot \nabla_\theta L(\theta; S), \qquad
              g = \big(\nabla_\theta \mathcal{L}, \nabla_\alpha \mathcal{L}\big)

    The rates come from ``MetaParams.lr`` (see :func:`metagrad.learned_rates`); passing ``lr``
    or an ``optimizer`` as well is refused.

    Example:
        >>> from metagrad import MetaParams, Task, learned_rates
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> mp = MetaParams(jnp.array(0.0), lr=learned_rates(jnp.array(0.0), 0.1))
        >>> _, g = metasgd(steps=1).value_and_grad(loss_fn, mp, task, 0)
        >>> round(float(g.lr), 4)  # phi = 4a, so d/da (phi - 2)^2 = 2 (0.4 - 2) 4 at a = 0.1
        -12.8
    """
    for key in ("lr", "optimizer"):
        if kwargs.get(key) is not None:
            raise ValueError(f"metasgd learns its inner rates; {key}= is not accepted")
    return maml(steps=steps, lr=None, name="metasgd", **kwargs)


def head_only(path: str) -> bool:
    """ANIL's mask: the parameters under a top-level ``head`` adapt, nothing else."""
    return path.split("/")[0] == "head"


def anil(*, steps: int, mask=head_only, **kwargs) -> MetaGradEstimator:
    r"""ANIL (Raghu et al. 2020): MAML with only the head adapted in the inner loop.

    .. math:: \phi = (\theta_{body},\; \theta_{head} - \alpha \nabla_{head} L(\theta; S))

    ``mask`` is a path predicate or a params-shaped pytree of bools (default: the top-level
    ``head``). The body still gets a meta-gradient, through the query loss.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> loss_fn = lambda p, b: jnp.mean((p["body"] * p["head"] * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> mp = MetaParams({"body": 1.0, "head": 0.0})
        >>> adapted = anil(steps=1, lr=0.1).adapt(loss_fn, mp, task.support)
        >>> {k: round(float(v), 4) for k, v in adapted.items()}  # the body stays
        {'body': 1.0, 'head': 0.4}
    """
    return maml(steps=steps, mask=mask, name="anil", **kwargs)
