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
    sinusoid = [r for r in rows if r["workload"] == "sinusoid"]
    modes = {
        (r["task_batching"], r["mode"], r["steps_per_call"], bool(r["xla_options"]), r["estimator"])
        for r in sinusoid
    }
    assert modes == {
        ("vmap", "dispatch", 1, True, "maml"),
        ("vmap", "scan", 20, True, "maml"),
        ("vmap", "scan", 20, False, "maml"),  # XLA's defaults, to show what the options give
        ("map", "scan", 20, True, "maml"),
        ("vmap", "dispatch", 1, True, "maml_lean"),  # without the pre-adaptation loss
        ("vmap", "scan", 20, True, "maml_lean"),
        ("vmap", "given", 20, True, "maml"),  # tasks drawn before the timed calls, as the peers
    }
    assert all(r["meta_steps_per_s"] > 0 and r["peak_bytes"] > 0 for r in sinusoid)
    [peak] = [r for r in rows if r["workload"] == "peak"]
    assert peak["gflop_per_s"] > 0 and peak["flops_per_meta_step"] == 2 * 2048**3
    for r in sinusoid:  # each row's rate against the peak measured in the same run
        assert r["fraction_of_peak"] == pytest.approx(r["gflop_per_s"] / peak["gflop_per_s"])
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


def test_fraction_of_peak_is_against_the_peak_row_of_the_same_run():
    rows = [
        {"workload": "peak", "gflop_per_s": 100.0},
        {"workload": "sinusoid", "gflop_per_s": 25.0},
        {"workload": "conv4", "gflop_per_s": None},  # XLA counted no flops
    ]
    assert harness.add_fraction_of_peak(rows) == 100.0
    assert rows[1]["fraction_of_peak"] == 0.25 and "fraction_of_peak" not in rows[2]
    assert "fraction_of_peak" not in rows[0]
    assert harness.add_fraction_of_peak(rows[1:]) is None  # no peak row: nothing to divide by


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
