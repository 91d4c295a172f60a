"""The SLURM sweep preset (``hydra/launcher=slurm_gpu``) composes with Hydra's compose API and its
parameters are ones submitit's SLURM executor accepts; skipped without the ``slurm`` extra."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from metagrad.experiment.config import Config, validate

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason="needs the slurm extra: pip install -e '.[slurm]' (hydra-submitit-launcher)",
)

CONF = Path(__file__).resolve().parents[1] / "conf"
ConfigStore.instance().store(name="base_config", node=Config)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


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

    cfg = _compose(
        [
            "hydra/launcher=slurm_gpu",
            "hydra.launcher.nodes=2",
            "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
            "distributed.enabled=true",
            "train.devices=all",
        ]
    )
    validate(cfg)
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
