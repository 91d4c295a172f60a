r"""Prototypical Networks (Snell et al. 2017) and Proto-MAML (Triantafillou et al. 2020).

Both are estimators like MAML's, so task batching, sharding and `check_meta_grad` apply; what
differs is the first argument of ``objective`` and ``value_and_grad``: where MAML takes a loss,
these take the embedding ``embed_fn(params, x) -> (n, d)`` (a head-less model, e.g.
``metagrad.nn.Conv4(1, None)``), because the classifier is built from the support set:

.. math:: c_k = \frac{1}{|S_k|} \sum_{(x, y) \in S,\, y = k} f_\theta(x), \qquad
          \text{logit}_k(x) = -\|f_\theta(x) - c_k\|^2

Support and query are embedded in separate passes (a transductive batch norm then sees each
set alone, as in MAML). A query batch ``(x, y, x_support)`` (what
``metagrad.nn.losses.with_support_context`` makes) embeds ``x`` after the support images with
``stats_rows=len(x_support)``, so a ``MetaBatchNorm(policy="support")`` model normalises the
query with support statistics alone.

Classes are the support labels ``0 .. ways - 1``; with ``ways=None`` (the default) the logits
have one column per support example and the columns of absent labels are ``-inf``, so that one
estimator serves any number of ways (Snell et al. train Omniglot at 60 ways, test at 5 or 20).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metagrad._types import MetaParams, Task
from metagrad.estimators.base import InnerLoop, MetaGradEstimator, check_meta_params
from metagrad.estimators.maml import head_only
from metagrad.inner import check_inner_optimizer

DISTANCES = ("euclidean", "cosine")
DEFAULT_SCALE = {"euclidean": 1.0, "cosine": 10.0}  # cosine logits in [-1, 1] need a scale

EmbedFn = Callable[..., jax.Array]
"""``embed_fn(params, x) -> (n, d)`` (or ``(n, ...)``, flattened); called with ``stats_rows=``
too for a query batch that carries the support images."""


def embed(embed_fn: EmbedFn, params, batch) -> tuple[jax.Array, jax.Array]:
    """``(z, y)``: the flattened embeddings ``(n, d)`` of a batch ``(x, y)`` and its labels.

    A batch ``(x, y, context)`` runs ``context`` (the support images) in front of ``x`` with
    ``stats_rows=len(context)`` and keeps ``x``'s rows (support-statistics batch norm).

    Example:
        >>> z, y = embed(lambda w, x: x @ w, jnp.ones((3, 2)), (jnp.ones((4, 3)), jnp.arange(4)))
        >>> z.shape, z[0].tolist()
        ((4, 2), [3.0, 3.0])
    """
    x, y, *context = batch
    if context:
        (ctx,) = context
        rows = ctx.shape[0]
        z = embed_fn(params, jnp.concatenate([ctx, x]), stats_rows=rows)[rows:]
    else:
        z = embed_fn(params, x)
    return z.reshape(z.shape[0], -1), y


def prototypes(z: jax.Array, y: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    r"""Class means of embeddings and the class counts, ``(num_classes, d)`` and
    ``(num_classes,)``: :math:`c_k = \sum_i [y_i = k]\, z_i / \max(n_k, 1)`. An absent class has
    count 0 and a zero prototype.

    Example:
        >>> z = jnp.array([[0.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
        >>> c, n = prototypes(z, jnp.array([0, 0, 1]), 3)
        >>> c.tolist(), n.tolist()
        ([[1.0, 1.0], [4.0, 4.0], [0.0, 0.0]], [2.0, 1.0, 0.0])
    """
    onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype)
    counts = jnp.sum(onehot, axis=0)
    return (onehot.T @ z) / jnp.maximum(counts, 1)[:, None], counts


def proto_logits(
    z: jax.Array,
    protos: jax.Array,
    *,
    distance: str = "euclidean",
    scale: float | jax.Array | None = None,
    counts: jax.Array | None = None,
) -> jax.Array:
    r"""Logits of queries ``z`` ``(n, d)`` against prototypes ``(K, d)``, ``(n, K)``.

    .. math:: \text{euclidean: } -s\,\|z - c_k\|^2, \qquad
              \text{cosine: } s\, \frac{z^\top c_k}{\max(\|z\|, \epsilon) \max(\|c_k\|, \epsilon)}

    with :math:`s` = ``scale`` (default 1 for euclidean, 10 for cosine). With ``counts``, the
    columns of classes with count 0 are ``-inf`` (absent from the softmax).

    Example:
        >>> z, c = jnp.array([[0.0, 0.0], [3.0, 0.0]]), jnp.array([[1.0, 0.0], [3.0, 4.0]])
        >>> proto_logits(z, c).tolist()
        [[-1.0, -25.0], [-4.0, -16.0]]
        >>> proto_logits(z[1:], c, distance="cosine", scale=1.0).tolist()
        [[1.0, 0.6000000238418579]]
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    scale = DEFAULT_SCALE[distance] if scale is None else scale
    if distance == "euclidean":
        logits = -scale * jnp.sum((z[:, None, :] - protos[None, :, :]) ** 2, axis=-1)
    else:
        # max before sqrt: the norm of an absent class's zero prototype has no NaN derivative.
        floor = jnp.finfo(z.dtype).eps ** 2  # (not `tiny`: rsqrt's derivative there overflows)
        unit = lambda a: a * lax.rsqrt(jnp.maximum(jnp.sum(a * a, -1, keepdims=True), floor))
        logits = scale * unit(z) @ unit(protos).T
    if counts is not None:
        logits = jnp.where(counts > 0, logits, -jnp.inf)
    return logits


def classification_metrics(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, dict]:
    """``(mean cross-entropy, {"loss_post", "acc_post"})`` of logits and integer labels; the
    metrics are outside the gradient ("post": after the head is fitted to the support set).

    Example:
        >>> logits = jnp.array([[0.0, 0.0], [5.0, -5.0]])
        >>> loss, m = classification_metrics(logits, jnp.array([0, 1]))
        >>> round(float(loss), 4), float(m["acc_post"])  # (log 2 + 10) / 2; argmax of a tie is 0
        (5.3466, 0.5)
    """
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    acc = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, {"loss_post": lax.stop_gradient(loss), "acc_post": acc}


def _num_classes(ways: int | None, support) -> int:
    return support[0].shape[0] if ways is None else ways


def _check_ways(ways) -> None:
    if ways is not None and (isinstance(ways, bool) or not isinstance(ways, int) or ways < 1):
        raise ValueError(f"ways must be a positive int or None (any number of ways), got {ways!r}")


def _vg(objective: Callable) -> Callable:
    def value_and_grad(embed_fn, meta_params, task, step):
        return jax.value_and_grad(objective, argnums=1, has_aux=True)(
            embed_fn, meta_params, task, step
        )

    return value_and_grad


def protonet(
    *,
    distance: str = "euclidean",
    scale: float | None = None,
    ways: int | None = None,
    name: str = "protonet",
) -> MetaGradEstimator:
    r"""Prototypical Networks (Snell et al. 2017) as a meta-gradient estimator.

    .. math:: \mathcal{L}(\theta) = -\frac{1}{|Q|} \sum_{(x, y) \in Q}
              \log \frac{\exp(-d(f_\theta(x), c_y))}{\sum_k \exp(-d(f_\theta(x), c_k))}

    with :math:`c_k` the support class means (:func:`prototypes`) and :math:`d` the squared
    Euclidean distance (or minus the scaled cosine, :func:`proto_logits`). There is no inner
    loop; the meta-gradient is plain backpropagation through the prototypes.

    The first argument of ``objective``/``value_and_grad`` is the embedding
    ``embed_fn(params, x)``, and ``meta_params`` is ``MetaParams(embedding_params)``; the
    metrics are ``loss_post`` and ``acc_post``.

    Args:
        distance: ``"euclidean"`` (squared, the paper's) or ``"cosine"``.
        scale: multiplies the logits (default 1 for euclidean, 10 for cosine).
        ways: the number of classes, or None for any (absent labels masked out).

    Example:
        Two classes on a line, embedded by :math:`f_w(x) = w x`; the query 2 is nearer the
        prototype 1 than 5 (with :math:`w = 1`: logits :math:`-1, -9`):

        >>> from metagrad import MetaParams, Task
        >>> embed_fn = lambda w, x: x * w
        >>> task = Task((jnp.array([[1.0], [5.0]]), jnp.array([0, 1])),
        ...             (jnp.array([[2.0]]), jnp.array([0])))
        >>> (loss, m), g = protonet().value_and_grad(embed_fn, MetaParams(jnp.ones(1)), task, 0)
        >>> round(float(loss), 6), float(m["acc_post"])  # log(1 + e^-8)
        (0.000335, 1.0)
        >>> round(float(g.params[0]), 5)  # d/dw log(1 + e^{-8 w^2}) = -16 w e^{-8 w^2} / (1 + ...)
        -0.00537
    """
    proto_logits(jnp.zeros((1, 1)), jnp.zeros((1, 1)), distance=distance)  # checks `distance`
    _check_ways(ways)

    def objective(embed_fn, meta_params, task, step):
        check_meta_params(meta_params)
        theta = meta_params.params
        zs, ys = embed(embed_fn, theta, task.support)
        zq, yq = embed(embed_fn, theta, task.query)
        protos, counts = prototypes(zs, ys, _num_classes(ways, task.support))
        logits = proto_logits(zq, protos, distance=distance, scale=scale, counts=counts)
        return classification_metrics(logits, yq)

    return MetaGradEstimator(name, objective, _vg(objective), None)


def proto_head(protos: jax.Array) -> dict:
    r"""The linear head equivalent to squared-Euclidean prototypes (Triantafillou et al. 2020):
    :math:`W_{:,k} = 2 c_k`, :math:`b_k = -\|c_k\|^2`, since
    :math:`-\|z - c_k\|^2 = 2 c_k^\top z - \|c_k\|^2 - \|z\|^2` and :math:`\|z\|^2` is the same
    for every class (absent classes are masked by :func:`linear_logits`).

    Returns:
        ``{"kernel": (d, K), "bias": (K,)}``.

    Example:
        >>> head = proto_head(jnp.array([[1.0, 0.0], [0.0, 2.0]]))
        >>> head["kernel"].tolist(), head["bias"].tolist()
        ([[2.0, 0.0], [0.0, 4.0]], [-1.0, -4.0])
    """
    return {"kernel": 2 * protos.T, "bias": -jnp.sum(protos**2, axis=-1)}


def linear_logits(head: dict, z: jax.Array, counts: jax.Array | None = None) -> jax.Array:
    """``z @ kernel + bias``, with the columns of absent classes (``counts == 0``) ``-inf``.

    Example:
        >>> head = {"kernel": jnp.eye(2), "bias": jnp.array([0.0, 1.0])}
        >>> linear_logits(head, jnp.array([[3.0, 4.0]]), jnp.array([1, 0])).tolist()
        [[3.0, -inf]]
    """
    logits = z @ head["kernel"] + head["bias"]
    return logits if counts is None else jnp.where(counts > 0, logits, -jnp.inf)


def protomaml(
    *,
    steps: int,
    lr,
    first_order: bool = False,
    head_only_adapt: bool = False,
    ways: int | None = None,
    remat: bool = False,
    unroll: bool = False,
    optimizer: Any = None,
    name: str | None = None,
) -> MetaGradEstimator:
    r"""Proto-MAML (Triantafillou et al. 2020): a linear head initialised from the prototypes
    (:func:`proto_head`), then MAML's inner loop on the support set.

    .. math:: \phi_0 = \big(\theta,\; W = 2 C^\top,\; b = -\|c_k\|^2\big), \qquad
              \phi = \operatorname{adapt}(\phi_0; S), \qquad
              \mathcal{L}(\theta) = L\big(\phi; Q\big)

    The head's initial value depends on :math:`\theta` through the prototypes, so the
    meta-gradient flows through it too, also first order (``first_order=True`` stops the
    inner gradients only: fo-Proto-MAML). With ``steps=0`` the loss is Prototypical Networks'.

    The inner parameters are ``{"body": embedding params, "head": {"kernel", "bias"}}``;
    ``head_only_adapt=True`` adapts the head alone (ANIL-style). The first argument of
    ``objective``/``value_and_grad`` is the embedding ``embed_fn(params, x)``, as for
    :func:`protonet`; metrics ``loss_post``, ``acc_post``. The rates are fixed (``lr``, or an
    optax ``optimizer``), not learned. The estimator has no ``inner`` for evaluation curves:
    evaluate another step count with ``protomaml(steps=...)``'s ``objective``.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> embed_fn = lambda w, x: jnp.tanh(x @ w)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> task = Task((x, jnp.array([0, 1])), (x, jnp.array([0, 1])))
        >>> mp = MetaParams(jnp.array([[1.0, 0.5], [0.2, 1.0]]))
        >>> l0 = protomaml(steps=0, lr=0.5).objective(embed_fn, mp, task, 0)[0]
        >>> bool(jnp.allclose(l0, protonet().objective(embed_fn, mp, task, 0)[0]))
        True
        >>> l1 = protomaml(steps=1, lr=0.5).objective(embed_fn, mp, task, 0)[0]
        >>> bool(l1 < l0)  # a step on the support set (here also the query) lowers the loss
        True
    """
    _check_ways(ways)
    inner = InnerLoop(
        steps=steps,
        lr=lr,
        mask=head_only if head_only_adapt else None,
        optimizer=optimizer,
        remat=remat,
        unroll=unroll,
    )
    if inner.learns_lr:
        raise ValueError("protomaml does not meta-learn inner rates: pass lr or an optimizer")
    if optimizer is not None and not first_order:  # differentiated through, as in maml
        check_inner_optimizer(optimizer)

    def objective(embed_fn, meta_params, task, step, fo=first_order):
        check_meta_params(meta_params)
        theta = meta_params.params
        zs, ys = embed(embed_fn, theta, task.support)
        protos, counts = prototypes(zs, ys, _num_classes(ways, task.support))

        def head_loss(phi, batch):
            z, y = embed(embed_fn, phi["body"], batch)
            return classification_metrics(linear_logits(phi["head"], z, counts), y)[0]

        phi0 = {"body": theta, "head": proto_head(protos)}
        phi = inner.run(head_loss, MetaParams(phi0), task.support, first_order=fo)
        zq, yq = embed(embed_fn, phi["body"], task.query)
        return classification_metrics(linear_logits(phi["head"], zq, counts), yq)

    exact = lambda embed_fn, meta_params, task, step: objective(
        embed_fn, meta_params, task, step, False
    )
    name = name or ("fo_protomaml" if first_order else "protomaml")
    return MetaGradEstimator(name, exact, _vg(objective), None)


def evaluate_tasks(
    estimator: MetaGradEstimator | Callable,
    embed_fn: EmbedFn,
    meta_params: MetaParams,
    tasks: Task,
    *,
    batch_size: int = 100,
) -> dict:
    """Per-task ``loss`` and ``acc`` (shape ``(num_tasks,)``) of an estimator's objective over
    a batch of tasks (a leading task axis), ``batch_size`` tasks at a time, outside the
    gradient: held-out evaluation for the estimators without an inner loop to curve.
    ``estimator`` may also be a bare objective, e.g. the fine-tuning baselines'
    :func:`metagrad.estimators.finetune.probe`.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> x = jnp.array([[[1.0], [5.0]]] * 3)  # 3 tasks
        >>> tasks = Task((x, jnp.array([[0, 1]] * 3)), (x, jnp.array([[0, 1]] * 3)))
        >>> out = evaluate_tasks(protonet(), lambda w, x: x * w, MetaParams(jnp.ones(1)), tasks)
        >>> out["acc"].tolist()
        [1.0, 1.0, 1.0]
    """

    objective = estimator.objective if isinstance(estimator, MetaGradEstimator) else estimator

    def one(mp, task):
        loss, metrics = objective(embed_fn, mp, task, 0)
        return {"loss": loss, "acc": metrics["acc_post"]}

    run = jax.jit(lambda mp, t: lax.map(lambda task: one(mp, task), t, batch_size=batch_size))
    return run(lax.stop_gradient(meta_params), tasks)


__all__ = [
    "classification_metrics",
    "embed",
    "evaluate_tasks",
    "linear_logits",
    "proto_head",
    "proto_logits",
    "protomaml",
    "protonet",
    "prototypes",
]
