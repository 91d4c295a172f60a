"""Model adapters: a module of a JAX library becomes ``(params, apply)``, a pure function of its
parameters: Flax NNX (:func:`functional`, also :func:`from_nnx`), Flax Linen
(:func:`functional_linen`, also :func:`from_linen`) and Equinox (:func:`from_equinox`; Equinox is
the optional ``equinox`` extra and is imported only when that adapter is called)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from metagrad._extras import require_extra
from metagrad.inner import mask_by_path

PyTree = Any


def functional(module: nnx.Module) -> tuple[dict, Callable]:
    """Split a Flax NNX module once into a pure params dict and ``apply(params, *args, **kw)``.

    Only ``nnx.Param`` variables are parameters; everything else is fixed. A module holding
    state the inner loop must carry, ``nnx.BatchStat`` (``nnx.BatchNorm``'s running statistics)
    or an RNG stream (``nnx.Dropout(rate, rngs=...)``), raises ``TypeError``: fixed, the running
    averages would never update and every task and step would share one dropout mask; use
    :func:`metagrad.nn.from_nnx_stateful`. ``apply`` merges inside the traced function, so it is
    pure and differentiable to any order.

    Example:
        >>> import jax.numpy as jnp
        >>> params, apply = functional(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> sorted(params), apply(params, jnp.ones((5, 2))).shape
        (['bias', 'kernel'], (5, 1))
    """
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    _refuse_carried_state(module, rest)
    params = nnx.to_pure_dict(state)

    def apply(params, *args, **kwargs):
        template = jax.tree.map(
            lambda x: x, state
        )  # a fresh State each call; never mutated in place
        nnx.replace_by_pure_dict(template, params)
        return nnx.merge(graphdef, template, rest)(*args, **kwargs)

    return params, apply


def _refuse_carried_state(module: nnx.Module, rest) -> None:
    held = [
        f"{'/'.join(map(str, path))} ({type(var).__name__})"
        for path, var in nnx.to_flat_state(rest)
        if isinstance(var, nnx.BatchStat | nnx.RngState)
    ]
    if held:
        more = f" and {len(held) - 4} more" if len(held) > 4 else ""
        raise TypeError(
            f"functional: {type(module).__name__} holds state the inner loop must carry "
            f"({', '.join(held[:4])}{more}), which this adapter would freeze (running averages "
            "never updated, one dropout mask for every task and step): use "
            "metagrad.nn.from_nnx_stateful, or build the layers without it (e.g. "
            "metagrad.nn.MetaBatchNorm, nnx.Dropout without rngs=)"
        )


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


def from_equinox(module, *, batched: bool = False) -> tuple[Any, Callable]:
    r"""Split an Equinox module into its floating-point arrays and ``apply(params, *args, **kw)``.

    ``params, static = eqx.partition(module, eqx.is_inexact_array)``: the parameters are every
    floating-point (or complex) array leaf, a pytree of the module's own structure with ``None``
    elsewhere; everything else (integer arrays, Python numbers, activation functions, the
    ``eqx.field(static=True)`` fields) stays in ``static``, fixed and never differentiated.
    ``apply`` recombines the two inside the traced function, so
    :math:`\mathrm{apply}(\theta, x) = \mathrm{combine}(\theta, \mathrm{static})(x)` is pure and
    differentiable to any order.

    Equinox layers map one example (``eqx.nn.Linear`` takes ``(in,)``, ``eqx.nn.Conv2d`` takes
    ``(C, H, W)``), so by default ``apply`` maps the module over the leading axis of each
    positional argument with ``jax.vmap`` (keyword arguments are passed to every example
    unchanged); ``batched=True`` calls a module that takes the whole batch itself.

    A module holding state (``eqx.nn.BatchNorm``, ``eqx.nn.SpectralNorm``: an
    ``eqx.nn.StateIndex``) raises ``TypeError``: the adapter does not thread ``eqx.nn.State``
    through the inner loop, and dropping it silently would be wrong. ``eqx.nn.Dropout`` needs a
    ``key`` per call unless ``inference=True``; pass ``eqx.nn.inference_mode(module)``.

    Example:
        >>> import equinox as eqx, jax.numpy as jnp
        >>> model = eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jax.random.key(0))
        >>> params, apply = from_equinox(model)
        >>> apply(params, jnp.ones((5, 2))).shape  # five examples, one vmapped call
        (5, 1)
        >>> len(jax.tree.leaves(params))  # two weights and two biases; the activation is static
        4
    """
    require_extra("equinox", "metagrad.nn.from_equinox")
    import equinox as eqx  # the optional extra, imported only here

    is_state = lambda x: isinstance(x, eqx.nn.StateIndex)
    flat, _ = jax.tree_util.tree_flatten_with_path(module, is_leaf=is_state)
    stateful = [jax.tree_util.keystr(path) for path, x in flat if is_state(x)]
    if stateful:
        raise TypeError(
            f"from_equinox: {type(module).__name__} holds state (eqx.nn.StateIndex at "
            f"{', '.join(stateful)}, e.g. eqx.nn.BatchNorm's running statistics), which the "
            "adapter does not thread through the inner loop; use a stateless layer "
            "(eqx.nn.LayerNorm, eqx.nn.GroupNorm)"
        )
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def apply(params, *args, **kwargs):
        model = eqx.combine(params, static)
        if batched:
            return model(*args, **kwargs)
        return jax.vmap(lambda *xs: model(*xs, **kwargs))(*args)

    return params, apply


from_nnx = functional
"""Alias of :func:`functional`: the Flax NNX adapter, named like :func:`from_equinox`."""

from_linen = functional_linen
"""Alias of :func:`functional_linen`: the Flax Linen adapter, named like :func:`from_equinox`."""


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
