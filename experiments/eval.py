"""Evaluate a saved run's checkpoint with other evaluation settings, without retraining.

    python experiments/eval.py run_dir=PATH eval.shots=5 eval.inner_steps=10 [eval.checkpoint=last]

Reads the run's resolved config (``PATH/.hydra/config.yaml``), applies the overrides, restores
the checkpoint and writes ``PATH/eval_<overrides>.json`` (and ``.png``); the training run's own
files are left untouched.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from metagrad.experiment.config import Config, ConfigError, validate


def parse_args(argv: list[str]) -> tuple[Path, list[str]]:
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("run_dir=")]
    overrides = [a for a in argv if not a.startswith("run_dir=")]
    if len(run_dirs) != 1:
        raise ConfigError("usage: python experiments/eval.py run_dir=PATH [key=value ...]")
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    return Path(run_dirs[0]), overrides


def load_config(run_dir: Path, overrides: list[str]):
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"run_dir={run_dir}: no {saved.relative_to(run_dir)} there; pass the "
            "directory of a run made by experiments/train.py"
        )
    if not (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"run_dir={run_dir}: the run has no checkpoints/ folder")
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.load(saved), OmegaConf.from_dotlist(overrides))
    except Exception as e:  # OmegaConf's validation errors name the key
        raise ConfigError(str(e).splitlines()[0]) from None
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_dir, overrides = parse_args(argv)
        cfg = load_config(run_dir, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from metagrad.experiment.checkpoint import Checkpoints
    from metagrad.outer import meta_learner
    from metagrad.experiment.loop import Experiment, evaluate_checkpoint, write_results

    exp = Experiment.from_config(cfg)
    template = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False).init(
        exp.meta_params
    )
    ckpt = Checkpoints(run_dir)
    results = evaluate_checkpoint(exp, ckpt, template, which=cfg.eval.checkpoint)
    ckpt.close()
    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(overrides)) or "default"
    name = f"eval_{tag}.json"
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
