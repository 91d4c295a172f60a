"""What every meta-gradient estimator shares: the estimator type, the inner loop it owns, the
meta-parameter checks and the pre/post-adaptation metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad._types import LossFn, MetaParams, MetricsFn, PyTree, Task
from metagrad.inner import _validate_steps, _validate_truncate, adapt, proximal, with_step


class MetaGradEstimator(NamedTuple):
    r"""A meta-gradient estimator for one task, and the inner loop it adapts with.

    Attributes:
        name: e.g. ``"maml"``.
        objective: ``(loss_fn, meta_params, task, step) -> (loss, metrics)``: the meta-objective
            whose gradient is estimated (what `check_meta_grad` differentiates numerically).
        value_and_grad: ``(loss_fn, meta_params, task, step) -> ((loss, metrics), grads)``, with
            ``grads`` a :class:`metagrad.MetaParams` shaped like ``meta_params``.
        inner: the :class:`InnerLoop` it trains with; :meth:`adapt` runs it, and evaluation,
            curves and plots adapt through it. None for an estimator without adaptation.

    Example:
        A custom estimator (no adaptation, :math:`g = \nabla_\theta L(\theta; Q)`), checked
        against finite differences like the built-in ones:

        >>> from metagrad import MetaParams, Task, check_meta_grad
        >>> def objective(loss_fn, meta_params, task, step):
        ...     return loss_fn(meta_params.params, task.query), {}
        >>> def value_and_grad(loss_fn, meta_params, task, step):
        ...     vg = jax.value_and_grad(objective, argnums=1, has_aux=True)
        ...     return vg(loss_fn, meta_params, task, step)
        >>> joint = MetaGradEstimator("joint", objective, value_and_grad)
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> task = Task((jnp.ones(3), 2 * jnp.ones(3)), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> (loss, _), g = joint.value_and_grad(loss_fn, MetaParams(0.0), task, 0)
        >>> float(loss), float(g.params)  # (0 - 2)^2 and 2 (0 - 2)
        (4.0, -4.0)
        >>> check_meta_grad(joint, loss_fn, MetaParams(jnp.array(0.5)), task) < 1e-8
        True
    """

    name: str
    objective: Callable
    value_and_grad: Callable
    inner: InnerLoop | None = None

    def adapt(
        self,
        loss_fn: LossFn,
        meta_params: MetaParams,
        support: Any,
        *,
        steps: int | None = None,
        return_trajectory: bool = False,
    ):
        """The parameters after the estimator's own inner loop (``steps`` to override its step
        count); with ``return_trajectory``, also those after each step."""
        if self.inner is None:
            if steps:
                raise ValueError(f"estimator {self.name!r} has no inner loop to run {steps} steps")
            check_meta_params(meta_params)
            theta = meta_params.params
            empty = jax.tree.map(
                lambda p: jnp.zeros((0,) + jnp.shape(p), jnp.result_type(p)), theta
            )
            return (theta, empty) if return_trajectory else theta
        return self.inner.run(
            loss_fn, meta_params, support, steps=steps, return_trajectory=return_trajectory
        )

    def check(self, meta_params: MetaParams) -> None:
        """Raises a clear error if ``meta_params`` cannot be trained by this estimator."""
        check_meta_params(meta_params)
        if self.inner is not None:
            self.inner.rates(meta_params)


@dataclass(frozen=True)
class InnerLoop:
    """An estimator's inner loop: the static settings of :func:`adapt`, and where the rates come
    from. Training, evaluation, curves and plots all adapt through :meth:`run`, so they cannot
    disagree.

    ``lr=None`` without an ``optimizer`` means the rates are meta-learned and read from
    ``MetaParams.lr``; otherwise ``MetaParams.lr`` must be None (a conflict is an error, never a
    silent choice). ``prox_reg`` adds iMAML's proximal term around the initial parameters.
    ``truncate`` backpropagates through the last ``truncate`` steps only (see
    :func:`metagrad.adapt`).
    """

    steps: int
    lr: Any = None
    per_step: bool = False
    mask: Any = None
    optimizer: Any = None
    remat: bool = False
    unroll: bool = False
    step_arg: bool = False
    prox_reg: float | None = None
    truncate: int | None = None

    def __post_init__(self):
        _validate_steps(self.steps)
        if self.truncate is not None:
            _validate_truncate(self.truncate)
            if self.truncate > self.steps:
                raise ValueError(
                    f"truncate={self.truncate} exceeds steps={self.steps}: backpropagation "
                    "through the last truncate steps needs truncate <= steps"
                )
        if self.optimizer is not None and self.lr is not None:
            raise ValueError(
                "pass either lr (SGD) or optimizer, not both: the optax optimizer "
                "carries its own learning rate"
            )
        if self.optimizer is not None and self.per_step:
            raise ValueError("per_step rates are SGD rates; an optax optimizer has its own")

    @property
    def learns_lr(self) -> bool:
        return self.lr is None and self.optimizer is None

    def rates(self, meta_params: MetaParams):
        """The rates to adapt with, after checking ``meta_params`` against this loop."""
        check_meta_params(meta_params)
        learned = meta_params.lr
        if self.optimizer is not None and learned is not None:
            raise ValueError(
                "meta_params.lr holds learned inner rates, but the inner loop uses an optax "
                "optimizer, which applies its own rate: the learned rates would get no "
                "gradient. Drop meta_params.lr or the optimizer."
            )
        if self.learns_lr and learned is None:
            raise ValueError(
                "this estimator learns its inner rates (built with lr=None and no optimizer): "
                "pass MetaParams(params, lr=metagrad.learned_rates(params, init))"
            )
        if self.lr is not None and learned is not None:
            raise ValueError(
                f"the estimator was built with lr={self.lr!r} and meta_params.lr holds learned "
                "rates: build it with lr=None to learn them, or drop meta_params.lr"
            )
        return learned if self.learns_lr else self.lr

    def run(
        self,
        loss_fn: LossFn,
        meta_params: MetaParams,
        support: Any,
        *,
        first_order: bool = False,
        steps: int | None = None,
        return_trajectory: bool = False,
    ):
        """:func:`adapt` from ``meta_params.params`` with this loop's settings.

        ``steps`` overrides the number of steps (evaluation at other step counts); per-step
        rates are then cut, or extended by repeating the last step's rate.
        """
        lr = self.rates(meta_params)
        steps = self.steps if steps is None else steps
        if self.per_step and steps != self.steps:
            lr = jax.tree.map(lambda a: _resize_steps(a, steps), lr)
        theta = meta_params.params
        inner_loss = loss_fn if self.prox_reg is None else proximal(loss_fn, theta, self.prox_reg)
        return adapt(
            inner_loss,
            theta,
            support,
            steps=steps,
            lr=lr,
            first_order=first_order,
            per_step=self.per_step,
            mask=self.mask,
            optimizer=self.optimizer,
            remat=self.remat,
            unroll=self.unroll,
            step_arg=self.step_arg,
            return_trajectory=return_trajectory,
            truncate=self.truncate,
        )


def _resize_steps(rates: jax.Array, steps: int) -> jax.Array:
    """Per-step rates for ``steps`` steps: cut, or extended by repeating the last step's."""
    have = rates.shape[0]
    if steps <= have:
        return rates[:steps]
    return jnp.concatenate([rates, jnp.repeat(rates[-1:], steps - have, axis=0)])


