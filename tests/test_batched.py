"""Many runs in one compiled program (metagrad.experiment.batched): each run's parameters, logs
and test metrics equal the same run trained alone, to float32 rounding; resume, divergence of
one run, grouping and the CLI sweep that batches."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV, disk_full_at_step, final_params

from metagrad.experiment.batched import (
    BATCHABLE,
    RunGroup,
    group_runs,
    program_key,
    train_batched,
    with_values,
)
from metagrad.experiment.checkpoint import Checkpoints
from metagrad.experiment.config import Config
from metagrad.experiment.loop import DiskFull, Experiment, NonFiniteLoss, train

# vmap over runs changes how XLA orders some float32 reductions (the batched matmuls), so a run
# of a batched program is not bit-identical to the run alone: after 20 meta-steps its parameters
# agree to this relative bound (measured: about 1e-7), its metrics the same.
RTOL = 2e-5


def tiny(seed=0, inner_lr=0.01, outer_lr=1e-3, steps=20):
    cfg = Config()
    cfg.seed, cfg.inner.lr, cfg.outer.lr = seed, inner_lr, outer_lr
    cfg.model.hidden = [8]
    t = cfg.train
    t.steps, t.chunk_steps, t.eval_every, t.checkpoint_every = steps, 10, 10, 10
    t.meta_batch_size, t.progress, t.compile_cache = 4, False, False
    e = cfg.eval
    e.tasks, e.val_tasks, e.curve_steps, e.query, e.figure = 8, 8, 1, 10, False
    return cfg


POINTS = [(0, 0.01, 1e-3), (1, 0.03, 1e-3), (2, 0.01, 3e-3)]  # seed, inner.lr, outer.lr


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assert_close_runs(a, b):
    step_a, params_a = final_params(a)
    step_b, params_b = final_params(b)
    assert step_a == step_b
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-7)
    for kind in ("train", "val"):
        ra, rb = records(a, kind), records(b, kind)
        assert [r["step"] for r in ra] == [r["step"] for r in rb]
        for x, y in zip(ra, rb, strict=True):
            for k, v in x.items():
                if isinstance(v, float) and k != "seconds":
                    np.testing.assert_allclose(v, y[k], rtol=RTOL, err_msg=k)
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    for k in ("eval_loss_pre", "eval_loss_post", "val_objective"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=RTOL, err_msg=k)
    assert ma["checkpoint_step"] == mb["checkpoint_step"]


@pytest.fixture(scope="module")
def separate_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    dirs = [root / str(i) for i in range(len(POINTS))]
    for p, d in zip(POINTS, dirs, strict=True):
        train(tiny(*p), d)
    return dirs


@pytest.mark.slow
def test_batched_runs_equal_separate_runs_also_across_a_resume(tmp_path, separate_runs):
    dirs = [tmp_path / str(i) for i in range(len(POINTS))]
    # Half the steps, then a resume of the whole group to the end: as the runs alone did at once.
    first = train_batched([tiny(*p, steps=10) for p in POINTS], dirs)
    assert [r["parallel_runs"] for r in first] == [3, 3, 3]
    resumed = [tiny(*p) for p in POINTS]
    for cfg in resumed:
        cfg.train.resume = True
    results = train_batched(resumed, dirs)
    assert [r["train_steps"] for r in results] == [20, 20, 20]
    for a, b in zip(dirs, separate_runs, strict=True):
        assert_close_runs(a, b)
    # The runs differ: each trained with its own seed and rates, not one run's copy.
    p0, p1 = final_params(dirs[0])[1], final_params(dirs[1])[1]
    assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(p1)[0])
    for d in dirs:  # the usual layout, so that summarize.py and eval.py read them
        assert {"metrics.json", "metrics.jsonl", "run_info.json", "checkpoints"} <= {
            p.name for p in d.iterdir()
        }


@pytest.mark.slow
def test_a_diverging_run_stops_alone_and_is_named(tmp_path, separate_runs):
    dirs = [tmp_path / "good", tmp_path / "bad"]
    cfgs = [tiny(*POINTS[0]), tiny(0, 1e6, 1e-3)]  # an inner rate that blows up at once
    with pytest.raises(NonFiniteLoss, match=r"1 of 2 runs stopped \(.*bad: "):
        train_batched(cfgs, dirs)
    assert_close_runs(dirs[0], separate_runs[0])  # the healthy run finished, unaffected
    assert not (dirs[1] / "metrics.json").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_group_resumes(tmp_path, separate_runs, monkeypatch):
    dirs = [tmp_path / str(i) for i in range(2)]
    disk_full_at_step(monkeypatch, 20)
    with pytest.raises(DiskFull, match=r"no space left.*kept in .*train.resume=true"):
        train_batched([tiny(*p) for p in POINTS[:2]], dirs)
    monkeypatch.undo()
    resumed = [tiny(*p) for p in POINTS[:2]]
    for cfg in resumed:
        cfg.train.resume = True
    train_batched(resumed, dirs)  # from each run's checkpoint at step 10
    for a, b in zip(dirs, separate_runs[:2], strict=True):
        assert_close_runs(a, b)


def test_a_refused_group_writes_nothing(tmp_path):
    (tmp_path / "kept" / "checkpoints").mkdir(parents=True)  # someone's run, without resume
    Checkpoints(tmp_path / "kept").save_last(0, {"x": np.zeros(2)})
    dirs = [tmp_path / "new", tmp_path / "kept"]
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_batched([tiny(0), tiny(1)], dirs)
    assert not (tmp_path / "new").exists()
    assert {p.name for p in (tmp_path / "kept").iterdir()} - {".lock"} == {"checkpoints"}


def test_runs_that_differ_in_a_shape_are_refused_as_one_program():
    a, b = tiny(), tiny()
    b.inner.steps = 2
    with pytest.raises(ValueError, match="use group_runs"):
        train_batched([a, b], ["never/a", "never/b"])
    assert group_runs([a, b]) == [[0], [1]]


def test_groups_respect_parallel_runs_and_what_cannot_batch():
    cfgs = [tiny(seed) for seed in range(5)]
    for c in cfgs:
        c.train.parallel_runs = 2
    cfgs[4].train.profile_steps = [0, 1]
    assert group_runs(cfgs) == [[0, 1], [2, 3], [4]]
    assert program_key(tiny(0, 0.5, 0.1)) == program_key(tiny(3))


def _imaml():
    from metagrad.experiment.config import IMAMLConfig

    return IMAMLConfig(reg=2.0, cg_iters=3)


def _mamlpp():
    from metagrad.experiment.config import MAMLppConfig

    return MAMLppConfig(msl_anneal_steps=4)


@pytest.mark.parametrize(
    "algo, key, value, other",
    [
        pytest.param(_imaml, "algo.reg", 2.0, 8.0, marks=pytest.mark.slow),
        pytest.param(_mamlpp, "algo.msl_anneal_steps", 4, 100, marks=pytest.mark.slow),
    ],
    ids=["imaml_reg", "mamlpp_msl_anneal_steps"],
)
def test_traced_values_build_the_same_update_as_constants(algo, key, value, other):
    """The learner built from traced values (inside the program) is the learner of the config
    with those values: one meta-step agrees, with the algorithm's own batchable key traced too
    (iMAML's L2 term; MAML++'s annealing, at meta-step 2 where its weights depend on it)."""
    from metagrad.outer import meta_learner

    assert key in BATCHABLE
    cfg = tiny(inner_lr=0.05)
    cfg.inner.steps, cfg.algo = 2, algo()
    exp = Experiment.from_config(cfg)
    group = RunGroup(exp, [cfg], [], [], [], np.zeros(1), {})
    tasks = exp.source.sample_train(None, jax.random.key(3), 4)
    concrete = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False)
    state = concrete.init(exp.meta_params)._replace(step=jax.numpy.asarray(2, jax.numpy.int32))
    want, _ = jax.jit(concrete.update)(state, tasks)

    @jax.jit
    def traced(values, state, tasks):
        return group.learner_for(values).update(state, tasks)

    got, _ = traced({"inner.lr": 0.05, key: value, "outer.lr": 1e-3}, state, tasks)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
    moved, _ = traced({"inner.lr": 0.05, key: other, "outer.lr": 1e-3}, state, tasks)
    pairs = zip(jax.tree.leaves(moved.meta_params), jax.tree.leaves(got.meta_params), strict=True)
    differ = [not np.allclose(x, y, rtol=1e-6, atol=1e-8) for x, y in pairs]
    assert any(differ), f"{key}={other} gave the update of {key}={value}"
    assert _get_key(with_values(cfg, {key: other}), key) == other and _get_key(cfg, key) == value


def _get_key(cfg, key):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.slow
def test_cli_sweep_trains_its_points_in_one_program(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1",
        "inner.lr=0.01,0.02",
        "model.hidden=[8]",
        "train.steps=20",
        "train.chunk_steps=10",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "train.meta_batch_size=4",
        "train.progress=false",
        "train.compile_cache=false",
        "eval.tasks=8",
        "eval.val_tasks=8",
        "eval.curve_steps=1",
        "eval.figure=false",
        f"hydra.sweep.dir={sweep}",
    ]

    def run(script, *argv):
        return subprocess.run(
            [sys.executable, str(REPO_ROOT / "experiments" / script), *argv],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=SUBPROCESS_ENV,
            timeout=300,
        )

    proc = run("train.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert "4 runs in one compiled program" in proc.stdout
    assert proc.stdout.count("(each of 4 runs in one program)") == 4
    for i in range(4):
        assert (sweep / str(i) / ".hydra" / "config.yaml").is_file()
        assert json.loads((sweep / str(i) / "metrics.json").read_text())["parallel_runs"] == 4
    summary = run("summarize.py", str(sweep))
    assert summary.returncode == 0, summary.stderr
    rows = [line.split() for line in summary.stdout.splitlines() if "inner.lr=" in line]
    # one row per learning rate, each the mean of its two seeds
    assert sorted(r[0] for r in rows) == ["inner.lr=0.01", "inner.lr=0.02"], summary.stdout
    assert all(r[r.index("+-") - 2] == "2" for r in rows), summary.stdout
    again = run("train.py", *args[:-1], "train.steps=30", "train.resume=true", args[-1])
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in records(sweep / "3", "train")] == [10, 20, 30]


def test_a_refused_sweep_leaves_no_folder(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "experiments" / "train.py"),
            "-m",
            "seed=0,1",
            "task=omniglot",
            "model=conv4",
            f"task.data_dir={tmp_path / 'no-such'}",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        timeout=120,
    )
    assert proc.returncode == 2 and "Omniglot not found" in proc.stderr
    assert not sweep.exists()
