"""The image benchmarks through the command line, as a new user runs them: a tiny synthetic
mini-ImageNet copy in the pickle layout with split files of its own, trained on the device and
streamed from the host, and the refusals a careless user meets (one line, exit 2, nothing
written)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

SPLIT_CLASSES = {"train": 4, "val": 3, "test": 3}
PER_CLASS = 4


@pytest.fixture(scope="module")
def mini_copy(tmp_path_factory):
    """``mini-imagenet-cache-{split}.pkl`` of 4 + 3 + 3 classes x 4 random 84x84 images, and a
    split file per split (the standard lists would refuse so small a copy)."""
    root = tmp_path_factory.mktemp("mini_cli")
    rng = np.random.default_rng(0)
    n = 0
    for split, count in SPLIT_CLASSES.items():
        wnids = [f"n{n + i:08d}" for i in range(count)]
        n += count
        images = rng.integers(0, 256, (count * PER_CLASS, 84, 84, 3), np.uint8)
        rows = lambda i: list(range(i * PER_CLASS, (i + 1) * PER_CLASS))
        class_dict = {w: rows(i) for i, w in enumerate(wnids)}
        obj = {"image_data": images, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(obj, protocol=4))
        (root / f"{split}.txt").write_text("\n".join(wnids) + "\n")
    return root


def _task_args(root, cache):
    return [
        "task=miniimagenet",
        f"task.data_dir={root}",
        f"task.cache_dir={cache}",
        *(f"task.classes.{s}={root / f'{s}.txt'}" for s in SPLIT_CLASSES),
        f"task.images_per_class={PER_CLASS}",
        "task.ways=3",
        "task.query=1",
    ]


TINY = [
    "model.channels=4",
    "inner.steps=1",
    "train.steps=30",
    "train.meta_batch_size=2",
    "train.chunk_steps=10",
    "train.eval_every=30",
    "train.checkpoint_every=30",
    "train.progress=false",
    "eval.tasks=4",
    "eval.val_tasks=2",
    "eval.batch_size=2",
    "eval.query=1",
    "eval.inner_steps=1",
    "eval.curve_steps=1",
    "eval.figure=false",
]


def train(*args, check=True):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=SUBPROCESS_ENV,
        timeout=400,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["device", "host"])
def test_miniimagenet_runs_end_to_end_and_records_the_data(mini_copy, tmp_path, sampling):
    run = tmp_path / "run"
    args = [*_task_args(mini_copy, tmp_path / "cache"), *TINY, f"task.sampling={sampling}"]
    train(*args, f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 30
    assert 0.0 <= metrics["eval_acc_post"] <= 1.0
    data = json.loads((run / "run_info.json").read_text())["data"]
    assert data["dataset"] == "miniimagenet" and data["layout"] == "pickle"
    assert data["sampling"] == sampling
    assert data["classes"] == SPLIT_CLASSES
    assert data["images"] == {s: c * PER_CLASS for s, c in SPLIT_CLASSES.items()}
    assert len(data["fingerprint"]) == 64


def _refused(tmp_path, *args):
    run = tmp_path / "run"
    proc = train(*args, *TINY, f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert not run.exists()
    return lines[0]


def test_a_missing_data_folder_is_one_line(tmp_path):
    line = _refused(tmp_path, "task=miniimagenet", f"task.data_dir={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in line and "never downloads" in line


@pytest.mark.slow
def test_the_standard_split_refuses_a_small_copy_without_being_told(mini_copy, tmp_path):
    line = _refused(
        tmp_path, "task=miniimagenet", f"task.data_dir={mini_copy}", f"task.cache_dir={tmp_path}"
    )
    assert "mini-imagenet-cache-train.pkl" in line


@pytest.mark.slow
def test_more_ways_than_classes_is_one_line(mini_copy, tmp_path):
    args = _task_args(mini_copy, tmp_path / "cache")
    line = _refused(tmp_path, *args, "task.ways=5")
    assert "ways=5" in line and "4 classes" in line


@pytest.mark.slow
def test_folder_without_split_files_is_one_line(tmp_path):
    line = _refused(tmp_path, "task=folder", f"task.data_dir={tmp_path}")
    assert line.startswith("error: task.classes.train=null: task=folder needs a split file")
