"""The optional extras: which package each optional feature needs, and the one-line error that
names the ``pip install`` command when it is missing (checked with ``importlib.util.find_spec``,
so nothing is imported just to ask)."""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    "equinox": ("equinox",),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
    "tensorboard": ("tensorboardX",),
    "wandb": ("wandb",),
}
"""Extra name (``pip install 'metagrad[NAME]'``) -> the importable modules it provides."""


class MissingExtraError(ImportError):
    """An optional feature was used without its extra installed."""


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when it is installed).

    Example:
        >>> missing_modules("equinox") in ([], ["equinox"])
        True
    """
    return [m for m in EXTRAS[extra] if not _importable(m)]


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` (one line, with the pip command) unless ``extra`` is
    installed; ``feature`` says what asked for it (a config key, a function).

    Example:
        >>> require_extra("tensorboard", "train.tensorboard=true")  # installed: returns None
    """
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the optional extra {extra!r} (no module {missing[0]!r}): "
            f"pip install 'metagrad[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
