"""The task source of the image benchmarks (mini-/tiered-ImageNet, CIFAR-FS, FC100, CUB, a
folder of classes): training tasks sampled on the device or streamed from the host, held-out
tasks from fixed keys, optional augmentation of the training tasks.

Both sampling paths draw step ``s``'s tasks from the same integers
(:func:`metagrad.tasks.fewshot.batch_indices` of ``fold_in(base_key, s)``), so a run trains on
the same tasks, bit for bit, whichever path its memory allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from metagrad.experiment.chunks import available_memory
from metagrad.nn.losses import with_support_context
from metagrad.tasks import fewshot
from metagrad.tasks.augment import AugmentOptions, augment_task
from metagrad.tasks.streaming import HostTaskStream

if TYPE_CHECKING:
    from metagrad.experiment.build import TaskSource

__all__ = ["image_task_source", "resolve_sampling"]

SAMPLING = ("auto", "device", "host")
# The default device budget of the meta-train split under sampling="auto": this fraction of what
# the device can still allocate, leaving the rest to the compiled step and the held-out tasks.
DEVICE_FRACTION = 0.5
# A training task's augmentation key is fold_in(task_key, AUGMENT_FOLD), apart from the key's
# split into (class_key, image_key) that draws the task.
AUGMENT_FOLD = 1


def resolve_sampling(
    train_bytes: int, sampling: str = "auto", device_budget_bytes: int | None = None
) -> str:
    """``"device"`` or ``"host"``: ``sampling`` itself unless ``"auto"``, which is ``"device"``
    when the meta-train split's ``train_bytes`` fit ``device_budget_bytes`` (default
    ``DEVICE_FRACTION`` of :func:`metagrad.experiment.chunks.available_memory`; where that is
    unknown, ``"device"``).

    Example:
        >>> resolve_sampling(10**9, "auto", device_budget_bytes=2**20)
        'host'
        >>> resolve_sampling(10**9, "device", device_budget_bytes=2**20)
        'device'
    """
    if sampling not in SAMPLING:
        raise ValueError(f"task.sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if sampling != "auto":
        return sampling
    if device_budget_bytes is None:
        have = available_memory()
        if have is None:
            return "device"
        device_budget_bytes = int(DEVICE_FRACTION * have)
    return "device" if train_bytes <= device_budget_bytes else "host"


def _augment_options(augment) -> AugmentOptions:
    if augment is None:
        return AugmentOptions()
    if isinstance(augment, Mapping):
        augment = AugmentOptions(**augment)
    if not isinstance(augment, AugmentOptions):
        raise ValueError(f"task.augment must be AugmentOptions or a mapping, got {augment!r}")
    return augment.validate()


def image_task_source(
    data,
    *,
    ways: int,
    shots: int,
    query: int,
    eval_shots: int | None = None,
    eval_query: int | None = None,
    eval_ways: int | None = None,
    meta_batch_size: int,
    sampling: str = "auto",
    device_budget_bytes: int | None = None,
    augment: AugmentOptions | Mapping | None = None,
    support_context: bool = False,
    prefetch: int = 2,
) -> TaskSource:
    """The :class:`~metagrad.experiment.build.TaskSource` of an image data set.

    Training: step ``s`` trains on ``meta_batch_size`` tasks drawn from ``key =
    fold_in(base_key, s)`` (task ``t`` from ``split(key, meta_batch_size)[t]``), either

    - ``"device"``: the meta-train split moved to the device once as uint8 (``train_data``) and
      the tasks gathered inside the compiled step, or
    - ``"host"``: a :class:`~metagrad.tasks.streaming.HostTaskStream` (``stream``) gathering each
      chunk's images from the (memory-mapped) split on the host, ``prefetch`` chunks ahead;

    then scaled ``x * float32(1 / 255)`` on the device, augmented when ``augment`` is on (each
    task with ``fold_in(task_key, 1)``; support and query images), and with
    ``support_context`` given the support images in the query batch (the ``"support"``
    batch-norm policy, :func:`metagrad.nn.losses.with_support_context`).

    Held-out: ``heldout(split, num_tasks, shots, query, ways=None)`` draws ``num_tasks`` tasks from
    ``jax.random.key(HELDOUT_SEEDS[split])``, the tasks ``fewshot.make_sampler(...).sample_batch``
    gives from that key, gathered on the host (only the tasks reach the device), never
    augmented.

    Args:
        data: an ``ImageSetData`` (``images`` and ``counts`` per split; ``"train"`` required).
        ways, shots, query: the training task; eval_ways, eval_shots, eval_query: the
            held-out tasks' (default: the training ones).
        meta_batch_size: tasks per meta-step (``train.meta_batch_size``).
        sampling: ``"auto"``, ``"device"`` or ``"host"`` (see :func:`resolve_sampling`).
        device_budget_bytes: the budget of ``"auto"``.
        augment: :class:`~metagrad.tasks.augment.AugmentOptions` (or a mapping of its fields);
            None: none.
        support_context: the ``"support"`` batch-norm policy's query batches.
        prefetch: chunks the host stream gathers ahead.

    Raises:
        ValueError: a task a split cannot make (``ways``, ``shots + query`` against the smallest
            class), bad ``sampling`` or ``augment``; before anything is compiled.

    Example:
        >>> from types import SimpleNamespace
        >>> images = np.zeros((4, 5, 6, 6, 3), np.uint8)
        >>> counts = np.array([5, 4, 5, 3], np.int32)
        >>> data = SimpleNamespace(images={"train": images, "val": images},
        ...                        counts={"train": counts, "val": counts})
        >>> source = image_task_source(data, ways=3, shots=1, query=2, meta_batch_size=2,
        ...                            sampling="host")
        >>> source.stream is not None, source.train_data is None
        (True, True)
        >>> jax.eval_shape(lambda: source.heldout("val", 7, 1, 2)).query[0].shape
        (7, 6, 6, 6, 3)
        >>> source.stream.close()
    """
    # Here, not at the top: build.py imports this module lazily (no import cycle either way).
    from metagrad.experiment.build import HELDOUT_SEEDS, TaskSource  # noqa: F811

    splits = dict(data.images)
    counts = {s: np.asarray(c, np.int32) for s, c in data.counts.items()}
    if "train" not in splits:
        raise ValueError("image_task_source: the data has no 'train' split")
    eval_shots, eval_query = eval_shots or shots, eval_query or query
    eval_ways = eval_ways or ways
    for split, images in splits.items():
        if np.ndim(images) != 5:
            raise ValueError(
                f"the {split} split must be (classes, images, H, W, C), got {np.shape(images)}"
            )
        w, s, q = (ways, shots, query) if split == "train" else (eval_ways, eval_shots, eval_query)
        try:
            fewshot.check_task_size(*np.shape(images)[:2], counts[split], ways=w, shots=s, query=q)
        except ValueError as err:
            raise ValueError(f"the {split} split: {err}") from None
    augment = _augment_options(augment)
    mode = resolve_sampling(np.asarray(splits["train"]).nbytes, sampling, device_budget_bytes)
    finish = with_support_context if support_context else (lambda task: task)
    train_counts, train_rows = counts["train"], np.shape(splits["train"])[1]

    def training_tasks(x: jax.Array, key: jax.Array, batch: int):
        """Gathered uint8 ``(batch, ways, shots + query, H, W, C)`` -> the step's Task batch."""
        tasks = jax.vmap(partial(fewshot.to_task, shots=shots))(x)
        if augment.enabled:
            keys = jax.random.split(key, batch)  # the task keys batch_indices drew from
            one = lambda task, k: augment_task(task, jax.random.fold_in(k, AUGMENT_FOLD), augment)
            tasks = jax.vmap(one)(tasks, keys)
        # A barrier, so that XLA fuses the step's math the same way whether the images were
        # gathered in this program or streamed into it: both paths train bit for bit alike.
        return finish(jax.lax.optimization_barrier(tasks))

    if mode == "device":
        train_data, stream = jnp.asarray(splits["train"]), None

        def sample_train(images, key, batch):
            idx = fewshot.batch_indices(
                key, train_counts, batch, ways=ways, shots=shots, query=query, max_count=train_rows
            )
            return training_tasks(fewshot.gather(images, idx), key, batch)

    else:
        train_data = None
        stream = HostTaskStream(
            splits["train"],
            train_counts,
            ways=ways,
            shots=shots,
            query=query,
            meta_batch_size=meta_batch_size,
            prefetch=prefetch,
        )

        def sample_train(step_data, key, batch):
            if step_data.shape[0] != batch:
                raise ValueError(
                    f"the stream gathers {step_data.shape[0]} tasks per step, the trainer asked "
                    f"for {batch} (train.meta_batch_size)"
                )
            return training_tasks(step_data, key, batch)

    heldout_fns: dict[tuple, object] = {}

    def heldout(split: str, num_tasks: int, shots_: int, query_: int, ways_: int | None = None):
        if split not in splits:
            raise ValueError(f"the data has no {split!r} split")
        ways_ = ways_ or eval_ways
        spec = (split, num_tasks, shots_, query_, ways_)
        if spec not in heldout_fns:
            images = splits[split]
            fewshot.check_task_size(
                *np.shape(images)[:2], counts[split], ways=ways_, shots=shots_, query=query_
            )
            heldout_fns[spec] = _heldout_fn(
                images,
                counts[split],
                HELDOUT_SEEDS[split],
                num_tasks,
                ways_,
                shots_,
                query_,
                finish,
            )
        return heldout_fns[spec]()

    return TaskSource("classification", train_data, sample_train, heldout, stream=stream)


def _heldout_fn(
    images, counts, seed: int, num_tasks: int, ways: int, shots: int, query: int, finish
):
    """A jitted ``() -> Task batch``: indices on the device, the gather on the host
    (``pure_callback`` into the memory-mapped split), the scaling on the device. Under
    ``jax.eval_shape`` (the held-out memory check) nothing is gathered."""
    shape, dtype = (num_tasks, ways, shots + query, *np.shape(images)[2:]), images.dtype

    def host_gather(classes, rows):
        return np.asarray(fewshot.gather(images, fewshot.TaskIndices(classes, rows)), dtype)

    @jax.jit
    def heldout():
        idx = fewshot.batch_indices(
            jax.random.key(seed),
            counts,
            num_tasks,
            ways=ways,
            shots=shots,
            query=query,
            max_count=np.shape(images)[1],
        )
        out = jax.ShapeDtypeStruct(shape, dtype)
        x = jax.pure_callback(host_gather, out, idx.classes, idx.rows)
        return finish(jax.vmap(partial(fewshot.to_task, shots=shots))(x))

    return heldout
