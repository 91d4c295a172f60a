"""Meta-train from the command line: ``python experiments/train.py task=sinusoid algo=maml``.

Before Hydra starts (and writes ``.hydra/`` into a run directory), the command line is composed
as Hydra will compose it, every job of a ``-m`` sweep too, and checked: the per-option schemas
(metagrad.experiment.config) refuse keys the chosen options do not have, wrong types and Enum
values; each dataclass's ``__post_init__`` the ranges; ``validate`` the rules across nodes. A
refusal is one line naming the key, exit status 2. Hydra's own groups and keys
(``hydra/launcher=...``, ``hydra/job_logging=disabled``, ``hydra.run.dir=...``) pass through.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments._hydra import (
    CommandLine,
    check_command_line,
    exit_when_threads_end,
    one_line,
    quiet_library_logs,
    resume_config,
    to_config,
)

COMMAND = CommandLine()  # what the pre-check learnt, set before Hydra starts


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_config(dict_cfg)
        if cfg.train.resume:  # the run's saved config, with only the overrides given
            cfg = resume_config(run_dir, list(HydraConfig.get().overrides.task))
            # This invocation's record holds what it continues with (Hydra wrote its own
            # composition there; the run's own .hydra/config.yaml stays as it was).
            record = run_dir / HydraConfig.get().output_subdir / "config.yaml"
            record.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    except Exception as e:  # noqa: BLE001 - OmegaConf's and the dataclasses' checks
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    quiet_library_logs()
    from metagrad.experiment.chunks import MemoryEstimateError
    from metagrad.experiment.distributed import is_primary
    from metagrad.experiment.loop import DiskFull, NonFiniteLoss, TrainingInterrupted, train
    from metagrad.experiment.runlog import RunDirLocked

    try:
        results = train(cfg, run_dir)  # validates cfg before anything is built
    except (FileNotFoundError, FileExistsError, ValueError, RunDirLocked, MemoryEstimateError) as e:
        print(f"error: {e}", file=sys.stderr)  # refused: nothing trained
        if COMMAND.new_run_dir is not None:  # nor left behind: Hydra's files included
            shutil.rmtree(COMMAND.new_run_dir, ignore_errors=True)
        exit_when_threads_end(2)
    except (NonFiniteLoss, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        exit_when_threads_end(1)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        exit_when_threads_end(130)
    keys = [
        k
        for k in ("eval_loss_pre", "eval_loss_post", "eval_acc_pre", "eval_acc_post")
        if k in results
    ]
    summary = "  ".join(f"{k}={results[k]:.4f}" for k in keys)
    ci = results.get("eval_acc_post_ci95", results["eval_loss_post_ci95"])
    speed = results["steps_per_sec"]
    if is_primary():  # a multi-host run prints once
        print(
            f"{summary}  (+-{ci:.4f}, {cfg.eval.tasks} test tasks, {results['eval_inner_steps']} "
            f"inner steps)  {speed or 0:.0f} meta-steps/s  -> {run_dir}"
        )
    return results["val_objective"]  # what sweepers minimise: validation, never test


if __name__ == "__main__":
    COMMAND = check_command_line(sys.argv[1:])
    sys.argv += COMMAND.extra_overrides
    main()
