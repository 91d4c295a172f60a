"""Evaluate a saved run's checkpoint with other evaluation settings, without retraining.

    python experiments/eval.py run_dir=PATH eval.shots=5 eval.inner_steps=10 [eval.checkpoint=last]

Reads the run's resolved config (``PATH/.hydra/config.yaml``) into the schema of its own task,
model and algorithm options, applies the overrides, restores the checkpoint and writes
``PATH/eval_<overrides>.json`` (and ``.png``); the training run's own files are left untouched.
A bad override, a config that does not fit the schema, or a missing or damaged checkpoint is one
line naming the key or the file, and exit status 2.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from experiments._hydra import exit_when_threads_end, quiet_library_logs, saved_config_with
from metagrad.experiment.config import GROUP_OPTIONS, Config, ConfigError

USAGE = "usage: python experiments/eval.py run_dir=PATH [key=value ...]"


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    overrides = [a for a in argv if not a.startswith("run_dir=")]
    if len(run_dirs) != 1:
        raise ConfigError(USAGE)
    bad = [a for a in overrides if "=" not in a or a.startswith(("+", "~", "-"))]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    choices = [a for a in overrides if a.split("=", 1)[0] in GROUP_OPTIONS]
    if choices:
        raise ConfigError(
            f"{choices[0]}: eval.py evaluates the run's own task, model and algorithm; "
            "choose options when training (experiments/train.py)"
        )
    return Path(run_dirs[0]), overrides


def load_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's saved config with the evaluation overrides applied (one line on an error)."""
    if not (run_dir / "checkpoints").is_dir() and (run_dir / ".hydra" / "config.yaml").is_file():
        raise ConfigError(f"run_dir={run_dir}: the run has no checkpoints/ folder")
    try:
        return saved_config_with(run_dir, overrides)
    except ConfigError as e:
        message = str(e)
        if message.startswith(str(run_dir)):  # about the run, not a key
            message = f"run_dir={message}"
        raise ConfigError(message) from None


def output_name(overrides: list[str]) -> str:
    """``eval_<overrides>.json``, shortened with a hash where it would be too long a file name."""
    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(overrides)) or "default"
    if len(tag) > 150:
        tag = f"{tag[:120]}_{hashlib.sha256(tag.encode()).hexdigest()[:12]}"
    return f"eval_{tag}.json"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_dir, overrides = parse_args(argv)
        cfg = load_config(run_dir, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    quiet_library_logs()
    from metagrad.experiment.checkpoint import Checkpoints
    from metagrad.experiment.chunks import MemoryEstimateError, check_heldout_memory
    from metagrad.experiment.loop import Experiment, evaluate_checkpoint, write_results
    from metagrad.outer import meta_learner

    try:
        exp = Experiment.from_config(cfg)
        check_heldout_memory(exp)
        template = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False).init(
            exp.meta_params
        )
        ckpt = Checkpoints(run_dir)
        try:
            results = evaluate_checkpoint(exp, ckpt, template, which=cfg.eval.checkpoint)
        finally:
            ckpt.close()
    except (
        ValueError,
        FileNotFoundError,
        MemoryEstimateError,
    ) as e:  # ConfigError, CheckpointError, data
        print(f"error: {e}", file=sys.stderr)
        exit_when_threads_end(2)
    except KeyboardInterrupt:
        print(f"stopped: evaluation of {run_dir} interrupted; nothing written", file=sys.stderr)
        exit_when_threads_end(130)
    name = output_name(overrides)
    write_results(exp, run_dir, results, name)
    steps = results["eval_inner_steps"]
    metric = "acc" if "eval_acc_post" in results else "loss"
    print(
        f"eval_{metric}_post={results[f'eval_{metric}_post']:.4f} "
        f"(+-{results[f'eval_{metric}_post_ci95']:.4f}) after {steps} steps, "
        f"{cfg.eval.tasks} tasks, {cfg.eval.checkpoint} checkpoint -> {run_dir / name}"
    )
    return results


if __name__ == "__main__":
    main()
