"""The one Hydra registration of metagrad's config schema, and what the entry points share:
the composed config as a typed `Config`, the CLI's check of a command line before Hydra writes
anything, one-line error messages that name the key, quiet library logs.

Each group option's dataclass (`metagrad.experiment.config.GROUP_OPTIONS`) is stored as
``schema/<group>/<option>``; ``conf/<group>/<option>.yaml`` extends it through its defaults list
(Hydra's "structured config schema" pattern), so a key that the chosen option does not have is
refused when Hydra composes: ``algo=reptile algo.learn_lr=true`` names ``algo.learn_lr``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metagrad.experiment.config import GROUP_OPTIONS, MISSING, Config, ConfigError, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/


def register_schemas() -> None:
    """``base_config`` (the root, its groups to be chosen) and ``schema/<group>/<option>``."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config(task=MISSING, model=MISSING, algo=MISSING))
    for group, options in GROUP_OPTIONS.items():
        for name, cls in options.items():
            cs.store(group=f"schema/{group}", name=name, node=cls)


register_schemas()


# ---------------------------------------------------------------------------------------------
# From Hydra's DictConfig to the typed Config.


def to_config(cfg: DictConfig) -> Config:
    """The `Config` a composed DictConfig describes: keys that no dataclass declares are refused
    (Hydra adds a ``+key`` override to a structured node without a word), then
    ``OmegaConf.to_object`` builds the dataclasses, whose ``__post_init__`` checks the ranges."""
    _refuse_undeclared_keys(cfg, "")
    return OmegaConf.to_object(cfg)


class UndeclaredKey(ConfigError):
    """A key that the node's dataclass does not declare (``key`` is its dotted name)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _refuse_undeclared_keys(node: DictConfig, prefix: str) -> None:
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return
    declared = [f.name for f in dataclasses.fields(cls)]
    for key in node.keys():
        if key not in declared:
            reason = f"Key {key!r} not in {cls.__name__!r}" + _hint(str(key), cls, prefix)
            raise UndeclaredKey(f"{prefix}{key}", reason)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_undeclared_keys(child, f"{prefix}{key}.")


def _hint(key: str, cls: type, prefix: str) -> str:
    """The declared key closest to a typo, or the keys there are."""
    declared = [f.name for f in dataclasses.fields(cls) if f.name != "name"]
    close = difflib.get_close_matches(key, declared, n=1)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return f" (its keys: {', '.join(declared)})" if declared else " (it has no keys to set)"


# ---------------------------------------------------------------------------------------------
# One line per error, naming the key (and the override that set it).


def one_line(err: BaseException, overrides=()) -> str:
    """``err`` (Hydra's, OmegaConf's or a `ConfigError`) as one line that starts with the key,
    or with the command-line override that set it."""
    chain, e = [], err
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, UndeclaredKey):
            return f"{_override_for(e.key, overrides) or e.key}: {e.reason}"
        if isinstance(e, ConfigError):
            return str(e)
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return _omegaconf_line(e, overrides)
    return _hydra_line(str(err))


def _omegaconf_line(e: OmegaConfBaseException, overrides) -> str:
    key = str(e.full_key)
    reason = str(e).splitlines()[0]
    cls = getattr(e, "object_type", None)
    if "not in" in reason and dataclasses.is_dataclass(cls):  # a typo: suggest the key meant
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        reason += _hint(key.rsplit(".", 1)[-1], cls, parent)
    given = _override_for(key, overrides)
    return f"{given or key}: {reason}"


def _override_for(key: str, overrides) -> str | None:
    """The override that sets ``key`` (or the node above it that holds it)."""
    best, depth = None, -1
    for o in overrides:
        name = o.split("=", 1)[0].lstrip("+~")
        if "/" not in name and (name == key or key.startswith(name + ".")):
            if name.count(".") > depth:
                best, depth = o, name.count(".")
    return best


def _hydra_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0] if lines else message
    if "Available options" in message:  # an unknown group option: list the choices
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = [line for line in lines[start + 1 :] if " " not in line]
        return f"{first}; available: {', '.join(options)}"
    if first.startswith("Ambiguous value"):
        return f"{first}: quote it, or add -m to sweep over it"
    return first


# ---------------------------------------------------------------------------------------------
# Composing without a run, and the CLI's pre-check.


def compose_config(overrides: list[str], *, config_name: str = "config") -> Config:
    """The validated `Config` that ``python experiments/train.py <overrides>`` trains, composed
    by Hydra's compose API without starting a run (Hydra's own overrides, ``hydra/launcher=...``
    or ``hydra.run.dir=...``, compose too); a bad override raises `ConfigError` naming it, before
    anything is built or compiled."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return _compose(compose, list(overrides), config_name)


def _compose(compose, overrides: list[str], config_name: str) -> Config:
    try:
        cfg = to_config(compose(config_name=config_name, overrides=overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's and OmegaConf's errors, and ConfigError
        if isinstance(e, ConfigError) or _is_config_error(e):
            raise ConfigError(one_line(e, overrides)) from e
        raise
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(one_line(e, overrides)) from None
    return cfg


def _is_config_error(e: BaseException) -> bool:
    from hydra.errors import HydraException

    return isinstance(e, HydraException | OmegaConfBaseException)


def jobs_of(overrides: list[str], *, multirun: bool) -> list[list[str]]:
    """The override lists whose configs a command's jobs use, for checking them all up front.

    A run is one job. A sweep's discrete overrides (``seed=0,1,2``, ``range(...)``) give the job
    of every first value, and for each swept key a job per other value (the rest at their
    first): every value of every swept key is composed with the rest of the command. Sweeps
    that only the sweeper can expand (Optuna's ``interval(...)``, ``glob(...)``) are left to it.
    """
    if not multirun:
        return [list(overrides)]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    slots = []  # per override: its one text, or the texts of its swept values
    for text, o in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True):
        values = []
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
            except Exception:  # noqa: BLE001 - a sweep the parser cannot expand alone (glob)
                values = []
            if not values:
                continue  # left to the sweeper
        slots.append([f"{o.get_key_element()}={v}" for v in values] if values else [text])
    jobs = [[texts[0] for texts in slots]]
    for i, texts in enumerate(slots):
        for text in texts[1:]:
            jobs.append([text if j == i else other[0] for j, other in enumerate(slots)])
    return jobs


def check_command_line(argv: list[str]) -> None:
    """Composes and validates every job a ``train.py`` command line describes, as Hydra will,
    before Hydra writes anything (it saves ``.hydra/config.yaml`` into the run directory before
    the task starts); a refusal is one line naming the key on stderr, and exit status 2.

    Commands that only print (``--help``, ``--hydra-help``, ``--info``, shell completion) and
    those that move the config search path (``--config-path``, ``--config-dir``) are Hydra's
    alone; the task checks their configs when it starts.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

    args = get_args_parser().parse_args(argv)  # a bad flag: argparse's usage line, exit 2
    if (
        args.help
        or args.hydra_help
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
        or args.experimental_rerun
    ):
        return
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    try:
        jobs = jobs_of(args.overrides, multirun=multirun)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            for overrides in jobs:
                _compose(compose, overrides, args.config_name or "config")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - e.g. an override Hydra's parser cannot read
        if not _is_config_error(e):
            raise
        print(f"error: {one_line(e, args.overrides)}", file=sys.stderr)
        sys.exit(2)


def quiet_library_logs() -> None:
    """orbax reports every save and restore at INFO through absl, and JAX says "no TPU here" at
    INFO: a training log wants neither. Called by the entry points, never at import."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
