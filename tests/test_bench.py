"""The benchmark entry points (`experiments.bench`) as their documented commands, with the
smallest settings they take: each runs, and its JSON holds the rows it claims."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV

from experiments.bench import harness

ENV = SUBPROCESS_ENV


def run_module(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.bench.{name}", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ENV,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_speed_benchmark_times_the_sinusoid_rows(tmp_path):
    out = tmp_path / "bench.json"
    run_module(
        "speed", "--quick", "--only=sinusoid", "--target-s=0.02", "--blocks=1", f"--out={out}"
    )
    report = json.loads(out.read_text())
    rows = report["results"]
    modes = {(r["task_batching"], r["mode"], r["steps_per_call"]) for r in rows}
    assert modes == {("vmap", "dispatch", 1), ("vmap", "scan", 20), ("map", "scan", 20)}
    assert all(r["meta_steps_per_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    assert report["peers"] == [] and report["args"]["only"] == ["sinusoid"]


def test_speed_benchmark_names_an_unknown_workload():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.speed", "--only=sinusiod"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 2 and "sinusiod" in proc.stderr


def test_per_example_benchmark_reports_the_ratio(tmp_path):
    out = tmp_path / "per_example.json"
    run_module("per_example", "--target-s=0.01", "--blocks=1", f"--json={out}")
    result = json.loads(out.read_text())
    assert result["speedup"] == pytest.approx(result["vmap_grad_s"] / result["jit_vmap_grad_s"])


def _conv4(meta_batch: int, steps_per_s: float, **more) -> dict:
    return dict(
        workload="conv4",
        arch="strided",
        meta_batch=meta_batch,
        meta_steps_per_s=steps_per_s,
        **more,
    )


def test_the_speed_to_beat_is_the_fastest_correct_peer_on_the_same_settings():
    peers = [
        _conv4(4, 9.0, impl="wrong", correct=False),  # faster, but its meta-gradient is wrong
        _conv4(4, 5.0, impl="right", correct=True),
        _conv4(32, 7.0, impl="other_batch", correct=True),
    ]
    best = harness.fastest_correct(peers, workload="conv4", arch="strided", meta_batch=4)
    assert best["impl"] == "right"
    ours = [_conv4(4, 10.0, conv_impl="patches", task_batching="map", estimator="maml")]
    [ratio] = harness.add_ratios(ours, peers)
    assert ratio["peer"] == "right" and ratio["ratio"] == ours[0]["ratio_to_peer"] == 2.0
