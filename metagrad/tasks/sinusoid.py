"""Sinusoid regression (Finn et al. 2017), sampled on the device from explicit keys.

A task is :math:`y = A \\sin(x - \\varphi)` with amplitude :math:`A \\sim U[0.1, 5]`, phase
:math:`\\varphi \\sim U[0, \\pi]` and inputs :math:`x \\sim U[-5, 5]`; support and query points are
drawn independently from the same task.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from metagrad.tasks.base import Task

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, jnp.pi)
INPUT_RANGE = (-5.0, 5.0)

# Held-out tasks come from fixed keys of their own, never from the training stream.
VAL_KEY_SEED = 1_000_001
TEST_KEY_SEED = 2_000_002


def sample_params(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Amplitude and phase of one task."""
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
    """``batch_size`` tasks with a leading task axis (one key each)."""
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: sample_task(k, shots=shots, query=query))(keys)


def heldout_key(split: str) -> jax.Array:
    """The fixed key of the ``"val"`` or ``"test"`` tasks."""
    seeds = {"val": VAL_KEY_SEED, "test": TEST_KEY_SEED}
    if split not in seeds:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return jax.random.key(seeds[split])


def _check_counts(shots, query):
    for name, v in (("shots", shots), ("query", query)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"sinusoid: {name} must be a positive int, got {v!r}")
