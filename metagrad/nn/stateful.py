r"""Stateful Flax NNX layers in the inner loop: batch-norm running statistics and dropout's random
streams, carried explicitly.

:func:`metagrad.nn.functional` treats everything but ``nnx.Param`` as fixed, so it refuses a module
holding ``nnx.BatchStat`` (``nnx.BatchNorm``'s running mean and variance) or an RNG stream
(``nnx.Dropout(rate, rngs=...)``): frozen, the running averages would never update and every
task and step would share one dropout mask. :func:`from_nnx_stateful` splits such a module into
``(params, state, apply)``, ``apply(params, state, x, *, key, train) -> (out, new_state)``, and
:func:`stateful_meta_loss` runs MAML's inner loop with that state as a carry.

**Dropout** (any RNG stream) draws its masks from the key of the forward pass, never from a stream
stored in the module: inner step :math:`i` of a task uses ``dropout_key(task_key, i)`` and the
query pass ``dropout_key(task_key)`` (see :func:`dropout_key`), so masks differ across tasks and
steps and are bit-reproducible from the task key. Nothing about RNG streams is carried.

**Batch norm** (``nnx.BatchNorm``) follows one of the policies the engine names
(:data:`metagrad.nn.models.BN_POLICIES`); ``m`` is the layer's ``momentum``, :math:`\phi_i` the
parameters before inner step :math:`i` (:math:`\phi_0 = \theta`), :math:`S, Q` support and query:

============  ====================  =======================  ==============================
policy        inner step i (on S)   query pass (on Q)        running averages (train)
============  ====================  =======================  ==============================
transductive  S's batch statistics  Q's batch statistics     r <- m r + (1-m) stats(S; phi_i)
per_step      S's batch statistics  Q's batch statistics     slot i of a (steps, C) state:
                                                             r_i <- m r_i + (1-m) stats(...)
support       S's batch statistics  S's statistics at phi_K  r <- m r + (1-m) stats(S; phi_i)
eval          running averages      running averages         unchanged
============  ====================  =======================  ==============================

Running averages are updated from the support batch of each inner step, in order, and nowhere
else: never from a query pass (under ``support`` the query pass does not even see its own
statistics) and never in eval mode (``train=False``, or ``use_running_average=True``), which
normalises every pass with the carried averages (``per_step``: slot ``i`` at step ``i``, the last
step's slot for the query). Why the support batches: they are the data a learner has at test time
and the data the adapted parameters come from, so the averages describe what the model normalises
in the inner loop; the query is the meta-objective's held-out data. :func:`stateful_meta_grad`
starts every task of a meta-batch from the same state and returns the mean of the tasks' final
states: the tasks are processed in parallel and are exchangeable, and the mean is independent of
task order and of the task batching (``vmap`` or ``map``). The carried state is a constant to every
derivative (``stop_gradient``): it is not a meta-parameter.

``per_step`` here keeps MAML++'s per-step running statistics (state leaves with a leading
``steps`` axis, :func:`per_step_state`); its per-step scales and biases are
:class:`metagrad.nn.MetaBatchNorm`'s (``policy="per_step"``), which keeps no running statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from metagrad._types import PyTree, Task
from metagrad.estimators.base import MetaGradEstimator, check_meta_params
from metagrad.inner import adapt
from metagrad.nn.models import BN_POLICIES

TASK_BATCHINGS = ("vmap", "map")


def _path(parts) -> str:
    return "/".join(map(str, parts))


@dataclass(frozen=True, eq=False)
class StatefulApply:
    r"""The pure forward pass of a split NNX module: ``apply(params, state, x, *, key, train)``.

    ``train=True``: dropout on (its masks drawn from ``key``), batch norm normalises with the
    batch's own statistics and returns its running averages updated once,
    :math:`r \leftarrow m r + (1 - m)\,\mathrm{stats}(x)`; ``train=False``: no dropout, batch
    norm normalises with ``state`` and returns it unchanged. :meth:`run` sets the two
    separately. Built by :func:`from_nnx_stateful`.

    Example:
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(2, 3, rngs=r), nnx.BatchNorm(3, momentum=0.5, rngs=r)))
        >>> x = jnp.array([[0.0, 1.0], [2.0, 3.0]])
        >>> out, new = apply(params, state, x)  # the running mean starts at 0
        >>> h = x @ params["layers"][0]["kernel"] + params["layers"][0]["bias"]
        >>> bool(jnp.allclose(new["layers"][1]["mean"], 0.5 * 0.0 + 0.5 * h.mean(0)))
        True
        >>> _, same = apply(params, state, x, train=False)  # eval: the running averages
        >>> bool(jnp.array_equal(same["layers"][1]["mean"], state["layers"][1]["mean"]))
        True
    """

    graphdef: Any
    param_template: Any
    stat_template: Any
    rng_template: Any

    @property
    def draws_random(self) -> bool:
        """Whether the module holds an RNG stream (``nnx.Dropout(rate, rngs=...)``)."""
        return bool(jax.tree.leaves(self.rng_template))

    def __call__(self, params, state, x, *, key=None, train: bool = True):
        return self.run(params, state, x, key=key, dropout=train, batch_stats=train)

    def run(self, params, state, x, *, key=None, dropout: bool, batch_stats: bool, stats_rows=None):
        """``(out, new_state)`` with dropout and batch statistics chosen separately; with
        ``stats_rows``, every ``nnx.BatchNorm`` takes its batch statistics from the first
        ``stats_rows`` rows of its input only (``nnx.BatchNorm``'s ``mask``; the ``support``
        policy runs ``[support; query]`` so)."""
        # The statistics in the inputs' precision: batch norm writes its update into them (a
        # float32 state would be a lossy cast of a float64 forward pass, e.g. in check_meta_grad).
        dtype = jnp.result_type(x)
        state = jax.tree.map(lambda s: s.astype(jnp.promote_types(s.dtype, dtype)), state)
        module = nnx.merge(
            self.graphdef,
            _filled(self.param_template, params),
            _filled(self.stat_template, state),
            self._rngs(key) if dropout else self.rng_template,
        )
        module = nnx.view(
            module,
            deterministic=not dropout,
            use_running_average=not batch_stats,
            raise_if_not_found=False,
        )
        if stats_rows is not None:
            for _, layer in nnx.iter_modules(module):
                if isinstance(layer, nnx.BatchNorm):
                    # This merged copy only: the layer's own class, its call given a row mask.
                    layer.__class__ = _rows_batch_norm(type(layer))
                    layer.stats_rows = stats_rows
        out = module(x)
        return out, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    def _rngs(self, key):
        """Every RNG stream re-keyed from the pass key (stream ``j``: ``fold_in(key, j)``, its
        counter at 0), so a mask depends on the key alone, not on the module's call history."""
        if not self.draws_random:
            return self.rng_template
        if key is None:
            streams = sorted({_path(p[:-1]) for p, _ in nnx.to_flat_state(self.rng_template)})
            raise ValueError(
                f"the module draws random numbers (RNG streams at {', '.join(streams)}, e.g. "
                "nnx.Dropout): pass key= (one per forward pass, see metagrad.nn.dropout_key), "
                "or train=False"
            )
        if not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
        pure = nnx.to_pure_dict(self.rng_template)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
        fresh, stream = [], 0
        for path, leaf in leaves:
            name = getattr(path[-1], "key", None)
            if name == "key":
                fresh.append(jax.random.fold_in(key, stream))
                stream += 1
            elif name == "count":
                fresh.append(jnp.zeros_like(leaf))
            else:
                fresh.append(leaf)
        return _filled(self.rng_template, jax.tree.unflatten(treedef, fresh))


