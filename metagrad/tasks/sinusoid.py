"""Sinusoid regression (Finn et al. 2017), sampled on the device from explicit keys.

A task is :math:`y = A \\sin(x - \\varphi)` with amplitude :math:`A \\sim U[0.1, 5]`, phase
:math:`\\varphi \\sim U[0, \\pi]` and inputs :math:`x \\sim U[-5, 5]`; support and query points are
drawn independently from the same task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metagrad._types import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)

# Held-out tasks come from fixed keys of their own, never from the training stream.
VAL_KEY_SEED = 1_000_001
TEST_KEY_SEED = 2_000_002


def sample_params(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Amplitude and phase of one task: :math:`A \sim U[0.1, 5]`, :math:`\varphi \sim U[0, \pi]`.

    Example:
        >>> amplitude, phase = sample_params(jax.random.key(0))
        >>> bool(0.1 <= amplitude <= 5.0), bool(0.0 <= phase <= jnp.pi)
        (True, True)
    """
    k_a, k_p = jax.random.split(key)
    amplitude = jax.random.uniform(k_a, (), minval=AMPLITUDE[0], maxval=AMPLITUDE[1])
    phase = jax.random.uniform(k_p, (), minval=PHASE[0], maxval=PHASE[1])
    return amplitude, phase


def sample_task(key: jax.Array, *, shots: int, query: int, return_params: bool = False):
    """One task: ``shots`` support and ``query`` query points, inputs of shape ``(n, 1)``.

    Example:
        >>> task = sample_task(jax.random.key(0), shots=10, query=5)
        >>> task.support[0].shape, task.query[1].shape
        ((10, 1), (5, 1))
    """
    _check_counts(shots, query)
    k_task, k_s, k_q = jax.random.split(key, 3)
    amplitude, phase = sample_params(k_task)

    def points(k, n):
        x = jax.random.uniform(k, (n, 1), minval=INPUT_RANGE[0], maxval=INPUT_RANGE[1])
        return x, amplitude * jnp.sin(x - phase)

    task = Task(points(k_s, shots), points(k_q, query))
    return (task, (amplitude, phase)) if return_params else task


def sample_batch(key: jax.Array, batch_size: int, *, shots: int, query: int) -> Task:
    """``batch_size`` tasks with a leading task axis (one key each).

    Task ``i`` is ``sample_task(jax.random.split(key, batch_size)[i], ...)``.

    Example:
        >>> tasks = sample_batch(jax.random.key(0), 4, shots=10, query=5)
        >>> tasks.support[0].shape, tasks.query[1].shape
        ((4, 10, 1), (4, 5, 1))
        >>> first = sample_task(jax.random.split(jax.random.key(0), 4)[0], shots=10, query=5)
        >>> bool(jnp.allclose(tasks.support[1][0], first.support[1]))
        True
    """
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: sample_task(k, shots=shots, query=query))(keys)


def sample_batch_flat(
    key: jax.Array, batch_size: int, *, shots: int, query: int, return_params: bool = False
):
    r"""``batch_size`` tasks from the same distribution as `sample_batch`, in one PRNG draw.

    One array :math:`u \sim U[0, 1)^{B \times (2 + K + Q)}` gives each task's amplitude
    :math:`0.1 + 4.9\, u_0`, phase :math:`\pi u_1` and inputs :math:`-5 + 10\, u_{2:}` (support
    first). Training and held-out evaluation sample this way: one threefry call instead of
    five per task, several times cheaper on CPU to run and, above all, to compile. With
    ``return_params`` it returns ``(tasks, (amplitudes, phases))``, each of shape ``(B,)``.

    Example:
        >>> tasks = sample_batch_flat(jax.random.key(0), 4, shots=10, query=5)
        >>> tasks.support[0].shape, tasks.query[1].shape
        ((4, 10, 1), (4, 5, 1))
        >>> x, y = tasks.support
        >>> bool(jnp.all((x >= -5.0) & (x < 5.0)) and jnp.all(jnp.abs(y) < 5.0))
        True
    """
    _check_counts(shots, query)
    u = jax.random.uniform(key, (batch_size, 2 + shots + query, 1))
    amplitude = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u[:, :1]
    phase = PHASE[0] + (PHASE[1] - PHASE[0]) * u[:, 1:2]
    x = INPUT_RANGE[0] + (INPUT_RANGE[1] - INPUT_RANGE[0]) * u[:, 2:]
    y = amplitude * jnp.sin(x - phase)
    tasks = Task((x[:, :shots], y[:, :shots]), (x[:, shots:], y[:, shots:]))
    return (tasks, (amplitude[:, 0, 0], phase[:, 0, 0])) if return_params else tasks


def heldout_key(split: str) -> jax.Array:
    """The fixed key of the ``"val"`` or ``"test"`` tasks.

    Example:
        Held-out tasks are the same in every run, whatever the training seed:

        >>> a = sample_batch(heldout_key("test"), 2, shots=5, query=5)
        >>> b = sample_batch(heldout_key("test"), 2, shots=5, query=5)
        >>> bool(jnp.array_equal(a.query[1], b.query[1]))
        True
        >>> heldout_key("train")
        Traceback (most recent call last):
        ValueError: split must be 'val' or 'test', got 'train'
    """
    seeds = {"val": VAL_KEY_SEED, "test": TEST_KEY_SEED}
    if split not in seeds:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return jax.random.key(seeds[split])


def _check_counts(shots, query):
    for name, v in (("shots", shots), ("query", query)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"sinusoid: {name} must be a positive int, got {v!r}")
