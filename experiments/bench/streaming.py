"""Host streaming's device wait: how long the training chunk waits for tasks gathered on the host.

A synthetic split (``--classes`` x ``--images`` random 84x84x3 uint8 images) is written to disk
as ``.npy`` and memory-mapped, as the image readers' cache is. Finn et al.'s mini-ImageNet Conv4
(32 filters, max-pool, flattened 800 features) trains with second-order MAML on 5-way 1-shot
15-query tasks, meta-batch 4, through the trainer's :class:`metagrad.experiment.chunks.
ChunkRunner`, twice in one run:

- ``host``: streaming forced by a one-byte device budget (``image_task_source(...,
  device_budget_bytes=1)``): a background thread draws each chunk's task indices, gathers the
  images from the memory map with numpy and puts them on the device ``--prefetch`` chunks ahead;
  ``wait`` is the time :meth:`HostTaskStream.chunk` blocked, per meta-step and as a fraction of
  the meta-step (the issue's target: under 5 % on CPU);
- ``device``: the split moved to the device and the tasks sampled inside the compiled step (the
  baseline), and the time of that on-device sampling alone per step (``sample_train`` compiled
  and timed by itself).

The first chunk of each (compilation, the stream's first synchronous gather) is not timed. On a
shared machine compare the two rows of one run, never absolute numbers across runs.

    python -m experiments.bench.streaming [--chunks 4] [--chunk-steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import optax
from flax import nnx

import metagrad as mg
from experiments.bench import harness
from metagrad.experiment.chunks import ChunkRunner
from metagrad.experiment.image_source import image_task_source
from metagrad.nn import Conv4, cross_entropy_loss, functional
from metagrad.outer import default_task_batching

WAYS, SHOTS, QUERY = 5, 1, 15


def synthetic_split(folder: Path, classes: int, images: int, size: int, seed: int = 0):
    """A random uint8 split ``(classes, images, size, size, 3)`` saved as .npy and memory-mapped."""
    rng = np.random.default_rng(seed)
    path = folder / "train.npy"
    out = np.lib.format.open_memmap(path, "w+", np.uint8, (classes, images, size, size, 3))
    for c in range(classes):  # class by class: the whole split is never in memory at once
        out[c] = rng.integers(0, 256, out.shape[1:], dtype=np.uint8)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def conv4_learner(size: int, inner_steps: int, task_batching):
    model = Conv4(
        3,
        WAYS,
        hidden=32,
        downsample="maxpool",
        pool="flatten",
        maxpool_padding="VALID",
        image_size=size,
        rngs=nnx.Rngs(0),
    )
    params, apply = functional(model)
    learner = mg.meta_learner(
        cross_entropy_loss(apply),
        mg.maml(steps=inner_steps, lr=0.01),
        optax.adam(1e-3),
        task_batching=task_batching,
        jit=False,
    )
    return learner, mg.MetaParams(params)


def run_path(source, learner, meta_params, *, meta_batch: int, chunk_steps: int, chunks: int):
    """Trains ``chunks + 1`` chunks (the first untimed); per-chunk seconds and stream waits."""
    exp = SimpleNamespace(
        cfg=SimpleNamespace(seed=0, train=SimpleNamespace(meta_batch_size=meta_batch)),
        source=source,
    )
    runner = ChunkRunner(exp, learner, source.train_data, memory_check=False)
    state = learner.init(meta_params)
    tic = time.perf_counter()
    state, metrics = runner(state, chunk_steps)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - tic
    stream = source.stream
    seconds, waits = [], []
    c0, w0 = harness._cpu_snapshot(), time.perf_counter()
    for _ in range(chunks):
        wait0 = stream.wait_seconds if stream is not None else 0.0
        tic = time.perf_counter()
        state, metrics = runner(state, chunk_steps)
        metrics = jax.device_get(metrics)  # what the training loop does after each chunk
        seconds.append(time.perf_counter() - tic)
        waits.append((stream.wait_seconds if stream is not None else 0.0) - wait0)
    window = time.perf_counter() - w0
    return {
        "first_chunk_s": first_s,
        "compile_s": runner.compile_seconds,
        "chunk_s": seconds,
        "wait_s": waits,
        "step_s": sum(seconds) / (chunks * chunk_steps),
        "wait_s_per_step": sum(waits) / (chunks * chunk_steps),
        "wait_fraction": sum(waits) / sum(seconds),
        "meta_loss": float(metrics["meta_loss"]),
        "foreign_cpu": harness._foreign_cpu(c0, harness._cpu_snapshot(), window),
    }


def time_device_sampling(source, meta_batch: int, repeats: int = 20) -> float:
    """Median seconds of one step's on-device sampling (``sample_train``, compiled alone)."""
    sample = jax.jit(source.sample_train, static_argnums=2)
    key = jax.random.key(0)
    jax.block_until_ready(sample(source.train_data, key, meta_batch))
    times = []
    for i in range(repeats):
        k = jax.random.fold_in(key, i)
        tic = time.perf_counter()
        jax.block_until_ready(sample(source.train_data, k, meta_batch))
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=20, help="classes of the synthetic split")
    p.add_argument("--images", type=int, default=60, help="images per class")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=1, help="MAML's inner SGD steps")
    p.add_argument("--chunk-steps", type=int, default=5, help="meta-steps per compiled chunk")
    p.add_argument("--chunks", type=int, default=4, help="timed chunks per path")
    p.add_argument("--prefetch", type=int, default=2, help="chunks the stream gathers ahead")
    p.add_argument("--task-batching", default=None, help="vmap or map (default: the backend's)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the .npy goes (a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    tb = args.task_batching or default_task_batching(jax.default_backend(), convolutional=True)

    with tempfile.TemporaryDirectory(dir=args.data_dir) as tmp:
        split = synthetic_split(Path(tmp), args.classes, args.images, args.image_size)
        data = SimpleNamespace(
            images={"train": split},
            counts={"train": np.full(args.classes, args.images, np.int32)},
        )
        common = dict(ways=WAYS, shots=SHOTS, query=QUERY, meta_batch_size=args.meta_batch)
        host = image_task_source(data, **common, device_budget_bytes=1, prefetch=args.prefetch)
        device = image_task_source(data, **common, sampling="device")
        assert host.stream is not None and device.stream is None
        learner, meta_params = conv4_learner(args.image_size, args.inner_steps, tb)
        kw = dict(meta_batch=args.meta_batch, chunk_steps=args.chunk_steps, chunks=args.chunks)
        try:
            rows = {"host": run_path(host, learner, meta_params, **kw)}
            made = [s / n for first, n, s in host.stream.produce_log if first > 0]
            rows["host"]["produce_s_per_step"] = statistics.median(made) if made else None
        finally:
            host.stream.close()
        rows["device"] = run_path(device, learner, meta_params, **kw)
        rows["device"]["device_sampling_s_per_step"] = time_device_sampling(device, args.meta_batch)
    result = {
        "workload": "streaming",
        "model": f"conv4-{args.image_size} (32 filters, max-pool, flatten)",
        "task": f"{WAYS}-way {SHOTS}-shot {QUERY}-query",
        "task_batching": tb,
        "split_bytes": int(split.nbytes),
        "step_bytes": args.meta_batch * WAYS * (SHOTS + QUERY) * args.image_size**2 * 3,
        **rows,
        "args": harness.args_dict(args),
        "environment": harness.environment(),
    }
    h, d = rows["host"], rows["device"]
    made = harness.fmt((h["produce_s_per_step"] or 0) * 1e3, ".2f")
    print(
        f"host streaming: {h['step_s'] * 1e3:8.1f} ms/step, device wait "
        f"{h['wait_s_per_step'] * 1e3:7.3f} ms/step = {h['wait_fraction']:.2%} of the step "
        f"(gathered in the background: {made} ms/step)\n"
        f"on device:      {d['step_s'] * 1e3:8.1f} ms/step, of which sampling alone "
        f"{d['device_sampling_s_per_step'] * 1e3:.2f} ms/step\n"
        f"({tb}, meta-batch {args.meta_batch}, {args.chunks} x {args.chunk_steps} steps timed, "
        f"foreign cpu {harness.fmt(h['foreign_cpu'], '.0%')} / "
        f"{harness.fmt(d['foreign_cpu'], '.0%')})",
        flush=True,
    )
    harness.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