@functools.cache
def _rows_batch_norm(cls: type) -> type:
    """``cls`` (an ``nnx.BatchNorm``) with its batch statistics from the first ``stats_rows``
    rows: flax's own ``mask`` argument, so they stay differentiable (flax stops the gradient of
    the running-average update only)."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        rows = jnp.arange(x.shape[0]) < self.stats_rows
        rows = jnp.broadcast_to(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
        mask = rows if mask is None else mask & rows
        return cls.__call__(self, x, use_running_average, mask=mask)

    return type(f"SupportRows{cls.__name__}", (cls,), {"__call__": __call__})


def _filled(template, pure):
    state = jax.tree.map(lambda x: x, template)  # a fresh State: the template is never mutated
    nnx.replace_by_pure_dict(state, pure)
    return state


class StatefulModel(NamedTuple):
    """What :func:`from_nnx_stateful` returns: the parameters (a pure dict), the batch-norm state
    (a pure dict of running means and variances; ``{}`` without batch norm) and the pure
    forward pass :class:`StatefulApply`.

    Example:
        >>> model = from_nnx_stateful(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))
        >>> sorted(model.params), sorted(model.state)
        (['bias', 'scale'], ['mean', 'var'])
    """

    params: dict
    state: dict
    apply: StatefulApply


def from_nnx_stateful(module: nnx.Module) -> StatefulModel:
    """Split a Flax NNX module into ``(params, state, apply)`` with its state explicit.

    ``nnx.Param`` variables are the parameters; the ``nnx.BatchStat`` of ``nnx.BatchNorm`` layers
    is ``state``, carried by :func:`stateful_meta_loss`; RNG streams (``nnx.Dropout``'s) are
    re-keyed from the ``key`` of each forward pass. Any other variable (``nnx.Cache``,
    ``nnx.Intermediate``, a custom ``nnx.Variable`` type, a ``BatchStat`` outside
    ``nnx.BatchNorm``) raises ``TypeError`` naming its path and type: it is never dropped or
    frozen silently. ``apply`` merges inside the traced function, so it is pure and
    differentiable to any order. ``train`` sets every layer's ``deterministic`` and
    ``use_running_average`` as ``nnx.Module.train()`` / ``.eval()`` do (a flag given to a
    layer's constructor is overridden; a dropout rate of 0 is dropout off in both modes).

    Example:
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(2, 4, rngs=r), nnx.Dropout(0.5, rngs=r)))
        >>> x = jnp.ones((1, 2))
        >>> a, _ = apply(params, state, x, key=jax.random.key(1))
        >>> b, _ = apply(params, state, x, key=jax.random.key(1))
        >>> c, _ = apply(params, state, x, train=False)  # no dropout, no key needed
        >>> bool(jnp.array_equal(a, b)), bool(jnp.all((a == 0) | jnp.isclose(a, 2 * c)))
        (True, True)
    """
    check_stateful_module(module, "from_nnx_stateful")
    graphdef, params, stats, rngs = nnx.split(module, nnx.Param, nnx.BatchStat, nnx.RngState)
    apply = StatefulApply(graphdef, params, stats, rngs)
    return StatefulModel(nnx.to_pure_dict(params), nnx.to_pure_dict(stats), apply)


def check_stateful_module(module: nnx.Module, caller: str) -> None:
    """Raises ``TypeError`` for a variable the stateful adapter does not thread.

    Example:
        >>> class Counter(nnx.Variable): pass
        >>> class Counting(nnx.Module):
        ...     def __init__(self):
        ...         self.calls = Counter(jnp.zeros(()))
        >>> check_stateful_module(Counting(), "demo")
        Traceback (most recent call last):
        TypeError: demo: Counting holds ...Counter at 'calls', ...
    """
    owners = dict(nnx.iter_modules(module))
    for parts, var in nnx.to_flat_state(nnx.state(module)):
        if isinstance(var, nnx.Param | nnx.RngState):
            continue
        if isinstance(var, nnx.BatchStat):
            owner = owners.get(tuple(parts[:-1]))
            if isinstance(owner, nnx.BatchNorm):
                continue
            raise TypeError(
                f"{caller}: nnx.BatchStat at '{_path(parts)}' belongs to "
                f"{type(owner).__name__ if owner is not None else 'no module'}, not an "
                "nnx.BatchNorm: the adapter threads nnx.BatchNorm's running statistics only "
                "(it knows their update rule); use nnx.BatchNorm, or metagrad.nn.MetaBatchNorm"
            )
        kind = f"{type(var).__module__}.{type(var).__qualname__}"
        raise TypeError(
            f"{caller}: {type(module).__name__} holds {kind} at '{_path(parts)}', a kind of "
            "state the adapter does not thread through the inner loop (it threads nnx.Param, "
            "nnx.BatchNorm's nnx.BatchStat and RNG streams); make it an nnx.Param or a plain "
            "attribute, or remove it"
        )


def dropout_key(task_key: jax.Array, step=None) -> jax.Array:
    """The key of one forward pass of a task: inner step ``step``, or the query pass (``None``).

    ``inner, query = jax.random.split(task_key)``; inner step :math:`i` uses
    ``fold_in(inner, i)`` and the query pass (under ``support``: the one pass over support and
    query) uses ``query``: distinct keys per task, step and pass, the same
    for the same task key.

    Example:
        >>> k = jax.random.key(0)
        >>> keys = [dropout_key(k, 0), dropout_key(k, 1), dropout_key(k)]
        >>> len({tuple(jax.random.key_data(x).tolist()) for x in keys})
        3
    """
    inner, query = jax.random.split(task_key)
    return query if step is None else jax.random.fold_in(inner, step)


def per_step_state(state: PyTree, steps: int) -> PyTree:
    """The ``per_step`` policy's state: each running average repeated on a leading axis of
    ``steps`` slots (MAML++'s per-step running statistics).

    Example:
        >>> per_step_state({"mean": jnp.zeros(3)}, 5)["mean"].shape
        (5, 3)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"per_step_state needs steps >= 1, got {steps!r}")
    return jax.tree.map(lambda s: jnp.broadcast_to(s, (steps, *jnp.shape(s))), state)


