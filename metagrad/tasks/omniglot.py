"""Omniglot N-way K-shot classification: standard splits and an on-device task sampler.

A class is a character turned by a multiple of 90 degrees (Santoro et al. 2016; Vinyals et al.
2016; Finn et al. 2017), so ``C`` characters make ``4 C`` classes. Splits are made over
characters, so the four rotations of a character always share a split.

Typical use::

    splits = omniglot_splits("~/data/omniglot")          # {"train", "val", "test"}: uint8
    sampler = make_sampler(splits["train"], ways=5, shots=1, query=15)
    task = sampler.sample_batch(key, 32)                   # Task with a leading task axis

Reading the files and the on-disk cache live in :mod:`metagrad.tasks.omniglot_io`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._types import Task
from metagrad.tasks.omniglot_io import (
    DRAWINGS,
    OmniglotData,
    OmniglotFormatError,
    OmniglotNotFoundError,
    load_omniglot,
)

__all__ = [
    "SPLIT_SEED",
    "OmniglotData",
    "OmniglotFormatError",
    "OmniglotNotFoundError",
    "TaskIndices",
    "TaskSampler",
    "load_omniglot",
    "make_sampler",
    "omniglot_splits",
    "sample_indices",
    "sample_task",
    "split_characters",
]

SPLIT_SEED = 1  # Finn et al. seed their shuffle with 1 too (random.seed(1) in data_generator.py)
ROTATIONS = 4


# --- splits ------------------------------------------------------------------------------------


def split_characters(
    alphabet: np.ndarray,
    background: np.ndarray,
    *,
    split: str = "finn",
    seed: int = SPLIT_SEED,
    num_train: int = 1100,
    num_val: int = 100,
    num_val_alphabets: int = 5,
) -> dict[str, np.ndarray]:
    """Character indices of the meta-train, validation and meta-test splits.

    ``split="finn"`` (Vinyals et al. 2016, Finn et al. 2017): the characters, in the canonical
    order of :class:`OmniglotData`, are shuffled with
    ``np.random.default_rng(seed).permutation(num_characters)``; the first ``num_train`` are
    meta-train, the next ``num_val`` validation, the rest meta-test. On the full data that is
    1,100 / 100 / 423 characters, mixing alphabets. (Finn et al.'s code shuffles the
    ``os.listdir`` order with Python's ``random``, so their exact assignment cannot be
    reproduced; this one is fixed and documented instead.)

    ``split="alphabet"`` (Lake et al.'s background/evaluation protocol): meta-test is every
    evaluation alphabet; ``num_val_alphabets`` background alphabets, drawn with
    ``np.random.default_rng(seed).choice(sorted_background_alphabets, num_val_alphabets,
    replace=False)``, are validation, and the other background alphabets meta-train. With the
    defaults the validation alphabets are Anglo-Saxon_Futhorc, Futurama, Grantha, Latin and
    Syriac_(Estrangelo): 817 / 147 / 659 characters (pinned by a test).

    Args:
        alphabet: ``(num_characters,)`` alphabet names, as ``OmniglotData.alphabet``.
        background: ``(num_characters,)`` bool, as ``OmniglotData.background``.
        split: ``"finn"`` or ``"alphabet"``.
        seed: the seed of the shuffle.
        num_train, num_val: split sizes in characters for ``"finn"``; the rest is meta-test.
        num_val_alphabets: held-out background alphabets for ``"alphabet"``.

    Returns:
        ``{"train", "val", "test"}`` -> sorted ``int64`` character indices; they are disjoint
        and cover every character.

    Example:
        >>> idx = split_characters(np.array(["A"] * 1623), np.ones(1623, bool))
        >>> {name: len(i) for name, i in idx.items()}
        {'train': 1100, 'val': 100, 'test': 423}
    """
    alphabet, background = np.asarray(alphabet), np.asarray(background, dtype=bool)
    n = len(alphabet)
    if background.shape != (n,):
        raise ValueError(f"alphabet {alphabet.shape} and background {background.shape} differ")
    rng = np.random.default_rng(seed)
    if split == "finn":
        if num_train < 1 or num_val < 0 or num_train + num_val >= n:
            raise ValueError(
                f"split='finn' needs 1 <= num_train and 0 <= num_val with num_train + num_val < "
                f"the {n} characters (the rest is meta-test); got num_train={num_train}, "
                f"num_val={num_val}"
            )
        order = rng.permutation(n)
        parts = np.split(order, [num_train, num_train + num_val])
    elif split == "alphabet":
        names = np.unique(alphabet[background])  # sorted, so the draw does not depend on order
        if not 0 <= num_val_alphabets < len(names) or background.all():
            raise ValueError(
                f"split='alphabet' needs evaluation characters and 0 <= num_val_alphabets < the "
                f"{len(names)} background alphabets; got num_val_alphabets={num_val_alphabets}"
            )
        held_out = rng.choice(names, num_val_alphabets, replace=False)
        val = background & np.isin(alphabet, held_out)
        parts = [np.flatnonzero(m) for m in (background & ~val, val, ~background)]
    else:
        raise ValueError(f"split must be 'finn' or 'alphabet', got {split!r}")
    return {name: np.sort(p) for name, p in zip(("train", "val", "test"), parts, strict=True)}


def omniglot_splits(
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    split: str = "finn",
    seed: int = SPLIT_SEED,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The images of the meta-train, validation and meta-test characters.

    :func:`load_omniglot` (cached preprocessing) followed by :func:`split_characters`.

    Args:
        data_dir: folder with ``images_background.zip`` and ``images_evaluation.zip`` (or the
            extracted folders); default ``$METAGRAD_DATA/omniglot``. Never downloads.
        cache_dir: writable cache folder; default ``$METAGRAD_CACHE`` or ``~/.cache/metagrad``.
        split: ``"finn"`` (1,100 / 100 / 423 characters) or ``"alphabet"``; see
            :func:`split_characters`.
        seed: the seed of the split's shuffle.
        progress: a progress bar on stderr during the first (uncached) decode.

    Returns:
        ``{"train", "val", "test"}`` -> ``uint8`` arrays ``(characters, 20, 28, 28)``, ink 255.
        :func:`make_sampler` moves one to the device and hands float32 in ``[0, 1]`` to JAX.

    Example:
        Typical use is ``splits = omniglot_splits("~/data/omniglot")`` then
        ``make_sampler(splits["train"], ways=5, shots=1, query=1)``; without the files:

        >>> omniglot_splits("/no/such/folder")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        metagrad.tasks.omniglot_io.OmniglotNotFoundError: ...images_background.zip...
    """
    data = load_omniglot(data_dir, cache_dir=cache_dir, progress=progress)
    index = split_characters(data.alphabet, data.background, split=split, seed=seed)
    return {name: data.images[i] for name, i in index.items()}


# --- sampling ----------------------------------------------------------------------------------


class TaskIndices(NamedTuple):
    """What one task is made of: ``ways`` classes and their drawings.

    Attributes:
        character: ``(ways,)`` int32 character index into the split; class ``i`` has label ``i``.
        rotation: ``(ways,)`` int32 quarter turns counterclockwise, as ``np.rot90``'s ``k``.
        drawing: ``(ways, shots + query)`` int32 drawer indices, distinct within a row; the
            first ``shots`` go to the support set, the rest to the query set.

    Example:
        Class 0's first support image is drawing 4 of character 1, turned once:

        >>> images = np.arange(2 * 20 * 2 * 2).reshape(2, 20, 2, 2)  # tiny 2x2 "images"
        >>> idx = TaskIndices(
        ...     character=np.array([1, 0]), rotation=np.array([1, 0]),
        ...     drawing=np.array([[4, 0], [2, 3]]),
        ... )
        >>> images[1, 4].tolist()
        [[96, 97], [98, 99]]
        >>> np.rot90(images[idx.character[0], idx.drawing[0, 0]], idx.rotation[0]).tolist()
        [[97, 99], [96, 98]]
    """

    character: jax.Array
    rotation: jax.Array
    drawing: jax.Array


class TaskSampler(NamedTuple):
    """``sample(key) -> Task``, ``sample_batch(key, meta_batch_size) -> Task`` and
    ``sample_keys(keys) -> Task``, all jitted.

    ``sample_batch(key, n)`` is ``sample_keys(jax.random.split(key, n))``, so a large held-out
    set can be drawn in blocks, ``sample_keys(keys[a:b])``, with the same tasks bit for bit.

    Example:
        >>> sampler = make_sampler(np.zeros((2, 20, 8, 8), np.uint8), ways=3, shots=2, query=1)
        >>> task = sampler.sample(jax.random.key(0))
        >>> task.support[0].shape, task.support[1].tolist(), task.query[1].tolist()
        ((6, 8, 8, 1), [0, 0, 1, 1, 2, 2], [0, 1, 2])
    """

    sample: Callable[[jax.Array], Task]
    sample_batch: Callable[[jax.Array, int], Task]
    sample_keys: Callable[[jax.Array], Task]


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_task_shape(
    num_characters: int, drawings: int, *, ways: int, shots: int, query: int, rotations: bool
) -> None:
    for name, value in (("ways", ways), ("shots", shots), ("query", query)):
        _check_int(name, value)
    num_classes = num_characters * (ROTATIONS if rotations else 1)
    if ways > num_classes:
        raise ValueError(
            f"ways={ways} is more than the {num_classes} classes in this split ({num_characters} "
            f"characters x {ROTATIONS if rotations else 1} rotations)"
        )
    if shots + query > drawings:
        raise ValueError(
            f"shots + query = {shots} + {query} = {shots + query} distinct drawings per class, "
            f"but each character has only {drawings}"
        )


def _distinct(key: jax.Array, n: int, k: int) -> jax.Array:
    """``k`` distinct ints from ``range(n)``, every ordered k-tuple equally likely.

    Floyd's algorithm (Bentley 1987) makes an exactly uniform k-subset in ``k`` steps; a
    shuffle of those ``k`` then makes the order uniform. ``jax.random.choice(replace=False)``
    sorts all ``n``, about 300 times slower on CPU for ``n = 4400`` under ``vmap``.
    """
    order_key, step_key = jax.random.split(key)

    def step(i: jax.Array, chosen: jax.Array) -> jax.Array:
        j = n - k + i  # draw from range(j + 1); take j itself if the draw is already taken
        t = jax.random.randint(jax.random.fold_in(step_key, i), (), 0, j + 1, dtype=jnp.int32)
        return chosen.at[i].set(jnp.where(jnp.any(chosen == t), j, t))

    chosen = jax.lax.fori_loop(0, k, step, jnp.full((k,), -1, jnp.int32))
    return jax.random.permutation(order_key, chosen)


def sample_indices(
    key: jax.Array,
    num_characters: int,
    *,
    ways: int,
    shots: int,
    query: int,
    rotations: bool = True,
    drawings: int = DRAWINGS,
) -> TaskIndices:
    """Draw ``ways`` distinct classes and ``shots + query`` distinct drawings of each.

    Classes are drawn uniformly without replacement from the ``num_characters * 4`` pairs
    (character, rotation) (``* 1`` without rotations), so two rotations of one character may
    meet in a task as two classes. Their random order is the label assignment: labels are a
    fresh permutation per task.

    Args:
        key: a PRNG key.
        num_characters: characters in the split.
        ways, shots, query: classes per task, support and query drawings per class.
        rotations: whether the four rotations of a character are separate classes.
        drawings: drawings per character.

    Returns:
        A :class:`TaskIndices`.

    Example:
        >>> idx = sample_indices(jax.random.key(0), 10, ways=5, shots=1, query=2)
        >>> idx.character.shape, idx.rotation.shape, idx.drawing.shape
        ((5,), (5,), (5, 3))
    """
    _check_task_shape(
        num_characters, drawings, ways=ways, shots=shots, query=query, rotations=rotations
    )
    per_character = ROTATIONS if rotations else 1
    class_key, drawing_key = jax.random.split(key)
    classes = _distinct(class_key, num_characters * per_character, ways)
    rows = jnp.broadcast_to(jnp.arange(drawings, dtype=jnp.int32), (ways, drawings))
    drawing = jax.random.permutation(drawing_key, rows, axis=1, independent=True)
    return TaskIndices(
        character=(classes // per_character).astype(jnp.int32),
        rotation=(classes % per_character).astype(jnp.int32),
        drawing=drawing[:, : shots + query],
    )


def _rotation_gather(height: int, width: int, count: int) -> np.ndarray:
    """``(count, H*W)`` pixel indices: ``flat[..., idx[k]]`` is ``np.rot90(image, k)``, flat."""
    pixels = np.arange(height * width, dtype=np.int32).reshape(height, width)
    return np.stack([np.rot90(pixels, k).ravel() for k in range(count)])


def sample_task(
    images: jax.Array,
    key: jax.Array,
    *,
    ways: int,
    shots: int,
    query: int,
    rotations: bool = True,
) -> Task:
    """One N-way K-shot task from a split's images, as a pure function (jit/vmap-friendly).

    Classes and drawings come from :func:`sample_indices`. The images are gathered and turned in
    one gather with precomputed pixel indices (cheaper than a ``lax.switch`` over ``rot90``,
    which ``vmap`` turns into computing all four). Examples are grouped by label: support
    labels are ``[0]*shots + [1]*shots + ...``, query labels likewise.

    Args:
        images: ``(characters, drawings, H, W)``; ``uint8`` (ink 255) is scaled to ``[0, 1]``
            as ``x * float32(1 / 255)``, a float array is only cast to float32. ``H == W`` when
            ``rotations``.
        key: a PRNG key.
        ways, shots, query: classes per task, support and query examples per class (keyword).
        rotations: whether the four rotations of a character are separate classes.

    Returns:
        ``Task(support=(x, y), query=(x, y))`` with ``x`` float32 ``(ways * shots, H, W, 1)``
        (``ways * query`` for the query set) and ``y`` int32 labels in ``0 .. ways - 1``.

    Example:
        >>> images = np.zeros((3, 20, 28, 28), np.uint8)
        >>> task = sample_task(images, jax.random.key(0), ways=5, shots=1, query=2)
        >>> task.support[0].shape, task.query[0].shape, task.query[1].tolist()
        ((5, 28, 28, 1), (10, 28, 28, 1), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or (rotations and images.shape[2] != images.shape[3]):
        raise ValueError(
            "images must be (characters, drawings, H, W), square when rotations=True; got "
            f"shape {images.shape}"
        )
    n, drawings, height, width = images.shape
    index = sample_indices(
        key, n, ways=ways, shots=shots, query=query, rotations=rotations, drawings=drawings
    )
    pixels = jnp.asarray(_rotation_gather(height, width, ROTATIONS if rotations else 1))
    flat = images.reshape(n, drawings, height * width)
    x = flat[
        index.character[:, None, None],
        index.drawing[:, :, None],
        pixels[index.rotation][:, None, :],
    ]
    # A multiply, not a divide: XLA turns ``/ 255`` into one anyway, so this is what it computes.
    x = x.astype(jnp.float32) * (1 / 255) if images.dtype == jnp.uint8 else x.astype(jnp.float32)
    x = x.reshape(ways, shots + query, height, width, 1)

    def batch(part: jax.Array) -> tuple[jax.Array, jax.Array]:
        per_class = part.shape[1]
        labels = jnp.repeat(jnp.arange(ways, dtype=jnp.int32), per_class)
        return part.reshape(ways * per_class, height, width, 1), labels

    return Task(support=batch(x[:, :shots]), query=batch(x[:, shots:]))


def make_sampler(
    images: np.ndarray | jax.Array,
    *,
    ways: int,
    shots: int,
    query: int,
    rotations: bool = True,
) -> TaskSampler:
    """A jitted task sampler over one split, with the arguments checked up front.

    The split is moved to the device once (as given: keep it ``uint8`` to use a quarter of the
    memory) and passed to the compiled sampler as an argument. Called inside your own ``jit``,
    the closure makes it a compile-time constant, which is fine at Omniglot's size (17 MB of
    ``uint8`` for the meta-train split); for larger data call :func:`sample_task` with the
    images as an argument of your jitted function.

    Args:
        images: a split, ``(characters, 20, 28, 28)``, e.g. ``omniglot_splits(...)["train"]``.
        ways, shots, query: classes per task, support and query examples per class.
        rotations: whether the four rotations of a character are separate classes.

    Returns:
        A :class:`TaskSampler`: ``sample(key)`` gives one :class:`Task` as in
        :func:`sample_task`; ``sample_batch(key, meta_batch_size)`` vmaps it over
        ``jax.random.split(key, meta_batch_size)``, adding a leading task axis to every leaf;
        ``sample_keys(keys)`` vmaps it over the given keys. Samplers over splits of one shape
        share their compilations.

    Raises:
        ValueError: ``ways``/``shots``/``query`` not positive ints, ``ways`` more than the
            split's classes, ``shots + query`` more than the drawings per character, or
            ``images`` not 4-d.

    Example:
        >>> images = np.random.default_rng(0).integers(0, 256, (4, 20, 28, 28), np.uint8)
        >>> sampler = make_sampler(images, ways=5, shots=1, query=3)
        >>> x, y = sampler.sample_batch(jax.random.key(0), 8).query
        >>> x.shape, x.dtype, y.shape, y.dtype
        ((8, 15, 28, 28, 1), dtype('float32'), (8, 15), dtype('int32'))
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (characters, drawings, H, W), got shape {images.shape}")
    _check_task_shape(
        images.shape[0], images.shape[1], ways=ways, shots=shots, query=query, rotations=rotations
    )
    task = dict(ways=ways, shots=shots, query=query, rotations=rotations)

    def sample(key: jax.Array) -> Task:
        return _sample_jit(images, key, **task)

    def sample_batch(key: jax.Array, meta_batch_size: int) -> Task:
        _check_int("meta_batch_size", meta_batch_size)
        return _sample_batch_jit(images, key, meta_batch_size=int(meta_batch_size), **task)

    def sample_keys(keys: jax.Array) -> Task:
        if jnp.ndim(keys) != 1:
            raise ValueError(f"keys must be a 1-d array of PRNG keys, got shape {jnp.shape(keys)}")
        return _sample_keys_jit(images, keys, **task)

    return TaskSampler(sample=sample, sample_batch=sample_batch, sample_keys=sample_keys)


# Module-level, so every sampler over arrays of one shape shares one compilation: a held-out
# split's sampler made anew for each validation does not compile again.
_TASK_ARGS = ("ways", "shots", "query", "rotations")


@partial(jax.jit, static_argnames=_TASK_ARGS)
def _sample_jit(images, key, **task) -> Task:
    return sample_task(images, key, **task)


def _sample_each(images, keys, **task) -> Task:
    return jax.vmap(lambda key: sample_task(images, key, **task))(keys)


_sample_keys_jit = partial(jax.jit, static_argnames=_TASK_ARGS)(_sample_each)


@partial(jax.jit, static_argnames=("meta_batch_size", *_TASK_ARGS))
def _sample_batch_jit(images, key, meta_batch_size: int, **task) -> Task:
    return _sample_each(images, jax.random.split(key, meta_batch_size), **task)
