"""Device-count rows for `benchmark.py --devices 1,2,4`: the same meta-step with the task axis
sharded over 1, 2, 4, ... devices (``meta_learner(devices=n)``).

Each count runs in its own subprocess, because the number of forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=n``) is fixed when JAX starts; on a GPU or
TPU the first ``n`` real devices are used. Every worker also checks its sharded meta-gradient on
one fixed batch against the same meta-gradient on one device (in the same process):
``grad_rel_err`` is the relative L2 difference, ``grad_agrees`` whether it is below
``AGREE_RTOL`` (float32 sums in another order differ by about 1e-7).

Workloads: ``sinusoid`` (Finn et al.'s MLP 1-40-40-1, meta-batch 24 so that 1, 2 and 4 divide
it, chunks of meta-steps in one ``lax.scan`` with on-device task sampling) and ``conv4`` (Omniglot
5-way 1-shot shapes, strided Conv4, meta-batch 4, one dispatch per meta-step).

    python experiments/benchmark.py --only none --devices 1,2,4 --devices-workloads sinusoid,conv4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

AGREE_RTOL = 1e-5
WORKLOADS = ("sinusoid", "conv4")


def run(args) -> list[dict]:
    """One row per (workload, device count), each measured in a fresh subprocess."""
    rows = []
    for workload in args.devices_workloads:
        for n in args.devices:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                f"--workload={workload}",
                f"--n={n}",
                f"--target-s={args.target_s}",
                f"--blocks={args.blocks}",
                f"--max-call-s={args.max_call_s}",
                f"--chunk={20 if args.quick else 200}",
            ]
            flags = os.environ.get("XLA_FLAGS", "")
            env = dict(
                os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip()
            )
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


# --- the worker (one device count, in its own process) -------------------------------------------


def _worker(argv) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--target-s", type=float, default=2.0)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--max-call-s", type=float, default=10.0)
    p.add_argument("--chunk", type=int, default=200)
    a = p.parse_args(argv)

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax import lax
    from jax.flatten_util import ravel_pytree

    import metagrad as mg
    from metagrad.nn import MLP, Conv4, cross_entropy_loss, functional, mse_loss
    from metagrad.outer import default_task_batching, sharded_batch_value_and_grad

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmark as bm  # the sibling script's timing helpers

    if len(jax.devices()) < a.n:
        raise SystemExit(f"{a.n} devices asked, {len(jax.devices())} present")
    if a.workload == "sinusoid":
        mb, k, tb = 24, 10, "vmap"
        params, apply = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
        loss_fn, estimator = mse_loss(apply), mg.maml(steps=1, lr=0.01)
        sample = lambda key: bm.sample_sinusoid(key, mb, k, k)
    else:
        mb, tb = 4, default_task_batching(convolutional=True)
        params, apply = functional(Conv4(1, 5, downsample="strided", rngs=nnx.Rngs(0)))
        loss_fn, estimator = cross_entropy_loss(apply), mg.maml(steps=1, lr=0.4)
        sample = lambda key: bm.conv4_tasks(key, mb)
    learner = mg.meta_learner(
        loss_fn, estimator, optax.adam(1e-3), task_batching=tb, jit=False, devices=a.n
    )
    state = learner.init({"params": params})

    # Speed: `steps` meta-steps per compiled call, tasks sampled on the device from the step's key.
    steps = a.chunk if a.workload == "sinusoid" else 1

    def chunk(state, key):
        def body(carry, _):
            state, key = carry
            key, sub = jax.random.split(key)
            state, metrics = learner.update(state, sample(sub))
            return (state, key), metrics["meta_loss"]

        (state, key), losses = lax.scan(body, (state, key), None, length=steps)
        return state, (key, losses[-1])

    compiled, compile_s = bm.compile_step(chunk, state, jax.random.key(0))
    box = [state, jax.random.key(0)]

    def call():
        box[0], (box[1], _) = compiled(box[0], box[1])
        return box[0]

    t = bm.time_calls(call, target_s=a.target_s, blocks=a.blocks, max_call_s=a.max_call_s)

    # Agreement: the sharded meta-gradient of one fixed batch against one device's.
    tasks = sample(jax.random.key(7))

    def meta_grad(devices):  # as the learner computes it
        fn = sharded_batch_value_and_grad(estimator, loss_fn, task_batching=tb, devices=devices)
        return np.asarray(ravel_pytree(jax.jit(fn)({"params": params}, tasks, 0)[1])[0], np.float64)

    g_n, g_1 = meta_grad(a.n), meta_grad(1)
    rel = float(np.linalg.norm(g_n - g_1) / np.linalg.norm(g_1))
    row = bm._row(
        "devices",
        {"model": a.workload, "devices": a.n, "meta_batch": mb, "task_batching": tb},
        t["calls_per_s"] * steps,
        mb,
        compile_s,
        None,
        bm.cost_and_memory(compiled),
        t,
    )
    row.update(
        steps_per_call=steps,
        backend=jax.default_backend(),
        grad_rel_err=rel,
        grad_agrees=rel < AGREE_RTOL,
    )
    return row


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1:]), default=str))
