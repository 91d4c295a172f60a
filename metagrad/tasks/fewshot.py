"""N-way K-shot classification tasks from any image split, in two halves: which images
(:func:`task_indices`, integers drawn on the device from a key) and the images themselves
(:func:`gather`, the same indexing on a device array or on a memory-mapped numpy array).

A split is ``images`` ``(classes, max_count, H, W, C)`` with ``counts`` ``(classes,)`` images per
class (rows past ``counts[c]`` are padding and never drawn); ``counts=None`` means every class has
``max_count``. Because the indices depend only on the key, the counts and ``max_count``, a host
stream that gathers them from the cache with numpy (:mod:`metagrad.tasks.streaming`) builds the
same tasks, bit for bit, as :func:`sample_task` on the device.

Typical use::

    sampler = make_sampler(data.images["train"], ways=5, shots=1, query=15,
                           counts=data.counts["train"])
    tasks = sampler.sample_batch(key, 4)                   # Task with a leading task axis
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from metagrad._types import Task

__all__ = [
    "TaskIndices",
    "TaskSampler",
    "batch_indices",
    "check_task_size",
    "gather",
    "make_sampler",
    "sample_task",
    "task_indices",
    "to_task",
]


class TaskIndices(NamedTuple):
    """What a task is made of: ``classes[i]`` is the split's class with label ``i`` and
    ``rows[i]`` its images, distinct, the first ``shots`` to the support set.

    Attributes:
        classes: int32 ``(..., ways)`` class indices into the split, distinct.
        rows: int32 ``(..., ways, shots + query)``, each row ``< counts[classes[i]]``.

    Example:
        >>> images = np.arange(3 * 4).reshape(3, 4, 1, 1, 1)  # image r of class c holds 4c + r
        >>> idx = TaskIndices(classes=np.array([2, 0]), rows=np.array([[3, 1], [0, 2]]))
        >>> gather(images, idx)[..., 0, 0, 0].tolist()
        [[11, 9], [0, 2]]
    """

    classes: jax.Array
    rows: jax.Array


class TaskSampler(NamedTuple):
    """``sample(key) -> Task`` and ``sample_batch(key, meta_batch_size) -> Task``, both jitted.

    Example:
        >>> sampler = make_sampler(np.zeros((5, 4, 4, 4, 3), np.uint8), ways=5, shots=1, query=1)
        >>> sampler.sample(jax.random.key(0)).support[1].tolist()
        [0, 1, 2, 3, 4]
    """

    sample: Callable[[jax.Array], Task]
    sample_batch: Callable[[jax.Array, int], Task]


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _is_concrete(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


def check_task_size(
    num_classes: int, max_count: int, counts=None, *, ways: int, shots: int, query: int
) -> None:
    """Refuses, before anything is compiled, a task the split cannot make.

    Args:
        num_classes: classes in the split.
        max_count: images per class in the array (padded).
        counts: images per class, ``(num_classes,)`` ints, or None (all ``max_count``). A traced
            array is not checked (its values are unknown until it runs).
        ways, shots, query: classes per task, support and query images per class.

    Raises:
        ValueError: a count not a positive int, ``ways > num_classes``, ``counts`` of the wrong
            shape or outside ``[0, max_count]``, or ``shots + query`` more than the smallest
            class has.

    Example:
        >>> check_task_size(4, 6, np.array([6, 6, 5, 6]), ways=2, shots=1, query=5)
        Traceback (most recent call last):
        ValueError: shots + query = 1 + 5 = 6 distinct images per class, but class 2 has only 5
    """
    for name, value in (("ways", ways), ("shots", shots), ("query", query)):
        _check_int(name, value)
    if ways > num_classes:
        raise ValueError(f"ways={ways} is more than the {num_classes} classes in this split")
    need = shots + query
    if counts is None:
        if need > max_count:
            raise ValueError(
                f"shots + query = {shots} + {query} = {need} distinct images per class, "
                f"but each class has only {max_count}"
            )
        return
    if not _is_concrete(counts):
        return
    counts = np.asarray(counts)
    if counts.shape != (num_classes,) or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(
            f"counts must be ints of shape ({num_classes},), one per class, got "
            f"{counts.dtype} {counts.shape}"
        )
    if counts.size and (counts.min() < 0 or counts.max() > max_count):
        raise ValueError(f"counts must lie in [0, {max_count}] (the images array's rows)")
    smallest = int(np.argmin(counts))
    if need > counts[smallest]:
        raise ValueError(
            f"shots + query = {shots} + {query} = {need} distinct images per class, "
            f"but class {smallest} has only {int(counts[smallest])}"
        )


def _random_order(key: jax.Array, valid: jax.Array) -> jax.Array:
    """Indices along the last axis in uniformly random order, the ``valid`` ones first.

    Each position gets a 64-bit random sort key (two uint32 draws, so ties are practically
    impossible: about ``n^2 / 2^65``); invalid positions get the largest key. A stable sort
    keeps every valid position ahead of the (later) invalid ones even in a tie with the
    largest key, so the first ``k`` are a uniform ordered draw without replacement among
    the valid positions.
    """
    top = jnp.uint32(0xFFFFFFFF)
    hi, lo = jax.random.bits(key, (2, *valid.shape), jnp.uint32)
    hi, lo = jnp.where(valid, hi, top), jnp.where(valid, lo, top)
    index = lax.broadcasted_iota(jnp.int32, valid.shape, valid.ndim - 1)
    return lax.sort((hi, lo, index), dimension=valid.ndim - 1, is_stable=True, num_keys=2)[2]


def task_indices(
    key: jax.Array,
    counts,
    *,
    ways: int,
    shots: int,
    query: int,
    max_count: int | None = None,
    num_classes: int | None = None,
) -> TaskIndices:
    """Draw one task's classes and images: integers only, on the device, jit/vmap-friendly.

    With ``key`` split into ``(class_key, image_key)``: ``ways`` distinct classes in uniformly
    random order (the order is the label assignment, a fresh permutation per task), then for
    the class with label ``i`` ``shots + query`` distinct rows, drawn uniformly without
    replacement from ``range(counts[classes[i]])``. Both draws sort random keys
    (``jax.random.bits``), masking the padded rows past a class's count.

    Args:
        key: a PRNG key.
        counts: ``(classes,)`` images per class, or None (every class has ``max_count``).
        ways, shots, query: classes per task, support and query images per class (keyword).
        max_count: the padded rows per class (``images.shape[1]``); it sets the draw, so the
            device sampler and a host stream must pass the same. Default: ``max(counts)``,
            which needs concrete ``counts``.
        num_classes: needed only with ``counts=None``.

    Returns:
        A :class:`TaskIndices`: ``classes`` ``(ways,)``, ``rows`` ``(ways, shots + query)``.

    Example:
        >>> draw = jax.jit(partial(task_indices, ways=2, shots=1, query=2, max_count=5))
        >>> idx = draw(jax.random.key(0), np.array([3, 5, 4]))
        >>> idx.classes.shape, idx.rows.shape
        ((2,), (2, 3))
        >>> all(len(set(r)) == 3 for r in idx.rows.tolist())  # distinct within a class
        True
    """
    if counts is None:
        if max_count is None or num_classes is None:
            raise ValueError("task_indices with counts=None needs max_count and num_classes")
        counts = jnp.full((num_classes,), max_count, jnp.int32)
    elif max_count is None:
        if not _is_concrete(counts):
            raise ValueError("task_indices needs max_count when counts is traced")
        max_count = int(np.max(counts))
    check_task_size(np.shape(counts)[0], max_count, counts, ways=ways, shots=shots, query=query)
    counts = jnp.asarray(counts, jnp.int32)
    class_key, image_key = jax.random.split(key)
    classes = _random_order(class_key, jnp.ones(counts.shape, bool))[:ways]
    valid = jnp.arange(max_count, dtype=jnp.int32) < counts[classes][:, None]
    rows = _random_order(image_key, valid)[:, : shots + query]
    return TaskIndices(classes=classes, rows=rows)


def batch_indices(
    key: jax.Array, counts, batch_size: int, *, ways: int, shots: int, query: int, max_count: int
) -> TaskIndices:
    """:func:`task_indices` of ``batch_size`` tasks, task ``t`` from
    ``jax.random.split(key, batch_size)[t]``, the convention of every sampler here.

    Example:
        >>> draw = jax.jit(batch_indices, static_argnums=2,
        ...                static_argnames=("ways", "shots", "query", "max_count"))
        >>> idx = draw(jax.random.key(0), np.array([4, 4, 4]), 2, ways=3, shots=1, query=1,
        ...            max_count=4)
        >>> idx.classes.shape, idx.rows.shape
        ((2, 3), (2, 3, 2))
    """
    one = partial(task_indices, ways=ways, shots=shots, query=query, max_count=max_count)
    return jax.vmap(one, in_axes=(0, None))(jax.random.split(key, batch_size), counts)


def gather(images, idx: TaskIndices):
    """``images[idx.classes[..., None], idx.rows]``: ``(..., ways, shots + query, H, W, C)``.

    The same expression on a device array (``jnp``, inside a compiled sampler) and on a numpy
    or memory-mapped array (a host stream reads only the rows it needs): a copy either way, so
    both give the same bytes.

    Example:
        >>> images = np.arange(2 * 3).reshape(2, 3, 1, 1, 1)
        >>> idx = TaskIndices(np.array([1]), np.array([[2, 0]]))
        >>> gather(images, idx).shape, gather(jnp.asarray(images), idx)[..., 0, 0, 0].tolist()
        ((1, 2, 1, 1, 1), [[5, 3]])
    """
    return images[idx.classes[..., None], idx.rows]


def to_task(x: jax.Array, *, shots: int) -> Task:
    """A task from gathered images ``(ways, shots + query, H, W, C)`` (on the device).

    uint8 is scaled to ``[0, 1]`` as ``x * float32(1 / 255)``; a float array is only cast to
    float32. Examples are grouped by label: ``[0]*shots + [1]*shots + ...`` for the support set,
    likewise for the query set.

    Example:
        >>> task = to_task(jnp.full((2, 3, 1, 1, 1), 255, jnp.uint8), shots=1)
        >>> task.support[1].tolist(), task.query[1].tolist(), float(task.query[0].max())
        ([0, 1], [0, 0, 1, 1], 1.0)
    """
    x = jnp.asarray(x)
    ways = x.shape[0]
    x = x.astype(jnp.float32) * (1 / 255) if x.dtype == jnp.uint8 else x.astype(jnp.float32)

    def batch(part: jax.Array) -> tuple[jax.Array, jax.Array]:
        n = part.shape[1]
        labels = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), n)
        return part.reshape(ways * n, *part.shape[2:]), labels

    return Task(support=batch(x[:, :shots]), query=batch(x[:, shots:]))


def _check_images(shape: tuple[int, ...]) -> None:
    if len(shape) != 5:
        raise ValueError(f"images must be (classes, images, H, W, C), got shape {shape}")


def sample_task(
    images: jax.Array, key: jax.Array, *, ways: int, shots: int, query: int, counts=None
) -> Task:
    """One N-way K-shot task from a split's images, as a pure function (jit/vmap-friendly).

    :func:`task_indices` (with ``max_count = images.shape[1]``), :func:`gather`, :func:`to_task`.

    Args:
        images: ``(classes, max_count, H, W, C)``; uint8 is scaled to ``[0, 1]`` as
            ``x * float32(1 / 255)``, a float array is only cast to float32.
        key: a PRNG key.
        ways, shots, query: classes per task, support and query images per class (keyword).
        counts: ``(classes,)`` images per class (rows past a class's count are never drawn);
            None: every row is an image.

    Returns:
        ``Task(support=(x, y), query=(x, y))``: ``x`` float32 ``(ways * shots, H, W, C)``
        (``ways * query`` for the query set), ``y`` int32 labels in ``0 .. ways - 1``.

    Raises:
        ValueError: ``ways`` more than the classes, ``shots + query`` more than the smallest
            class's count, a non-positive count, or ``images`` not 5-d.

    Example:
        >>> images = np.zeros((5, 4, 4, 4, 3), np.uint8)  # tiny 4x4 images
        >>> sample = jax.jit(partial(sample_task, ways=5, shots=1, query=2))  # one compilation
        >>> task = sample(images, jax.random.key(0))
        >>> task.support[0].shape, task.query[0].dtype, task.query[1].tolist()
        ((5, 4, 4, 3), dtype('float32'), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """
    images = jnp.asarray(images)
    _check_images(images.shape)
    classes, max_count = images.shape[:2]
    check_task_size(classes, max_count, counts, ways=ways, shots=shots, query=query)
    idx = task_indices(
        key,
        counts,
        ways=ways,
        shots=shots,
        query=query,
        max_count=max_count,
        num_classes=classes,
    )
    return to_task(gather(images, idx), shots=shots)


def make_sampler(
    images: np.ndarray, *, ways: int, shots: int, query: int, counts=None
) -> TaskSampler:
    """A jitted task sampler over one split, the arguments checked up front.

    The split is moved to the device once, as uint8 (mini-ImageNet's meta-train split is
    813 MB, a quarter of float32), and passed to the compiled sampler as an argument.

    Args:
        images: a split ``(classes, max_count, H, W, C)``, e.g. ``data.images["train"]``.
        ways, shots, query: classes per task, support and query images per class.
        counts: images per class (``data.counts["train"]``), or None (all ``max_count``).

    Returns:
        A :class:`TaskSampler`; ``sample_batch`` vmaps :func:`sample_task` over
        ``jax.random.split(key, meta_batch_size)``.

    Example:
        >>> sampler = make_sampler(np.zeros((5, 4, 4, 4, 3), np.uint8), ways=5, shots=1, query=1)
        >>> sampler.sample_batch(jax.random.key(0), 2).support[0].shape
        (2, 5, 4, 4, 3)
    """
    _check_images(np.shape(images))
    classes, max_count = np.shape(images)[:2]
    check_task_size(classes, max_count, counts, ways=ways, shots=shots, query=query)
    images = jnp.asarray(images)
    counts = None if counts is None else np.asarray(counts, np.int32)
    one = partial(sample_task, ways=ways, shots=shots, query=query, counts=counts)
    one_jit = jax.jit(one)

    @partial(jax.jit, static_argnames="meta_batch_size")
    def batch_jit(images: jax.Array, key: jax.Array, meta_batch_size: int) -> Task:
        return jax.vmap(one, in_axes=(None, 0))(images, jax.random.split(key, meta_batch_size))

    def sample_batch(key: jax.Array, meta_batch_size: int) -> Task:
        _check_int("meta_batch_size", meta_batch_size)
        return batch_jit(images, key, meta_batch_size=meta_batch_size)

    return TaskSampler(sample=lambda key: one_jit(images, key), sample_batch=sample_batch)
