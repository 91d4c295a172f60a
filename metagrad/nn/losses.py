"""Loss and metric functions in the engine's form, ``loss_fn(params, batch[, step])``."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax


def mse_loss(apply: Callable) -> Callable:
    r"""``loss_fn(params, (x, y)) = mean((apply(params, x) - y)^2)``.

    Example:
        >>> float(mse_loss(lambda p, x: p * x)(2.0, (jnp.ones(3), jnp.zeros(3))))
        4.0
    """

    def loss_fn(params, batch, step=None):
        x, y = batch
        pred = apply(params, x) if step is None else apply(params, x, step=step)
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
        x, y = batch
        logits = apply(params, x) if step is None else apply(params, x, step=step)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss_fn


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
        x, y = batch
        return {"acc": jnp.mean(jnp.argmax(apply(params, x), axis=-1) == y)}

    return metrics_fn