@dataclass(frozen=True)
class _Mode:
    policy: str
    train: bool  # dropout on
    running: bool  # normalise with the carried running averages

    @property
    def updates(self) -> bool:
        return self.train and not self.running

    @classmethod
    def make(cls, policy, train, use_running_average) -> _Mode:
        if policy not in BN_POLICIES:
            raise ValueError(f"batch-norm policy must be one of {BN_POLICIES}, got {policy!r}")
        if not isinstance(train, bool):
            raise ValueError(f"train must be a bool, got {train!r}")
        running = (not train) if use_running_average is None else use_running_average
        if not isinstance(running, bool):
            raise ValueError(f"use_running_average must be None or a bool, got {running!r}")
        return cls(policy, train, running)


def _check_state(apply, state, mode: _Mode) -> None:
    if not isinstance(apply, StatefulApply):
        raise TypeError(
            f"apply must be the StatefulApply from metagrad.nn.from_nnx_stateful, got "
            f"{type(apply).__name__}"
        )
    want = nnx.to_pure_dict(apply.stat_template)
    want_leaves, want_def = jax.tree.flatten(want)
    got_leaves, got_def = jax.tree.flatten(state)
    if got_def != want_def:
        raise ValueError(
            f"state must have the structure of from_nnx_stateful's state; got {got_def}, the "
            f"module has {want_def}"
        )
    lead = mode.policy == "per_step"
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], got_leaves, strict=True):
        shape, base = jnp.shape(g), jnp.shape(w)
        ok = (len(shape) == len(base) + 1 and shape[1:] == base) if lead else shape == base
        if not ok:
            need = f"(steps, *{base}) (see per_step_state)" if lead else f"{base}"
            raise ValueError(
                f"state leaf {jax.tree_util.keystr(path)} has shape {shape}; the "
                f"{mode.policy!r} policy needs {need}"
            )


