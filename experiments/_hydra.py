"""The one Hydra registration of metagrad's config schema, and what the entry points share:
composing a config without a run, the CLI's one-line override checks, quiet library logs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

from metagrad.experiment.config import Config, ConfigError, validate

ConfigStore.instance().store(name="base_config", node=Config)
GROUPS = ("task", "model", "algo", "experiment", "hparams_search")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/


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




def quiet_library_logs() -> None:
    """orbax reports every save and restore at INFO through absl, and JAX says "no TPU here" at
    INFO: a training log wants neither. Called by the entry points, never at import."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
