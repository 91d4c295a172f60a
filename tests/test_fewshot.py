"""The generic N-way K-shot sampler: indices within each class's count, distinct, uniform;
the gather the same on numpy and on the device; sizes refused before compiling."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad.tasks import fewshot, miniimagenet

COUNTS = np.array([3, 5, 4, 7, 2, 6], np.int32)  # ragged: rows past a count are padding
MAX_COUNT = 7


def _images(counts=COUNTS, max_count=MAX_COUNT, size=2):
    """Image r of class c holds 10 c + r in every pixel (padding rows are 255)."""
    c, r = np.meshgrid(np.arange(len(counts)), np.arange(max_count), indexing="ij")
    value = np.where(r < counts[:, None], 10 * c + r, 255).astype(np.uint8)
    return np.broadcast_to(value[..., None, None, None], (*value.shape, size, size, 3)).copy()


@pytest.fixture(scope="module")
def many_indices():
    draw = jax.jit(
        jax.vmap(
            partial(fewshot.task_indices, ways=3, shots=1, query=1, max_count=MAX_COUNT),
            in_axes=(0, None),
        )
    )
    return jax.tree.map(np.asarray, draw(jax.random.split(jax.random.key(0), 4000), COUNTS))


def test_indices_are_distinct_and_within_each_class_count(many_indices):
    classes, rows = many_indices
    assert classes.shape == (4000, 3) and rows.shape == (4000, 3, 2)
    assert classes.dtype == rows.dtype == np.int32
    assert all(len(set(c)) == 3 for c in classes.tolist())
    assert np.all(rows[..., 0] != rows[..., 1])
    assert np.all((rows >= 0) & (rows < COUNTS[classes][..., None]))


def test_classes_labels_and_rows_are_uniform(many_indices):
    classes, rows = many_indices
    n = classes.shape[0]
    # each class in a task with probability ways / classes, at each label with 1 / classes
    for label in range(3):
        freq = np.bincount(classes[:, label], minlength=6) / n
        np.testing.assert_allclose(freq, 1 / 6, atol=5 * np.sqrt(1 / 6 * 5 / 6 / n))
    for c, count in enumerate(COUNTS):  # the support image of class c: uniform over its count
        picks = rows[..., 0][classes == c]
        freq = np.bincount(picks, minlength=MAX_COUNT) / picks.size
        p = 1 / count
        np.testing.assert_allclose(freq[:count], p, atol=5 * np.sqrt(p * (1 - p) / picks.size))
        assert freq[count:].sum() == 0


def test_sample_task_gathers_the_indexed_images_with_labels():
    images = _images()
    key = jax.random.key(4)
    kw = dict(ways=3, shots=1, query=1)
    task = jax.jit(partial(fewshot.sample_task, **kw, counts=COUNTS))(images, key)
    idx = jax.jit(partial(fewshot.task_indices, **kw, max_count=MAX_COUNT))(key, COUNTS)
    (xs, ys), (xq, yq) = task.support, task.query
    assert xs.shape == (3, 2, 2, 3) and xs.dtype == jnp.float32 and xq.shape == (3, 2, 2, 3)
    assert ys.tolist() == yq.tolist() == [0, 1, 2]
    want = 10 * np.asarray(idx.classes)[:, None] + np.asarray(idx.rows)  # (ways, shots + query)
    want = want.astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_array_equal(np.asarray(xs[:, 0, 0, 0]), want[:, 0])
    np.testing.assert_array_equal(np.asarray(xq[:, 0, 0, 0]), want[:, 1])
    # numpy (the host stream's gather) and the device agree byte for byte
    np.testing.assert_array_equal(
        fewshot.gather(images, idx), np.asarray(fewshot.gather(jnp.asarray(images), idx))
    )


@pytest.mark.slow
def test_sampler_and_counts_none_and_the_miniimagenet_names():
    images = _images(np.full(6, MAX_COUNT, np.int32))
    sampler = fewshot.make_sampler(images, ways=4, shots=2, query=3)
    key = jax.random.key(1)
    batch = sampler.sample_batch(key, 3)
    one = sampler.sample(jax.random.split(key, 3)[2])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batch), strict=True):
        np.testing.assert_array_equal(a, b[2])
    explicit = jax.jit(
        partial(fewshot.sample_task, ways=4, shots=2, query=3, counts=np.full(6, MAX_COUNT))
    )(images, jax.random.split(key, 3)[2])
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(a, b)
    assert miniimagenet.sample_task is fewshot.sample_task
    assert miniimagenet.make_sampler is fewshot.make_sampler
    assert miniimagenet.TaskSampler is fewshot.TaskSampler


def test_sizes_are_refused_before_compiling():
    images = _images()
    with pytest.raises(ValueError, match="ways=7 is more than the 6 classes"):
        fewshot.make_sampler(images, ways=7, shots=1, query=1, counts=COUNTS)
    with pytest.raises(ValueError, match=r"shots \+ query = 2 \+ 1 = 3 .* class 4 has only 2"):
        fewshot.make_sampler(images, ways=2, shots=2, query=1, counts=COUNTS)
    with pytest.raises(ValueError, match=r"shots \+ query = 5 \+ 3 = 8 .* each class has only 7"):
        fewshot.sample_task(images, jax.random.key(0), ways=2, shots=5, query=3)
    with pytest.raises(ValueError, match=r"counts must be ints of shape \(6,\)"):
        fewshot.make_sampler(images, ways=2, shots=1, query=1, counts=COUNTS[:5])
    with pytest.raises(ValueError, match=r"counts must lie in \[0, 7\]"):
        fewshot.make_sampler(images, ways=2, shots=1, query=1, counts=COUNTS + 1)
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        fewshot.make_sampler(images, ways=2, shots=0, query=1)
    with pytest.raises(ValueError, match="images must be"):
        fewshot.make_sampler(images[0], ways=2, shots=1, query=1)
    with pytest.raises(ValueError, match="meta_batch_size must be an int >= 1"):
        fewshot.make_sampler(images, ways=2, shots=1, query=1).sample_batch(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="needs max_count when counts is traced"):
        jax.jit(lambda c: fewshot.task_indices(jax.random.key(0), c, ways=2, shots=1, query=1))(
            COUNTS
        )
