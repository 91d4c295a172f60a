"""Meta-train from the command line: ``python experiments/train.py task=sinusoid algo=maml``.

Hydra composes the config (conf/), the schema in metagrad.config checks types, and
metagrad.config.validate checks values, all before anything is built or compiled. ``-m`` sweeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metagrad.config import Config, ConfigError, validate

ConfigStore.instance().store(name="base_config", node=Config)
GROUPS = ("task", "model", "algo", "experiment", "hparams_search")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]) -> Config:
    """The validated `Config` that ``python experiments/train.py <overrides>`` trains, composed
    by Hydra's compose API without starting a run (for scripts such as gpu_omniglot.py); a bad
    override raises `ConfigError` naming it, before anything is built or compiled."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ else ""
        raise ConfigError(f"{str(e).splitlines()[0]}{cause}") from e
    validate(cfg)
    return cfg


def check_override_types(argv: list[str]) -> None:
    """One line naming the key for a value of the wrong type (Hydra's own message is longer)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(Config)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith(("-", "+", "~", "hydra.")) or key in GROUPS:
            continue
        if "," in value and ("-m" in argv or "--multirun" in argv):
            continue  # a sweep over values: Hydra checks each
        try:
            OmegaConf.merge(schema, OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            print(f"error: {arg}: {reason}", file=sys.stderr)
            sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from metagrad.distributed import is_primary
    from metagrad.train import NonFiniteLoss, train  # after validation: bad input is fast

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
