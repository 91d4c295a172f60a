"""The compiled unit of training: a chunk of meta-steps in one call (a ``lax.scan`` with task
sampling on the device, or over task data streamed from the host), compiled ahead of time and
checked against the device's memory."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from metagrad.outer import MetaState

# A chunk's tasks up to this size are drawn before its scan, in one call batched over steps: on
# CPU the PRNG (threefry, lowered as rolled loops) then runs once per chunk, not once per step,
# where sampling took about a quarter of a sinusoid meta-step and slowed its compilation.
PRESAMPLE_BYTES = 64 * 2**20


def _base_key(exp) -> jax.Array:
    """The key the training tasks of step ``s`` are drawn from is ``fold_in(base_key, s)``."""
    return jax.random.key(exp.cfg.seed + 1)


def _chunk_fn(exp, learner, presample_bytes: int = PRESAMPLE_BYTES):
    """One compiled call: ``n`` meta-steps with tasks sampled on the device.

    Returns ``(state, metrics)``: the metrics' means over the chunk, and ``params_finite``,
    whether the meta-parameters it ends with are finite. Step ``s`` trains on
    ``sample_train(data, fold_in(base_key, s))`` however the tasks are drawn: for the whole chunk
    ahead of the scan when they fit in ``presample_bytes``, else inside each step (Omniglot's
    images). Both give the same tasks, bit for bit.
    """
    base_key = _base_key(exp)

    @jax.jit
    def run(state: MetaState, data, n_steps_marker: jax.Array):
        presample = presampled(exp, data, n_steps_marker.shape[0], presample_bytes)
        return chunk_steps(exp, learner, base_key, state, data, n_steps_marker.shape[0], presample)

    return run


def presampled(exp, data, n: int, budget: int) -> bool:
    """Whether the tasks of ``n`` steps fit in ``budget`` bytes, to be drawn before the scan."""
    batch = exp.cfg.train.meta_batch_size
    one_step = jax.eval_shape(lambda d: exp.source.sample_train(d, jax.random.key(0), batch), data)
    return n * _nbytes(one_step) <= budget


def chunk_steps(exp, learner, base_key, state: MetaState, data, n: int, presample: bool):
    """``n`` meta-steps of ``learner`` from ``state`` (traced: the body of a compiled chunk, of
    one run or, vmapped, of many), step ``s`` on the tasks of ``fold_in(base_key, s)``."""
    batch = exp.cfg.train.meta_batch_size

    def tasks_at(step):
        key = jax.random.fold_in(base_key, step)  # the stream depends on the step only
        return exp.source.sample_train(data, key, batch)

    if presample:
        steps = state.step + jnp.arange(n, dtype=state.step.dtype)
        state, metrics = lax.scan(learner.update, state, jax.vmap(tasks_at)(steps))
    else:
        body = lambda state, _: learner.update(state, tasks_at(state.step))
        state, metrics = lax.scan(body, state, None, length=n)
    return state, _summary(state, metrics)


def _streamed_chunk_fn(exp, learner):
    """One compiled call over host-streamed data (``TaskSource.stream``): ``streamed`` holds the
    per-step data of ``n`` steps (leading axis ``n``), step ``s``'s slice handed to
    ``sample_train(step_data, fold_in(base_key, s), batch)`` in place of ``train_data``."""
    batch = exp.cfg.train.meta_batch_size
    base_key = _base_key(exp)

    def body(state: MetaState, step_data):
        key = jax.random.fold_in(base_key, state.step)
        return learner.update(state, exp.source.sample_train(step_data, key, batch))

    @jax.jit
    def run(state: MetaState, streamed):
        state, metrics = lax.scan(body, state, streamed)
        return state, _summary(state, metrics)

    return run


def _summary(state: MetaState, metrics) -> dict:
    metrics = jax.tree.map(jnp.mean, metrics)
    # Checked here, in the compiled call, not leaf by leaf on the host after it.
    finite = jnp.all(
        jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state.meta_params)])
    )
    return dict(metrics, params_finite=finite)


class MemoryEstimateError(RuntimeError):
    """The compiled meta-step needs more memory than the device has (``train.memory_check``)."""


def available_memory() -> int | None:
    """Bytes the default device can still allocate: the accelerator's limit, or on CPU the host's
    ``MemAvailable`` (None where neither is known)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_estimate(compiled) -> int | None:
    """XLA's estimate of a compiled program's memory: arguments, outputs and temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - (m.alias_size_in_bytes)
    )


class ChunkRunner:
    """Runs ``n`` meta-steps in one compiled call, compiling each chunk length once, ahead of
    time, so that speed and compile time are measured apart. With ``memory_check`` a chunk whose
    memory estimate exceeds what the device has is refused before it runs.

    ``compiler_options``: XLA's, for the chunk (``build.resolve_compiler_options``).

    With ``exp.source.stream`` set (host streaming), each call first takes the chunk's per-step
    data from ``stream.chunk(base_key, state.step, n)`` (prefetched while the previous chunk
    ran) and ``data`` is unused; the memory check then also counts the chunks the stream holds
    ahead (``stream.prefetch``). Use it in ``with`` (or call :meth:`close` after the last chunk)
    to free the chunks prefetched past the end of training."""

    def __init__(self, exp, learner, data, *, memory_check: bool = True, compiler_options=None):
        self._stream = getattr(exp.source, "stream", None)
        if self._stream is None:
            self._jit = _chunk_fn(exp, learner)
        else:
            self._jit, self._base_key = _streamed_chunk_fn(exp, learner), _base_key(exp)
        self._data, self._compiled = data, {}
        self.compile_seconds, self.memory_check = 0.0, memory_check
        self._compiler_options = compiler_options or None

    def _args(self, state: MetaState, n: int) -> tuple:
        """The compiled call's arguments after the state."""
        if self._stream is not None:
            return (self._stream.chunk(self._base_key, int(state.step), n),)
        return (self._data, jnp.zeros((n, 0)))  # the chunk length as a shape: one compile each

    def __call__(self, state: MetaState, n: int):
        args = self._args(state, n)
        if n not in self._compiled:
            tic = time.perf_counter()
            lowered = self._jit.lower(state, *args)
            compiled = lowered.compile(compiler_options=self._compiler_options)
            self.compile_seconds += time.perf_counter() - tic
            if self.memory_check:
                ahead = 0
                if self._stream is not None:  # chunks prefetched on the device meanwhile
                    ahead = getattr(self._stream, "prefetch", 0) * _nbytes(args[0])
                _check_memory(compiled, ahead)
            self._compiled[n] = compiled
        return self._compiled[n](state, *args)

    def close(self) -> None:
        """Frees what the stream prefetched beyond the last chunk run (device memory the
        evaluation after training may need) and ends its thread; without a stream, nothing.
        The stream stays usable: a later call starts it afresh."""
        if self._stream is not None:
            self._stream.drop()

    def __enter__(self) -> ChunkRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nbytes(tree) -> int:
    """Bytes of a pytree of arrays or shape structs (``jax.eval_shape``'s)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_memory(compiled, extra_bytes: int = 0) -> None:
    need, have = memory_estimate(compiled), available_memory()
    if need is not None:
        need += extra_bytes
    if need is not None and have is not None and need > have:
        streamed = (
            f" (with {extra_bytes / 2**30:.1f} GiB of streamed chunks prefetched: lower "
            "train.chunk_steps or task.prefetch)"
            if extra_bytes
            else ""
        )
        raise MemoryEstimateError(
            f"the compiled meta-step needs about {need / 2**30:.1f} GiB (XLA's estimate)"
            f"{streamed} and {have / 2**30:.1f} GiB are available: lower "
            "train.meta_batch_size, task.shots or task.query, use train.task_batching=map, or "
            "pass train.memory_check=false if you know better"
        )


def check_heldout_memory(exp) -> None:
    """Refuses held-out task sets (validation, test) that would not fit on the device: they are
    drawn whole before evaluation in blocks, so their size is ``eval.tasks`` (``eval.val_tasks``)
    times the shots and query images, known before anything is compiled."""
    cfg, have = exp.cfg, available_memory()
    if have is None or not cfg.train.memory_check:
        return
    e, t = cfg.eval, cfg.task
    for split, key, n in (("val", "eval.val_tasks", e.val_tasks), ("test", "eval.tasks", e.tasks)):
        shape = jax.eval_shape(
            lambda split=split, n=n: exp.source.heldout(
                split, n, e.shots or t.shots, e.query or t.query, e.ways
            )
        )
        need = _nbytes(shape)
        if need > have:
            raise MemoryEstimateError(
                f"{key}={n}: the {split} tasks need about {need / 2**30:.1f} GiB and "
                f"{have / 2**30:.1f} GiB are available: lower {key}, eval.shots or eval.query, "
                "or pass train.memory_check=false if you know better"
            )
