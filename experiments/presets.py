"""The experiment presets of ``conf/`` as a `metagrad.config.Config`, without Hydra.

For machines where Hydra and OmegaConf are not installed (the GPU scripts). It follows the
precedence of ``conf/config.yaml`` -- root < model < task < algo < ``+experiment`` < overrides --
for the subset of Hydra that ``conf/`` uses: ``# @package _global_`` headers, ``override
/group: option`` defaults, and nested mappings. tests/test_gpu_scripts.py checks it against
Hydra's own compose for every preset. PyYAML is a dependency of Flax, so it is present wherever
metagrad imports.

    cfg = compose_preset("maml_omniglot_5w1s", ["train.steps=100", "task.data_dir=/data"])
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from metagrad.config import Config, ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "task", "algo")  # in precedence order, lowest first


def _read(path: Path) -> tuple[dict, dict]:
    """``(body, group overrides)`` of a config file, the body placed at its package."""
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    text = path.read_text()
    body = yaml.safe_load(text) or {}
    overrides = {}
    for entry in body.pop("defaults", []):
        if isinstance(entry, dict):
            for k, v in entry.items():
                if k.startswith("override /"):
                    overrides[k.removeprefix("override /")] = v
    body.pop("hydra", None)
    if "# @package _global_" not in text.split("\n", 1)[0] and path.parent.name in GROUPS:
        body = {path.parent.name: body}  # Hydra's default package is the group's name
    return body, overrides


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _parse_override(item: str) -> dict:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=100")
    node: dict = {}
    leaf = node
    *parents, last = key.split(".")
    for part in parents:
        leaf = leaf.setdefault(part, {})
    leaf[last] = yaml.safe_load(value) if value else None
    return node


def _build(cls, values: dict, where: str):
    """A config dataclass from a mapping; unknown keys and wrong types name their key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{where}.{k}" if where else k
        if k not in fields:
            raise ConfigError(f"{key}: no such key (see metagrad/config.py)")
        default = getattr(cls(), k)
        if dataclasses.is_dataclass(default):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}={v!r}: expected a mapping")
            kwargs[k] = _build(type(default), v, key)
            continue
        kind = str(fields[k].type)  # a string: metagrad.config uses postponed annotations
        if kind.startswith("float") and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif kind.startswith("str") and isinstance(v, int) and not isinstance(v, bool):
            v = str(v)  # e.g. train.task_batching=4, as Hydra converts it
        ok = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(
            kind.split("[")[0].split(" ")[0]
        )
        if v is not None and ok is not None and not isinstance(v, ok):
            raise ConfigError(f"{key}={v!r}: expected {kind}")
        if ok is int and isinstance(v, bool):
            raise ConfigError(f"{key}={v!r}: expected {kind}")
        kwargs[k] = v
    return cls(**kwargs)


def compose_preset(
    preset: str | None, overrides: list[str] = (), *, conf_dir: Path = CONF
) -> Config:
    """The validated `Config` of ``+experiment=<preset>`` (or the root config for None)."""
    root, _ = _read(conf_dir / "config.yaml")
    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text())["defaults"]
    choice = {k: v for e in defaults if isinstance(e, dict) for k, v in e.items() if k in GROUPS}
    exp, exp_choice = _read(conf_dir / "experiment" / f"{preset}.yaml") if preset else ({}, {})
    choice.update({k: v for k, v in exp_choice.items() if k in GROUPS})
    _, task_choice = _read(conf_dir / "task" / f"{choice['task']}.yaml")
    for group, option in task_choice.items():  # omniglot brings conv4, unless the preset chose
        if group in GROUPS and group not in exp_choice:
            choice[group] = option
    bodies = {g: _read(conf_dir / g / f"{choice[g]}.yaml")[0] for g in GROUPS}
    merged: dict[str, Any] = {}
    for part in (root, bodies["model"], bodies["task"], bodies["algo"], exp):
        _merge(merged, part)
    for item in overrides:
        _merge(merged, _parse_override(item))
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg
