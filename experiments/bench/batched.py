"""Many seeds in one compiled program against the same runs one by one, and against the peers.

Sinusoid MAML in Finn et al.'s setting (MLP 1-40-40-1, meta-batch 25, K = 10 support and 10
query points, one inner step at 0.01, Adam 1e-3), through the training loop's own compiled chunk
(`metagrad.experiment.chunks.ChunkRunner`, tasks sampled on the device) for one run, and
through the batched program of ``--runs`` seeds (`metagrad.experiment.batched`), spread over
one XLA host device per core as ``experiments/train.py`` spreads a sweep's. For each: the
chunk's compile time, meta-steps/s per run and in all, GFLOP/s from XLA's cost analysis. Then
the time of ``--runs`` runs of ``--steps`` meta-steps each, compilation included: one by one
(each its own program, as separate processes compile) against the batched program; with
``--peers``, against the fastest correct PyTorch peer run ``--runs`` times one after another.

    python -m experiments.bench.batched --runs 8 --out batched.json
    python -m experiments.bench.batched --runs 8 --peers --peers-python <venv>/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # one XLA host device per core, as train.py gives a sweep
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        _cores = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"
        os.environ["XLA_FLAGS"] = f"{_flags} {_cores}".strip()

import jax
import numpy as np

from experiments.bench import harness
from metagrad.experiment import build
from metagrad.experiment.batched import BatchedChunks, RunGroup, stack_runs
from metagrad.experiment.chunks import ChunkRunner
from metagrad.experiment.config import Config
from metagrad.experiment.loop import Experiment
from metagrad.outer import meta_learner


def finn_sinusoid(seed: int) -> Config:
    cfg = Config()  # meta-batch 25, K = 10 + 10, inner lr 0.01, one step, Adam 1e-3
    cfg.seed, cfg.model.hidden = seed, [40, 40]
    cfg.train.compile_cache, cfg.train.progress = False, False
    return cfg


def _single(cfg: Config):
    exp = Experiment.from_config(cfg)
    learner = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False)
    options = build.resolve_compiler_options(cfg)  # as the CLI compiles its chunk
    runner = ChunkRunner(exp, learner, exp.source.train_data, compiler_options=options)
    return exp, runner, learner.init(exp.meta_params)


def step_flops(cfg: Config) -> float | None:
    """XLA's count of one meta-step's flops (a chunk's cost analysis counts its scan body once
    and its task sampling for every step: not a step's work)."""
    exp, _, state = _single(cfg)
    learner = meta_learner(exp.model.loss_fn, exp.estimator, exp.optimizer, jit=False)
    tasks = exp.source.sample_train(exp.source.train_data, jax.random.key(0), 25)
    compiled = jax.jit(learner.update).lower(state, tasks).compile()
    return harness.cost_and_memory(compiled)["flops"]


def _batched(cfgs: list[Config]):
    exp = Experiment.from_config(cfgs[0])
    hparams, states = stack_runs(exp, cfgs)
    group = RunGroup(exp, cfgs, [], [], [], np.zeros(len(cfgs)), hparams)
    return BatchedChunks(group), group.put(states, per_run=True)


def _timed(runner, state, chunk: int, timing: harness.Timing) -> dict:
    tic = time.perf_counter()
    runner(state, chunk)  # compiles (counted in runner.compile_seconds) and runs once
    first = time.perf_counter() - tic
    box = [state]

    def call():
        box[0], _ = runner(box[0], chunk)
        return box[0]

    t = harness.time_calls(call, timing)
    compiled = runner._compiled[chunk]
    return {
        "compile_s": runner.compile_seconds,
        "first_call_s": first,
        "chunks_per_s": t["calls_per_s"],
        "foreign_cpu": t["foreign_cpu"],
        **harness.cost_and_memory(compiled),
    }


def measure(args) -> dict:
    """The report: :func:`batched_report` and, with ``args.peers``, the peers' rows."""
    report = batched_report(args.runs, args.steps, args.chunk, harness.timing_of(args))
    if args.peers:
        peers_dir = args.peers_dir or harness.default_peers_dir()
        threads = [int(t) for t in str(args.peer_threads).split(",")]
        peers = harness.peers_sinusoid(args.peers_python, peers_dir, quick=False, threads=threads)
        report["peers"] = peers
        add_peer(report, harness.fastest_correct(peers))
    return report


def add_peer(report: dict, best: dict | None) -> None:
    """``report["peer"]``: the fastest correct peer run ``runs`` times one after another,
    against the batched program."""
    if best is None:
        return
    runs, steps = report["runs"], report["steps"]
    peer_s = runs * steps / best["meta_steps_per_s"]
    report["peer"] = {
        "impl": best["impl"],
        "threads": best["threads"],
        "meta_steps_per_s": best["meta_steps_per_s"],
        "runs_s": peer_s,
        "batched_x": peer_s / report["batched_s"],
        "throughput_x": report["batched"]["meta_steps_per_s_all_runs"] / best["meta_steps_per_s"],
    }


def batched_report(runs: int, steps: int, chunk: int, timing: harness.Timing) -> dict:
    """One run's chunk and the batched chunk of ``runs`` seeds, timed in this process."""
    args = argparse.Namespace(runs=runs, steps=steps, chunk=chunk)
    cfg = finn_sinusoid(0)
    _, runner, state = _single(cfg)
    one = _timed(runner, state, args.chunk, timing)
    one["meta_steps_per_s"] = one["chunks_per_s"] * args.chunk
    runner_b, states = _batched([finn_sinusoid(s) for s in range(args.runs)])
    many = _timed(runner_b, states, args.chunk, timing)
    many["meta_steps_per_s_per_run"] = many["chunks_per_s"] * args.chunk
    many["meta_steps_per_s_all_runs"] = many["meta_steps_per_s_per_run"] * args.runs
    flops = step_flops(cfg)
    peak = harness.bench_matmul_peak(timing)["gflop_per_s"]  # the machine's, in this run
    if flops:
        one["gflops_per_s"] = flops * one["meta_steps_per_s"] / 1e9
        many["gflops_per_s"] = flops * many["meta_steps_per_s_all_runs"] / 1e9
        for row in (one, many):
            row["fraction_of_peak"] = row["gflops_per_s"] / peak
    # N runs of --steps each, compilation included: one by one (each compiles its program, as
    # separate processes do), or all at once.
    sequential_s = args.runs * (one["compile_s"] + args.steps / one["meta_steps_per_s"])
    batched_s = many["compile_s"] + args.steps / many["meta_steps_per_s_per_run"]
    return {
        "workload": "sinusoid MAML, Finn et al. (MLP 40-40, meta-batch 25, K=10, 1 step)",
        "runs": args.runs,
        "steps": args.steps,
        "chunk": args.chunk,
        "one_run": one,
        "batched": many,
        "throughput_x": many["meta_steps_per_s_all_runs"] / one["meta_steps_per_s"],
        "matmul_peak_gflops": peak,
        "flops_per_meta_step": flops,
        "sequential_s": sequential_s,
        "batched_s": batched_s,
        "wall_x": sequential_s / batched_s,
        "environment": harness.environment(),
    }


def print_report(r: dict) -> None:
    one, many = r["one_run"], r["batched"]
    print(f"{r['workload']}; {r['runs']} seeds, chunks of {r['chunk']} meta-steps")
    print(
        f"  one run:        {one['meta_steps_per_s']:9,.0f} meta-steps/s  "
        f"compile {one['compile_s']:.2f} s  {one.get('gflops_per_s') or 0:.1f} GFLOP/s "
        f"({one.get('fraction_of_peak') or 0:.0%} of the {r['matmul_peak_gflops']:.0f} peak)"
    )
    print(
        f"  {r['runs']} runs at once: {many['meta_steps_per_s_all_runs']:9,.0f} meta-steps/s, all "
        f"({many['meta_steps_per_s_per_run']:,.0f} each)  compile {many['compile_s']:.2f} s  "
        f"{many.get('gflops_per_s') or 0:.1f} GFLOP/s ({many.get('fraction_of_peak') or 0:.0%})"
    )
    print(f"  throughput: {r['throughput_x']:.2f}x one run")
    print(
        f"  {r['runs']} runs of {r['steps']:,} steps, compilation included: one by one "
        f"{r['sequential_s']:.1f} s, batched {r['batched_s']:.1f} s: {r['wall_x']:.2f}x"
    )
    if r.get("peer"):
        p = r["peer"]
        print(
            f"  peer {p['impl']} (threads {p['threads']}) {p['meta_steps_per_s']:.0f} meta-steps/s:"
            f" {r['runs']} runs one by one {p['runs_s']:.1f} s; batched metagrad "
            f"{p['batched_x']:.1f}x faster ({p['throughput_x']:.1f}x in throughput)"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--steps", type=int, default=70_000, help="meta-steps per run (Finn: 70,000)")
    p.add_argument("--chunk", type=int, default=1000, help="meta-steps per compiled call")
    p.add_argument("--out", type=Path, default=None)
    harness.add_timing_args(p, harness.Timing(target_s=2.0, blocks=3, max_call_s=10.0))
    harness.add_peer_args(p)
    args = p.parse_args(argv)
    if args.peers and not args.peers_python:
        sys.exit("--peers needs --peers-python or $PEERS_PYTHON (shared/peers/setup.sh)")
    report = measure(args)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
