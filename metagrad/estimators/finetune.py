r"""Fine-tuning baselines: supervised pre-training of a backbone on all training classes, then a
new head fitted on each test task's support embeddings (Baseline and Baseline++ of Chen et al.
2019, RFS of Tian et al. 2020).

Pre-training is not meta-training: there are no tasks, only ``(images, global labels)`` batches
of the training split (:func:`supervised_batch`), the backbone plus a classifier over all
training classes (:func:`init_classifier`; Baseline++: a cosine classifier), the loss
:func:`pretrain_loss` and an optax step (:func:`pretrain_step`). At test, :func:`probe` fits a
logistic-regression head to the support embeddings of the frozen backbone (L-BFGS on the
convex, L2-regularised cross-entropy) and scores the query; it has the estimators' ``objective``
signature, so :func:`metagrad.estimators.protonet.evaluate_tasks` evaluates it over held-out
tasks like ProtoNets.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from metagrad._types import MetaParams, Task
from metagrad.estimators.base import MetaGradEstimator, check_meta_params
from metagrad.estimators.protonet import EmbedFn, classification_metrics, embed


def baseline_pp_scale(num_classes: int) -> float:
    """Baseline++'s cosine-logit scale: 2 up to 200 classes, 10 above (Chen et al.'s code).

    Example:
        >>> baseline_pp_scale(64), baseline_pp_scale(4400)
        (2.0, 10.0)
    """
    return 2.0 if num_classes <= 200 else 10.0


def _unit(a: jax.Array, axis: int) -> jax.Array:
    floor = jnp.finfo(a.dtype).eps ** 2  # rsqrt's derivative stays finite at a zero vector
    return a * lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=axis, keepdims=True), floor))


def init_classifier(key: jax.Array, dim: int, num_classes: int, *, cosine: bool = False) -> dict:
    """A classifier's parameters: ``kernel`` ``(dim, num_classes)`` LeCun-normal and, for the
    linear one, a zero ``bias`` (Baseline++'s cosine classifier has none).

    Example:
        >>> head = init_classifier(jax.random.key(0), 4, 3)
        >>> head["kernel"].shape, head["bias"].tolist()
        ((4, 3), [0.0, 0.0, 0.0])
    """
    kernel = jax.random.normal(key, (dim, num_classes)) / jnp.sqrt(dim)
    return {"kernel": kernel} if cosine else {"kernel": kernel, "bias": jnp.zeros(num_classes)}


def classifier_logits(
    head: dict, z: jax.Array, *, cosine: bool = False, scale: float | None = None
) -> jax.Array:
    r"""Logits of a linear or cosine classifier.

    .. math:: \text{linear: } z W + b, \qquad
              \text{cosine: } s\, \frac{z^\top w_c}{\|z\| \|w_c\|}

    with :math:`s` = ``scale`` (default :func:`baseline_pp_scale` of the class count).

    Example:
        >>> head = {"kernel": jnp.array([[1.0, 0.0], [0.0, 3.0]])}
        >>> classifier_logits(head, jnp.array([[2.0, 2.0]]), cosine=True, scale=1.0).tolist()
        [[0.7071067690849304, 0.7071067690849304]]
    """
    if not cosine:
        return z @ head["kernel"] + head["bias"]
    s = baseline_pp_scale(head["kernel"].shape[1]) if scale is None else scale
    return s * _unit(z, -1) @ _unit(head["kernel"], 0)


def pretrain_loss(
    embed_fn: EmbedFn, *, cosine: bool = False, scale: float | None = None
) -> Callable:
    r"""``loss_fn(params, (images, labels))``: cross-entropy over all training classes of the
    backbone and classifier, ``params = {"backbone": ..., "classifier": init_classifier(...)}``.

    .. math:: L = -\frac1B \sum_i \log \operatorname{softmax}(g(f_\theta(x_i)))_{y_i}

    Example:
        >>> loss_fn = pretrain_loss(lambda w, x: x @ w)
        >>> classifier = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}
        >>> params = {"backbone": jnp.eye(2), "classifier": classifier}
        >>> round(float(loss_fn(params, (jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])))), 4)  # log 3
        1.0986
    """

    def loss_fn(params, batch):
        z, y = embed(embed_fn, params["backbone"], batch)
        logits = classifier_logits(params["classifier"], z, cosine=cosine, scale=scale)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss_fn


def pretrain_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    r"""A jitted supervised step, ``step(params, opt_state, batch) -> (params, opt_state,
    loss)``: :math:`\theta \leftarrow \theta + \text{optimizer}(\nabla_\theta L(\theta; B))`.
    RFS uses SGD with momentum 0.9 and weight decay 5e-4; Chen et al. Adam 1e-3.

    Example:
        >>> loss_fn = lambda p, b: jnp.mean((p * b[0] - b[1]) ** 2)
        >>> opt = optax.sgd(0.1)
        >>> step = pretrain_step(loss_fn, opt)
        >>> p, s, loss = step(0.0, opt.init(0.0), (jnp.ones(3), 2 * jnp.ones(3)))
        >>> round(float(p), 4), float(loss)  # 0 - 0.1 * 2 (0 - 2)
        (0.4, 4.0)
    """

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def supervised_batch(
    images: jax.Array,
    key: jax.Array,
    batch_size: int,
    *,
    rotations: bool = False,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""A batch of ``(images, global labels)`` drawn uniformly from a split of shape
    ``(classes, per_class, H, W)`` or ``(classes, per_class, H, W, C)``, for pre-training.

    With ``rotations`` (Omniglot) class :math:`4c + r` is character :math:`c` turned by
    :math:`r \cdot 90°`, as :mod:`metagrad.tasks.omniglot` samples them (``H == W``). ``uint8``
    is scaled to ``[0, 1]``; the output is float32 NHWC. ``counts`` ``(classes,)`` draws among
    each class's first ``counts[c]`` images (unequal class sizes).

    Example:
        >>> images = jnp.zeros((3, 20, 28, 28), jnp.uint8)
        >>> sample = jax.jit(supervised_batch, static_argnums=2, static_argnames="rotations")
        >>> x, y = sample(images, jax.random.key(0), 8, rotations=True)
        >>> x.shape, x.dtype, bool((y < 12).all())
        ((8, 28, 28, 1), dtype('float32'), True)
    """
    images = jnp.asarray(images)
    if images.ndim not in (4, 5):
        raise ValueError(
            f"images must be (classes, per_class, H, W[, C]); got shape {images.shape}"
        )
    n, per_class = images.shape[:2]
    k_cls, k_img, k_rot = jax.random.split(key, 3)
    cls = jax.random.randint(k_cls, (batch_size,), 0, n)
    limit = per_class if counts is None else jnp.asarray(counts)[cls]
    idx = jnp.floor(jax.random.uniform(k_img, (batch_size,)) * limit).astype(jnp.int32)
    x = images[cls, idx]
    if images.ndim == 4:
        x = x[..., None]
    label = cls
    if rotations:
        rot = jax.random.randint(k_rot, (batch_size,), 0, 4)
        turned = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)], axis=1)
        x = turned[jnp.arange(batch_size), rot]
        label = 4 * cls + rot
    x = x.astype(jnp.float32) * (1 / 255) if images.dtype == jnp.uint8 else x.astype(jnp.float32)
    return x, label.astype(jnp.int32)


