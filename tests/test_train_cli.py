"""The training loop and the Hydra CLI end to end, on tiny settings: files written, resume after
a real kill is bit-identical, bad input fails fast, a 2-point sweep and its summary."""

import json
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import OMNIGLOT_DIR, OMNIGLOT_MISSING, REPO_ROOT, SUBPROCESS_ENV, final_params

TINY = [
    "model.hidden=[16]",
    "train.steps=300",
    "train.chunk_steps=100",
    "train.eval_every=100",
    "train.checkpoint_every=100",
    "eval.tasks=20",
    "eval.val_tasks=10",
    "eval.curve_steps=3",
    "eval.query=20",
    "train.progress=false",
]
ENV = SUBPROCESS_ENV


def cli(script, *args, check=True, timeout=240):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ENV,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cli("train.py", *TINY, f"hydra.run.dir={run_dir}")
    return run_dir


def test_cli_writes_the_run_directory(tiny_run):
    for name in (
        ".hydra/config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "metrics.png",
        "run_info.json",
    ):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "checkpoints" / "last" / "300").is_dir()
    assert list((tiny_run / "checkpoints" / "best").iterdir())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in (
        "eval_loss_pre",
        "eval_loss_post",
        "eval_loss_post_ci95",
        "eval_loss_curve",
        "steps_per_sec",
    ):
        assert key in metrics
    assert (
        len(metrics["eval_loss_curve"]) == 4
        and metrics["eval_loss_curve"][0] == metrics["eval_loss_pre"]
    )
    assert metrics["eval_loss_post"] == metrics["eval_loss_curve"][1]  # post = inner.steps = 1
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [100, 200, 300]
    assert [r["step"] for r in records if r["kind"] == "val"] == [100, 200, 300]
    info = json.loads((tiny_run / "run_info.json").read_text())
    assert info["backend"] == "cpu" and info["packages"]["jax"] == jax.__version__


@pytest.mark.slow
def test_eval_script_reevaluates_without_retraining(tiny_run):
    before = (tiny_run / "metrics.json").read_text()
    proc = cli(
        "eval.py",
        f"run_dir={tiny_run}",
        "eval.shots=5",
        "eval.inner_steps=3",
        "eval.checkpoint=last",
    )
    out = json.loads(
        (tiny_run / "eval_eval.shots=5_eval.inner_steps=3_eval.checkpoint=last.json").read_text()
    )
    assert (
        out["eval_inner_steps"] == 3
        and out["checkpoint"] == "last"
        and out["checkpoint_step"] == 300
    )
    assert out["eval_loss_post"] == out["eval_loss_curve"][3]
    assert (tiny_run / "metrics.json").read_text() == before
    assert "eval_loss_post=" in proc.stdout


