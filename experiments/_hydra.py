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
import os
import sys
import threading
import time
from datetime import UTC, datetime
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


@dataclasses.dataclass
class CommandLine:
    """What the pre-check learnt: overrides to add before Hydra starts (a resume's own options,
    and a folder for this invocation's Hydra files so the run's own config is never
    overwritten), and the run directory this command creates, to remove if the run is refused."""

    extra_overrides: list[str] = dataclasses.field(default_factory=list)
    new_run_dir: Path | None = None


def check_command_line(argv: list[str]) -> CommandLine:
    """Composes and validates every job a ``train.py`` command line describes, as Hydra will,
    before Hydra writes anything (it saves ``.hydra/config.yaml`` into the run directory before
    the task starts); a refusal is one line naming the key on stderr, and exit status 2.

    A run directory that holds a run is refused unless ``train.resume=true``; a resume is checked
    against the run's saved config (:func:`resume_config`). Commands that only print
    (``--help``, ``--hydra-help``, ``--info``, shell completion) and those that move the config
    search path (``--config-path``, ``--config-dir``) are Hydra's alone; the task checks their
    configs when it starts.
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
        return CommandLine()
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    try:
        check_extras(args.overrides)  # before Hydra's "Could not find 'hydra/sweeper/optuna'"
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            if not multirun:
                return _check_run(compose, args.overrides, args.config_name or "config")
            for overrides in jobs_of(args.overrides, multirun=multirun):
                _compose(compose, overrides, args.config_name or "config")
            return CommandLine()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - e.g. an override Hydra's parser cannot read
        if not _is_config_error(e):
            raise
        print(f"error: {one_line(e, args.overrides)}", file=sys.stderr)
        sys.exit(2)


# Which optional extra a Hydra option needs: a config group choice -> (extra, the text in the
# chosen option's file, or the option's own name, that shows it uses the extra's plugin).
PLUGIN_EXTRAS = {"optuna": "optuna", "submitit": "slurm"}


def check_extras(overrides: list[str]) -> None:
    """Refuse, in one line with the ``pip install`` command, a command line that picks a Hydra
    plugin whose optional extra is not installed: ``hydra/sweeper=optuna`` or an
    ``hparams_search`` option that overrides the sweeper with it (the ``optuna`` extra),
    ``hydra/launcher=submitit_*`` or a launcher option built on it (the ``slurm`` extra).

    Example:
        >>> check_extras(["seed=1", "inner.lr=0.1"])  # nothing optional chosen
    """
    from metagrad._extras import MissingExtraError, require_extra

    for text in overrides:
        group, _, option = text.lstrip("+~").partition("=")
        if not option or ("/" not in group and group != "hparams_search"):
            continue
        source = CONF_DIR / group / f"{option}.yaml"
        lines = source.read_text().splitlines() if source.is_file() else []
        body = " ".join([option, *(line.split("#", 1)[0] for line in lines)])  # no comments
        for plugin, extra in PLUGIN_EXTRAS.items():
            if plugin in body:
                try:
                    require_extra(extra, text)
                except MissingExtraError as e:
                    raise ConfigError(str(e)) from None


def _check_run(compose, overrides: list[str], config_name: str) -> CommandLine:
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides if "=" in o}
    run_dir = Path(given["hydra.run.dir"]) if "hydra.run.dir" in given else None
    new_run_dir = run_dir if run_dir is not None and not run_dir.exists() else None
    resume = OmegaConf.from_dotlist([f"x={given.get('train.resume', 'false')}"]).x is True
    if _secondary_process(given):
        # Another process of a multi-host run: process 0 checks the directory and writes the
        # run's files; this one must not write Hydra's (its config differs in process_id).
        _compose(compose, overrides, config_name)
        return CommandLine(["hydra.output_subdir=null"], None)
    if not resume:
        _compose(compose, overrides, config_name)  # a bad value first, named
        if run_dir is not None and holds_run(run_dir):
            raise ConfigError(
                f"hydra.run.dir={run_dir} already holds a run; pass train.resume=true to "
                "continue it, or choose a new run directory"
            )
        return CommandLine(new_run_dir=new_run_dir)
    if run_dir is None:
        raise ConfigError("train.resume=true needs hydra.run.dir=<the directory of the run>")
    if not holds_run(run_dir):
        raise ConfigError(
            f"train.resume=true, but hydra.run.dir={run_dir} holds no run to resume: check the "
            "path, or drop train.resume to start a new run there"
        )
    saved = saved_config(run_dir)
    # Hydra composes the run's own options, so that their keys can be given.
    own = [f"{g}={saved[g].name}" for g in GROUP_OPTIONS if g not in given]
    composed = _compose(compose, [*overrides, *own], config_name)
    resume_config(run_dir, overrides, composed)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return CommandLine([*own, f"hydra.output_subdir=.hydra/resumes/{stamp}"], None)


# ---------------------------------------------------------------------------------------------
# A saved run: its own config, and what a resume may change.

# Keys a resume may set to another value: they do not change what the run computes (a larger
# train.steps continues it; a schedule over train.steps is refused below).
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.resume",
    "train.progress",
    "train.tensorboard",
    "train.wandb",  # and its train.wandb_* keys: where the numbers also go
    "train.profile_steps",
    "train.devices",
    "train.memory_check",
    "train.parallel_runs",  # runs batched or alone agree to float32 rounding
    "train.compile_cache",  # and its compile_cache_dir
    "eval.figure",
    "distributed.",
)


def _secondary_process(given: dict) -> bool:
    """Whether this command is a multi-host run's process other than 0 (its id given on the
    command line, or set by SLURM or Open MPI for JAX to detect)."""
    if given.get("distributed.enabled", "false").lower() != "true":
        return False
    rank = given.get("distributed.process_id")
    if rank in (None, "null"):
        rank = os.environ.get("SLURM_PROCID") or os.environ.get("OMPI_COMM_WORLD_RANK")
    return rank not in (None, "", "0")


def saved_config(run_dir: Path) -> DictConfig:
    """The run's own config (``.hydra/config.yaml``, written when it started) in the schema of
    its own task, model and algorithm options; a `ConfigError` when it is missing or does not
    fit."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"{run_dir}: no .hydra/config.yaml there; pass the directory of a run made by "
            "experiments/train.py"
        )
    try:
        data = OmegaConf.load(saved)
        options = {group: _saved_option(data, group) for group in GROUP_OPTIONS}
        return OmegaConf.merge(OmegaConf.structured(Config(**options)), data)
    except Exception as e:  # noqa: BLE001 - the saved file does not fit today's schema
        raise ConfigError(f"{run_dir}: {saved.name} does not fit: {one_line(e)}") from None


