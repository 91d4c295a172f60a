"""Augmentation: off is the identity, the crop is a slice of the zero-padded image, a flip
undone by the same flip, each image's draw fixed by its key, jitter within torchvision's ranges."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad import Task
from metagrad.tasks.augment import (
    AugmentOptions,
    augment_images,
    augment_task,
    color_jitter,
    random_crop,
    random_flip,
)

KEYS = jax.random.split(jax.random.key(0), 64)


def _image(h=5, w=6, c=3):
    """Distinct positive values, so a crop's offset can be read back."""
    return (1 + jnp.arange(h * w * c, dtype=jnp.float32).reshape(h, w, c)) / (h * w * c + 1)


def _task():
    x = jnp.stack([_image() * (i + 1) / 4 for i in range(4)])
    y = jnp.arange(4)
    return Task((x[:2], y[:2]), (x[2:], y[2:]))


def test_off_is_the_identity():
    task = _task()
    assert augment_task(task, KEYS[0], AugmentOptions()) is task
    x = task.support[0]
    assert augment_images(x, KEYS[0], AugmentOptions(0, False, 0.0)) is x
    image = x[0]
    assert color_jitter(image, KEYS[0], 0.0) is image and random_crop(image, KEYS[0], 0) is image


def test_a_crop_is_a_slice_of_the_zero_padded_image_at_every_offset():
    p, x = 2, _image()
    crops = np.asarray(
        jax.jit(jax.vmap(partial(random_crop, padding=p), in_axes=(None, 0)))(x, KEYS)
    )
    padded = np.pad(np.asarray(x), ((p, p), (p, p), (0, 0)))
    offsets = set()
    for crop in crops:
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(crop, padded[dy : dy + 5, dx : dx + 6])
        ]
        assert len(found) == 1
        offsets |= set(found)
    assert len(offsets) >= 20  # of the 25 offsets, 64 draws hit nearly all (uniform)


def test_flip_is_a_mirror_or_nothing_and_twice_with_its_key_the_identity():
    x = _image()
    flipped = jax.jit(jax.vmap(random_flip, in_axes=(None, 0)))(x, KEYS)
    mirrored = [bool(jnp.array_equal(f, x[:, ::-1])) for f in flipped]
    assert all(m or bool(jnp.array_equal(f, x)) for m, f in zip(mirrored, flipped, strict=True))
    assert 16 < sum(mirrored) < 48  # probability 1/2
    twice = jax.jit(jax.vmap(random_flip))(flipped, KEYS)
    np.testing.assert_array_equal(twice, jnp.broadcast_to(x, twice.shape))


@pytest.mark.slow
def test_each_task_and_image_is_fixed_by_its_key():
    options = AugmentOptions(crop_padding=1, flip=True, color_jitter=0.3)
    tasks = jax.tree.map(lambda x: jnp.stack([x, x]), _task())  # two copies of one task
    keys = jax.random.split(jax.random.key(5), 2)
    run = jax.jit(jax.vmap(partial(augment_task, options=options)))
    out = run(tasks, keys)
    again = run(tasks, keys)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    alone = jax.jit(partial(augment_task, options=options))(_task(), keys[1])
    for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(a, b[1])  # the same, whatever the batch around it
    assert not np.array_equal(out.support[0][0], out.support[0][1])  # another key, another draw
    np.testing.assert_array_equal(out.query[1], tasks.query[1])  # labels untouched


def test_jitter_factors_lie_in_torchvisions_ranges():
    s, v = 0.4, 0.5
    grey = jnp.full((3, 3, 3), v)  # contrast and saturation leave a grey image as it is
    out = np.asarray(
        jax.jit(jax.vmap(partial(color_jitter, strength=s), in_axes=(None, 0)))(grey, KEYS)
    )
    ratio = out[:, 0, 0, 0] / v  # the brightness factor
    assert np.allclose(out, out[:, :1, :1, :1], atol=1e-6)  # still grey and uniform
    assert ratio.min() >= 1 - s - 1e-6 and ratio.max() <= 1 + s + 1e-6
    assert ratio.min() < 1 - s / 2 and ratio.max() > 1 + s / 2  # spans the range
    colour = jax.random.uniform(jax.random.key(1), (4, 4, 3))
    big = jax.jit(jax.vmap(partial(color_jitter, strength=3.0), in_axes=(None, 0)))(colour, KEYS)
    assert float(big.min()) >= 0.0 and float(big.max()) <= 1.0  # factors in [0, 4], clipped


def test_bad_options_name_their_key():
    with pytest.raises(ValueError, match=r"task.augment.crop_padding must be an int >= 0"):
        AugmentOptions(crop_padding=1.5).validate()
    with pytest.raises(ValueError, match=r"task.augment.flip must be true or false"):
        AugmentOptions(flip="yes").validate()
    assert AugmentOptions(2, True, 0.4).validate().enabled