@pytest.mark.slow
def test_refuses_to_overwrite_a_run_without_resume(tiny_run):
    proc = cli("train.py", *TINY, f"hydra.run.dir={tiny_run}", check=False)
    assert proc.returncode == 2 and "train.resume=true" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "override,key",
    [
        ("inner.lr=oops", "inner.lr"),
        ("inner.steps=-1", "inner.steps"),
        ("task.shots=0", "task.shots"),
    ],
)
def test_bad_input_fails_before_compiling(tmp_path, override, key):
    proc = cli("train.py", override, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode != 0
    assert key in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


REFUSALS = [
    (
        ["algo=reptile", "algo.learn_lr=true"],
        "algo.learn_lr=true: Key 'learn_lr' not in 'ReptileConfig' (its keys: adapt_batchnorm)",
    ),
    (
        ["model=mlp", "model.channels=3"],
        "model.channels=3: Key 'channels' not in 'MLPConfig' (its keys: hidden)",
    ),
    (
        ["+train.stpes=5"],
        "+train.stpes=5: Key 'stpes' not in 'TrainLoopConfig'; did you mean train.steps?",
    ),
    (["inner.lr=inf"], "inner.lr=inf: must be >= 0 and finite"),
    (
        ["train.task_batching=0"],
        "train.task_batching='0': must be auto, vmap, map or a positive integer",
    ),
    (
        ["model.hidden=[0,40]"],
        "model.hidden=[0, 40]: every layer width must be a positive integer",
    ),
    (
        ["eval.checkpoint=worst"],
        "eval.checkpoint=worst: Invalid value 'worst', expected one of [best, last]",
    ),
]


# Two in the quick lane; each refusal is a ~2 s subprocess, so the rest run in the full one.
REFUSAL_PARAMS = [
    pytest.param(a, line, id=" ".join(a), marks=[pytest.mark.slow] if i >= 2 else [])
    for i, (a, line) in enumerate(REFUSALS)
]


@pytest.mark.parametrize("args,line", REFUSAL_PARAMS)
def test_refusal_is_one_line_naming_the_key_and_writes_nothing(tmp_path, args, line):
    proc = cli("train.py", *args, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: {line}"]
    assert not (tmp_path / "run").exists()  # refused before Hydra wrote .hydra/ there


@pytest.mark.slow
def test_readme_command_line_examples_compose_and_validate():
    """The README's "command line" block as typed, each train.py command as a dry run
    (``--cfg job``: composed and checked as for a run, nothing trained)."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("## The command line", 1)[1].split("```bash\n", 1)[1].split("```")[0]
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.strip()]
    train = [c[2:] for c in commands if c[:2] == ["python", "experiments/train.py"]]
    assert len(train) >= 3
    for args in train:
        proc = cli("train.py", *args, "--cfg", "job")
        assert proc.stdout.startswith("seed:"), args


@pytest.mark.slow
def test_every_job_of_a_sweep_is_checked_before_the_first_runs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "train.py",
        "-m",
        "seed=0,1",
        "inner.lr=0.01,oops",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: inner.lr=oops: Value 'oops' of type 'str' could not be converted to Float"
    ]
    assert not sweep.exists()


@pytest.mark.slow
def test_hydra_job_logging_disabled_runs(tmp_path):
    run = tmp_path / "run"
    cli(
        "train.py",
        "hydra/job_logging=disabled",
        "model.hidden=[8]",
        "train.steps=20",
        "train.chunk_steps=10",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "eval.tasks=10",
        "eval.val_tasks=10",
        "eval.figure=false",
        "train.progress=false",
        f"hydra.run.dir={run}",
    )
    assert (run / "metrics.json").is_file()
    assert not (run / "train.log").exists()  # Hydra's job log file handler is off


@pytest.mark.slow
def test_eval_script_names_the_bad_key(tiny_run):
    for arg, line in (
        (
            "eval.inner_steps=ten",
            "eval.inner_steps=ten: Value 'ten' of type 'str' could not be converted to Integer",
        ),
        ("eval.shots=0", "eval.shots=0: must be a positive integer or null"),
        ("eval.stepz=1", "eval.stepz=1: Key 'stepz' not in 'EvalConfig'"),
    ):
        proc = cli("eval.py", f"run_dir={tiny_run}", arg, check=False)
        assert proc.returncode == 2
        assert len(proc.stderr.splitlines()) == 1
        assert proc.stderr.startswith(f"error: {line}"), proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_bit_identically(tmp_path):
    args = [
        *TINY,
        "train.steps=600",
        "train.chunk_steps=50",
        "train.eval_every=600",
        "train.checkpoint_every=50",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    cli("train.py", *args, f"hydra.run.dir={full}")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "experiments" / "train.py"),
            *args,
            f"hydra.run.dir={killed}",
        ],
        cwd=REPO_ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last"
    deadline = time.time() + 180
    while time.time() < deadline and not (
        last.is_dir() and any(p.name.isdigit() and int(p.name) >= 150 for p in last.iterdir())
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "metrics.json").exists()
    cli("train.py", *args, "train.resume=true", f"hydra.run.dir={killed}")
    step_a, params_a = final_params(full)
    step_b, params_b = final_params(killed)
    assert step_a == step_b == 600
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_non_finite_run_stops_with_exit_1_and_writes_no_non_finite_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = cli("train.py", *TINY, "inner.lr=1e30", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 1 and re.search(r"(meta_loss|grad_norm) became", proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1
    last = run / "checkpoints" / "last"
    assert not last.exists() or not any(p.name.isdigit() for p in last.iterdir())


def _snapshot(run_dir):
    """Every file of a run directory, byte for byte."""
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "args,message",
    [
        (["inner.steps=-1"], "inner.steps=-1: must be >= 0"),
        pytest.param([], "already holds a run; pass train.resume=true", marks=pytest.mark.slow),
        pytest.param(
            ["train.resume=true", "inner.lr=0.05"],
            "would change the run .*inner.lr: 0.01 -> 0.05",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["train.resume=true", "model.hidden=[32]"],
            r"model.hidden: \[16\] -> \[32\]",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["train.resume=true", "algo=reptile"],
            "algo.name: 'maml' -> 'reptile'",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["train.resume=true", "train.steps=200"],
            "train.steps: 300 -> 200",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["bad-value", "no-resume", "resume-lr", "resume-model", "resume-algo", "fewer-steps"],
)
def test_refused_command_leaves_an_existing_run_byte_for_byte(tiny_run, args, message):
    before = _snapshot(tiny_run)
    proc = cli("train.py", *TINY, *args, f"hydra.run.dir={tiny_run}", check=False)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _snapshot(tiny_run) == before


@pytest.mark.slow
def test_resume_continues_the_saved_run_with_only_the_overrides_given(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = (run / ".hydra" / "config.yaml").read_bytes()
    # The README's resume command alone: the saved config (seed, model, steps) is the base.
    cli("train.py", "train.resume=true", "train.steps=400", f"hydra.run.dir={run}")
    assert (run / ".hydra" / "config.yaml").read_bytes() == config  # the run's own, unchanged
    (record,) = (run / ".hydra" / "resumes").glob("*/config.yaml")
    assert "steps: 400" in record.read_text() and "- 16" in record.read_text()
    step, _ = final_params(run)
    assert step == 400
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 400


def test_resume_of_a_directory_without_a_run_is_refused_and_creates_nothing(tmp_path):
    proc = cli("train.py", "train.resume=true", f"hydra.run.dir={tmp_path / 'typo'}", check=False)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stderr
    assert not (tmp_path / "typo").exists()


@pytest.mark.slow
def test_a_run_refused_after_hydra_started_leaves_no_directory(tmp_path):
    run = tmp_path / "run"
    args = ["task=omniglot", "model=conv4", f"task.data_dir={tmp_path / 'no-such'}"]
    proc = cli("train.py", *args, f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "Omniglot not found" in proc.stderr
    assert not run.exists()


@pytest.mark.slow
def test_two_point_sweep_and_summary(tmp_path):
    sweep = tmp_path / "sweep"
    cli(
        "train.py",
        "-m",
        "inner.lr=0.01,0.02",
        *TINY,
        "train.steps=100",
        "eval.figure=false",
        f"hydra.sweep.dir={sweep}",
    )
    proc = cli("summarize.py", str(sweep))
    assert (sweep / "summary.csv").is_file() and (sweep / "summary.txt").is_file()
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("setting,seeds,eval_loss_post_mean")
    values = [
        json.loads((sweep / str(i) / "metrics.json").read_text())["eval_loss_post"] for i in (0, 1)
    ]
    assert f"{values[0]:.4f}" in proc.stdout and f"{values[1]:.4f}" in proc.stdout


def test_summary_leaves_out_a_non_finite_run_with_a_warning(tmp_path):
    for i, (seed, value) in enumerate(((0, 0.5), (1, None), (2, 0.7))):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        (tmp_path / str(i) / "metrics.json").write_text(json.dumps({"eval_loss_post": value}))
    proc = cli("summarize.py", str(tmp_path))
    assert "1/metrics.json: eval_loss_post is null" in proc.stderr
    assert "(defaults)      2  0.6000 +- " in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(OMNIGLOT_DIR is None, reason=OMNIGLOT_MISSING)
def test_omniglot_cli_end_to_end_learns(tmp_path):
    run = tmp_path / "omniglot"
    cli(
        "train.py",
        "task=omniglot",
        f"task.data_dir={OMNIGLOT_DIR}",
        "model.channels=16",
        "task.query=5",
        "train.meta_batch_size=8",
        "train.steps=200",
        "train.chunk_steps=100",
        "train.eval_every=200",
        "train.checkpoint_every=200",
        "eval.tasks=100",
        "eval.val_tasks=20",
        "eval.figure=false",
        "train.progress=false",
        f"hydra.run.dir={run}",
        timeout=600,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval_acc_post"] >= 0.5  # chance is 0.2
    assert abs(metrics["eval_acc_pre"] - 0.2) < 0.1  # the head is not told the labels


@pytest.mark.slow
def test_ctrl_c_is_one_line_with_the_resume_command_and_the_resume_has_no_duplicates(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "train.steps=3000", "train.chunk_steps=50", "train.checkpoint_every=50"]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "experiments" / "train.py"),
            *args,
            f"hydra.run.dir={run}",
        ],
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run / "checkpoints" / "last"
    deadline = time.time() + 180
    while time.time() < deadline and not (
        last.is_dir() and any(p.name.isdigit() for p in last.iterdir())
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped: interrupted: checkpoint at step ")
    assert f"train.resume=true hydra.run.dir={run}" in lines[0]
    cli("train.py", *args, "train.resume=true", f"hydra.run.dir={run}")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == list(range(50, 3001, 50))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bit-flips", "no-checkpoint", "too-many-tasks"])
def test_eval_script_refuses_in_one_line(tiny_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = []
    if damage == "bit-flips":  # single-bit flips in best/'s array data: orbax reads them fine
        for path in (run / "checkpoints" / "best").rglob("*"):
            if path.is_file() and path.parent.name == "d":
                data = bytearray(path.read_bytes())
                data[len(data) // 2] ^= 0x01
                path.write_bytes(bytes(data))
        message = r"checkpoints/best/\d+ (is damaged|cannot be read)"
    elif damage == "no-checkpoint":
        shutil.rmtree(run / "checkpoints" / "best")
        message = "no 'best' checkpoint in"
    else:
        args, message = ["eval.tasks=1000000000"], "eval.tasks=1000000000: the test tasks need"
    proc = cli("eval.py", f"run_dir={run}", *args, check=False)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
