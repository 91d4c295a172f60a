"""The task container shared by every task family and by the outer loop."""

from __future__ import annotations

from typing import Any, NamedTuple


class Task(NamedTuple):
    """One few-shot task (or a batch of them, with a leading task axis on every leaf).

    ``support`` and ``query`` are batches in the form the loss takes, ``loss_fn(params, batch)``:
    for regression and classification, ``(inputs, targets)``.

    Example:
        Stacking tasks leaf by leaf adds the task axis that the outer loop maps over:

        >>> import jax, jax.numpy as jnp
        >>> task = Task(support=(jnp.zeros((5, 1)), jnp.zeros((5, 1))),
        ...             query=(jnp.ones((10, 1)), jnp.ones((10, 1))))
        >>> batch = jax.tree.map(lambda *leaves: jnp.stack(leaves), task, task, task)
        >>> batch.support[0].shape, batch.query[1].shape
        ((3, 5, 1), (3, 10, 1))
    """

    support: Any
    query: Any
