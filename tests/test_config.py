"""Hydra configs through the compose API and the typed `Config` in Python: every group option
composes into its own dataclass; keys of other options, bad Enum values and out-of-range values
fail naming the key; precedence is root < model < task < algo < +experiment < command line;
``Config()`` is the CLI's default run; presets are diffs over one protocol file per task."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from experiments._hydra import compose_config, to_config  # registers the schemas
from metagrad.experiment import config as C
from metagrad.experiment.config import Config, ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _typed(overrides):
    cfg = to_config(_compose(overrides))
    validate(cfg)
    return cfg


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_option_has_its_dataclass():
    for group, options in C.GROUP_OPTIONS.items():
        assert _options(group) == sorted(options), group


@pytest.mark.parametrize("algo", _options("algo"))
@pytest.mark.parametrize("task", _options("task"))
def test_every_task_and_algo_composes_and_validates(task, algo):
    if task == "sinusoid" and C.ALGOS[algo].EMBEDDING:  # classification only: refused
        with pytest.raises(ConfigError, match=f"algo={algo}: fits a classifier"):
            _typed([f"task={task}", f"algo={algo}"])
        return
    cfg = _typed([f"task={task}", f"algo={algo}"])
    assert cfg.task.name == task and cfg.algo.name == algo
    assert type(cfg.task) is C.TASKS[task] and type(cfg.algo) is C.ALGOS[algo]


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_composes(model):
    task = "sinusoid" if model.startswith("mlp") else "omniglot"
    cfg = _typed([f"task={task}", f"model={model}"])
    assert cfg.model.name == model and type(cfg.model) is C.MODELS[model]


@pytest.mark.parametrize("group", sorted(C.GROUP_OPTIONS))
def test_option_files_hold_no_second_copy_of_the_dataclass_defaults(group):
    """conf/<group>/<option>.yaml selects its schema; the values are the dataclass's."""
    for name, cls in C.GROUP_OPTIONS[group].items():
        overrides = [f"{group}={name}"]
        if group == "model" and not name.startswith("mlp"):
            overrides.append("task=omniglot")
        if group == "algo" and cls.EMBEDDING:  # classification only
            overrides.append("task=omniglot")
        assert getattr(_typed(overrides), group) == cls(), name


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_preset_composes(experiment):
    _typed([f"+experiment={experiment}"])


def test_default_config_equals_the_cli_default_composition():
    composed, default = OmegaConf.to_object(_compose([])), Config()
    for f in dataclasses.fields(Config):  # field by field, for a readable failure
        assert getattr(composed, f.name) == getattr(default, f.name), f.name
    assert composed == default


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


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize(
    "protocol,presets",
    [
        ("sinusoid", [p for p in _options("experiment") if p.endswith("_sinusoid")]),
        (
            "maml_omniglot",
            [p for p in _options("experiment") if p.startswith("maml_omniglot_")]
            + ["omniglot_5w1s_cpu"],
        ),
        (
            "maml_miniimagenet",
            [
                p
                for p in _options("experiment")
                if p.split("_")[0] in ("maml", "fomaml")
                and p.split("_")[1] in ("miniimagenet", "cifarfs", "fc100", "tiered")
            ],
        ),
        (
            "baselines_miniimagenet",
            [
                p
                for p in _options("experiment")
                if p.split("_")[0] in ("protonet", "r2d2", "svm", "finetune", "rfs")
                and p.split("_")[1] in ("miniimagenet", "cifarfs")
            ],
        ),
        (
            "protonet_omniglot",
            [p for p in _options("experiment") if p.startswith("protonet_omniglot_")],
        ),
    ],
)
def test_presets_are_diffs_over_one_protocol_file(protocol, presets):
    """Each preset includes conf/protocol/<task>.yaml and states exactly the keys it changes."""
    assert len(presets) >= 2
    for preset in presets:
        text = yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text())
        assert text["defaults"][0] == f"/protocol/{protocol}", preset
        stated = _flat({k: v for k, v in text.items() if k != "defaults"})
        # Another task or model ("override /task: cifarfs") is compared with the protocol on it.
        groups = [
            f"{k.removeprefix('override /')}={v}"
            for e in text["defaults"][1:]
            if isinstance(e, dict)
            for k, v in e.items()
            if k in ("override /task", "override /model")
        ]
        cfg = OmegaConf.to_container(_compose([f"+experiment={preset}"]))
        base = OmegaConf.to_container(
            _compose([f"+protocol={protocol}", f"algo={cfg['algo']['name']}", *groups])
        )
        changed = {k for k, v in _flat(cfg).items() if _flat(base).get(k) != v}
        assert set(stated) == changed, preset  # nothing restated, nothing changed unsaid
        assert all(_flat(cfg)[k] == v for k, v in stated.items()), preset