def fit_logistic_head(
    z: jax.Array,
    y: jax.Array,
    num_classes: int,
    *,
    l2: float = 1e-2,
    iters: int = 100,
    cosine: bool = False,
    scale: float | None = None,
) -> dict:
    r"""A new head fitted to (support) embeddings by L-BFGS (``iters`` steps, from zero):

    .. math:: \min_{W, b}\ \frac1n \sum_i -\log \operatorname{softmax}(z_i W + b)_{y_i}
              + \frac{\ell_2}{2} \|W\|^2

    convex, and strongly convex in :math:`W`, for ``l2 > 0`` (the linear head: logistic
    regression, Baseline and RFS). With ``cosine`` (Baseline++), the head is
    :func:`classifier_logits`' cosine classifier, started at the class means (zero would have no
    direction), without the L2 term (the logits do not depend on the columns' norms); no longer
    convex. Classes absent from ``y`` are masked out (their columns stay
    zero).

    Example:
        >>> z, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1])
        >>> head = jax.jit(fit_logistic_head, static_argnums=2)(z, y, 2)
        >>> classifier_logits(head, z).argmax(1).tolist()
        [0, 1]
    """
    onehot = jax.nn.one_hot(y, num_classes, dtype=z.dtype)
    present = jnp.sum(onehot, axis=0) > 0
    if cosine:
        means = (onehot.T @ z) / jnp.maximum(onehot.sum(0), 1)[:, None]
        head0 = {"kernel": means.T}
    else:
        head0 = {
            "kernel": jnp.zeros((z.shape[1], num_classes), z.dtype),
            "bias": jnp.zeros(num_classes, z.dtype),
        }

    def objective(head):
        logits = jnp.where(
            present, classifier_logits(head, z, cosine=cosine, scale=scale), -jnp.inf
        )
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        if cosine:  # the logits ignore |w_c|: an L2 penalty would only shrink it towards 0
            return ce
        return ce + 0.5 * l2 * jnp.sum(head["kernel"] ** 2)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def body(_, carry):
        head, state = carry
        value, grad = value_and_grad(head, state=state)
        updates, state = opt.update(grad, state, head, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(head, updates), state

    head, _ = lax.fori_loop(0, iters, body, (head0, opt.init(head0)))
    return head


def probe(
    *,
    l2: float = 1e-2,
    iters: int = 100,
    cosine: bool = False,
    scale: float | None = None,
    normalize: bool = False,
    ways: int | None = None,
) -> Callable:
    r"""The test-time classifier of the fine-tuning baselines as an ``objective(embed_fn,
    meta_params, task, step) -> (loss, {"loss_post", "acc_post"})``: embed support and query
    with the frozen backbone ``MetaParams(backbone params)``, fit :func:`fit_logistic_head` to
    the support, score the query.

    ``normalize`` scales every embedding to unit length first (RFS). ``ways=None`` gives the
    head one column per support example, as the estimators do; absent labels are masked out
    of the fit and of the logits.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> task = Task((x, jnp.array([0, 1])), (x + 0.1, jnp.array([0, 1])))
        >>> objective = jax.jit(probe(), static_argnums=0)
        >>> loss, m = objective(lambda w, x: x @ w, MetaParams(jnp.eye(2)), task, 0)
        >>> float(m["acc_post"])
        1.0
    """

    def objective(embed_fn, meta_params, task: Task, step):
        check_meta_params(meta_params)
        theta = lax.stop_gradient(meta_params.params)
        zs, ys = embed(embed_fn, theta, task.support)
        zq, yq = embed(embed_fn, theta, task.query)
        if normalize:
            zs, zq = _unit(zs, -1), _unit(zq, -1)
        num = zs.shape[0] if ways is None else ways
        head = fit_logistic_head(zs, ys, num, l2=l2, iters=iters, cosine=cosine, scale=scale)
        logits = classifier_logits(head, zq, cosine=cosine, scale=scale)
        present = jnp.sum(jax.nn.one_hot(ys, num), axis=0) > 0
        return classification_metrics(jnp.where(present, logits, -jnp.inf), yq)

    return objective


__all__ = [
    "baseline_pp_scale",
    "classifier_logits",
    "fit_logistic_head",
    "init_classifier",
    "pretrain_loss",
    "pretrain_step",
    "probe",
    "supervised_batch",
]


def finetune(
    *,
    cosine: bool = False,
    scale: float | None = None,
    normalize: bool = False,
    l2: float = 1e-2,
    iters: int = 100,
    ways: int | None = None,
    name: str = "finetune",
) -> MetaGradEstimator:
    r"""The fine-tuning baselines as an estimator, so the trainer, its checkpoints and the
    held-out evaluation serve them as they serve MAML: Baseline (linear), Baseline++
    (``cosine=True``) and RFS (``normalize=True``).

    ``value_and_grad`` is pre-training's: for a "task" whose support set is a batch of training
    images with their *global* labels (:func:`supervised_batch`), the gradient of
    :func:`pretrain_loss` with respect to ``MetaParams({"backbone", "classifier"})``. It is
    not the gradient of ``objective``, which is the test-time score: the classifier dropped,
    a logistic head fitted to each held-out task's support embeddings (:func:`probe`), nothing
    differentiated. The metrics of a pre-training step are ``loss_post`` and ``acc_post`` on
    the batch.

    Example:
        >>> from metagrad import MetaParams, Task
        >>> est = finetune()
        >>> embed_fn = lambda w, x: x @ w
        >>> classifier = init_classifier(jax.random.key(0), 2, 3)
        >>> params = {"backbone": jnp.eye(2), "classifier": classifier}
        >>> batch = (jnp.ones((4, 2)), jnp.array([0, 1, 2, 0]))
        >>> (loss, m), g = est.value_and_grad(embed_fn, MetaParams(params), Task(batch, batch), 0)
        >>> sorted(g.params), m["acc_post"].shape
        (['backbone', 'classifier'], ())
    """
    test_score = probe(
        l2=l2, iters=iters, cosine=cosine, scale=scale, normalize=normalize, ways=ways
    )

    def pretrain_objective(embed_fn, meta_params, task, step):
        check_meta_params(meta_params)
        params = meta_params.params
        z, y = embed(embed_fn, params["backbone"], task.support)  # RFS normalises at test only
        logits = classifier_logits(params["classifier"], z, cosine=cosine, scale=scale)
        return classification_metrics(logits, y)

    def value_and_grad(embed_fn, meta_params, task, step):
        return jax.value_and_grad(pretrain_objective, argnums=1, has_aux=True)(
            embed_fn, meta_params, task, step
        )

    def objective(embed_fn, meta_params, task, step):
        backbone = MetaParams(meta_params.params["backbone"])
        return test_score(embed_fn, backbone, task, step)

    return MetaGradEstimator(name, objective, value_and_grad, None)
