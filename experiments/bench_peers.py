"""Runs the PyTorch reference scripts in ``shared/peers`` for `benchmark.py` and parses their JSON.

The peers live outside the package (their own virtualenv with torch); nothing here imports torch.
Correctness is established in the same invocation: each script's ``--check`` compares one
meta-gradient of every implementation with the hand-written autograd loop, and only peers whose
relative error is below ``CORRECT_RTOL`` count as the speed to beat (torch.func's vmap is wrong
through batch norm, so it is excluded on Conv4). Torch's two-thread runs collapse when another
process holds a core (its OpenMP workers wait for each other), so the peers also run with one
thread and the faster of the two counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SINUSOID_IMPLS = [
    "torchfunc_vmap_bwd",
    "torchfunc_vmap",
    "autograd_loop",
    "torchopt",
    "l2l",
    "torchfunc_loop",
    "higher",
]
CONV4_IMPLS = ["autograd_loop", "l2l", "higher", "torchfunc_loop", "torchfunc_vmap_bwd"]
CORRECT_RTOL = 1e-4  # relative L2 error of one float32 meta-gradient against the autograd loop
REFERENCE = "autograd_loop"


def default_peers_dir() -> Path | None:
    """``shared/peers`` next to the checkout (``$PEERS_DIR`` overrides)."""
    if os.environ.get("PEERS_DIR"):
        return Path(os.environ["PEERS_DIR"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "peers"
        if (candidate / "bench_sinusoid.py").exists():
            return candidate
    return None


def _run(
    python: str, script: Path, args: list[str], timeout: float, prefix: tuple[str, ...] = ()
) -> list[dict]:
    """The JSON lines of ``python [*prefix] script args`` (``prefix``: e.g. a device launcher)."""
    cmd = [python, *prefix, str(script), *args]
    print("  $", " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(
            cmd, cwd=script.parent, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"  peer run timed out after {timeout:.0f} s", file=sys.stderr)
        return []
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if proc.returncode != 0:
        print(
            f"  peer script exited {proc.returncode}: {proc.stderr.strip()[-500:]}", file=sys.stderr
        )
    return rows


def _correct(check_rows: list[dict], impls: list[str]) -> dict[str, dict]:
    """impl -> {"correct": bool, "rel_l2_err": float | None} from ``--check`` lines."""
    out = {REFERENCE: {"correct": True, "rel_l2_err": 0.0}} if REFERENCE in impls else {}
    for row in check_rows:
        if row.get("check") == "meta_grad" and row.get("vs") == REFERENCE:
            err = row.get("rel_l2_err")
            out[row["impl"]] = {
                "correct": err is not None and err < CORRECT_RTOL,
                "rel_l2_err": err,
            }
    for impl in impls:
        out.setdefault(impl, {"correct": False, "rel_l2_err": None})
    return out


def run_sinusoid(
    python: str,
    peers_dir: Path,
    *,
    quick: bool,
    threads: list[int],
    impls: list[str] | None = None,
    prefix: tuple[str, ...] = (),
) -> list[dict]:
    """One row per implementation and torch thread count: ``meta_steps_per_s`` (median of timing
    blocks) and ``correct``. ``impls`` defaults to all (the first three when ``quick``)."""
    script = peers_dir / "bench_sinusoid.py"
    impls = impls or (SINUSOID_IMPLS[:3] if quick else SINUSOID_IMPLS)
    order = [REFERENCE] + [i for i in impls if i != REFERENCE]
    check = _run(python, script, ["--check", "--impls", ",".join(order)], 600, prefix)
    checks = _correct(check, impls)
    warmup, timing = (10, 50) if quick else (20, 200)
    rows = []
    for n in threads:
        rows += _run(
            python,
            script,
            [
                "--impls",
                ",".join(impls),
                "--steps",
                str(warmup + timing),
                "--warmup",
                str(warmup),
                "--timing-steps",
                str(timing),
                "--test-tasks",
                "10",
                "--threads",
                str(n),
            ],
            1800,
            prefix,
        )
    out = []
    for row in rows:
        if "error" in row:
            out.append({"workload": "sinusoid", "impl": row.get("impl"), "error": row["error"]})
            continue
        out.append(
            {
                "workload": "sinusoid",
                "impl": row["impl"],
                "meta_batch": row.get("meta_batch", 25),
                "threads": row.get("threads"),
                "meta_steps_per_s": row.get("steps_per_s_block_median", row.get("steps_per_s")),
                "meta_steps_per_s_overall": row.get("steps_per_s"),
                "foreign_cpu_s": row.get("foreign_cpu_s_in_window"),
                "window_s": row.get("window_s"),
                **checks.get(row["impl"], {"correct": False, "rel_l2_err": None}),
            }
        )
    return out


def run_conv4(
    python: str,
    peers_dir: Path,
    *,
    arch: str,
    meta_batches: list[int],
    quick: bool,
    threads: list[int],
    impls: list[str] | None = None,
    prefix: tuple[str, ...] = (),
) -> list[dict]:
    """One row per (implementation, meta-batch, torch threads) for ``arch`` (strided, maxpool).
    ``impls`` defaults to all (the first two when ``quick``)."""
    script = peers_dir / "bench_omniglot_conv4.py"
    impls = impls or (CONV4_IMPLS[:2] if quick else CONV4_IMPLS)
    order = [REFERENCE] + [i for i in impls if i != REFERENCE]
    check_args = ["--check", "--arch", arch, "--impls", ",".join(order)]
    check = _run(python, script, check_args, 600, prefix)
    checks = _correct(check, impls)
    warmup, timing = (1, 3) if quick else (2, 6)
    rows = []
    for n in threads:
        rows += _run(
            python,
            script,
            [
                "--arch",
                arch,
                "--impls",
                ",".join(impls),
                "--meta-batches",
                ",".join(map(str, meta_batches)),
                "--warmup",
                str(warmup),
                "--timing-steps",
                str(timing),
                "--threads",
                str(n),
            ],
            3600,
            prefix,
        )
    out = []
    for row in rows:
        base = {
            "workload": "conv4",
            "arch": arch,
            "impl": row.get("impl"),
            "meta_batch": row.get("meta_batch"),
            "threads": row.get("threads"),
        }
        if "error" in row:
            out.append({**base, "error": row["error"]})
            continue
        median_s = row.get("s_per_meta_step_median") or row["s_per_meta_step"]
        out.append(
            {
                **base,
                "meta_steps_per_s": 1.0 / median_s,
                "meta_steps_per_s_overall": row.get("meta_steps_per_s"),
                "tasks_per_s": row["meta_batch"] / median_s,
                "foreign_cpu_s": row.get("foreign_cpu_s_in_window"),
                "window_s": row.get("window_s"),
                **checks.get(row["impl"], {"correct": False, "rel_l2_err": None}),
            }
        )
    return out


def run_workloads(
    python: str,
    peers_dir: Path,
    *,
    only,
    archs,
    meta_batches: list[int],
    quick: bool,
    threads: list[int],
    impls: dict[str, list[str]] | None = None,
    prefix: tuple[str, ...] = (),
) -> list[dict]:
    """The peers' rows for the workloads in ``only`` ("sinusoid", "conv4" for each of ``archs``);
    ``impls`` maps a workload to the implementations to run (default: all)."""
    impls = impls or {}
    common = dict(quick=quick, threads=threads, prefix=prefix)
    rows = []
    if "sinusoid" in only:
        rows += run_sinusoid(python, peers_dir, impls=impls.get("sinusoid"), **common)
    if "conv4" in only:
        for arch in archs:
            rows += run_conv4(
                python,
                peers_dir,
                arch=arch,
                meta_batches=meta_batches,
                impls=impls.get("conv4"),
                **common,
            )
    return rows


def fastest_correct(peers: list[dict], **match) -> dict | None:
    """The fastest peer row (over implementations and torch thread counts) that matches ``match``
    and whose meta-gradient is correct."""
    rows = [
        p
        for p in peers
        if p.get("correct")
        and p.get("meta_steps_per_s")
        and all(p.get(k) == v for k, v in match.items())
    ]
    return max(rows, key=lambda p: p["meta_steps_per_s"], default=None)
