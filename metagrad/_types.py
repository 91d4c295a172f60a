"""The types every layer shares: pytrees, losses, tasks and meta-parameters. No logic here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PyTree = Any
"""Any JAX pytree: an array, or nested dicts, lists, tuples and NamedTuples of arrays."""

LossFn = Callable[..., jax.Array]
"""``loss_fn(params, batch) -> scalar`` (``loss_fn(params, batch, step)`` for models that take
the inner step index, such as MAML++'s per-step batch norm)."""

MetricsFn = Callable[[PyTree, Any], dict]
"""``metrics_fn(params, batch) -> {name: scalar}``, e.g. accuracy; never differentiated."""


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


class MetaParams(NamedTuple):
    """What the outer loop learns: the initial parameters and, optionally, the inner rates.

    ``lr`` is None unless the inner learning rates are meta-learned (Meta-SGD, MAML++'s LSLR);
    then it is a params-shaped pytree of rates (with a leading steps axis for per-step rates),
    differentiated like the parameters. Meta-gradients come back as ``MetaParams`` too.

    Example:
        >>> import jax.numpy as jnp
        >>> mp = MetaParams({"w": jnp.zeros(3)})
        >>> mp.lr is None, MetaParams(mp.params, lr={"w": jnp.full(3, 0.1)}).lr["w"].shape
        (True, (3,))
    """

    params: PyTree
    lr: PyTree | None = None