def _slot(state, step):
    """A per-step state's slot ``step``, clamped to the last (evaluation past the trained
    steps reuses the last step's statistics, as MetaBatchNorm's per-step weights do)."""
    return jax.tree.map(lambda s: s[jnp.clip(step, 0, s.shape[0] - 1)], state)


def _pass_key(key, train, step=None):
    return None if key is None or not train else dropout_key(key, step)


def adapt_stateful(
    apply: StatefulApply,
    loss: Callable,
    params: PyTree,
    state: PyTree,
    support: Any,
    *,
    key: jax.Array | None = None,
    steps: int,
    lr=None,
    policy: str = "transductive",
    train: bool = True,
    use_running_average: bool | None = None,
    first_order: bool = False,
    **adapt_kwargs,
):
    r"""The inner loop with the model's state carried: ``(adapted_params, new_state)``.

    The parameters follow :func:`metagrad.adapt` exactly (every keyword of it but ``step_arg``
    and ``return_trajectory`` is passed on: ``mask``, ``optimizer``, ``per_step``, ``remat``,
    ``truncate``...), with inner step :math:`i`'s forward pass on ``support`` drawing its dropout
    masks from ``dropout_key(key, i)`` and normalising per the policy (the module docstring's
    table). In training (``train=True`` and not ``use_running_average``) the running averages
    are then folded over the steps from the support statistics at :math:`\phi_0, \dots,
    \phi_{K-1}` (the trajectory, replayed outside the gradient: :math:`K` extra forward passes),
    :math:`r \leftarrow m r + (1 - m)\,\mathrm{stats}(S; \phi_i)`; otherwise ``state`` comes back
    unchanged.

    Args:
        apply: the :class:`StatefulApply` of :func:`from_nnx_stateful`.
        loss: a loss factory, ``loss(apply_fn) -> loss_fn(params, batch)`` with
            ``apply_fn(params, x)``: :func:`metagrad.nn.mse_loss`,
            :func:`metagrad.nn.cross_entropy_loss`. Batches are ``(x, y)``.
        params, state: the initial parameters and the carried running statistics.
        support: the support batch ``(x, y)``.
        key: the task's key (needed when the module draws random numbers and ``train``).
        steps, lr, first_order: as :func:`metagrad.adapt`.
        policy: ``"transductive"``, ``"per_step"`` or ``"support"``.
        train: dropout on and running averages updated; ``False`` is evaluation.
        use_running_average: normalise with the carried averages (default: ``not train``).

    Example:
        >>> from metagrad.nn import mse_loss
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(1, 2, rngs=r), nnx.BatchNorm(2, momentum=0.0, rngs=r)))
        >>> x = jnp.array([[1.0], [3.0]])
        >>> _, new = jax.jit(lambda p, s: adapt_stateful(
        ...     apply, mse_loss, p, s, (x, x), steps=1, lr=0.1))(params, state)
        >>> h = x @ params["layers"][0]["kernel"] + params["layers"][0]["bias"]
        >>> bool(jnp.allclose(new["layers"][1]["mean"], h.mean(0)))  # step 0's statistics
        True
    """
    mode = _Mode.make(policy, train, use_running_average)
    _check_state(apply, state, mode)
    for name in ("step_arg", "return_trajectory"):
        if name in adapt_kwargs:
            raise ValueError(f"adapt_stateful sets {name}= itself")
    if train and apply.draws_random and key is None:
        apply._rngs(None)  # the one clear error
    per_step = mode.policy == "per_step"

    def inner_loss(p, batch, step):
        st = _slot(state, step) if per_step else state
        k = _pass_key(key, mode.train, step)
        fwd = lambda q, x: apply.run(q, st, x, key=k, dropout=mode.train,
                                     batch_stats=not mode.running)[0]  # fmt: skip
        return loss(fwd)(p, batch)

    out = adapt(
        inner_loss, params, support, steps=steps, lr=lr, first_order=first_order,
        step_arg=True, return_trajectory=mode.updates, **adapt_kwargs,
    )  # fmt: skip
    if not mode.updates:
        return out, state
    adapted, trajectory = out
    new_state = _replay_statistics(
        apply, params, trajectory, state, support[0], key, steps=steps, per_step=per_step
    )
    return adapted, new_state


