"""What makes the sinusoid run fast keeps its results: tasks drawn for a whole chunk train like
tasks drawn step by step, the one-draw sampler has the task distribution, and evaluation in
fixed-size blocks equals one call over every task."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad.experiment import chunks
from metagrad.experiment import loop as mt
from metagrad.experiment.config import Config
from metagrad.outer import meta_learner
from metagrad.tasks import sinusoid


@pytest.fixture(scope="module")
def exp():
    cfg = Config()
    cfg.model.hidden, cfg.train.meta_batch_size, cfg.eval.batch_size = [8], 4, 7
    return mt.Experiment.from_config(cfg)


def test_presampled_chunk_trains_like_sampling_inside_each_step(exp):
    learner = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False)
    marker = jnp.zeros((20, 0))
    states = {}
    for budget in (0, chunks.PRESAMPLE_BYTES):  # 0: every step samples its own tasks
        run = chunks._chunk_fn(exp, learner, presample_bytes=budget)
        state = learner.init(exp.meta_params)
        for _ in range(2):  # the second chunk starts at step 20: the stream follows the step
            state, metrics = run(state, exp.source.train_data, marker)
        states[budget] = (state, metrics)
    (a, ma), (b, mb) = states.values()
    assert int(a.step) == int(b.step) == 40
    # Same tasks, same math; only XLA's fusion of the two programs differs (float rounding).
    for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    moved = jax.tree.leaves(
        jax.tree.map(lambda p, q: jnp.max(jnp.abs(p - q)), a, learner.init(exp.meta_params))
    )
    assert max(float(m) for m in moved) > 1e-3  # it trained


def test_one_draw_sampler_has_the_task_distribution():
    n = 20_000
    tasks, (amp, phase) = sinusoid.sample_batch_flat(
        jax.random.key(3), n, shots=3, query=2, return_params=True
    )
    x = np.concatenate([tasks.support[0], tasks.query[0]], axis=1)[..., 0]
    y = np.concatenate([tasks.support[1], tasks.query[1]], axis=1)[..., 0]
    np.testing.assert_allclose(y, amp[:, None] * np.sin(x - phase[:, None]), rtol=1e-6, atol=1e-6)
    for values, (lo, hi) in ((amp, (0.1, 5.0)), (phase, (0.0, math.pi)), (x, (-5.0, 5.0))):
        values = np.asarray(values, np.float64).ravel()
        assert lo <= values.min() and values.max() < hi
        se = (hi - lo) / math.sqrt(12 * values.size)  # U[lo, hi): mean and its standard error
        assert abs(values.mean() - (lo + hi) / 2) < 5 * se
        assert abs(values.var() - (hi - lo) ** 2 / 12) < 0.02 * (hi - lo) ** 2 / 12
    # Each task's own values: support and query share the amplitude and phase, not the inputs.
    assert np.corrcoef(x[:, 0], x[:, 3])[0, 1] < 0.05


def test_evaluation_in_blocks_equals_one_call(exp):
    curves = exp.curve_fn(steps=2)
    tasks = exp.source.heldout("test", 20, 5, 6)
    whole = jax.device_get(curves(exp.meta_params, tasks))
    blocks = mt._in_blocks(curves, exp.meta_params, tasks, block=7)  # 7 + 7 + 6 padded to 7
    assert blocks["loss"].shape == (20, 3)
    np.testing.assert_allclose(blocks["loss"], whole["loss"], rtol=1e-6)
