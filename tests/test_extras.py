"""Optional features: each is an extra named after it, ``dev`` holds them all and the tools the
docs use, and a feature used without its extra fails in one line with the ``pip install``
command (checked with ``importlib.util.find_spec`` monkeypatched: nothing is uninstalled)."""

import importlib.util
import tomllib

import pytest
from conftest import REPO_ROOT

from experiments._hydra import check_command_line, check_extras
from metagrad._extras import EXTRAS, MissingExtraError, require_extra

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
OPTIONAL = PYPROJECT["project"]["optional-dependencies"]


def _names(requirements):
    return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


@pytest.fixture
def without(monkeypatch):
    """``without(*modules)``: make ``find_spec`` report those modules as not installed."""
    real = importlib.util.find_spec

    def hide(*modules):
        def find_spec(name, *args, **kwargs):
            return None if name in modules else real(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return hide


def test_every_optional_feature_is_an_extra_and_dev_holds_them_and_the_doc_tools():
    assert set(EXTRAS) <= set(OPTIONAL)
    (self_ref,) = [r for r in OPTIONAL["dev"] if r.startswith("metagrad[")]
    assert set(self_ref[len("metagrad[") : -1].split(",")) == set(EXTRAS)
    # notebooks/README.md's `jupytext --to ipynb --execute` runs nbconvert's ExecutePreprocessor
    # on the python3 kernel; tests/test_notebooks.py uses jupytext, nbformat (jupytext's) and
    # nbclient.
    assert {"pytest", "ruff", "jupytext", "nbconvert", "nbclient", "ipykernel"} <= _names(
        OPTIONAL["dev"]
    )
    assert "jupytext --to ipynb --execute" in (REPO_ROOT / "notebooks" / "README.md").read_text()


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_a_missing_extra_is_one_line_with_the_pip_command(extra, without):
    without(*EXTRAS[extra])
    with pytest.raises(MissingExtraError, match=rf"pip install 'metagrad\[{extra}\]'") as info:
        require_extra(extra, "the feature")
    assert str(info.value).startswith("the feature needs the optional extra")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv, extra, hidden",
    [
        (["-m", "hparams_search=sinusoid_optuna"], "optuna", "hydra_plugins.hydra_optuna_sweeper"),
        (["-m", "hydra/sweeper=optuna"], "optuna", "optuna"),
        (["-m", "hydra/launcher=slurm_gpu", "seed=0,1"], "slurm", "submitit"),
    ],
)
def test_cli_refuses_a_plugin_without_its_extra_before_hydra(argv, extra, hidden, without, capsys):
    without(hidden)
    with pytest.raises(SystemExit) as info:
        check_command_line(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {argv[1]} needs the optional extra {extra!r}")
    assert f"pip install 'metagrad[{extra}]'" in err


@pytest.mark.parametrize(
    "key, module", [("train.wandb", "wandb"), ("train.tensorboard", "tensorboardX")]
)
def test_cli_refuses_a_logger_without_its_extra_before_hydra(key, module, without, capsys):
    without(module)
    with pytest.raises(SystemExit) as info:
        check_command_line([f"{key}=true", "train.progress=false"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {key}=True: needs"), err
    assert "pip install 'metagrad[" in err


def test_with_the_extras_installed_the_plugins_pass_the_check():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    check_extras(["hparams_search=sinusoid_optuna", "hydra/launcher=slurm_gpu", "seed=1"])