def _replay_statistics(apply, params, trajectory, state, x, key, *, steps, per_step):
    """The running averages folded over the inner steps: step ``i`` updates them once from the
    support statistics at ``phi_i`` (trajectory entries, with ``phi_0 = theta``), with step
    ``i``'s dropout key, so they see exactly the forward passes of the inner loop."""
    before = jax.tree.map(
        lambda p0, t: jnp.concatenate([jnp.asarray(p0)[None], t])[:steps], params, trajectory
    )
    before = lax.stop_gradient(before)

    def step_fn(st, inputs):
        phi, i = inputs
        s_in = _slot(st, i) if per_step else st
        _, s_out = apply.run(phi, s_in, x, key=_pass_key(key, True, i), dropout=True,
                             batch_stats=True)  # fmt: skip
        if per_step:
            s_out = jax.tree.map(
                lambda a, s: a.at[jnp.minimum(i, a.shape[0] - 1)].set(s.astype(a.dtype)), st, s_out
            )
        # The carry keeps the state's dtype (float64 inputs would otherwise promote it).
        return jax.tree.map(lambda s, a: s.astype(a.dtype), s_out, st), None

    state, _ = lax.scan(step_fn, state, (before, jnp.arange(steps, dtype=jnp.int32)))
    return lax.stop_gradient(state)


