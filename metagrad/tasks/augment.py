"""Data augmentation of training tasks on the device, keyed per task: random crop with zero
padding, horizontal flip and colour jitter, each switched on by :class:`AugmentOptions`.

The baselines that train with augmentation (MetaOptNet, RFS, ...) crop with 4- or 8-pixel
padding, flip and jitter; MAML's presets train without it, as in the papers. Every image of a
task gets its own key (split from the task's key), so a task's augmentation is reproducible
from its key alone, whatever the batch around it. Off (the defaults) is the identity, bit for
bit: nothing is traced.

Typical use (training tasks only; held-out tasks are never augmented)::

    options = AugmentOptions(crop_padding=8, flip=True, color_jitter=0.4)
    task = augment_task(task, key, options)
"""

from __future__ import annotations

from functools import partial  # noqa: F401 - used by the examples
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from metagrad._types import Task

__all__ = [
    "AugmentOptions",
    "augment_images",
    "augment_task",
    "color_jitter",
    "random_crop",
    "random_flip",
]

# torchvision's rgb_to_grayscale (ITU-R 601-2 luma), which ColorJitter's contrast and
# saturation blend towards.
_LUMA = (0.2989, 0.587, 0.114)


class AugmentOptions(NamedTuple):
    """Which augmentations to apply (config: ``task.augment.{crop_padding,flip,color_jitter}``).

    Attributes:
        crop_padding: pad ``p`` zero pixels on every side, then crop back to ``H x W`` at an
            offset drawn uniformly from ``{0 .. 2p}^2`` (``p = 0``: no crop).
        flip: mirror left-right with probability 1/2.
        color_jitter: ``s >= 0``, torchvision's ``ColorJitter(brightness=s, contrast=s,
            saturation=s)`` (see :func:`color_jitter`); 0: none.

    Example:
        >>> AugmentOptions().enabled, AugmentOptions(flip=True).enabled
        (False, True)
    """

    crop_padding: int = 0
    flip: bool = False
    color_jitter: float = 0.0

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on."""
        return self.crop_padding > 0 or bool(self.flip) or self.color_jitter > 0

    def validate(self, where: str = "task.augment") -> AugmentOptions:
        """The options, checked: ``ValueError`` naming the key ``where.<field>`` if one is bad.

        Example:
            >>> AugmentOptions(crop_padding=-1).validate()
            Traceback (most recent call last):
            ValueError: task.augment.crop_padding must be an int >= 0, got -1
        """
        p, f, s = self
        if isinstance(p, bool) or not isinstance(p, int) or p < 0:
            raise ValueError(f"{where}.crop_padding must be an int >= 0, got {p!r}")
        if not isinstance(f, bool):
            raise ValueError(f"{where}.flip must be true or false, got {f!r}")
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < float("inf"):
            raise ValueError(f"{where}.color_jitter must be a number >= 0, got {s!r}")
        return self


def random_crop(image: jax.Array, key: jax.Array, padding: int) -> jax.Array:
    """``pad(image, padding)[dy : dy + H, dx : dx + W]`` with zero padding and ``dy, dx`` drawn
    uniformly from ``0 .. 2 * padding``, for one ``(H, W, C)`` image.

    Example:
        >>> x = jnp.ones((4, 4, 1))
        >>> y = jax.jit(random_crop, static_argnums=2)(x, jax.random.key(0), 2)
        >>> y.shape, 0.0 <= float(y.mean()) <= 1.0
        ((4, 4, 1), True)
    """
    if padding == 0:
        return image
    h, w, _ = image.shape
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return lax.dynamic_slice(padded, (dy, dx, 0), (h, w, image.shape[2]))


def random_flip(image: jax.Array, key: jax.Array) -> jax.Array:
    """``image[:, ::-1]`` (left-right) with probability 1/2, else ``image``; one ``(H, W, C)``.

    Example:
        >>> x = jnp.arange(3.0).reshape(1, 3, 1)
        >>> keys = jax.random.split(jax.random.key(0), 8)
        >>> flipped = jax.jit(jax.vmap(random_flip, in_axes=(None, 0)))(x, keys)
        >>> sorted({tuple(f.ravel().tolist()) for f in flipped})
        [(0.0, 1.0, 2.0), (2.0, 1.0, 0.0)]
    """
    return jnp.where(jax.random.bernoulli(key), image[:, ::-1], image)


def _gray(image: jax.Array) -> jax.Array:
    if image.shape[-1] != 3:
        return image  # one channel (or not RGB): the image is its own grey level
    luma = jnp.asarray(_LUMA, image.dtype)
    return jnp.sum(image * luma, axis=-1, keepdims=True)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(factor * image + (1 - factor) * other, 0.0, 1.0)


def color_jitter(image: jax.Array, key: jax.Array, strength: float) -> jax.Array:
    r"""torchvision's ``ColorJitter(brightness=s, contrast=s, saturation=s)`` on one image in
    ``[0, 1]``, ``(H, W, C)``.

    Three factors ``b, c, t`` are drawn uniformly from ``[max(0, 1 - s), 1 + s]`` and applied in
    a uniformly random order, each a blend clipped to ``[0, 1]``,
    ``blend(x, o, f) = clip(f x + (1 - f) o, 0, 1)``:

    - brightness: ``blend(x, 0, b)``;
    - contrast: ``blend(x, mean(gray(x)), c)``, the mean over the whole image;
    - saturation: ``blend(x, gray(x), t)`` per pixel,

    with ``gray = 0.2989 R + 0.587 G + 0.114 B`` (one channel: the image itself). As
    torchvision; its hue jitter is not offered.

    Example:
        >>> x = jnp.full((2, 2, 3), 0.5)
        >>> y = jax.jit(color_jitter, static_argnums=2)(x, jax.random.key(0), 0.4)
        >>> y.shape, bool(jnp.all((y >= 0) & (y <= 1))), color_jitter(x, None, 0.0) is x
        ((2, 2, 3), True, True)
    """
    if strength == 0:
        return image
    order_key, factor_key = jax.random.split(key)
    low = max(0.0, 1.0 - strength)
    b, c, t = jax.random.uniform(factor_key, (3,), image.dtype, low, 1.0 + strength)
    order = jax.random.permutation(order_key, 3)
    for stage in range(3):  # stage i applies operation order[i]; all three computed, one kept
        op = order[stage]
        bright = _blend(image, 0.0, b)
        contrast = _blend(image, jnp.mean(_gray(image)), c)
        saturate = _blend(image, _gray(image), t)
        image = jnp.where(op == 0, bright, jnp.where(op == 1, contrast, saturate))
    return image


def augment_images(images: jax.Array, key: jax.Array, options: AugmentOptions) -> jax.Array:
    """Crop, flip, then jitter each image of ``(N, H, W, C)`` (floats in ``[0, 1]``) with its own
    key, ``jax.random.split(key, N)[i]``; the identity (the same array) when all are off.

    Example:
        >>> x = jnp.ones((3, 4, 4, 1))
        >>> augment_images(x, jax.random.key(0), AugmentOptions()) is x
        True
        >>> crop = jax.jit(partial(augment_images, options=AugmentOptions(crop_padding=1)))
        >>> crop(x, jax.random.key(0)).shape
        (3, 4, 4, 1)
    """
    if not options.enabled:
        return images

    def one(image, key):
        crop_key, flip_key, jitter_key = jax.random.split(key, 3)
        image = random_crop(image, crop_key, options.crop_padding)
        if options.flip:
            image = random_flip(image, flip_key)
        return color_jitter(image, jitter_key, options.color_jitter)

    return jax.vmap(one)(images, jax.random.split(key, images.shape[0]))


def augment_task(task: Task, key: jax.Array, options: AugmentOptions) -> Task:
    """The task with its support and query images augmented (:func:`augment_images`, keys
    ``jax.random.split(key)``), labels unchanged; the same task when all are off.

    Example:
        >>> x, y = jnp.zeros((2, 4, 4, 3)), jnp.arange(2)
        >>> task = Task((x, y), (x, y))
        >>> augment_task(task, jax.random.key(0), AugmentOptions()) is task
        True
        >>> flip = jax.jit(partial(augment_task, options=AugmentOptions(flip=True)))
        >>> flip(task, jax.random.key(0)).query[0].shape
        (2, 4, 4, 3)
    """
    if not options.enabled:
        return task
    support_key, query_key = jax.random.split(key)
    (xs, *support_rest), (xq, *query_rest) = task.support, task.query
    return type(task)(
        (augment_images(xs, support_key, options), *support_rest),
        (augment_images(xq, query_key, options), *query_rest),
    )
