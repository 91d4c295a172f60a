"""mini-ImageNet N-way K-shot classification (Vinyals et al. 2016; Ravi & Larochelle 2017).

Typical use::

    data = load_miniimagenet("~/data/miniimagenet")        # any of the three containers
    sampler = make_sampler(data.images["train"], ways=5, shots=1, query=15)
    task = sampler.sample_batch(key, 4)                    # Task with a leading task axis

Reading the files, the split lists and the on-disk cache live in
:mod:`metagrad.tasks.miniimagenet_io`; the restricted unpickler in
:mod:`metagrad.tasks.safe_pickle`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._types import Task
from metagrad.tasks.miniimagenet_io import (
    IMAGES_PER_CLASS,
    SPLITS,
    MiniImageNetClassError,
    MiniImageNetCountError,
    MiniImageNetData,
    MiniImageNetError,
    MiniImageNetFormatError,
    MiniImageNetImageError,
    MiniImageNetNotFoundError,
    fingerprint,
    load_miniimagenet,
    read_split_file,
    standard_split,
)

__all__ = [
    "IMAGES_PER_CLASS",
    "SPLITS",
    "MiniImageNetClassError",
    "MiniImageNetCountError",
    "MiniImageNetData",
    "MiniImageNetError",
    "MiniImageNetFormatError",
    "MiniImageNetImageError",
    "MiniImageNetNotFoundError",
    "TaskSampler",
    "fingerprint",
    "load_miniimagenet",
    "make_sampler",
    "read_split_file",
    "sample_task",
    "standard_split",
]


class TaskSampler(NamedTuple):
    """``sample(key) -> Task`` and ``sample_batch(key, meta_batch_size) -> Task``, both jitted."""

    sample: Callable[[jax.Array], Task]
    sample_batch: Callable[[jax.Array, int], Task]


def _check_task_shape(shape: tuple[int, ...], *, ways: int, shots: int, query: int) -> None:
    if len(shape) != 5:
        raise ValueError(f"images must be (classes, images, H, W, C), got shape {shape}")
    for name, value in (("ways", ways), ("shots", shots), ("query", query)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    classes, per_class = shape[:2]
    if ways > classes:
        raise ValueError(f"ways={ways} is more than the {classes} classes in this split")
    if shots + query > per_class:
        raise ValueError(
            f"shots + query = {shots} + {query} = {shots + query} distinct images per class, "
            f"but each class has only {per_class}"
        )


def sample_task(images: jax.Array, key: jax.Array, *, ways: int, shots: int, query: int) -> Task:
    """One N-way K-shot task from a split's images, as a pure function (jit/vmap-friendly).

    ``ways`` distinct classes are drawn uniformly without replacement and put in random order,
    which is the label assignment (a fresh permutation of ``0 .. ways-1`` per task); each class
    contributes ``shots + query`` distinct images, drawn uniformly without replacement, the first
    ``shots`` to the support set. Examples are grouped by label: ``[0]*shots + [1]*shots + ...``.

    Args:
        images: ``(classes, images_per_class, H, W, C)``; uint8 is scaled to ``[0, 1]`` as
            ``x * float32(1 / 255)``, a float array is only cast to float32.
        key: a PRNG key.
        ways, shots, query: classes per task, support and query images per class (keyword).

    Returns:
        ``Task(support=(x, y), query=(x, y))``: ``x`` float32 ``(ways * shots, H, W, C)``
        (``ways * query`` for the query set), ``y`` int32 labels in ``0 .. ways - 1``.

    Raises:
        ValueError: ``ways`` more than the classes, ``shots + query`` more than the images per
            class, a non-positive count, or ``images`` not 5-d.

    Example:
        >>> images = np.zeros((6, 10, 4, 4, 3), np.uint8)  # tiny 4x4 images
        >>> task = sample_task(images, jax.random.key(0), ways=5, shots=1, query=2)
        >>> task.support[0].shape, task.query[0].dtype, task.query[1].tolist()
        ((5, 4, 4, 3), dtype('float32'), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """
    images = jnp.asarray(images)
    _check_task_shape(images.shape, ways=ways, shots=shots, query=query)
    classes, per_class = images.shape[:2]
    class_key, image_key = jax.random.split(key)
    chosen = jax.random.permutation(class_key, classes)[:ways]
    rows = jnp.broadcast_to(jnp.arange(per_class, dtype=jnp.int32), (ways, per_class))
    picks = jax.random.permutation(image_key, rows, axis=1, independent=True)[:, : shots + query]
    x = images[chosen[:, None], picks]  # (ways, shots + query, H, W, C)
    x = x.astype(jnp.float32) * (1 / 255) if images.dtype == jnp.uint8 else x.astype(jnp.float32)

    def batch(part: jax.Array) -> tuple[jax.Array, jax.Array]:
        n = part.shape[1]
        labels = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n)
        return part.reshape(ways * n, *part.shape[2:]), labels

    return Task(support=batch(x[:, :shots]), query=batch(x[:, shots:]))


def make_sampler(images: np.ndarray, *, ways: int, shots: int, query: int) -> TaskSampler:
    """A jitted task sampler over one split, the arguments checked up front.

    The split is moved to the device once, as uint8 (mini-ImageNet's meta-train split is
    813 MB, a quarter of float32), and passed to the compiled sampler as an argument.

    Args:
        images: a split, e.g. ``load_miniimagenet(...).images["train"]``.
        ways, shots, query: classes per task, support and query images per class.

    Returns:
        A :class:`TaskSampler`; ``sample_batch`` vmaps :func:`sample_task` over
        ``jax.random.split(key, meta_batch_size)``.

    Example:
        >>> sampler = make_sampler(np.zeros((5, 4, 4, 4, 3), np.uint8), ways=5, shots=1, query=1)
        >>> sampler.sample_batch(jax.random.key(0), 2).support[0].shape
        (2, 5, 4, 4, 3)
    """
    _check_task_shape(np.shape(images), ways=ways, shots=shots, query=query)
    images = jnp.asarray(images)
    one = partial(sample_task, ways=ways, shots=shots, query=query)
    one_jit = jax.jit(one)

    @partial(jax.jit, static_argnames="meta_batch_size")
    def batch_jit(images: jax.Array, key: jax.Array, meta_batch_size: int) -> Task:
        return jax.vmap(one, in_axes=(None, 0))(images, jax.random.split(key, meta_batch_size))

    def sample_batch(key: jax.Array, meta_batch_size: int) -> Task:
        if isinstance(meta_batch_size, bool) or not isinstance(meta_batch_size, int):
            raise ValueError(f"meta_batch_size must be an int >= 1, got {meta_batch_size!r}")
        if meta_batch_size < 1:
            raise ValueError(f"meta_batch_size must be an int >= 1, got {meta_batch_size!r}")
        return batch_jit(images, key, meta_batch_size=meta_batch_size)

    return TaskSampler(sample=lambda key: one_jit(images, key), sample_batch=sample_batch)
