"""The task axis sharded over 4 forced host devices gives the single-device meta-gradients and
loss trajectory (XLA_FLAGS must be set before JAX starts, so this runs in a subprocess); the
device-count benchmark (`experiments.bench.devices`) checks its sharded meta-gradient too."""

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import SUBPROCESS_ENV

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import metagrad as mg
    import metagrad.tasks.sinusoid as sinusoid
    from metagrad import nn
    from metagrad.outer import task_mesh
    from flax import nnx

    assert len(jax.devices()) == 4, jax.devices()
    params, apply = nn.functional(nn.MLP(1, (16,), 1, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    loss_fn = nn.mse_loss(apply)
    est = mg.maml(steps=2, lr=0.01)
    runs = {}
    for devices in (1, 4):
        learner = mg.meta_learner(loss_fn, est, optax.adam(1e-3), devices=devices)
        state = learner.init(mg.MetaParams(params))
        losses = []
        for step in range(5):
            tasks = sinusoid.sample_batch(jax.random.key(step), 8, shots=5, query=5)
            state, metrics = learner.update(state, tasks)
            losses.append(float(metrics["meta_loss"]))
        runs[devices] = (losses, state.meta_params)
    np.testing.assert_allclose(runs[1][0], runs[4][0], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(runs[1][1]), jax.tree.leaves(runs[4][1])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    tasks = sinusoid.sample_batch(jax.random.key(9), 8, shots=5, query=5)
    spec = jax.sharding.PartitionSpec("tasks")
    sharded = jax.device_put(tasks, jax.sharding.NamedSharding(task_mesh(4), spec))
    grad_fn = lambda t: mg.batch_value_and_grad(est, loss_fn, mg.MetaParams(params), t, 0)[1]
    g1 = grad_fn(tasks)
    g4 = jax.jit(grad_fn)(sharded)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    print("OK", runs[4][0])
""")


@pytest.mark.slow
def test_four_forced_host_devices_agree_with_one():
    env = dict(SUBPROCESS_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


@pytest.mark.slow
def test_devices_benchmark_times_two_devices_and_checks_their_meta_gradient(tmp_path):
    """The documented command, small: a worker subprocess with two forced host devices."""
    out = tmp_path / "devices.json"
    cmd = [sys.executable, "-m", "experiments.bench.devices", "--counts=2", "--quick"]
    cmd += ["--chunk=2", "--target-s=0.01", "--blocks=1", f"--out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["results"]
    assert "error" not in row, row
    assert (row["devices"], row["model"], row["meta_batch"], row["steps_per_call"]) == (
        2,
        "sinusoid",
        24,
        2,
    )
    assert row["meta_steps_per_s"] > 0 and row["grad_agrees"] and row["grad_rel_err"] < 1e-5
