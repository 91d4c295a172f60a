"""Model adapters: a Flax module becomes ``(params, apply)``, a pure function of a params dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from metagrad.inner import mask_by_path

PyTree = Any


def functional(module: nnx.Module) -> tuple[dict, Callable]:
    """Split a Flax NNX module once into a pure params dict and ``apply(params, *args, **kw)``.

    Only ``nnx.Param`` variables are parameters; everything else (e.g. RNG state) is fixed.
    ``apply`` merges inside the traced function, so it is pure and differentiable to any order.

    Example:
        >>> import jax.numpy as jnp
        >>> params, apply = functional(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> sorted(params), apply(params, jnp.ones((5, 2))).shape
        (['bias', 'kernel'], (5, 1))
    """
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(state)

    def apply(params, *args, **kwargs):
        template = jax.tree.map(
            lambda x: x, state
        )  # a fresh State each call; never mutated in place
        nnx.replace_by_pure_dict(template, params)
        return nnx.merge(graphdef, template, rest)(*args, **kwargs)

    return params, apply


def functional_linen(
    module, key: jax.Array, *example_args, **example_kwargs
) -> tuple[dict, Callable]:
    """The same for a Flax Linen module: ``params = init(...)["params"]`` and a pure ``apply``.

    Example:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> params, apply = functional_linen(nn.Dense(1), jax.random.key(0), jnp.ones((1, 2)))
        >>> apply(params, jnp.ones((5, 2))).shape
        (5, 1)
    """
    variables = module.init(key, *example_args, **example_kwargs)
    if set(variables) != {"params"}:
        raise ValueError(
            f"functional_linen supports parameter-only modules; got collections "
            f"{sorted(variables)} (use metagrad.nn's explicit batch-norm policies)"
        )
    return variables["params"], lambda params, *a, **kw: module.apply({"params": params}, *a, **kw)


def adapt_mask(params: PyTree, *, head_only: bool = False, adapt_batchnorm: bool = True) -> PyTree:
    """Which parameters the inner loop adapts, for models whose last layer is named ``head``.

    ``head_only=True`` is ANIL; ``adapt_batchnorm=False`` keeps batch-norm scales and biases
    (modules named ``norm...`` at any depth) fixed in the inner loop.

    Example:
        >>> params = {"conv": {"w": 0}, "norm0": {"scale": 0}, "head": {"w": 0}}
        >>> adapt_mask(params, adapt_batchnorm=False)
        {'conv': {'w': True}, 'head': {'w': True}, 'norm0': {'scale': False}}
    """

    def keep(path: str) -> bool:
        parts = path.split("/")
        if head_only:
            return parts[0] == "head"
        return adapt_batchnorm or not any(p.startswith("norm") for p in parts)

    return mask_by_path(params, keep)
