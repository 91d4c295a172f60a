"""Meta-train from the command line: ``python experiments/train.py task=sinusoid algo=maml``.

Before Hydra starts (and writes ``.hydra/`` into a run directory), the command line is composed
as Hydra will compose it, every job of a ``-m`` sweep too, and checked: the per-option schemas
(metagrad.experiment.config) refuse keys the chosen options do not have, wrong types and Enum
values; each dataclass's ``__post_init__`` the ranges; ``validate`` the rules across nodes. A
refusal is one line naming the key, exit status 2. Hydra's own groups and keys
(``hydra/launcher=...``, ``hydra/job_logging=disabled``, ``hydra.run.dir=...``) pass through.
"""

from __future__ import annotations

import os
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


# A -m sweep's jobs under Hydra's basic sweeper and launcher: Hydra sets up each job's
# directory (and .hydra/) as usual, the job only records its config here, and once every job is
# set up they train in groups that share one compiled program (metagrad.experiment.batched).
DEFERRED: list[tuple] = []


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        cfg = to_config(dict_cfg)
        if cfg.train.resume:  # the run's saved config, with only the overrides given
            cfg = resume_config(run_dir, list(hydra_cfg.overrides.task))
            # This invocation's record holds what it continues with (Hydra wrote its own
            # composition there; the run's own .hydra/config.yaml stays as it was).
            record = run_dir / hydra_cfg.output_subdir / "config.yaml"
            record.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    except Exception as e:  # noqa: BLE001 - OmegaConf's and the dataclasses' checks
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    quiet_library_logs()
    from metagrad.experiment.batched import cannot_batch

    if _batching_sweep(hydra_cfg) and cannot_batch(cfg) is None:
        DEFERRED.append((cfg, run_dir))
        return None
    from metagrad.experiment.loop import train

    new_dirs = [] if COMMAND.new_run_dir is None else [COMMAND.new_run_dir]
    results = _report(lambda: [train(cfg, run_dir)], [cfg], [run_dir], new_dirs)
    return results[0]["val_objective"]  # what sweepers minimise: validation, never test


def _batching_sweep(hydra_cfg) -> bool:
    """A multirun whose sweeper and launcher are Hydra's basic ones: its jobs can be deferred
    (another sweeper, such as Optuna's, needs each job's result before it picks the next)."""
    from hydra.types import RunMode

    return (
        hydra_cfg.mode == RunMode.MULTIRUN
        and hydra_cfg.sweeper._target_.endswith("BasicSweeper")
        and hydra_cfg.launcher._target_.endswith("BasicLauncher")
    )


def train_deferred() -> int:
    """Trains the deferred jobs in groups of one program each; returns the exit status (0, or
    the worst of the groups': 1 a run diverged, 2 a group was refused)."""
    from metagrad.experiment.batched import group_runs, train_batched

    status = 0
    cfgs = [cfg for cfg, _ in DEFERRED]
    for group in group_runs(cfgs):
        group_cfgs = [cfgs[i] for i in group]
        dirs = [DEFERRED[i][1] for i in group]
        if len(group) > 1:
            print(f"{len(group)} runs in one compiled program: {', '.join(map(str, dirs))}")
        # A new job's folder holds only what Hydra wrote: removed if the group is refused.
        new = [d for c, d in zip(group_cfgs, dirs, strict=True) if not c.train.resume]
        new = [d for d in new if all(_hydra_file(p) for p in d.iterdir())]
        try:
            _report(lambda c=group_cfgs, d=dirs: train_batched(c, d), group_cfgs, dirs, new)
        except SystemExit as e:
            status = max(status, int(e.code or 0))
    sweep_dir = DEFERRED[0][1].parent  # nothing but Hydra's multirun.yaml left: no sweep either
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    return status


def _hydra_file(path: Path) -> bool:
    """What Hydra writes into a job's folder before the job runs (and the run's lock)."""
    return path.name in (".hydra", ".lock") or path.suffix == ".log"


def _report(run, cfgs: list, run_dirs: list, new_dirs: list[Path]) -> list[dict]:
    """``run()``'s results, each run's summary line printed; a refusal or a failure is one line
    on stderr and ``SystemExit`` (2 refused, 1 diverged or disk full, 130 interrupted). A
    refusal removes ``new_dirs``, the run directories this command created."""
    from metagrad.experiment.chunks import MemoryEstimateError
    from metagrad.experiment.distributed import is_primary
    from metagrad.experiment.loop import DiskFull, NonFiniteLoss, TrainingInterrupted
    from metagrad.experiment.runlog import RunDirLocked

    try:
        results = run()  # validates the configs before anything is built
    except (FileNotFoundError, FileExistsError, ValueError, RunDirLocked, MemoryEstimateError) as e:
        print(f"error: {e}", file=sys.stderr)  # refused: nothing trained
        for new_dir in new_dirs:  # nor left behind: Hydra's files included
            shutil.rmtree(new_dir, ignore_errors=True)
        exit_when_threads_end(2)
    except (NonFiniteLoss, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        exit_when_threads_end(1)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        exit_when_threads_end(130)
    if is_primary():  # a multi-host run prints once
        for cfg, r, run_dir in zip(cfgs, results, run_dirs, strict=True):
            print(summary_line(cfg, r, run_dir))
    return results


def summary_line(cfg, results: dict, run_dir) -> str:
    """The test metrics, their interval, and the speed to three significant digits."""
    keys = [
        k
        for k in ("eval_loss_pre", "eval_loss_post", "eval_acc_pre", "eval_acc_post")
        if k in results
    ]
    summary = "  ".join(f"{k}={results[k]:.4f}" for k in keys)
    ci = results.get("eval_acc_post_ci95", results["eval_loss_post_ci95"])
    speed = results["steps_per_sec"]
    # Three significant digits, never rounded to 0 (0.0709), without an exponent (3,430).
    speed = "n/a" if speed is None else f"{speed:,.0f}" if speed >= 100 else f"{speed:.3g}"
    runs = results.get("parallel_runs", 1)
    shared = f" (each of {runs} runs in one program)" if runs > 1 else ""
    return (
        f"{summary}  (+-{ci:.4f}, {cfg.eval.tasks} test tasks, {results['eval_inner_steps']} "
        f"inner steps)  {speed} meta-steps/s{shared}  -> {run_dir}"
    )


def one_device_per_core(argv: list[str]) -> None:
    """For a sweep, XLA's CPU backend as one host device per core, before JAX starts it: the
    runs of a batched program are spread over them (``RunGroup.mesh``), since a small model's
    program keeps one core busy. Runs alone still use one device; ``XLA_FLAGS`` set by the
    user are left as they are."""
    if not ({"-m", "--multirun"} & set(argv) or "hydra.mode=MULTIRUN" in argv):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        count = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"
        os.environ["XLA_FLAGS"] = f"{flags} {count}".strip()


if __name__ == "__main__":
    COMMAND = check_command_line(sys.argv[1:])
    one_device_per_core(sys.argv[1:])
    sys.argv += COMMAND.extra_overrides
    main()
    if DEFERRED:
        exit_when_threads_end(train_deferred())
