"""Meta-train from the command line: ``python experiments/train.py task=sinusoid algo=maml``.

Hydra composes the config (conf/), the schema in metagrad.experiment.config checks types, and
metagrad.experiment.config.validate checks values, all before anything is built or compiled. ``-m`` sweeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments._hydra import check_override_types, quiet_library_logs
from metagrad.experiment.config import ConfigError, validate

@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    quiet_library_logs()
    from metagrad.experiment.distributed import is_primary
    from metagrad.experiment.loop import NonFiniteLoss, train  # after validation: bad input is fast

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = train(cfg, run_dir)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
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
    check_override_types(sys.argv[1:])
    main()
