"""Hydra configs through the compose API: every group option composes and validates; precedence
is root < model < task < algo < +experiment < command line; bad values name their key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from metagrad.experiment.config import Config, ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
ConfigStore.instance().store(name="base_config", node=Config)


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("algo", _options("algo"))
@pytest.mark.parametrize("task", _options("task"))
def test_every_task_and_algo_composes_and_validates(task, algo):
    cfg = _compose([f"task={task}", f"algo={algo}"])
    validate(cfg)
    assert cfg.task.name == task and cfg.algo.name == algo


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(model):
    task = "sinusoid" if model.startswith("mlp") else "omniglot"
    cfg = _compose([f"task={task}", f"model={model}"])
    validate(cfg)
    assert cfg.model.name == model


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    validate(cfg)


def test_hparams_search_preset_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hparams_search=sinusoid_optuna"],
            return_hydra_config=True,
        )
    assert cfg.hydra.sweeper.direction == "minimize"
    assert set(cfg.hydra.sweeper.params) == {"inner.lr", "outer.lr"}


def test_precedence_task_brings_its_model_and_command_line_wins():
    cfg = _compose(["task=omniglot"])
    assert cfg.model.name == "conv4" and cfg.inner.lr == 0.4 and cfg.task.ways == 5
    cfg = _compose(["task=omniglot", "task.shots=5"])
    assert cfg.task.shots == 5 and cfg.task.ways == 5 and cfg.inner.lr == 0.4  # only that key
    cfg = _compose(["+experiment=maml_sinusoid", "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.train.meta_batch_size == 25
    cfg = _compose(["algo=mamlpp"])  # an algo file may set outer nodes; it beats the task file
    assert cfg.outer.schedule == "cosine"


def test_paper_settings_of_the_sinusoid_preset():
    cfg = _compose(["+experiment=maml_sinusoid"])
    assert (cfg.train.steps, cfg.train.meta_batch_size, cfg.task.shots) == (70_000, 25, 10)
    assert (cfg.inner.steps, cfg.inner.lr, cfg.outer.lr, cfg.outer.optimizer) == (
        1,
        0.01,
        0.001,
        "adam",
    )


def test_wrong_type_is_rejected_by_the_schema_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["inner.lr=oops"])
    assert "inner.lr" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "override,key",
    [
        ("inner.steps=-1", "inner.steps"),
        ("task.shots=0", "task.shots"),
        ("train.eval_every=123", "train.eval_every"),
        ("algo.reg=0", "algo.reg"),
        ("eval.checkpoint=worst", "eval.checkpoint"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        validate(_compose([override]))


def test_model_must_fit_the_task():
    with pytest.raises(ConfigError, match="model.name"):
        validate(_compose(["task=omniglot", "model=mlp"]))


def test_auto_task_batching_follows_the_model_on_cpu():
    from metagrad.experiment.build import resolve_task_batching

    assert resolve_task_batching(_compose(["task=omniglot"])) == "map"  # Conv4
    assert resolve_task_batching(_compose([])) == "vmap"  # the sinusoid MLP
    assert resolve_task_batching(_compose(["task=omniglot", "train.task_batching=3"])) == 3