def stateful_meta_loss(
    apply: StatefulApply,
    loss: Callable,
    params: PyTree,
    state: PyTree,
    task: Task,
    *,
    key: jax.Array | None = None,
    steps: int,
    lr=None,
    policy: str = "transductive",
    train: bool = True,
    use_running_average: bool | None = None,
    first_order: bool = False,
    **adapt_kwargs,
):
    r"""MAML's meta-objective with the model's state carried: ``(query_loss, new_state)``.

    .. math:: \mathcal{L}(\theta) = L\big(\phi_K(\theta); Q\big), \qquad
              (\phi_K, r') = \text{adapt\_stateful}(\theta, r; S)

    :func:`adapt_stateful` on ``task.support``, then the query loss at :math:`\phi_K` with the
    query pass's dropout key ``dropout_key(key)`` and the policy's statistics: the query's own
    (``transductive``, ``per_step``), the support's at :math:`\phi_K` (``support``: one pass
    over support and query, each batch norm's statistics from the support rows, differentiable,
    not kept), or the running averages (eval). ``new_state`` is :func:`adapt_stateful`'s: the
    query never updates it. ``jax.grad`` (``has_aux=True``) of this with respect to ``params``
    is the MAML meta-gradient with ``state`` and ``key`` held fixed.

    Example:
        >>> from metagrad import Task
        >>> from metagrad.nn import mse_loss
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(1, 2, rngs=r), nnx.BatchNorm(2, rngs=r), nnx.Linear(2, 1, rngs=r)))
        >>> task = Task((jnp.ones((4, 1)), jnp.zeros((4, 1))), (jnp.ones((3, 1)), jnp.ones((3, 1))))
        >>> objective = lambda p: stateful_meta_loss(
        ...     apply, mse_loss, p, state, task, steps=2, lr=0.1, policy="support")
        >>> (val, new), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
        >>> val.shape, sorted(g["layers"]), sorted(new["layers"])
        ((), [0, 1, 2], [1])
    """
    mode = _Mode.make(policy, train, use_running_average)
    adapted, new_state = adapt_stateful(
        apply, loss, params, state, task.support, key=key, steps=steps, lr=lr, policy=policy,
        train=train, use_running_average=use_running_average, first_order=first_order,
        **adapt_kwargs,
    )  # fmt: skip
    fwd = _query_forward(apply, state, task.support[0], key, mode, steps)
    return loss(fwd)(adapted, task.query), new_state


def _query_forward(apply, state, support_x, key, mode: _Mode, steps: int):
    """``apply_fn(params, x)`` of the query pass under the policy (see the module docstring)."""
    k = _pass_key(key, mode.train)
    if mode.policy == "per_step":
        state = _slot(state, steps - 1)  # MAML++ evaluates the query at the last step's index
    if mode.running:
        return lambda p, x: apply.run(p, state, x, key=k, dropout=mode.train, batch_stats=False)[0]
    if mode.policy != "support":
        return lambda p, x: apply.run(p, state, x, key=k, dropout=mode.train, batch_stats=True)[0]
    n = support_x.shape[0]

    def fwd(p, x):
        # One pass over [support; query], every batch norm's statistics from the support rows
        # (each layer's input normalised with support statistics, as the policy says, and
        # differentiable); the query's outputs are returned, the statistics are not kept.
        both = jnp.concatenate([support_x, x])
        out = apply.run(p, state, both, key=k, dropout=mode.train, batch_stats=True,
                        stats_rows=n)[0]  # fmt: skip
        return out[n:]

    return fwd