def test_wrong_type_is_rejected_by_the_schema_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["inner.lr=oops"])
    assert "inner.lr" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["algo=reptile", "algo.learn_lr=true"], "algo.learn_lr"),
        (["model=mlp", "model.channels=3"], "model.channels"),
        (["task=sinusoid", "task.ways=3"], "task.ways"),
        (["algo=maml", "algo.reg=2.0"], "algo.reg"),
        (["algo=metasgd", "algo.learn_lr=false"], "algo.learn_lr"),
        (["task=omniglot", "model=conv4", "model.hidden=[8]"], "model.hidden"),
    ],
)
def test_a_key_of_another_option_fails_at_compose_naming_it(overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(overrides)
    assert info.value.__cause__.full_key == key
    with pytest.raises(ConfigError, match=rf"^{key}=\S+: Key '\w+' not in '\w+Config'"):
        compose_config(overrides)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["task=omniglot", "model.downsample=avgpool"], "model.downsample"),
        (["task=omniglot", "model.conv_impl=cudnn"], "model.conv_impl"),
        (["task=omniglot", "model.bn_policy=batch"], "model.bn_policy"),
        (["model=mlp_quant", "model.quantizer=nf4"], "model.quantizer"),
        (["task=omniglot", "task.split=random"], "task.split"),
        (["algo=imaml", "algo.curvature=fisher"], "algo.curvature"),
        (["outer.optimizer=rmsprop"], "outer.optimizer"),
        (["outer.schedule=step"], "outer.schedule"),
        (["eval.checkpoint=worst"], "eval.checkpoint"),
    ],
)
def test_enum_choices_are_checked_at_compose(overrides, key):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(overrides)
    assert info.value.__cause__.full_key == key
    with pytest.raises(ConfigError, match=rf"^{key}=\S+: Invalid value"):
        compose_config(overrides)


