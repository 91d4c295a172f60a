"""The held-out curves (metagrad.experiment.evaluation): the one-forward scores and
the mapped steps give the curves of the separate loss and metrics, vmapped; restored
(committed) parameters reuse the compiled curves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metagrad import nn as mnn
from metagrad._types import MetaParams
from metagrad.estimators import make_estimator
from metagrad.experiment import evaluation
from metagrad.experiment.evaluation import make_curve_fn
from metagrad.tasks.omniglot import make_sampler


@pytest.mark.slow  # three compilations of the curves of a Conv4
def test_scores_fn_and_mapped_steps_give_the_same_curves():
    module = mnn.Conv4(1, 3, hidden=4, rngs=nnx.Rngs(0), image_size=8)
    params, apply = mnn.functional(module)
    mp = MetaParams(params=params)
    est = make_estimator("maml", steps=2, lr=0.1, metrics_fn=mnn.accuracy(apply))
    images = np.random.default_rng(0).integers(0, 256, (4, 20, 8, 8), np.uint8)
    tasks = make_sampler(images, ways=3, shots=1, query=2).sample_batch(jax.random.key(0), 5)
    loss, metrics = mnn.cross_entropy_loss(apply), mnn.accuracy(apply)
    scores = mnn.cross_entropy_and_accuracy(apply)
    want = make_curve_fn(est, loss, metrics, steps=3, batch_size=5)(mp, tasks)
    for batch, batching in ((2, "map"), (5, "vmap")):
        got = make_curve_fn(
            est,
            loss,
            metrics,
            steps=3,
            batch_size=batch,
            scores_fn=scores,
            steps_batching=batching,
        )(mp, tasks)
        for k in ("loss", "acc"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_committed_parameters_reuse_the_compiled_curves():
    calls = []
    fn = evaluation._compiled_once(lambda p, x: (calls.append(1), p * x)[1])
    x = jnp.ones(3)
    fn(jnp.ones(3), x)
    fn(jax.device_put(np.ones(3, np.float32), jax.devices()[0]), x)  # committed, as restored
    assert len(calls) == 1
    fn(jnp.ones(4), jnp.ones(4))
    assert len(calls) == 2
