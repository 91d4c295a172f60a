"""Multi-host training on one machine: two JAX processes on loopback, each with two forced host
devices (four global devices, CPU collectives by gloo), agree with one process on one device --
through the library API (float64; vmap and lax.map over tasks) and through the CLI (float32,
checkpoints and logs)."""

import json
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

from metagrad.experiment.config import Config, ConfigError, validate

# argv: out_dir, process_id, port (process_id -1: one process, no jax.distributed).
API_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    out, pid, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if pid >= 0:  # before anything else touches a JAX backend
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import metagrad as mg
    from metagrad import nn
    import metagrad.tasks.sinusoid as sinusoid
    from flax import nnx

    assert len(jax.devices()) == (4 if pid >= 0 else 1), jax.devices()
    params, apply = nn.functional(nn.MLP(1, (16,), 1, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    out_arrays = {}
    # lax.map over tasks runs under shard_map (each device maps over its own tasks; an
    # all-gather would mean every device computed every task).
    for tb in ("vmap", "map") if pid >= 0 else ("vmap",):
        learner = mg.meta_learner(
            nn.mse_loss(apply), mg.maml(steps=2, lr=0.01), optax.adam(1e-2),
            devices="all" if pid >= 0 else 1, task_batching=tb, jit=False,
        )
        update = jax.jit(learner.update)
        state = learner.init(mg.MetaParams(params))
        losses = []
        for step in range(3):  # every process passes the whole meta-batch, from one key
            tasks = sinusoid.sample_batch(jax.random.key(step), 8, shots=5, query=5)
            if step == 0 and pid >= 0:
                hlo = update.lower(state, tasks).compile().as_text()
                assert "all-gather" not in hlo and "all-reduce" in hlo, tb
            state, metrics = update(state, tasks)
            losses.append(float(metrics["meta_loss"]))
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.meta_params)])
        out_arrays.update({f"params_{tb}": flat, f"losses_{tb}": np.array(losses)})
    if pid >= 0:  # the decisions every process must take alike
        from metagrad.experiment import distributed
        assert distributed.agree(pid == 0) is True  # process 0's value everywhere
        distributed.check_same_everywhere("/same/dir", "the run directory")
        try:
            distributed.check_same_everywhere(f"/dir{pid}", "the run directory")
            raise AssertionError("different run directories were accepted")
        except ValueError as e:
            assert "the run directory differs" in str(e), e
    np.savez(f"{out}/api_{pid}.npz", **out_arrays)
""")

CLI_ARGS = [
    "model.hidden=[8]",
    "train.steps=4",
    "train.chunk_steps=2",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.meta_batch_size=8",
    "eval.tasks=8",
    "eval.val_tasks=8",
    "eval.curve_steps=1",
    "eval.figure=false",
    "train.progress=false",
]


def _env(devices: int) -> dict:
    return dict(SUBPROCESS_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_all(commands, timeout=180):
    """Runs ``(argv, env)`` pairs at once; kills them all if one hangs (a peer that died leaves
    the others waiting for the coordinator)."""
    procs = [
        subprocess.Popen(
            argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for argv, env in commands
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, f"{p.args}\n{out[-2000:]}\n{err[-3000:]}"
    return outs


@pytest.mark.slow
def test_two_processes_agree_with_one_device_through_the_api(tmp_path):
    port = _free_port()
    script = [sys.executable, "-c", API_SCRIPT, str(tmp_path)]
    _run_all(
        [(script + [str(pid), str(port)], _env(2)) for pid in (0, 1)]
        + [(script + ["-1", "0"], _env(1))]
    )
    ref, p0, p1 = (np.load(tmp_path / f"api_{pid}.npz") for pid in (-1, 0, 1))
    for tb in ("vmap", "map"):
        for what in ("params", "losses"):  # one replicated result
            np.testing.assert_array_equal(p0[f"{what}_{tb}"], p1[f"{what}_{tb}"])
        np.testing.assert_allclose(p0[f"params_{tb}"], ref["params_vmap"], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(p0[f"losses_{tb}"], ref["losses_vmap"], rtol=1e-12)


def _final_params(run_dir, like=None):
    """The last checkpoint's state, flat, as numpy (``like``: the target structure; a checkpoint
    saved on four devices needs one to be restored on one)."""
    import orbax.checkpoint as ocp

    from metagrad.experiment.checkpoint import Checkpoints

    ckpt = Checkpoints(run_dir)
    args = None if like is None else ocp.args.StandardRestore(like)
    item = ckpt.last.restore(ckpt.latest_step(), args=args)
    ckpt.close()
    return jax.tree.map(np.asarray, item)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_two_processes_agree_with_one_through_the_cli(tmp_path):
    port = _free_port()
    train = [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), *CLI_ARGS]
    multi = [
        "train.devices=all",
        "distributed.enabled=true",
        f"distributed.coordinator_address=127.0.0.1:{port}",
        "distributed.num_processes=2",
        f"hydra.run.dir={tmp_path / 'multi'}",
    ]
    outs = _run_all(
        [(train + multi + [f"distributed.process_id={pid}"], _env(2)) for pid in (0, 1)]
        + [(train + [f"hydra.run.dir={tmp_path / 'single'}"], _env(1))]
    )
    assert "eval_loss_post=" in outs[0][0] and "eval_loss_post=" not in outs[1][0]  # one printer
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    records = [json.loads(x) for x in (multi_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [
        (2, "train"),
        (2, "val"),
        (4, "train"),
        (4, "val"),
    ]  # written once, by process 0
    info = json.loads((multi_dir / "run_info.json").read_text())
    assert info["process_count"] == 2 and len(info["devices"]) == 4
    multi_metrics = json.loads((multi_dir / "metrics.json").read_text())
    single_metrics = json.loads((single_dir / "metrics.json").read_text())
    single = _final_params(single_dir)
    multi = _final_params(multi_dir, like=single)
    np.testing.assert_allclose(_flat(multi), _flat(single), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        multi_metrics["eval_loss_post"], single_metrics["eval_loss_post"], rtol=1e-4
    )


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"train.devices": "1"}, "train.devices"),
        ({"distributed.coordinator_address": "localhost"}, "distributed.coordinator_address"),
        ({"distributed.num_processes": 0}, "distributed.num_processes"),
        ({"distributed.num_processes": 2, "distributed.process_id": 2}, "distributed.process_id"),
        ({"distributed.local_device_ids": []}, "distributed.local_device_ids"),
    ],
)
def test_bad_distributed_settings_name_their_key(overrides, key):
    cfg = Config()
    cfg.distributed.enabled = True
    cfg.train.devices = "all"
    validate(cfg)  # enabled with every argument auto-detected is valid
    for dotted, value in overrides.items():
        node, name = dotted.split(".")
        setattr(getattr(cfg, node), name, value)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)