@pytest.mark.parametrize(
    "override,key",
    [
        ("inner.steps=-1", "inner.steps"),
        ("task.shots=0", "task.shots"),
        ("train.eval_every=123", "train.eval_every"),
        ("algo=imaml algo.reg=0", "algo.reg"),
        ("eval.checkpoint=worst", "eval.checkpoint"),
        # issue 19: values that got past validation, or ended in a traceback
        ("inner.lr=inf", "inner.lr"),
        ("inner.lr=nan", "inner.lr"),
        ("outer.lr=inf", "outer.lr"),
        ("algo=imaml algo.cg_iters=0", "algo.cg_iters"),
        ("algo=imaml algo.damping=-1", "algo.damping"),
        ("outer.min_lr_ratio=-0.1", "outer.min_lr_ratio"),
        ("outer.min_lr_ratio=1.5", "outer.min_lr_ratio"),
        ("algo.per_step_lr=true inner.steps=0", "inner.steps"),
        ("train.task_batching=0", "train.task_batching"),
        ("train.task_batching=many", "train.task_batching"),
        ("model.hidden=[0,40]", "model.hidden"),
        ("model.hidden=[-5,40]", "model.hidden"),
        (f"seed={2**63}", "seed"),
        ("seed=-1", "seed"),
        ("algo.name=reptile", "algo.name"),
        ("model=mlp_quant model.quantizer=ternary", "model.weight_bits"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        compose_config(override.split())


def test_plus_key_typos_are_refused_like_plain_typos():
    for prefix in ("", "+", "++"):
        with pytest.raises(ConfigError) as info:
            compose_config([f"{prefix}train.stpes=5"])
        assert str(info.value) == (
            f"{prefix}train.stpes=5: Key 'stpes' not in 'TrainLoopConfig'; "
            "did you mean train.steps?"
        )
    with pytest.raises(ConfigError, match=r"^\+foo=1: Key 'foo' not in 'Config'"):
        compose_config(["+foo=1"])


def test_model_must_fit_the_task():
    with pytest.raises(ConfigError, match="model.name"):
        compose_config(["task=omniglot", "model=mlp"])


def test_per_step_batch_norm_needs_an_algorithm_that_passes_the_step():
    with pytest.raises(ConfigError, match=r"^model.bn_policy='per_step'.*reptile"):
        compose_config(["task=omniglot", "algo=reptile", "model.bn_policy=per_step"])
    compose_config(["task=omniglot", "algo=mamlpp", "model.bn_policy=per_step"])


def test_python_configs_check_ranges_at_construction_and_again_in_validate():
    with pytest.raises(ConfigError, match=r"^model.hidden=\[0, 40\]: "):
        C.MLPConfig(hidden=[0, 40])
    with pytest.raises(ConfigError, match=r"^model.downsample='avgpool': must be one of"):
        C.Conv4Config(downsample="avgpool")
    assert C.Conv4Config(downsample="maxpool").downsample is C.Downsample.maxpool
    cfg = Config()
    cfg.inner.lr = math.inf  # set after construction: validate checks again
    with pytest.raises(ConfigError, match=r"^inner.lr=inf: "):
        validate(cfg)
    cfg.inner.lr, cfg.outer.schedule = 0.01, "sawtooth"
    with pytest.raises(ConfigError, match=r"^outer.schedule='sawtooth': "):
        validate(cfg)
    cfg.outer.schedule, cfg.train.steps = "cosine", "ten"  # a value of the wrong type
    with pytest.raises(ConfigError, match=r"^train.steps='ten': "):
        validate(cfg)
    cfg.train.steps, cfg.algo = 100, C.ReptileConfig()
    cfg.inner.steps = 0
    with pytest.raises(ConfigError, match=r"^inner.steps=0: reptile needs at least one step"):
        validate(cfg)


def test_validate_takes_the_typed_config_only():
    with pytest.raises(TypeError, match="OmegaConf.to_object"):
        validate(_compose([]))


def test_each_algorithm_builds_its_registry_estimator():
    import jax

    from metagrad.experiment.build import build_estimator, build_model, initial_meta_params

    for name, algo in C.ALGOS.items():
        if algo.EMBEDDING:  # classification only, over a head-less Conv4
            cfg = Config(task=C.OmniglotConfig(), model=C.Conv4Config(channels=4), algo=algo())
        else:
            cfg = Config(model=C.MLPConfig(hidden=[4]), algo=algo())
        validate(cfg)
        model = build_model(cfg, jax.random.key(0))
        assert build_estimator(cfg, model).name == name
        if name == "finetune":  # its classifier covers the data's classes: needs the data
            continue
        meta = initial_meta_params(cfg, model)
        assert (meta.lr is not None) == cfg.algo.learns_lr
        assert ("backbone" in meta.params) == (name in ("r2d2", "svm"))  # beside learned heads


def test_auto_task_batching_follows_the_model_on_cpu():
    from metagrad.experiment.build import resolve_task_batching

    assert resolve_task_batching(_typed(["task=omniglot"])) == "map"  # Conv4
    assert resolve_task_batching(_typed([])) == "vmap"  # the sinusoid MLP
    assert resolve_task_batching(_typed(["task=omniglot", "train.task_batching=3"])) == 3


def test_a_sweeps_jobs_cover_every_value_of_every_swept_key():
    from experiments._hydra import jobs_of

    assert jobs_of(["seed=0,1", "x=1"], multirun=False) == [["seed=0,1", "x=1"]]
    assert jobs_of(["seed=0,1,2", "+a=5,10", "b=1", "c=interval(0,1)"], multirun=True) == [
        ["seed=0", "+a=5", "b=1"],
        ["seed=1", "+a=5", "b=1"],
        ["seed=2", "+a=5", "b=1"],
        ["seed=0", "+a=10", "b=1"],
    ]  # interval(...) is the sweeper's to draw
