"""A run directory nothing can corrupt (issue 19), through the library's `train`: one writer,
whole log lines, verified checkpoints with fall-back, divergence, standard JSON, refusals that
leave nothing behind, the memory estimate, and a verified Omniglot cache."""

import errno
import json
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import disk_full_at_step

from metagrad.experiment import Config, NonFiniteLoss, train
from metagrad.experiment.checkpoint import CheckpointError, Checkpoints
from metagrad.experiment.chunks import MemoryEstimateError
from metagrad.experiment.loop import DiskFull
from metagrad.experiment.runlog import RunDirLocked, RunLog, read_log


def tiny(steps=40, **train_kw):
    cfg = Config()
    cfg.model.hidden = [8]
    cfg.train.steps, cfg.train.chunk_steps = steps, 10
    cfg.train.eval_every, cfg.train.checkpoint_every = steps, 10
    cfg.train.meta_batch_size, cfg.train.progress = 4, False
    cfg.eval.tasks, cfg.eval.val_tasks, cfg.eval.curve_steps, cfg.eval.figure = 8, 4, 1, False
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def last_state(run_dir):
    ckpt = Checkpoints(run_dir)
    step = ckpt.latest_step()
    item = ckpt.last.restore(step)
    ckpt.close()
    return step, jax.tree.leaves(item["state"])


def strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run to compare resumed runs with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(tiny(), run_dir)
    return run_dir


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from metagrad.experiment.runlog import RunLock;"
            f"lock = RunLock({str(run_dir)!r}).acquire(); print('held', flush=True);"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid} on "):
            train(tiny(), run_dir)
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train(tiny(steps=10), run_dir)  # the OS released the lock with the process


def test_resume_without_a_run_is_an_error_and_leaves_nothing(tmp_path):
    cfg = tiny(resume=True)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to resume"):
        train(cfg, tmp_path / "mistyped")
    assert not (tmp_path / "mistyped").exists()


@pytest.mark.slow
def test_kill_between_best_and_last_save_resumes_bit_identically(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "last" / "40")  # best/40 written, last/40 not
    (run_dir / "metrics.json").unlink()
    train(tiny(resume=True), run_dir)
    (step_a, a), (step_b, b) = last_state(reference), last_state(run_dir)
    assert step_a == step_b == 40
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    steps = [r["step"] for r in read_log(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "duplicate records after resume"


def _data_files(folder):
    """Every file of an orbax checkpoint but metagrad's checksums (array data and metadata)."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "checksums.json"]
    return [p for p in files if p.stat().st_size > 64]


@pytest.mark.parametrize("damage", ["truncate", pytest.param("flip", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, reference, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.json").unlink()
    for path in _data_files(run_dir / "checkpoints" / "last" / "40"):
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            for i in range(0, len(data), max(len(data) // 8, 1)):
                data[i] ^= 0x10
            path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"last/40.*newest intact checkpoint.*last/30"):
        train(tiny(resume=True), run_dir)
    (_, a), (_, b) = last_state(reference), last_state(run_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_flipped_bits_in_a_checkpoint_are_an_error_naming_it(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    ckpt = Checkpoints(run_dir)
    template = ckpt.last.restore(ckpt.latest_step())["state"]
    # Single-bit flips in the array data only (orbax's ocdbt data files), which orbax itself
    # restores without complaint.
    data_files = [p for p in _data_files(run_dir / "checkpoints" / "best") if "d" == p.parent.name]
    assert data_files
    for path in data_files:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoints/best/40"):
        ckpt.restore(template, which="best")
    ckpt.close()


def test_non_finite_run_keeps_no_non_finite_checkpoint_and_writes_standard_json(tmp_path):
    cfg = tiny()
    cfg.inner.lr = 1e30
    with pytest.raises(NonFiniteLoss, match="became"):
        train(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last"
    if last.exists() and any(last.iterdir()):
        _, leaves = last_state(tmp_path / "run")
        assert all(np.isfinite(x).all() for x in leaves)
    log = tmp_path / "run" / "metrics.jsonl"
    for line in log.read_text().splitlines() if log.exists() else []:
        strict_json(line)


@pytest.mark.slow
def test_disk_full_while_logging_stops_with_one_line_then_resumes_cleanly(
    tmp_path, reference, monkeypatch
):
    run_dir = tmp_path / "run"
    written = []
    original = RunLog.write

    def write(self, record):
        if len(written) == 2:  # the third record: half a line, then the disk is full
            with self.path.open("a") as f:
                f.write('{"step": 30, "kind": "tr')
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(record)
        original(self, record)

    monkeypatch.setattr(RunLog, "write", write)
    with pytest.raises(DiskFull, match=r"no space left.*kept.*train.resume=true"):
        train(tiny(), run_dir)
    monkeypatch.setattr(RunLog, "write", original)
    with pytest.warns(UserWarning, match="torn last line"):
        train(tiny(resume=True), run_dir)
    records = [strict_json(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [10, 20, 30, 40]
    strict_json((run_dir / "metrics.json").read_text())
    (_, a), (_, b) = last_state(reference), last_state(run_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_memory_estimate_refuses_a_huge_meta_batch_before_the_first_step(tmp_path):
    cfg = tiny(meta_batch_size=10**6)
    cfg.model.hidden = [40, 40]  # the default model: XLA estimates ~31 GiB for one chunk
    cfg.train.chunk_steps = cfg.train.eval_every = cfg.train.checkpoint_every = 10
    tic = time.perf_counter()
    with pytest.raises(MemoryEstimateError, match=r"needs about .* GiB .* train.memory_check"):
        train(cfg, tmp_path / "run")
    assert time.perf_counter() - tic < 120
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_memory_check_refuses_a_test_set_that_cannot_fit_before_compiling(tmp_path):
    cfg = tiny()
    cfg.eval.tasks = 10**9  # 10^9 tasks x 110 points x (x, y) x 4 bytes: about 820 GiB
    with pytest.raises(MemoryEstimateError, match=r"eval.tasks=1000000000: the test tasks need"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_bit_flipped_omniglot_cache_is_rebuilt_with_a_warning(tmp_path):
    from test_omniglot_data import assert_same_data, synthetic_release, write_zips

    from metagrad.tasks.omniglot_io import load_omniglot

    files, expected = synthetic_release(drawings=20)
    data_dir = write_zips(tmp_path / "data", files)
    load_omniglot(data_dir, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "omniglot").glob("*.npz")
    data = bytearray(cached.read_bytes())
    for i in range(len(data) // 3, len(data), len(data) // 5):  # a few flipped bits
        data[i] ^= 0x04
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="cache .* is damaged; rebuilding"):
        assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)
    assert_same_data(load_omniglot(data_dir, cache_dir=tmp_path / "cache"), expected)  # rebuilt


def test_kill_inside_a_save_leaves_a_resumable_run(tmp_path, reference):
    """A save cut short leaves orbax's temporary folder (and possibly no checksums yet)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.json").unlink()
    last = run_dir / "checkpoints" / "last"
    shutil.copytree(last / "40", last / "40.orbax-checkpoint-tmp-1234")  # a write in progress
    shutil.rmtree(last / "40")
    (last / "30" / "checksums.json").unlink()  # the save of 30 was cut before its checksums
    with pytest.warns(UserWarning, match="last/30 has no checksums.json"):
        train(tiny(resume=True), run_dir)
    (_, a), (_, b) = last_state(reference), last_state(run_dir)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch
):
    disk_full_at_step(monkeypatch, 30)
    with pytest.raises(DiskFull, match=r"no space left.*checkpoint at step 20 kept"):
        train(tiny(), tmp_path / "run")