def _saved_option(data, group: str):
    name = OmegaConf.select(data, f"{group}.name")
    options = GROUP_OPTIONS[group]
    if name not in options:
        raise ConfigError(f"{group}.name={name!r}: must be one of {', '.join(options)}")
    return options[name]()


def saved_config_with(run_dir: Path, overrides: list[str]) -> Config:
    """:func:`saved_config` with ``key=value`` overrides applied, checked and validated."""
    base = saved_config(run_dir)
    try:
        cfg = to_config(OmegaConf.merge(base, OmegaConf.from_dotlist(overrides)))
        validate(cfg)
    except Exception as e:  # noqa: BLE001 - OmegaConf's and the dataclasses' checks
        raise ConfigError(one_line(e, overrides)) from None
    return cfg


def holds_run(run_dir: Path) -> bool:
    return (run_dir / ".hydra" / "config.yaml").is_file() or (run_dir / "checkpoints").is_dir()


def _flat(cfg: Config) -> dict:
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True), "")
    return out


def resume_config(run_dir: Path, overrides: list[str], composed: Config | None = None) -> Config:
    """The config a ``train.resume=true`` run continues with: the run's saved config, with only
    the ``key=value`` overrides given applied. A change that alters what the run computes is
    refused naming the keys with their old and new values (see `RESUME_MAY_CHANGE`); so is a
    group choice or preset on the command line that describes another run than the saved one
    (``composed``: the command as Hydra composed it)."""
    keyvals = [
        o for o in overrides if "=" in o and not _is_choice(o) and not o.startswith("hydra.")
    ]
    saved = saved_config_with(run_dir, [])
    resumed = saved_config_with(run_dir, keyvals)
    old, new = _flat(saved), _flat(resumed)
    proposed = {k: v for k, v in new.items() if old.get(k) != v}
    if composed is not None and any(_is_choice(o) for o in overrides):
        explicit = {o.split("=", 1)[0].lstrip("+~") for o in keyvals}
        for k, v in _flat(composed).items():  # what the command's choices and presets say
            if k not in explicit and old.get(k) != v:
                proposed[k] = v
    refused = [k for k in proposed if not k.startswith(RESUME_MAY_CHANGE)]
    if "train.steps" in proposed and (
        proposed["train.steps"] < old["train.steps"] or old["outer.schedule"] != "constant"
    ):  # fewer steps than configured, or a schedule that decays over train.steps
        refused.append("train.steps")
    if refused:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {proposed[k]!r}" for k in refused)
        raise ConfigError(
            f"train.resume=true would change the run in {run_dir}: {diffs}. A resume continues "
            "the run as it was configured (it may raise train.steps and change logging, "
            "progress and device keys); start a new run directory for other settings"
        )
    return resumed


def _is_choice(override: str) -> bool:
    """A group choice or preset (``algo=reptile``, ``+experiment=...``), not a key's value."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key in GROUP_OPTIONS or key in ("experiment", "hparams_search") or "/" in key


def quiet_library_logs() -> None:
    """orbax reports every save and restore at INFO through absl, and JAX says "no TPU here" at
    INFO: a training log wants neither. Called by the entry points, never at import."""
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def exit_when_threads_end(status: int, timeout: float = 30.0):
    """``sys.exit(status)`` once the other non-daemon threads have ended (``timeout`` seconds at
    most): at interpreter shutdown ``concurrent.futures`` refuses new work, so a library thread
    still finishing (orbax's) would print a traceback under the one-line error."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    sys.exit(status)
