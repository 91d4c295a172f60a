"""The README's SLURM sweeps (``hydra/launcher=slurm_gpu``), as the user types them: through the
real CLI up to ``sbatch`` (a stand-in on PATH records the job script and refuses it), as a dry
run (``--cfg hydra``), through Hydra's compose API against submitit's parameter check, and as
a real sweep with submitit's local executor; skipped without the ``slurm`` extra."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_train_cli import ENV, TINY, cli

from experiments._hydra import CONF_DIR, compose_config  # registers the schemas

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="needs the slurm extra: pip install -e '.[slurm]' (hydra-submitit-launcher)",
)

# The README's two SLURM sweep commands, word for word (the README's own lines).
README_SWEEP = (
    "-m hydra/launcher=slurm_gpu hydra.launcher.partition=gpu "
    "+experiment=maml_sinusoid seed=0,1,2 task.shots=5,10"
)
README_MULTIHOST = (
    "-m hydra/launcher=slurm_gpu hydra.launcher.partition=gpu "
    "hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=4 hydra.launcher.gpus_per_node=4 "
    "distributed.enabled=true train.devices=all +experiment=maml_omniglot_5w1s seed=0,1"
)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _fake_slurm(tmp_path):
    """``sbatch`` that keeps the job script and fails, and an ``srun`` submitit looks for."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/bin/sh\ncp "$1" "$FAKE_SBATCH_SCRIPT"\necho "sbatch: not a cluster" >&2\nexit 1\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SBATCH_SCRIPT=str(script))
    return env, script


def test_these_are_the_readmes_slurm_commands():
    readme = " ".join((REPO_ROOT / "README.md").read_text().replace("\\\n", " ").split())
    for command in (README_SWEEP, README_MULTIHOST):
        assert f"python experiments/train.py {command}" in readme


@pytest.mark.slow
@pytest.mark.parametrize(
    "command,expect",
    [
        (README_SWEEP, ["--array=0-5%6", "--gpus-per-node=1", "--nodes=1"]),
        (README_MULTIHOST, ["--array=0-1%2", "--gpus-per-node=4", "--nodes=2"]),
    ],
    ids=["sweep", "multihost"],
)
def test_readme_slurm_command_reaches_sbatch_with_its_resources(tmp_path, command, expect):
    env, script = _fake_slurm(tmp_path)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "experiments/train.py", *command.split(), f"hydra.sweep.dir={sweep}"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=120,
    )
    # Past the CLI's pre-check and Hydra's composition, refused only by the stand-in sbatch.
    assert proc.returncode != 0 and "sbatch: not a cluster" in proc.stderr, proc.stderr
    assert "error: hydra/launcher" not in proc.stderr
    lines = set(script.read_text().splitlines())
    for option in ["--partition=gpu", *expect]:
        assert f"#SBATCH {option}" in lines, (option, sorted(lines))


@pytest.mark.slow
def test_readme_slurm_command_dry_run_composes_the_launcher(tmp_path):
    # --cfg and -m do not combine in Hydra: the dry run prints one job's Hydra config.
    args = README_SWEEP.replace("-m ", "").replace("seed=0,1,2 task.shots=5,10", "seed=0")
    proc = cli("train.py", *args.split(), "--cfg", "hydra", "--package", "hydra.launcher")
    launcher = yaml.safe_load(proc.stdout)  # "# @package hydra.launcher", then its keys
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["partition"], launcher["gpus_per_node"], launcher["nodes"]) == ("gpu", 1, 1)
    bad = cli(
        "train.py", *args.split(), "hydra.launcher.partitio=gpu", "--cfg", "hydra", check=False
    )
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: hydra.launcher.partitio=gpu: Key 'partitio' not in 'SlurmQueueConf'; "
        "did you mean hydra.launcher.partition?"
    ]


def test_preset_asks_for_one_gpu_per_job():
    cfg = _compose(["hydra/launcher=slurm_gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (1, 1, 1)
    assert launcher.timeout_min > 0 and launcher.cpus_per_task > 0


def test_multihost_job_composes_validates_and_submitit_accepts_it(tmp_path, monkeypatch):
    import submitit

    srun = tmp_path / "bin" / "srun"  # submitit's executor wants srun on PATH; nothing runs it
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")

    overrides = [
        "hydra/launcher=slurm_gpu",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.partition=gpu",
        "distributed.enabled=true",
        "train.devices=all",
    ]
    assert compose_config(overrides).distributed.enabled  # the job's config, validated
    cfg = _compose(overrides)
    assert cfg.distributed.enabled and cfg.hydra.launcher.nodes == 2
    # What the plugin's launch() does before it submits: submitit rejects unknown parameters.
    params = OmegaConf.to_container(cfg.hydra.launcher)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "jobs", slurm_max_num_timeout=0
    )
    base = {
        "timeout_min",
        "cpus_per_task",
        "gpus_per_node",
        "tasks_per_node",
        "mem_gb",
        "nodes",
        "name",
        "stderr_to_stdout",
    }
    skip = {"_target_", "submitit_folder", "max_num_timeout"}  # not resources
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in params.items() if k not in skip}
    )
    with pytest.raises(NameError, match="not_a_parameter"):  # the check above can fail
        executor.update_parameters(slurm_not_a_parameter=1)


@pytest.mark.slow
def test_sweep_runs_through_submitits_local_executor(tmp_path):
    """The README sweep with the launcher swapped for submitit's local executor: each job a
    process that submitit starts and collects, as on a cluster."""
    sweep = tmp_path / "sweep"
    cli(
        "train.py",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "+experiment=maml_sinusoid",
        "seed=0,1",
        *TINY,
        "train.steps=100",
        "eval.figure=false",
        f"hydra.sweep.dir={sweep}",
        timeout=600,
    )
    results = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert results[0]["eval_loss_post"] != results[1]["eval_loss_post"]  # two seeds
    assert list((sweep / ".submitit").iterdir())  # submitit ran them
