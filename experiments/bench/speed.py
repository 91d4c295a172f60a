"""metagrad's speed and memory numbers, and the PyTorch peers' in the same invocation.

Workloads (second-order MAML unless said otherwise):

- ``sinusoid``: Finn et al.'s regression (MLP 1-40-40-1, meta-batch 25, K = 10 support and 10
  query points, one inner step at 0.01, Adam 1e-3), tasks from `metagrad.tasks.sinusoid` as
  training samples them. Timed two ways: one dispatch per meta-step, and a chunk of meta-steps
  per compiled call (``lax.scan`` with on-device task sampling); the chunked timing also with
  ``lax.map`` over tasks, to choose the default task batching; a ``maml_lean`` chunk without
  the pre-adaptation query loss; and a chunk over tasks drawn before the timed calls
  (``given``), as the peers time theirs: the same work as theirs.
- ``conv4``: Omniglot 5-way 1-shot, 15 queries per class, random 28x28x1 inputs (as the peers),
  one inner step at 0.4, Adam 1e-3; strided and max-pool Conv4; meta-batch 32 and 4; every conv
  implementation x task batching, so that the defaults can be chosen from data. ``lean`` rows
  drop the pre-adaptation query metrics (a custom estimator): what they cost, and the peers'
  work.
- ``inner_steps``: Conv4 strided, meta-batch 4: MAML, MAML with remat, first-order MAML and iMAML
  at 1, 5, 10, 20 and 100 inner steps; peak memory and step time, plotted to a PNG.

For each: meta-steps/s, tasks/s, compile time, GFLOP/s, GFLOP/s as a fraction of the machine's
matrix-multiply peak (a 2048x2048 float32 ``jnp.dot`` timed first in the same run, the ``peak``
row) and the compiled step's memory (how they are measured: `experiments.bench.harness`). With
``--peers``, the last table has the README's rows: ours, the fastest correct peer, the ratio.
Device counts are `experiments.bench.devices`.

    python -m experiments.bench.speed --quick                      # smoke run, a few minutes
    python -m experiments.bench.speed --out bench.json --peers     # everything, with the peers
    JAX_PLATFORMS=cuda python -m experiments.bench.speed ...       # same script on GPU

``--peers`` needs the peers' virtualenv (``shared/peers/setup.sh``): ``--peers-python`` or
``$PEERS_PYTHON``. Only the library API is used (no Hydra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

import metagrad as mg
from experiments.bench import harness
from metagrad.nn import default_conv_impl
from metagrad.outer import TASK_BATCHING

SWEEP_ESTIMATORS = {
    "maml": lambda s: mg.maml(steps=s, lr=0.4),
    "maml_remat": lambda s: mg.maml(steps=s, lr=0.4, remat=True),
    "fomaml": lambda s: mg.fomaml(steps=s, lr=0.4),
    "imaml": lambda s: mg.imaml(steps=s, lr=0.4, reg=1.0, cg_iters=10),
}


def bench_conv4(args, timing: harness.Timing) -> list[dict]:
    rows, flops_cache = [], {}
    for arch in args.archs:
        for mb in args.meta_batches:
            for impl in harness.CONV_IMPLS:
                for tb in ("vmap", "map"):  # vmap first: map rows take their flops from it
                    if (
                        impl == "lax"
                        and mb >= 32
                        and not args.full_grid
                        and (arch == "maxpool" or tb == "map")
                    ):
                        print(
                            f"  skip conv4 {arch} mb{mb} lax {tb} (about a minute per step; "
                            "--full-grid runs it)",
                            flush=True,
                        )
                        continue
                    cfg = {
                        "workload": "conv4",
                        "arch": arch,
                        "meta_batch": mb,
                        "conv_impl": impl,
                        "task_batching": tb,
                        "estimator": "maml",
                        "inner_steps": 1,
                    }
                    estimator = mg.maml(steps=1, lr=0.4)
                    rows.append(harness.run_conv4(cfg, timing, estimator, flops_cache))
                    harness.print_progress(rows[-1])
            # what the pre-adaptation metrics cost, with the fastest configuration just measured
            done = [r for r in rows if r.get("arch") == arch and r.get("meta_batch") == mb]
            best = max(done, key=lambda r: r["meta_steps_per_s"])
            cfg = {
                "workload": "conv4",
                "arch": arch,
                "meta_batch": mb,
                "conv_impl": best["conv_impl"],
                "task_batching": best["task_batching"],
                "estimator": "maml_lean",
                "inner_steps": 1,
            }
            rows.append(harness.run_conv4(cfg, timing, harness.lean_maml(1, 0.4), flops_cache))
            harness.print_progress(rows[-1])
    return rows


def bench_inner_steps(args, timing: harness.Timing) -> list[dict]:
    rows = []
    for name, make in SWEEP_ESTIMATORS.items():
        for steps in args.inner_steps:
            cfg = {
                "workload": "inner_steps",
                "arch": "strided",
                "meta_batch": 4,
                "conv_impl": default_conv_impl(),
                "task_batching": args.sweep_task_batching,
                "estimator": name,
                "inner_steps": steps,
            }
            try:
                rows.append(harness.run_conv4(cfg, timing, make(steps), {}))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at 100 steps on a GPU
                rows.append({**cfg, "error": f"{type(e).__name__}: {e}"[:300]})
            harness.print_progress(rows[-1])
    return rows


def fastest_configs(results: list[dict]) -> list[dict]:
    """Per (architecture, meta-batch): the fastest conv impl x task batching of full MAML."""
    out = []
    conv4 = [r for r in results if r["workload"] == "conv4" and "error" not in r]
    for arch, mb in sorted({(r["arch"], r["meta_batch"]) for r in conv4}):
        rows = [
            r
            for r in conv4
            if r["arch"] == arch and r["meta_batch"] == mb and r["estimator"] == "maml"
        ]
        ranked = sorted(rows, key=lambda r: -r["meta_steps_per_s"])
        slowest = ranked[-1]["meta_steps_per_s"]
        out.append(
            {
                "arch": arch,
                "meta_batch": mb,
                "backend": jax.default_backend(),
                "ranking": [
                    {
                        "conv_impl": r["conv_impl"],
                        "task_batching": r["task_batching"],
                        "meta_steps_per_s": r["meta_steps_per_s"],
                        "x_slowest": r["meta_steps_per_s"] / slowest,
                    }
                    for r in ranked
                ],
            }
        )
    return out


def plot_inner_steps(rows: list[dict], path: Path) -> bool:
    """Memory and time against inner steps, as a PNG (a backend-free ``Figure``); False without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4))
    ax_mem, ax_time = fig.subplots(1, 2)
    for name in SWEEP_ESTIMATORS:
        done = [r for r in rows if r.get("estimator") == name and "error" not in r]
        pts = sorted(((r["inner_steps"], r) for r in done), key=lambda p: p[0])
        if not pts:
            continue
        steps = [s for s, _ in pts]
        ax_mem.plot(steps, [r["peak_bytes"] / 2**20 for _, r in pts], "o-", label=name)
        ax_time.plot(steps, [1e3 / r["meta_steps_per_s"] for _, r in pts], "o-", label=name)
    for ax, ylabel in (
        (ax_mem, "compiled peak memory (MiB)"),
        (ax_time, "time per meta-step (ms)"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend()
    r0 = next((r for r in rows if "error" not in r), {})
    fig.suptitle(
        f"Conv4 strided, 5-way 1-shot, meta-batch 4, {r0.get('conv_impl')} conv, "
        f"task batching {r0.get('task_batching')} ({jax.default_backend()})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def readme_rows(results: list[dict]) -> list[dict]:
    """The rows of the README's table: sinusoid in scanned chunks and one dispatch per step
    (vmap), and per Conv4 architecture and meta-batch the fastest full-MAML configuration and
    its lean twin."""
    ok = [r for r in results if "error" not in r]
    out = [
        r
        for r in ok
        if r["workload"] == "sinusoid"
        and r["task_batching"] == "vmap"
        and r["estimator"] == "maml"
    ]
    order = {"given": 0, "scan": 1, "dispatch": 2}
    out.sort(key=lambda r: (order[r["mode"]], not r.get("xla_options")))
    for arch, mb in sorted(
        {(r["arch"], r["meta_batch"]) for r in ok if r["workload"] == "conv4"},
        key=lambda am: (am[0], am[1]),
    ):
        same = [
            r for r in ok if r["workload"] == "conv4" and (r["arch"], r["meta_batch"]) == (arch, mb)
        ]
        full = [r for r in same if r["estimator"] == "maml"]
        if full:
            out.append(max(full, key=lambda r: r["meta_steps_per_s"]))
        out += [r for r in same if r["estimator"] == "maml_lean"]
    return out


def print_readme_rows(results: list[dict], peak: float | None) -> None:
    """The README's performance table, as Markdown."""
    rows = readme_rows(results)
    if not rows:
        return
    peak_s = f"{peak:.1f} GFLOP/s" if peak else "not measured"
    print(f"\nREADME rows (matrix-multiply peak in this run: {peak_s})\n")
    print(
        "| workload | metagrad, meta-steps/s | fastest correct peer | ratio | compile | "
        "GFLOP/s | of peak |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    for r in rows:
        peer = (
            f"{r['peer']} (threads {r.get('peer_threads')}), {r['peer_meta_steps_per_s']:.3g}"
            if r.get("peer")
            else "-"
        )
        what = harness.label(r)
        if r["workload"] == "conv4":
            what += f" ({r['conv_impl']} conv, task batching {r['task_batching']})"
        print(
            f"| {what} | {r['meta_steps_per_s']:.4g} | {peer} | "
            f"{harness.fmt(r.get('ratio_to_peer'), '.2f')}x | {r['compile_s']:.1f} s | "
            f"{harness.fmt(r.get('gflop_per_s'), '.1f')} | "
            f"{harness.fmt(r.get('fraction_of_peak'), '.0%')} |"
        )


def bench_batched(args) -> dict:
    """``experiments.bench.batched``'s report (8 sinusoid seeds in one program, against one
    run), from a process of its own: it asks XLA for one host device per core, which the other
    rows must not get."""
    import json
    import subprocess
    import tempfile

    print("8 sinusoid seeds in one program", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "batched.json"
        cmd = [sys.executable, "-m", "experiments.bench.batched", "--runs", "8", "--out", str(out)]
        if args.quick:
            cmd += ["--chunk", "100", "--blocks", "2", "--target-s", "0.5"]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2])
        return json.loads(out.read_text())


def print_batched_row(b: dict) -> None:
    """The README's batched-runs rows, as Markdown."""
    one, many, peer = b["one_run"], b["batched"], b.get("peer")
    runs, steps = b["runs"], b["steps"]
    print(
        f"\n| {runs} sinusoid seeds, {steps:,} meta-steps each | in all | one by one | ratio | "
        "compile | GFLOP/s | of peak |\n| --- | --- | --- | --- | --- | --- | --- |"
    )
    print(
        f"| one program, against one run's throughput | {many['meta_steps_per_s_all_runs']:,.0f} "
        f"meta-steps/s ({many['meta_steps_per_s_per_run']:,.0f} a run) | "
        f"{one['meta_steps_per_s']:,.0f} | {b['throughput_x']:.2f}x | "
        f"{many['compile_s']:.1f} s (one run: {one['compile_s']:.1f} s) | "
        f"{harness.fmt(many.get('gflops_per_s'), '.1f')} | "
        f"{harness.fmt(many.get('fraction_of_peak'), '.0%')} |"
    )
    print(
        f"| one program, against {runs} runs of ours one by one, compilation included | "
        f"{b['batched_s']:.1f} s | {b['sequential_s']:.1f} s | {b['wall_x']:.2f}x | | | |"
    )
    if peer:
        print(
            f"| one program, against {runs} runs of {peer['impl']} (threads {peer['threads']}, "
            f"{peer['meta_steps_per_s']:.0f} meta-steps/s) one by one | {b['batched_s']:.1f} s | "
            f"{peer['runs_s']:.1f} s | {peer['batched_x']:.1f}x | | | |"
        )


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--out", type=Path, default=None, help="write the JSON here")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of memory and time against inner steps (default: next to --out)",
    )
    p.add_argument(
        "--only",
        default="sinusoid,conv4,inner_steps",
        help="comma list of workloads: sinusoid, conv4, inner_steps",
    )
    p.add_argument("--archs", default="strided,maxpool")
    p.add_argument("--meta-batches", default="32,4")
    p.add_argument("--inner-steps", default="1,5,10,20,100")
    p.add_argument("--sweep-task-batching", default="map", choices=TASK_BATCHING)
    p.add_argument(
        "--full-grid",
        action="store_true",
        help="also run lax convolutions at meta-batch 32 (about a minute a step)",
    )
    harness.add_timing_args(p)
    harness.add_peer_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.archs, args.meta_batches, args.inner_steps = "strided", "4", "1,2"
        args.target_s, args.blocks = min(args.target_s, 0.5), min(args.blocks, 3)
    args.archs = [a for a in args.archs.split(",") if a]
    args.meta_batches = [int(m) for m in args.meta_batches.split(",") if m]
    args.inner_steps = [int(s) for s in args.inner_steps.split(",") if s]
    args.only = {w for w in args.only.split(",") if w}
    if not args.only <= {"sinusoid", "conv4", "inner_steps", "batched"}:
        p.error(f"--only {sorted(args.only)}: choose from sinusoid, conv4, inner_steps, batched")
    return args


def run_peers(args) -> list[dict]:
    peers_dir = args.peers_dir or harness.default_peers_dir()
    if not args.peers_python or peers_dir is None:
        print(
            "--peers needs --peers-python (or $PEERS_PYTHON) and the peers' directory "
            "(--peers-dir or $PEERS_DIR)",
            file=sys.stderr,
        )
        return []
    threads = [int(t) for t in args.peer_threads.split(",") if t]
    print(f"PyTorch peers ({peers_dir}, torch threads {threads})", flush=True)
    return harness.run_peers(
        args.peers_python,
        Path(peers_dir).resolve(),
        only=args.only,
        archs=args.archs,
        meta_batches=args.meta_batches,
        quick=args.quick,
        threads=threads,
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    timing = harness.timing_of(args)
    env = harness.environment()
    print(
        f"metagrad benchmark on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs, "
        f"jax {env['jax']}); default conv impl {env['default_conv_impl']}",
        flush=True,
    )
    results: list[dict] = [harness.bench_matmul_peak(timing)]
    harness.print_progress(results[0])
    if "sinusoid" in args.only:
        print("sinusoid MAML", flush=True)
        sinusoid_rows = harness.bench_sinusoid(timing, chunk=20 if args.quick else 200)
        for r in sinusoid_rows:
            harness.print_progress(r)
        results += sinusoid_rows
    if "conv4" in args.only:
        print("Conv4 MAML", flush=True)
        results += bench_conv4(args, timing)
    if "inner_steps" in args.only:
        print("Conv4 inner-step sweep", flush=True)
        results += bench_inner_steps(args, timing)

    batched = bench_batched(args) if "batched" in args.only else None
    peers = run_peers(args) if args.peers else []
    ratios = harness.add_ratios(results, peers)
    peak = harness.add_fraction_of_peak(results)
    if batched is not None:
        from experiments.bench.batched import add_peer

        add_peer(batched, harness.fastest_correct(peers, workload="sinusoid"))
    harness.print_table(results, peers)
    fastest = fastest_configs(results)
    for f in fastest:
        print(
            f"fastest on {f['backend']}, conv4 {f['arch']} mb{f['meta_batch']}: "
            + ", ".join(
                f"{r['conv_impl']}/{r['task_batching']} {r['meta_steps_per_s']:.3f}"
                for r in f["ranking"]
            )
        )

    print_readme_rows(results, peak)
    if batched is not None:
        print_batched_row(batched)

    plot = None
    sweep = [r for r in results if r["workload"] == "inner_steps"]
    if sweep:
        plot = args.plot or (
            args.out.with_suffix(".png") if args.out else Path("benchmark_inner_steps.png")
        )
        plot = str(plot) if plot_inner_steps(sweep, plot) else None
        if plot:
            print(f"\nplot: {plot}")
    report = {
        "environment": env,
        "args": harness.args_dict(args),
        "results": results,
        "peers": peers,
        "ratios": ratios,
        "fastest": fastest,
        "batched": batched,
        "plot": plot,
    }
    harness.write_json(args.out, report)
    if args.out:
        print(f"json: {args.out}")
    return report


if __name__ == "__main__":
    main()