def stateful_meta_grad(
    apply: StatefulApply,
    loss: Callable,
    params: PyTree,
    state: PyTree,
    tasks: Task,
    *,
    key: jax.Array | None = None,
    task_batching: str = "vmap",
    **kwargs,
):
    r"""The meta-batch's ``((mean loss, new_state), mean meta-gradient)``.

    Tasks (a leading task axis on every leaf) get the keys ``jax.random.split(key, n)``; each
    runs :func:`stateful_meta_loss` from the same ``state``, and ``new_state`` is the mean of
    the tasks' final states (exchangeable tasks processed in parallel: the mean does not depend
    on their order or on ``task_batching``, ``"vmap"`` or ``"map"`` (``lax.map``, the faster on
    CPU for second-order convolutions)). With momentum :math:`m` and :math:`K` steps,
    :math:`r' = m^K r + (1 - m) \sum_{i<K} m^{K-1-i}\, \overline{\mathrm{stats}}_i`, the bar a mean
    over tasks. Keywords are :func:`stateful_meta_loss`'s.

    Example:
        >>> from metagrad import Task
        >>> from metagrad.nn import mse_loss
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(1, 2, rngs=r), nnx.BatchNorm(2, rngs=r), nnx.Linear(2, 1, rngs=r)))
        >>> x = jnp.arange(12.0).reshape(3, 4, 1)  # three tasks of four examples
        >>> (val, new), g = jax.jit(lambda p, s: stateful_meta_grad(
        ...     apply, mse_loss, p, s, Task((x, x), (x, x)), steps=1, lr=0.1))(params, state)
        >>> new["layers"][1]["mean"].shape, jax.tree.structure(g) == jax.tree.structure(params)
        ((2,), True)
    """
    if task_batching not in TASK_BATCHINGS:
        raise ValueError(f"task_batching must be one of {TASK_BATCHINGS}, got {task_batching!r}")
    n = jax.tree.leaves(tasks)[0].shape[0]
    keys = None if key is None else jax.random.split(key, n)

    def one(task_and_key):
        task, k = task_and_key
        f = lambda p: stateful_meta_loss(apply, loss, p, state, task, key=k, **kwargs)
        return jax.value_and_grad(f, has_aux=True)(params)

    batched = jax.vmap(one) if task_batching == "vmap" else lambda xs: lax.map(one, xs)
    (losses, states), grads = batched((tasks, keys))
    mean = lambda tree: jax.tree.map(lambda a: jnp.mean(a, axis=0).astype(a.dtype), tree)
    return (jnp.mean(losses), mean(states)), mean(grads)


def stateful_estimator(
    apply: StatefulApply, state: PyTree, *, key: jax.Array | None = None, name="stateful_maml",
    **kwargs,
) -> MetaGradEstimator:  # fmt: skip
    """:func:`stateful_meta_loss` as a :class:`metagrad.MetaGradEstimator` for one task, with
    ``state`` and ``key`` held fixed (as the policy does: the carried state is a constant to the
    meta-gradient), for :func:`metagrad.check_meta_grad`. Its ``loss_fn`` argument is the loss
    factory (``metagrad.nn.mse_loss``); ``MetaParams.lr`` must be None (the rate is ``lr=``).

    Example:
        >>> from metagrad import MetaParams, Task, check_meta_grad
        >>> from metagrad.nn import mse_loss
        >>> r = nnx.Rngs(0)
        >>> params, state, apply = from_nnx_stateful(nnx.Sequential(
        ...     nnx.Linear(1, 2, rngs=r), nnx.BatchNorm(2, rngs=r), nnx.Linear(2, 1, rngs=r)))
        >>> x = jnp.linspace(-1.0, 1.0, 4)[:, None]
        >>> est = stateful_estimator(apply, state, steps=1, lr=0.1)
        >>> check_meta_grad(est, mse_loss, MetaParams(params), Task((x, x**2), (x, -x))) < 1e-6
        True
    """

    def objective(loss, meta_params, task, step):
        check_meta_params(meta_params)
        if meta_params.lr is not None:
            raise ValueError(f"{name}: pass the inner rate as lr=; MetaParams.lr must be None")
        val, _ = stateful_meta_loss(apply, loss, meta_params.params, state, task, key=key, **kwargs)
        return val, {}

    def value_and_grad(loss, meta_params, task, step):
        return jax.value_and_grad(objective, argnums=1, has_aux=True)(loss, meta_params, task, step)

    return MetaGradEstimator(name, objective, value_and_grad)


__all__ = [
    "StatefulApply",
    "StatefulModel",
    "adapt_stateful",
    "check_stateful_module",
    "dropout_key",
    "from_nnx_stateful",
    "per_step_state",
    "stateful_estimator",
    "stateful_meta_grad",
    "stateful_meta_loss",
]
