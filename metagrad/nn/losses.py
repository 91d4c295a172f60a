"""Loss and metric functions in the engine's form, ``loss_fn(params, batch[, step])``."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax


def forward(apply: Callable, params, batch, step=None):
    """``(outputs, targets)`` for ``batch = (x, y)``, or ``(x, y, context)``: then ``context``
    (the support inputs) is run in front of ``x`` and the batch-norm statistics come from its
    rows alone (``MetaBatchNorm(policy="support")``); only ``x``'s outputs are returned."""
    x, y, *context = batch
    kwargs = {} if step is None else {"step": step}
    if context:
        (ctx,) = context
        out = apply(params, jnp.concatenate([ctx, x]), stats_rows=ctx.shape[0], **kwargs)
        return out[ctx.shape[0] :], y
    return apply(params, x, **kwargs), y


def with_support_context(task):
    """The task with the support inputs appended to its query batch, ``(xq, yq, xs)``, so that
    a loss normalises query examples with support statistics only (see :func:`forward`)."""
    (xs, _), (xq, yq) = task.support, task.query
    return type(task)(task.support, (xq, yq, xs))


def mse_loss(apply: Callable) -> Callable:
    r"""``loss_fn(params, (x, y)) = mean((apply(params, x) - y)^2)``.

    Example:
        >>> float(mse_loss(lambda p, x: p * x)(2.0, (jnp.ones(3), jnp.zeros(3))))
        4.0
    """

    def loss_fn(params, batch, step=None):
        pred, y = forward(apply, params, batch, step)
        return jnp.mean((pred - y) ** 2)

    return loss_fn


def cross_entropy_loss(apply: Callable) -> Callable:
    r"""Mean softmax cross-entropy of integer labels, ``-mean(log softmax(apply(params, x))[y])``.

    Example:
        >>> loss = cross_entropy_loss(lambda p, x: x * p)
        >>> round(float(loss(0.0, (jnp.ones((2, 4)), jnp.array([0, 3])))), 4)  # log 4
        1.3863
    """

    def loss_fn(params, batch, step=None):
        logits, y = forward(apply, params, batch, step)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss_fn


def cross_entropy_and_accuracy(apply: Callable) -> Callable:
    r"""``scores_fn(params, batch, step=None) -> {"loss", "acc"}`` from one forward pass: the
    held-out curves' scores (``cross_entropy_loss`` and ``accuracy`` apart run the model twice,
    and XLA does not merge the two: 2.2x slower curves on Omniglot on CPU).

    Example:
        >>> scores = cross_entropy_and_accuracy(lambda p, x: x)  # the inputs are the logits
        >>> out = scores(None, (jnp.array([[0.0, 0.0], [2.0, 0.0]]), jnp.array([0, 1])))
        >>> round(float(out["loss"]), 4), float(out["acc"])
        (1.41, 0.5)
    """

    def scores_fn(params, batch, step=None):
        logits, y = forward(apply, params, batch, step)
        return {
            "loss": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
            "acc": jnp.mean(jnp.argmax(logits, axis=-1) == y),
        }

    return scores_fn


def accuracy(apply: Callable) -> Callable:
    r"""``metrics_fn(params, (x, y)) -> {"acc": fraction of argmax(logits) == y}``.

    .. math:: \mathrm{acc} = \frac{1}{n} \sum_{i=1}^{n} [\arg\max_c f(x_i)_c = y_i]

    Example:
        >>> metrics_fn = accuracy(lambda p, x: x)  # the inputs are the logits
        >>> logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
        >>> float(metrics_fn(None, (logits, jnp.array([1, 1, 1, 0])))["acc"])
        0.75
    """

    def metrics_fn(params, batch):
        logits, y = forward(apply, params, batch)
        return {"acc": jnp.mean(jnp.argmax(logits, axis=-1) == y)}

    return metrics_fn
