"""The speed table of `experiments.bench.speed` on one GPU, with the PyTorch peers on the same GPU,
in one run.

Ours (second-order MAML, as in `experiments.bench.speed`): sinusoid (one dispatch per meta-step,
and chunks of meta-steps with vmap and with lax.map over tasks), and Conv4 5-way 1-shot with 15
queries per class, strided and max-pool, meta-batch 32 and 4, with lax convolutions (cuDNN) and
vmap over tasks; ``--batched-runs`` sinusoid seeds in one compiled program
(`experiments.bench.batched`), against one run and against the fastest correct peer's runs
one after another. Peers: the implementations in ``shared/peers`` that need torch alone --
torch.func (vmap, vmap with ``.backward()``, loop) and the hand-written autograd loop; higher,
learn2learn and TorchOpt are not on the GPU machine -- run on the GPU through
``experiments/gpu/peer_on_device.py``. Each peer's meta-gradient is checked against the autograd
loop in the same run (torch.func's vmap is wrong through batch norm, so on Conv4 it is timed but
never the speed to beat). Each of our rows gets its ratio to the fastest correct peer on the same
workload. About 4 minutes on an H100. Run from the checkout's root (installed or not: the GPU
machine has the repository, not the package):

    python -m experiments.gpu.benchmark --peers-dir .gpu_carry/peers --out bench.json
    python -m experiments.gpu.benchmark --quick --only sinusoid --device cpu \\
        --peers-python /work/peers-venv/bin/python              # CPU smoke test

The device command (the `run` tool), after ``bash experiments/gpu/prepare.sh`` here has filled
``.gpu_carry/`` (the Omniglot zips and cache, a copy of ``shared/peers``, which does not
travel by itself, and wheels of Hydra for `experiments.gpu.omniglot`); carry
``[".gpu_carry"]``, timeout_s 560; one line, joined with spaces:

    export PYTHONUNBUFFERED=1; python3 -m pip install -q --no-index --no-deps --target /tmp/site
    .gpu_carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L; python3 -c
    "import jax, flax, optax,
    orbax.checkpoint, torch; print('jax', jax.__version__, jax.devices(), 'flax',
    flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)" 2>&1 |
    tee $OUT/versions.log; timeout 300 python3 -m experiments.gpu.omniglot --data-dir
    .gpu_carry/omniglot --cache-dir .gpu_carry/cache --time-budget-s 150 --out
    $OUT/omniglot.json 2>&1 | tee $OUT/omniglot.log; timeout 230 python3 -m
    experiments.gpu.benchmark --peers-dir .gpu_carry/peers --out $OUT/bench.json 2>&1 |
    tee $OUT/bench.log
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# JAX takes most of the GPU's memory at start-up by default; the torch peers need some too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

import metagrad as mg  # noqa: E402
from experiments.bench import harness  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PEER_ON_DEVICE = Path(__file__).resolve().with_name("peer_on_device.py")  # run by the peers' python
CONV4_GOAL = 5.0  # Conv4 on a GPU: at least 5x the fastest correct torch peer on the same card
PEER_IMPLS = {  # torch alone; the reference (autograd_loop) first where it is timed
    "sinusoid": ["autograd_loop", "torchfunc_vmap_bwd", "torchfunc_vmap", "torchfunc_loop"],
    "conv4": ["autograd_loop", "torchfunc_loop", "torchfunc_vmap_bwd"],
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--only", default="sinusoid,conv4", help="sinusoid and/or conv4")
    p.add_argument("--archs", default="strided,maxpool")
    p.add_argument("--meta-batches", default="32,4")
    p.add_argument("--conv-impl", default="lax", choices=harness.CONV_IMPLS)
    p.add_argument("--task-batching", default="vmap", choices=("vmap", "map"))
    harness.add_timing_args(p, harness.Timing(target_s=1.0, blocks=3, max_call_s=10.0))
    p.add_argument("--quick", action="store_true", help="fewer steps and peers: a smoke test")
    p.add_argument(
        "--batched-runs", type=int, default=8, help="sinusoid seeds in one program (1: skip)"
    )
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--peers-python", default=sys.executable, help="a python with torch")
    p.add_argument(
        "--peers-dir",
        type=Path,
        default=None,
        help="the peers' scripts (default: .gpu_carry/peers, else ../shared/peers)",
    )
    p.add_argument("--peer-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--device",
        default=None,
        help="torch device of the peers (default: cuda when JAX runs on a GPU, else cpu)",
    )
    args = p.parse_args(argv)
    args.only = {w for w in args.only.split(",") if w}
    if not args.only <= {"sinusoid", "conv4"}:
        p.error(f"--only {sorted(args.only)}: choose from sinusoid, conv4")
    args.archs = [a for a in args.archs.split(",") if a]
    args.meta_batches = [int(m) for m in args.meta_batches.split(",") if m]
    return args


def peers_dir(args) -> Path | None:
    for candidate in (args.peers_dir, REPO / ".gpu_carry" / "peers"):
        if candidate is not None and (Path(candidate) / "bench_sinusoid.py").is_file():
            return Path(candidate).resolve()  # the peers run from their own folder
    if args.peers_dir is not None:
        sys.exit(f"error: --peers-dir {args.peers_dir}: no bench_sinusoid.py there")
    return harness.default_peers_dir()


def run_ours(args) -> list[dict]:
    timing = harness.timing_of(args)
    rows = []
    if "sinusoid" in args.only:
        print("sinusoid MAML", flush=True)
        rows += harness.bench_sinusoid(timing, chunk=20 if args.quick else 200)
        for r in rows:
            harness.print_progress(r)
    if "conv4" in args.only:
        print(f"Conv4 MAML, {args.conv_impl} convolutions, {args.task_batching} over tasks")
        for arch in args.archs:
            for mb in args.meta_batches:
                config = {
                    "workload": "conv4",
                    "arch": arch,
                    "meta_batch": mb,
                    "conv_impl": args.conv_impl,
                    "task_batching": args.task_batching,
                    "estimator": "maml",
                    "inner_steps": 1,
                }
                rows.append(harness.run_conv4(config, timing, mg.maml(steps=1, lr=0.4), {}))
                harness.print_progress(rows[-1])
    return rows


def run_peers(args, where: Path, device: str) -> list[dict]:
    n = 2 if args.quick else None
    print(f"PyTorch peers on {device} ({where})", flush=True)
    return harness.run_peers(
        args.peers_python,
        where,
        only=args.only,
        archs=args.archs,
        meta_batches=args.meta_batches,
        quick=args.quick,
        threads=[args.peer_threads],
        impls={workload: names[:n] for workload, names in PEER_IMPLS.items()},
        prefix=(str(PEER_ON_DEVICE), "--device", device),
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    env = harness.environment()
    env["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
    device = args.device or ("cuda" if env["backend"] == "gpu" else "cpu")
    print(f"metagrad benchmark on {env['backend']} ({env['device']}, jax {env['jax']})", flush=True)
    report = {"environment": env, "args": harness.args_dict(args)}

    def write(**parts):
        report.update(parts)
        harness.write_json(args.out, report)

    results = run_ours(args)
    write(results=results)  # kept even if the peers fail or time out
    batched = None
    if "sinusoid" in args.only and args.batched_runs > 1:
        from experiments.bench.batched import batched_report, print_report

        runs, chunk = (2, 20) if args.quick else (args.batched_runs, 200)  # quick: a smoke test
        batched = batched_report(runs, 70_000, chunk, harness.timing_of(args))
        print_report(batched)
        write(results=results, batched=batched)
    peers = []
    where = None if args.no_peers else peers_dir(args)
    if where is not None:
        peers = run_peers(args, where, device)
    elif not args.no_peers:
        print("peers skipped: no peers directory (--peers-dir)", file=sys.stderr)
    ratios = harness.add_ratios(results, peers)
    harness.print_table(results, peers)
    for r in ratios:
        goal = CONV4_GOAL if r["ours"].startswith("conv4") else None
        verdict = "met" if goal is not None and r["ratio"] >= goal else "not met"
        met = "" if goal is None else f" (goal {goal:g}x: {verdict})"
        print(
            f"{r['ours']}: {r['ratio']:.2f} x {r['peer']} (torch threads {r['peer_threads']}){met}"
        )
    if batched is not None:
        from experiments.bench.batched import add_peer

        add_peer(batched, harness.fastest_correct(peers, workload="sinusoid"))
        if "peer" in batched:
            p = batched["peer"]
            print(
                f"{batched['runs']} sinusoid seeds in one program: {p['throughput_x']:.1f} x "
                f"{p['impl']}'s throughput, {p['batched_x']:.1f} x its {batched['runs']} runs "
                "one after another (compilation included)"
            )
    write(results=results, peers=peers, ratios=ratios, peers_device=device, batched=batched)
    if args.out:
        print(f"json: {args.out}")
    return report


if __name__ == "__main__":
    main()
