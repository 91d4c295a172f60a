"""`python -m experiments.bench.grad_modes` as documented, at its smallest settings: every mode
gives a row, and the implicit mode's memory does not grow with the inner steps while
second-order MAML's does."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, SUBPROCESS_ENV


@pytest.mark.slow
def test_grad_modes_benchmark_reports_every_mode(tmp_path):
    out = tmp_path / "modes.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.grad_modes", "--steps=2,20",
         "--target-s=0.01", "--blocks=1", f"--json={out}"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=SUBPROCESS_ENV, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["mode"], r["steps"]): r for r in json.loads(out.read_text())["rows"]}
    modes = ("second_order", "first_order", "truncated", "implicit", "es")
    assert set(rows) == {(m, s) for m in modes for s in (2, 20)}
    assert all(r["ms_per_meta_grad"] > 0 and r["peak_bytes"] > 0 for r in rows.values())
    peak = lambda m, s: rows[(m, s)]["peak_bytes"]
    assert peak("implicit", 20) <= 1.05 * peak("implicit", 2)
    assert peak("second_order", 20) > 2 * peak("second_order", 2)
    assert "| implicit |" in proc.stdout


@pytest.mark.slow  # 3 s: the interpreter and JAX start
def test_grad_modes_benchmark_refuses_an_unknown_mode():
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench.grad_modes", "--modes=implict"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=SUBPROCESS_ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "unknown mode 'implict'" in proc.stderr