def check_meta_params(meta_params) -> None:
    """A clear error for anything but a :class:`metagrad.MetaParams`.

    Example:
        >>> check_meta_params({"w": 1.0})
        Traceback (most recent call last):
        TypeError: meta-parameters must be metagrad.MetaParams(params, lr=None); got a dict ...
    """
    if isinstance(meta_params, MetaParams):
        return
    what = (
        f"a dict with keys {sorted(map(str, meta_params))}"
        if isinstance(meta_params, dict)
        else f"a {type(meta_params).__name__}"
    )
    raise TypeError(
        f"meta-parameters must be metagrad.MetaParams(params, lr=None); got {what}. Wrap the "
        "model's parameters: MetaParams(params), or MetaParams(params, lr=rates) for learned "
        "inner rates"
    )


def learned_rates(
    params: PyTree, init: float, *, per_element: bool = True, steps: int | None = None, dtype=None
):
    """Initial learned inner rates, all ``init``: one per parameter entry (Meta-SGD) or one per
    tensor (``per_element=False``), with a leading axis of ``steps`` for per-step rates
    (MAML++'s LSLR). Each leaf broadcasts to its parameter.

    Example:
        >>> rates = learned_rates({"w": jnp.zeros((2, 3))}, 0.1, per_element=False, steps=4)
        >>> rates["w"].shape
        (4, 1, 1)
    """
    lead = () if steps is None else (steps,)

    def leaf(p):
        shape = lead + (np.shape(p) if per_element else (1,) * np.ndim(p))
        return jnp.full(shape, init, dtype or jnp.result_type(p))

    return jax.tree.map(leaf, params)


def query_loss(loss_fn: LossFn, inner: InnerLoop, params: PyTree, batch, step) -> jax.Array:
    """The loss at ``params``, with the step index for models that take it."""
    return with_step(loss_fn, inner.step_arg)(params, batch, step)


def adaptation_metrics(
    loss_fn: LossFn,
    inner: InnerLoop,
    meta_params: MetaParams,
    adapted: PyTree,
    task: Task,
    metrics_fn: MetricsFn | None,
    loss_post,
) -> dict:
    """Pre- and post-adaptation query metrics, outside the gradient. ``loss_post`` is the query
    loss at ``adapted``, which every estimator has already computed (recomputing it here costs
    a forward pass per task that XLA does not always merge)."""
    params = lax.stop_gradient(meta_params.params)
    adapted = lax.stop_gradient(adapted)
    out = {
        "loss_pre": query_loss(loss_fn, inner, params, task.query, 0),
        "loss_post": lax.stop_gradient(loss_post),
    }
    if metrics_fn is not None:
        for k, v in metrics_fn(params, task.query).items():
            out[f"{k}_pre"] = v
        for k, v in metrics_fn(adapted, task.query).items():
            out[f"{k}_post"] = v
    return out


def no_learned_lr(inner: InnerLoop, name: str) -> None:
    """Estimators that do not differentiate the inner rates refuse to learn them."""
    if inner.learns_lr:
        raise ValueError(f"{name} does not meta-learn inner rates: pass lr or an optimizer")
