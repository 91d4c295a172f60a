"""The meta-step with the task axis sharded over 1, 2, 4, ... devices (``meta_learner(devices=n)``),
timed, and each sharded meta-gradient checked against one device's.

Each count runs in its own subprocess (this module with ``--worker``), because the number of
forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=n``) is fixed when JAX
starts; on a GPU or TPU the first ``n`` real devices are used. Every worker also checks its
sharded meta-gradient on one fixed batch against the same meta-gradient on one device (in the
same process): ``grad_rel_err`` is the relative L2 difference, ``grad_agrees`` whether it is
below ``AGREE_RTOL`` (float32 sums in another order differ by about 1e-7).

Workloads: ``sinusoid`` (Finn et al.'s MLP 1-40-40-1, meta-batch 24 so that 1, 2 and 4 divide
it, chunks of meta-steps in one ``lax.scan`` with on-device task sampling) and ``conv4`` (Omniglot
5-way 1-shot shapes, strided Conv4, meta-batch 4, one dispatch per meta-step).

    python -m experiments.bench.devices --counts 1,2,4 --workloads sinusoid,conv4 --out dev.json
    python -m experiments.bench.devices --counts 1,2 --quick           # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.flatten_util import ravel_pytree

import experiments
import metagrad as mg
from experiments.bench import harness
from metagrad.nn import Conv4, cross_entropy_loss, functional, mse_loss
from metagrad.outer import default_task_batching, sharded_batch_value_and_grad

AGREE_RTOL = 1e-5
WORKLOADS = ("sinusoid", "conv4")


def run(workloads, counts, timing: harness.Timing, *, chunk: int) -> list[dict]:
    """One row per (workload, device count), each measured in a fresh subprocess."""
    # The worker imports the `experiments` this process imported, installed or not.
    root = str(Path(experiments.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    rows = []
    for workload in workloads:
        for n in counts:
            cmd = [
                sys.executable,
                "-m",
                "experiments.bench.devices",
                "--worker",
                f"--workload={workload}",
                f"--n={n}",
                f"--target-s={timing.target_s}",
                f"--blocks={timing.blocks}",
                f"--max-call-s={timing.max_call_s}",
                f"--chunk={chunk}",
            ]
            flags = os.environ.get("XLA_FLAGS", "")
            flags = f"{flags} --xla_force_host_platform_device_count={n}".strip()
            env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=path)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                lines = proc.stderr.strip().splitlines() or ["no output"]
                err = next((x for x in reversed(lines) if "Error" in x.split(":")[0]), lines[-1])
                row = {"workload": "devices", "model": workload, "devices": n, "error": err[:300]}
            else:
                row = json.loads(lines[-1])
            rows.append(row)
            _print(row)
    return rows


def _print(r: dict) -> None:
    name = f"devices={r['devices']} {r['model']}"
    if "error" in r:
        print(f"  {name}: ERROR {r['error']}", flush=True)
        return
    print(
        f"  {name:24s} mb{r['meta_batch']:<3d} {r['meta_steps_per_s']:9.3f} steps/s  "
        f"compile {r['compile_s']:5.1f} s  grad rel err vs 1 device {r['grad_rel_err']:.1e} "
        f"({'agrees' if r['grad_agrees'] else 'DIFFERS'})  foreign cpu "
        f"{(r['foreign_cpu'] or 0):.0%}",
        flush=True,
    )


def worker(workload: str, n: int, timing: harness.Timing, *, chunk: int) -> dict:
    """One device count, in this process: speed, and agreement with one device."""
    if len(jax.devices()) < n:
        raise SystemExit(f"{n} devices asked, {len(jax.devices())} present")
    if workload == "sinusoid":
        mb, k, tb = 24, 10, "vmap"
        params, apply = harness.sinusoid_mlp()
        loss_fn, estimator = mse_loss(apply), mg.maml(steps=1, lr=0.01)
        sample = lambda key: harness.sinusoid_tasks(key, mb, k, k)
    else:
        mb, tb = 4, default_task_batching(convolutional=True)
        params, apply = functional(Conv4(1, 5, downsample="strided", rngs=nnx.Rngs(0)))
        loss_fn, estimator = cross_entropy_loss(apply), mg.maml(steps=1, lr=0.4)
        sample = lambda key: harness.conv4_tasks(key, mb)
    learner = mg.meta_learner(
        loss_fn, estimator, optax.adam(1e-3), task_batching=tb, jit=False, devices=n
    )
    meta_params = mg.MetaParams(params)
    state = learner.init(meta_params)

    # Speed: `steps` meta-steps per compiled call, tasks sampled on the device from the step's key.
    steps = chunk if workload == "sinusoid" else 1

    def chunked(state, key):
        def body(carry, _):
            state, key = carry
            key, sub = jax.random.split(key)
            state, metrics = learner.update(state, sample(sub))
            return (state, key), metrics["meta_loss"]

        (state, key), losses = lax.scan(body, (state, key), None, length=steps)
        return state, (key, losses[-1])

    compiled, compile_s = harness.compile_step(chunked, state, jax.random.key(0))
    t = harness.time_calls(harness.keyed(compiled, state, jax.random.key(0)), timing)

    # Agreement: the sharded meta-gradient of one fixed batch against one device's.
    tasks = sample(jax.random.key(7))

    def meta_grad(devices):  # as the learner computes it
        fn = sharded_batch_value_and_grad(estimator, loss_fn, task_batching=tb, devices=devices)
        grads = jax.jit(fn)(meta_params, tasks, 0)[1]
        return np.asarray(ravel_pytree(grads)[0], np.float64)

    g_n, g_1 = meta_grad(n), meta_grad(1)
    rel = float(np.linalg.norm(g_n - g_1) / np.linalg.norm(g_1))
    config = {"model": workload, "devices": n, "meta_batch": mb, "task_batching": tb}
    cm = harness.cost_and_memory(compiled)
    row = harness.row("devices", config, t["calls_per_s"] * steps, mb, compile_s, None, cm, t)
    row.update(
        steps_per_call=steps,
        backend=jax.default_backend(),
        grad_rel_err=rel,
        grad_agrees=rel < AGREE_RTOL,
    )
    return row


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--counts", default="1,2,4", help="comma list of device counts")
    p.add_argument("--workloads", default="sinusoid", help="sinusoid and/or conv4")
    p.add_argument("--quick", action="store_true", help="short timing, 20-step chunks")
    p.add_argument("--chunk", type=int, default=None, help="sinusoid meta-steps per call (200)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    harness.add_timing_args(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.target_s, args.blocks = min(args.target_s, 0.5), min(args.blocks, 3)
    args.chunk = args.chunk or (20 if args.quick else 200)
    args.counts = [int(n) for n in args.counts.split(",") if n]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not set(args.workloads) <= set(WORKLOADS):
        p.error(f"--workloads {args.workloads}: choose from {', '.join(WORKLOADS)}")
    if args.worker and (args.workload is None or args.n is None):
        p.error("--worker needs --workload and --n")
    return args


def main(argv=None):
    args = parse_args(argv)
    timing = harness.timing_of(args)
    if args.worker:
        print(json.dumps(worker(args.workload, args.n, timing, chunk=args.chunk), default=str))
        return None
    env = harness.environment()
    print(f"device counts {args.counts} on {env['backend']} (forced host devices on CPU)")
    rows = run(args.workloads, args.counts, timing, chunk=args.chunk)
    harness.print_table(rows, [])
    report = {"environment": env, "args": harness.args_dict(args), "results": rows}
    harness.write_json(args.out, report)
    if args.out:
        print(f"json: {args.out}")
    return report


if __name__ == "__main__":
    main()
