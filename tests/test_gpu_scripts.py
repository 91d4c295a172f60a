"""The GPU scripts on CPU with tiny settings: presets composed as the CLI composes them, with bad
overrides named; `experiments.gpu.omniglot` sizes a run to its time budget;
`experiments.gpu.benchmark`, with Hydra and OmegaConf blocked (it needs neither), measures us and,
where torch is installed, the peers. The scripts run as on the device machine: ``python -m
experiments.gpu.<name>`` from the checkout's root, with the installed package out of reach."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

from experiments._hydra import compose_config
from experiments.gpu.omniglot import steps_within
from metagrad.experiment.config import ConfigError

ENV = {k: v for k, v in SUBPROCESS_ENV.items() if k != "PYTHONPATH"}

# As on the device machine, where the repository travels uninstalled: the editable install's
# finder is dropped, so `experiments` and `metagrad` resolve from the working directory alone.
UNINSTALLED = (
    "sys.meta_path[:] = [f for f in sys.meta_path "
    "if '__editable__' not in getattr(f, '__module__', '')]; "
)


def compose_preset(preset: str, overrides: list[str] = ()):
    return compose_config([f"+experiment={preset}", *overrides])


def run_script(
    module: str, *args: str, block_hydra: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m experiments.gpu.<module> args`` from the checkout's root, uninstalled, and
    optionally in a process where importing Hydra fails."""
    blocked = "sys.modules.update(hydra=None, omegaconf=None); " if block_hydra else ""
    name = f"experiments.gpu.{module}"
    code = (
        f"import runpy, sys; {UNINSTALLED}{blocked}"
        f"sys.argv = [{name!r}, *sys.argv[1:]]; "
        f"runpy.run_module({name!r}, run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ENV,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_gpu_scripts_import_from_the_checkout_without_the_installed_package():
    code = (
        f"import sys; {UNINSTALLED}"
        "import experiments.gpu.benchmark as b, experiments.bench.harness as h, metagrad; "
        "print(b.__file__, h.__file__, metagrad.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(Path(f).is_relative_to(REPO_ROOT) for f in proc.stdout.split())


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=1", "train.stepz"),
        ("train.steps=many", "train.steps"),
        ("inner.steps=-1", "inner.steps"),
    ],
)
def test_compose_config_names_the_bad_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_preset("maml_omniglot_5w1s", [override])


def test_steps_within_a_budget_are_whole_chunks():
    assert steps_within(10.0, 25.0, chunk=100, cap=60_000) == 200  # 250 fit: two whole chunks
    assert steps_within(1.0, 25.0, chunk=100, cap=60_000) == 100  # at least one chunk
    assert steps_within(1e6, 25.0, chunk=100, cap=60_000) == 60_000  # never more than asked


def test_reptile_preset_keeps_the_papers_protocol():
    cfg = compose_preset("reptile_omniglot_5w1s")
    assert (cfg.algo.name, cfg.task.ways, cfg.task.shots, cfg.eval.shots) == ("reptile", 5, 10, 1)
    assert (cfg.inner.steps, cfg.train.meta_batch_size, cfg.train.steps) == (5, 5, 100_000)
    assert (cfg.eval.inner_steps, cfg.eval.query, cfg.model.bn_policy) == (50, 1, "transductive")
    # outer step size 1.0: SGD on the direction (theta - phi) / (steps * lr), annealed to 0
    assert cfg.outer.optimizer == "sgd" and cfg.outer.lr == 1.0 * cfg.inner.steps * cfg.inner.lr
    assert (cfg.outer.schedule, cfg.outer.min_lr_ratio) == ("linear", 0.0)


def test_linear_outer_schedule_anneals_the_step_to_zero():
    import jax.numpy as jnp

    from metagrad.experiment.build import build_optimizer

    opt = build_optimizer(compose_preset("reptile_omniglot_5w1s", ["train.steps=4"]))
    state, grad, steps = opt.init(jnp.zeros(())), jnp.ones(()), []
    for _ in range(5):
        update, state = opt.update(grad, state)
        steps.append(float(-update))
    assert steps == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])  # outer.lr * (1 - t / steps)


@pytest.mark.slow
def test_gpu_omniglot_script_fits_its_budget(tmp_path):
    out = tmp_path / "run.json"
    run_script(
        "omniglot",
        "--preset=maml_sinusoid",  # the same machinery as Omniglot, without the data set
        "--steps=600",
        "--time-budget-s=0.5",
        f"--out={out}",
        f"--run-dir={tmp_path / 'run'}",
        "--set",
        "model.hidden=[8]",
        "train.chunk_steps=100",
        "train.eval_every=100",
        "train.checkpoint_every=100",
        "eval.tasks=20",
        "eval.val_tasks=10",
        "eval.curve_steps=1",
        "eval.figure=false",
    )
    report = json.loads(out.read_text())
    s = report["summary"]
    expected = steps_within(0.5, s["calibration_steps_per_s"], chunk=100, cap=600)
    assert s["steps_asked"] == 600 and s["train_steps"] == expected
    assert [r["step"] for r in report["log"] if r["kind"] == "train"] == list(
        range(100, expected + 1, 100)
    )
    assert s["eval_loss_post"] == report["metrics"]["eval_loss_post"]
    assert report["config"]["model"]["hidden"] == [8] and report["run_info"]["backend"] == "cpu"


def _peers():
    """(python with torch, peers folder) or None."""
    python = os.environ.get("PEERS_PYTHON") or str(REPO_ROOT.parent / "peers-venv/bin/python")
    peers = Path(os.environ.get("PEERS_DIR") or REPO_ROOT.parent / "shared" / "peers")
    if not (Path(python).is_file() and (peers / "bench_sinusoid.py").is_file()):
        return None
    ok = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
    return (python, peers) if ok else None


@pytest.mark.slow
@pytest.mark.parametrize("with_peers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gpu_benchmark_script_measures_us_and_the_peers_without_hydra(tmp_path, with_peers):
    out = tmp_path / "bench.json"
    peers = _peers() if with_peers else None
    if with_peers and peers is None:
        pytest.skip("no Python with torch and the peers' scripts (set PEERS_PYTHON, PEERS_DIR)")
    # A relative --peers-dir, as on the GPU machine (.gpu_carry/peers); the peers run elsewhere.
    rel = os.path.relpath(peers[1], REPO_ROOT) if peers else None
    where = ["--peers-python", peers[0], "--peers-dir", rel] if peers else ["--no-peers"]
    args = ["--quick", "--only=sinusoid", "--target-s=0.02", "--blocks=1", "--peer-threads=1"]
    run_script("benchmark", *args, *where, f"--out={out}", block_hydra=True)
    report = json.loads(out.read_text())
    modes = {(r["task_batching"], r["mode"]) for r in report["results"]}
    assert modes == {("vmap", "dispatch"), ("vmap", "scan"), ("map", "scan"), ("vmap", "given")}
    assert all(r["meta_steps_per_s"] > 0 for r in report["results"])
    if peers is None:
        assert report["peers"] == []
        return
    # The reference is always correct; torch.func's vmap matches it without batch norm.
    correct = {p["impl"]: p["correct"] for p in report["peers"]}
    assert correct == {"autograd_loop": True, "torchfunc_vmap_bwd": True}
    fastest = max(p["meta_steps_per_s"] for p in report["peers"])
    for r in report["results"]:
        assert r["ratio_to_peer"] == pytest.approx(r["meta_steps_per_s"] / fastest)
