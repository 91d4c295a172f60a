"""Host streaming of N-way K-shot tasks, for splits that do not fit in device memory.

tiered-ImageNet's meta-train split is about 16 GB at 84x84: rather than move it to the device,
a background thread draws each step's task indices (:func:`metagrad.tasks.fewshot.batch_indices`
with the step's key, computed on the CPU backend so that it never queues behind the training
step on an accelerator), gathers those images from the memory-mapped cache with numpy, and
puts them on the device (``jax.device_put``) a few chunks ahead while the compiled chunk runs.

The step's key is ``fold_in(base_key, step)`` and the tasks come from the same integers as on
the device, so a stream gives the same tasks, bit for bit, as sampling on the device from the
same key: only where the gather runs differs.

Typical use (what :class:`metagrad.experiment.chunks.ChunkRunner` does with
``TaskSource.stream``)::

    stream = HostTaskStream(data.images["train"], data.counts["train"], ways=5, shots=1,
                            query=15, meta_batch_size=4)
    images = stream.chunk(base_key, first_step=0, n=100)  # (100, 4, 5, 16, 84, 84, 3) uint8
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from concurrent.futures import Future
from functools import partial  # noqa: F401 - used by the examples

import jax
import numpy as np

from metagrad.tasks import fewshot

__all__ = ["HostTaskStream", "step_indices"]


def step_indices(
    base_key: jax.Array,
    steps: jax.Array,
    counts,
    *,
    meta_batch_size: int,
    ways: int,
    shots: int,
    query: int,
    max_count: int,
) -> fewshot.TaskIndices:
    """The task indices of training steps ``steps``: step ``s`` draws its ``meta_batch_size``
    tasks with :func:`metagrad.tasks.fewshot.batch_indices` from ``fold_in(base_key, s)``,
    the key the training chunk gives step ``s``.

    Returns:
        :class:`~metagrad.tasks.fewshot.TaskIndices` with leading axes
        ``(len(steps), meta_batch_size)``.

    Example:
        >>> draw = jax.jit(partial(step_indices, meta_batch_size=2, ways=2, shots=1, query=1,
        ...                        max_count=4))
        >>> idx = draw(jax.random.key(0), np.arange(3), np.array([4, 3, 4]))
        >>> idx.classes.shape, idx.rows.shape
        ((3, 2, 2), (3, 2, 2, 2))
    """

    def one(step):
        key = jax.random.fold_in(base_key, step)
        return fewshot.batch_indices(
            key, counts, meta_batch_size, ways=ways, shots=shots, query=query, max_count=max_count
        )

    return jax.vmap(one)(steps)


@functools.cache
def _jitted_step_indices():
    """One compilation per task shape and chunk length, shared by every stream."""
    return jax.jit(
        step_indices, static_argnames=("meta_batch_size", "ways", "shots", "query", "max_count")
    )


class HostTaskStream:
    """Per-step task images gathered on the host and prefetched to the device.

    ``chunk(base_key, first_step, n)`` returns the uint8 images of steps ``first_step ..
    first_step + n - 1``, ``(n, meta_batch_size, ways, shots + query, H, W, C)``, on the device,
    and queues the next ``prefetch`` chunks of the same length (``first_step + n``, ...) for the
    background thread, so that while the caller's compiled chunk runs the next one is gathered.
    A request that is not the one prefetched (another key, step or length) is gathered at once
    and the stale prefetches are dropped. Device memory: up to ``prefetch + 1`` chunks.

    The thread starts when there is work and ends when there is none, so no thread outlives the
    last request by more than the ``prefetch`` chunks it was asked for, even when the caller
    stops with an exception; :meth:`drop` frees those at once (the end of training),
    :meth:`close` (or ``with``) also refuses later requests.

    Attributes:
        wait_seconds: total time :meth:`chunk` blocked waiting for the thread (the device wait).
        produce_seconds: total time the thread spent drawing, gathering and transferring
            (the first chunk of a length includes compiling its index draw).
        produce_log: ``(first_step, n, seconds)`` of each chunk the thread made.
        chunks_served, steps_served: what :meth:`chunk` returned.

    Args:
        images: ``(classes, max_count, H, W, C)`` uint8, e.g. a memory-mapped cache (read only
            where tasks fall: nothing is copied up front).
        counts: ``(classes,)`` images per class, or None (all ``max_count``).
        ways, shots, query: the task; meta_batch_size: tasks per step.
        prefetch: chunks gathered ahead (>= 0; 0: each chunk gathered when asked).
        device: where the chunks go (a ``jax.Device`` or ``Sharding``); default the first local
            device.

    Example:
        >>> images = np.arange(3 * 4 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 4, 2, 2, 3)
        >>> with HostTaskStream(images, ways=2, shots=1, query=1, meta_batch_size=2) as stream:
        ...     x = stream.chunk(jax.random.key(0), 0, 3)
        >>> x.shape, x.dtype
        ((3, 2, 2, 2, 2, 2, 3), dtype('uint8'))
    """

    def __init__(
        self,
        images: np.ndarray,
        counts=None,
        *,
        ways: int,
        shots: int,
        query: int,
        meta_batch_size: int,
        prefetch: int = 2,
        device=None,
    ):
        if np.ndim(images) != 5:
            raise ValueError(f"images must be (classes, images, H, W, C), got {np.shape(images)}")
        classes, max_count = np.shape(images)[:2]
        fewshot.check_task_size(classes, max_count, counts, ways=ways, shots=shots, query=query)
        for name, value, least in (
            ("meta_batch_size", meta_batch_size, 1),
            ("prefetch", prefetch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        self.images = images
        self.counts = (
            np.full((classes,), max_count, np.int32)
            if counts is None
            else np.asarray(counts, np.int32)
        )
        self.ways, self.shots, self.query = ways, shots, query
        self.meta_batch_size, self.prefetch = meta_batch_size, prefetch
        self.device = device if device is not None else jax.local_devices()[0]
        self._cpu = jax.devices("cpu")[0]
        self._static = dict(
            meta_batch_size=meta_batch_size,
            ways=ways,
            shots=shots,
            query=query,
            max_count=max_count,
        )
        self._counts_cpu = jax.device_put(self.counts, self._cpu)
        self._lock = threading.Lock()
        self._jobs: collections.deque = collections.deque()
        self._pending: dict[tuple, Future] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self.wait_seconds = self.produce_seconds = 0.0
        self.produce_log: list[tuple[int, int, float]] = []
        self.chunks_served = self.steps_served = 0

    # --- what one chunk is --------------------------------------------------------------------

    def indices(self, base_key: jax.Array, first_step: int, n: int) -> fewshot.TaskIndices:
        """The task indices of steps ``first_step .. first_step + n - 1`` as numpy arrays,
        ``(n, meta_batch_size, ways, ...)``, drawn on the CPU backend."""
        key = jax.device_put(base_key, self._cpu)
        steps = jax.device_put(np.arange(first_step, first_step + n, dtype=np.int32), self._cpu)
        return jax.tree.map(
            np.asarray, _jitted_step_indices()(key, steps, self._counts_cpu, **self._static)
        )

    def host_chunk(self, base_key: jax.Array, first_step: int, n: int) -> np.ndarray:
        """The images of a chunk gathered on the host (numpy), nothing moved to the device."""
        return fewshot.gather(self.images, self.indices(base_key, first_step, n))

    def _produce(self, base_key, first_step: int, n: int) -> jax.Array:
        tic = time.perf_counter()
        x = jax.device_put(self.host_chunk(base_key, first_step, n), self.device)
        x.block_until_ready()
        seconds = time.perf_counter() - tic
        self.produce_seconds += seconds
        self.produce_log.append((first_step, n, seconds))
        return x

    # --- the background thread ----------------------------------------------------------------

    def _submit(self, base_key, first_step: int, n: int) -> Future:  # holds self._lock
        future: Future = Future()
        self._jobs.append((future, base_key, first_step, n))
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="metagrad-task-stream")
            self._worker.start()
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._worker = None
                    return
                future, base_key, first_step, n = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # dropped while it waited
            try:
                future.set_result(self._produce(base_key, first_step, n))
            except BaseException as err:  # noqa: BLE001 - handed to the caller of chunk()
                future.set_exception(err)

    # --- the caller's side --------------------------------------------------------------------

    def chunk(self, base_key: jax.Array, first_step: int, n: int) -> jax.Array:
        """The images of steps ``first_step .. first_step + n - 1`` on the device (see above)."""
        if self._closed:
            raise RuntimeError("this HostTaskStream is closed")
        first_step, n = int(first_step), int(n)
        if first_step < 0 or n < 1:
            raise ValueError(f"need first_step >= 0 and n >= 1, got {first_step} and {n}")
        key_bytes = np.asarray(jax.random.key_data(base_key)).tobytes()
        with self._lock:
            future = self._pending.pop((key_bytes, first_step, n), None)
            if future is None:  # not what was prefetched: drop those, gather this one now
                for stale in self._pending.values():
                    stale.cancel()
                self._pending.clear()
                future = self._submit(base_key, first_step, n)
            for i in range(1, self.prefetch + 1):
                ahead = (key_bytes, first_step + i * n, n)
                if ahead not in self._pending:
                    self._pending[ahead] = self._submit(base_key, ahead[1], n)
        tic = time.perf_counter()
        try:
            x = future.result()
        finally:
            self.wait_seconds += time.perf_counter() - tic
        self.chunks_served, self.steps_served = self.chunks_served + 1, self.steps_served + n
        return x

    def drop(self) -> None:
        """Drops the prefetched chunks (freeing their device memory) and waits for the thread to
        finish its current one; later requests start afresh."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
            for future, *_ in self._jobs:
                future.cancel()
            worker = self._worker
        if worker is not None:
            worker.join()

    def close(self) -> None:
        """:meth:`drop`, and no more requests (:meth:`chunk` then raises ``RuntimeError``)."""
        with self._lock:
            self._closed = True
        self.drop()

    def __enter__(self) -> HostTaskStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
