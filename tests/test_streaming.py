"""Host streaming: the same tasks, bit for bit, as sampling on the device (ragged counts too),
through the training chunk as well; prefetching, jumps, errors and thread shutdown; the image
task source's choice of path and its held-out tasks."""

import json
import subprocess
import sys
import threading
import time
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

from metagrad import MetaParams, maml, meta_learner
from metagrad.experiment import chunks
from metagrad.experiment.build import HELDOUT_SEEDS
from metagrad.experiment.image_source import image_task_source, resolve_sampling
from metagrad.nn import cross_entropy_loss
from metagrad.tasks import fewshot
from metagrad.tasks.streaming import HostTaskStream

COUNTS = np.array([7, 5, 6, 7, 4, 7], np.int32)  # 6 classes x 7 images of 8x8x3, ragged
KW = dict(ways=3, shots=1, query=2)
BATCH = 2


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A split on disk, memory-mapped as the cache is (zeros past each class's count)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 7, 8, 8, 3), dtype=np.uint8)
    x[np.arange(7)[None, :] >= COUNTS[:, None]] = 0
    path = tmp_path_factory.mktemp("split") / "train.npy"
    np.save(path, x)
    return np.load(path, mmap_mode="r")


def _stream_threads():
    return [t for t in threading.enumerate() if t.name == "metagrad-task-stream"]


def _wait_for_no_stream_threads(timeout=10.0):
    deadline = time.monotonic() + timeout
    while _stream_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _stream_threads()


@jax.jit
def _device_tasks(images, base_key, steps):
    """On-device sampling of steps ``steps``: sample_task vmapped over split(fold_in(key, s))."""

    def one(step):
        keys = jax.random.split(jax.random.fold_in(base_key, step), BATCH)
        sample = partial(fewshot.sample_task, **KW, counts=COUNTS)
        return jax.vmap(sample, in_axes=(None, 0))(images, keys)

    return jax.vmap(one)(steps)


@jax.jit
def _streamed_tasks(x):
    return jax.vmap(jax.vmap(partial(fewshot.to_task, shots=KW["shots"])))(x)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_stream_gives_the_device_tasks_bit_for_bit_with_prefetch_and_jumps(images):
    device_images = jnp.asarray(images)
    with HostTaskStream(images, COUNTS, **KW, meta_batch_size=BATCH, prefetch=2) as stream:
        for first, key in ((0, 7), (3, 7), (6, 7), (20, 7), (3, 8)):  # prefetched, then jumps
            x = stream.chunk(jax.random.key(key), first, 3)
            assert x.shape == (3, BATCH, 3, 3, 8, 8, 3) and x.dtype == jnp.uint8
            steps = jnp.arange(first, first + 3, dtype=jnp.int32)
            want = _device_tasks(device_images, jax.random.key(key), steps)
            _assert_same(_streamed_tasks(x), want)
            if first == 6:
                stream.drop()  # frees the prefetched chunks; the next request starts afresh
                assert not _stream_threads()
        assert stream.chunks_served == 5 and stream.steps_served == 15
        assert stream.wait_seconds >= 0 and stream.produce_seconds > 0
    assert not _stream_threads()
    with pytest.raises(RuntimeError, match="closed"):
        stream.chunk(jax.random.key(7), 0, 3)


@pytest.mark.slow
def test_the_thread_ends_after_the_last_request_and_after_an_exception(images):
    stream = HostTaskStream(images, COUNTS, **KW, meta_batch_size=BATCH, prefetch=3)
    with pytest.raises(ZeroDivisionError):
        for step in range(0, 6, 3):
            stream.chunk(jax.random.key(0), step, 3)
            raise ZeroDivisionError  # the consumer fails with prefetches queued
    assert _wait_for_no_stream_threads() == []  # never closed: it finishes and ends by itself
    with HostTaskStream(images, COUNTS, **KW, meta_batch_size=BATCH, prefetch=3) as stream:
        with pytest.raises(ZeroDivisionError):
            stream.chunk(jax.random.key(0), 0, 3)
            raise ZeroDivisionError
    assert not _stream_threads()  # close() joined it at once


class _Broken:
    """An images array whose reads fail (a cache file gone bad under the memory map)."""

    shape, ndim, dtype = (6, 7, 8, 8, 3), 5, np.dtype(np.uint8)

    def __getitem__(self, index):
        raise OSError("read error in the cache")


def test_a_failed_gather_is_raised_in_the_caller_and_sizes_are_checked(images):
    with HostTaskStream(_Broken(), COUNTS, **KW, meta_batch_size=BATCH) as stream:
        with pytest.raises(OSError, match="read error in the cache"):
            stream.chunk(jax.random.key(0), 0, 3)
    assert _wait_for_no_stream_threads() == []
    with pytest.raises(ValueError, match=r"class 4 has only 4"):
        HostTaskStream(images, COUNTS, ways=2, shots=2, query=3, meta_batch_size=1)
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        HostTaskStream(images, COUNTS, **KW, meta_batch_size=1, prefetch=-1)


# --- through the trainer's chunk ----------------------------------------------------------------


def _data(images):
    return SimpleNamespace(
        images={"train": images, "val": images[:5], "test": images[1:]},
        counts={"train": COUNTS, "val": COUNTS[:5], "test": COUNTS[1:]},
    )


def _linear(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _train(source, chunk_lengths=(3, 3)):
    exp = SimpleNamespace(cfg=SimpleNamespace(seed=0, train=SimpleNamespace(meta_batch_size=BATCH)))
    exp.source = source
    learner = meta_learner(
        cross_entropy_loss(_linear), maml(steps=1, lr=0.5), optax.sgd(0.1), jit=False
    )
    w = jax.random.normal(jax.random.key(1), (8 * 8 * 3, 3)) * 0.01
    state = learner.init(MetaParams({"w": w, "b": jnp.zeros(3)}))
    with chunks.ChunkRunner(exp, learner, source.train_data) as runner:
        for n in chunk_lengths:
            state, metrics = runner(state, n)
    assert not _stream_threads()  # the chunks prefetched past the end dropped, the thread ended
    return state, metrics


@pytest.mark.slow
def test_streamed_training_equals_on_device_training_bit_for_bit(images):
    sources = {
        mode: image_task_source(_data(images), **KW, meta_batch_size=BATCH, sampling=mode)
        for mode in ("device", "host")
    }
    assert sources["device"].stream is None and sources["host"].train_data is None
    (a, ma), (b, mb) = (_train(s) for s in sources.values())
    assert int(a.step) == int(b.step) == 6
    _assert_same((a, ma), (b, mb))
    moved = float(jnp.max(jnp.abs(a.meta_params.params["w"])))
    assert moved > 0.05  # it trained (the start is ~0.01)
    sources["host"].stream.close()
    assert not _stream_threads()


@pytest.mark.slow
def test_augmented_training_tasks_are_the_same_streamed_or_sampled_on_the_device(images):
    augment = dict(crop_padding=2, flip=True, color_jitter=0.4)
    device, host = (
        image_task_source(
            _data(images),
            **KW,
            meta_batch_size=BATCH,
            sampling=mode,
            augment=augment,
            support_context=True,
        )
        for mode in ("device", "host")
    )
    base_key, step = jax.random.key(3), 4
    key = jax.random.fold_in(base_key, step)
    on_device = jax.jit(device.sample_train, static_argnums=2)(device.train_data, key, BATCH)
    streamed = host.stream.chunk(base_key, step, 3)[0]
    from_stream = jax.jit(host.sample_train, static_argnums=2)(streamed, key, BATCH)
    _assert_same(on_device, from_stream)
    plain = image_task_source(_data(images), **KW, meta_batch_size=BATCH, sampling="device")
    plain_tasks = jax.jit(plain.sample_train, static_argnums=2)(plain.train_data, key, BATCH)
    assert not np.array_equal(plain_tasks.support[0], on_device.support[0])  # it augments
    xq, yq, xs = on_device.query  # the support batch-norm context carries the augmented support
    np.testing.assert_array_equal(xs, on_device.support[0])
    host.stream.close()


@pytest.mark.slow
def test_heldout_tasks_are_the_samplers_from_the_fixed_key_gathered_on_the_host(images):
    source = image_task_source(
        _data(images), **KW, eval_shots=2, eval_query=1, meta_batch_size=BATCH, sampling="device"
    )
    tasks = source.heldout("val", 5, 2, 1)
    sampler = fewshot.make_sampler(images[:5], ways=3, shots=2, query=1, counts=COUNTS[:5])
    _assert_same(tasks, sampler.sample_batch(jax.random.key(HELDOUT_SEEDS["val"]), 5))
    shape = jax.eval_shape(lambda: source.heldout("test", 10**6, 2, 1))  # the memory check's
    assert shape.query[0].shape == (10**6, 3, 8, 8, 3)
    support = image_task_source(
        _data(images), **KW, meta_batch_size=BATCH, sampling="device", support_context=True
    )
    xq, yq, xs = support.heldout("val", 5, 1, 2).query
    assert xs.shape == (5, 3, 8, 8, 3) and xq.shape == (5, 6, 8, 8, 3)


def test_the_source_chooses_its_path_and_refuses_bad_settings(images):
    nbytes = images.nbytes
    assert resolve_sampling(nbytes, "auto", device_budget_bytes=nbytes) == "device"
    assert resolve_sampling(nbytes, "auto", device_budget_bytes=nbytes - 1) == "host"
    small = image_task_source(_data(images), **KW, meta_batch_size=BATCH, device_budget_bytes=1)
    assert small.stream is not None and small.stream.prefetch == 2
    small.stream.close()
    with pytest.raises(ValueError, match="task.sampling must be one of auto, device, host"):
        image_task_source(_data(images), **KW, meta_batch_size=BATCH, sampling="disk")
    with pytest.raises(ValueError, match=r"the val split: ways=6 is more than the 5 classes"):
        image_task_source(_data(images), ways=6, shots=1, query=1, meta_batch_size=BATCH)
    with pytest.raises(ValueError, match=r"the val split: shots \+ query .* class 4 has only 4"):
        image_task_source(_data(images), **KW, eval_shots=3, eval_query=2, meta_batch_size=BATCH)
    with pytest.raises(ValueError, match="task.augment.color_jitter must be a number >= 0"):
        image_task_source(
            _data(images), **KW, meta_batch_size=BATCH, augment=dict(color_jitter=-1.0)
        )


@pytest.mark.slow
def test_the_streaming_benchmark_reports_the_device_wait(tmp_path):
    out = tmp_path / "streaming.json"
    args = ["--classes=6", "--images=17", "--image-size=28", "--chunk-steps=2", "--chunks=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.streaming", *args, f"--json={out}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    host, device = result["host"], result["device"]
    assert 0 <= host["wait_fraction"] < 1 and host["step_s"] > 0 and host["wait_s"] != []
    assert device["device_sampling_s_per_step"] > 0 and device["wait_fraction"] == 0
    assert "device wait" in proc.stdout
