"""Mixed precision against float32 on Conv4 5-way 1-shot second-order MAML (one inner step at
0.4, Adam 1e-3): compiled memory, meta-gradient error against float64, and a short training run.

Rows: the precisions of :func:`metagrad.precision.mixed_precision`: ``float32``; ``bf16``
(products on bf16 operands with float32 accumulation, the rest float32); ``bf16_full`` (params,
inputs and every operation of the model in bf16, batch norm included, outputs cast back).

- Memory: XLA's memory analysis of the compiled meta-step (``peak = argument + output +
  temporary - alias``, `experiments.bench.harness.cost_and_memory`), Conv4 with 64 channels,
  15 queries per class, ``--meta-batch`` tasks, each task batching in ``--batching``.
- Error: the meta-batch's meta-gradient at the initial params on Omniglot tasks (random images
  without the data), relative L2 error against float64, and two floors: float64 arithmetic on
  params and images rounded to bf16 once (what rounding the weights costs, whatever the
  arithmetic), and :func:`metagrad.precision.rounded_reference` (the same roundings as bf16,
  float64 arithmetic: what the float32 accumulation adds).
- Training: ``--train-steps`` meta-steps on Omniglot's training characters (5-way 1-shot,
  5 queries per class, meta-batch 8, as the CPU preset), then the post-adaptation query
  accuracy on ``--test-tasks`` test tasks (one inner step). Same seeds in every precision.

Speed is printed but is not a target on CPU (XLA's CPU bf16 products are not faster).

    python -m experiments.bench.precision [--train-steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

import metagrad as mg
from experiments.bench import harness
from metagrad.nn import Conv4, accuracy, cross_entropy_loss, functional
from metagrad.precision import mixed_precision, rounded_reference

MODES = ("float32", "bf16", "bf16_full")
LR = 0.4


def cast(tree, dtype):
    """Every floating leaf of ``tree`` as ``dtype``."""

    def one(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(one, tree)


def wrap(apply, mode: str):
    return mixed_precision(apply, mode)


def conv4(hidden: int = 64):
    return functional(Conv4(1, 5, hidden=hidden, rngs=nnx.Rngs(0)))


def residual_mib(apply, params, tasks) -> dict[str, float]:
    """MiB per dtype of what the outer backward pass keeps of second-order MAML's meta-batch
    (vmapped tasks), as JAX's autodiff saves it (before XLA's own buffer assignment, so the
    same on every backend): the activation memory that bf16 storage halves."""
    from jax._src.ad_checkpoint import saved_residuals  # JAX's print_saved_residuals' data

    est = mg.maml(steps=1, lr=LR)
    loss_fn = cross_entropy_loss(apply)
    objective = lambda mp: jnp.mean(  # noqa: E731
        jax.vmap(lambda t: est.objective(loss_fn, mp, t, 0)[0])(tasks)
    )
    out: dict[str, float] = {}
    for aval, why in saved_residuals(objective, mg.MetaParams(params)):
        if "argument" not in why:  # the params themselves are not activation memory
            key = str(aval.dtype)
            out[key] = out.get(key, 0.0) + aval.size * aval.dtype.itemsize / 2**20
    return out


def memory_rows(args) -> list[dict]:
    params, apply = conv4()
    tasks = harness.conv4_tasks(jax.random.key(1), args.meta_batch)
    rows = []
    for mode in MODES:
        res = residual_mib(wrap(apply, mode), params, tasks)
        rows.append({"mode": mode, "task_batching": "residuals", "residual_mib": res})
        print(f"  residuals {rows[-1]}", flush=True)
    for batching in args.batching.split(","):
        for mode in MODES:
            learner = mg.meta_learner(
                cross_entropy_loss(wrap(apply, mode)),
                mg.maml(steps=1, lr=LR),
                optax.adam(1e-3),
                task_batching=batching,
                jit=False,
            )
            state = learner.init(mg.MetaParams(params))
            compiled, compile_s = harness.compile_step(learner.update, state, tasks)
            cm = harness.cost_and_memory(compiled)
            t = harness.time_calls(harness.stateful(compiled, state, tasks), args.timing)
            rows.append(
                {
                    "mode": mode,
                    "task_batching": batching,
                    "meta_batch": args.meta_batch,
                    "peak_mib": cm["peak_bytes"] / 2**20,
                    "temp_mib": cm["temp_bytes"] / 2**20,
                    "meta_steps_per_s": t["calls_per_s"],
                    "compile_s": compile_s,
                    "foreign_cpu": t["foreign_cpu"],
                }
            )
            print(f"  memory {rows[-1]}", flush=True)
    return rows


def omniglot_samplers(data_dir):
    """(train sampler, test sampler) with 5 queries per class, or None without the data."""
    try:
        from metagrad.tasks import omniglot

        splits = omniglot.omniglot_splits(data_dir)
    except Exception as e:  # noqa: BLE001 - no data: the synthetic fallback, said in the output
        print(f"  Omniglot not available ({type(e).__name__}): random images instead")
        return None
    make = lambda s: omniglot.make_sampler(splits[s], ways=5, shots=1, query=5)  # noqa: E731
    return make("train"), make("test")


def meta_grad_fn(apply, meta_batch_mode="map"):
    est = mg.maml(steps=1, lr=LR)
    loss_fn = cross_entropy_loss(apply)
    return jax.jit(
        lambda p, t: (
            mg.batch_value_and_grad(
                est, loss_fn, mg.MetaParams(p), t, 0, task_batching=meta_batch_mode
            )[1].params
        )
    )


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def error_rows(args, samplers) -> dict:
    params, apply = conv4()
    if samplers is None:
        tasks = harness.conv4_tasks(jax.random.key(2), args.error_tasks, queries=5)
    else:
        tasks = samplers[0].sample_batch(jax.random.key(2), args.error_tasks)
    rnd = lambda t: cast(cast(t, jnp.bfloat16), jnp.float64)  # noqa: E731
    with jax.enable_x64(True):
        p64, t64 = cast(params, jnp.float64), cast(tasks, jnp.float64)
        g64 = flat(meta_grad_fn(apply)(p64, t64))
        floor = flat(meta_grad_fn(apply)(rnd(params), rnd(tasks)))
        twin = flat(meta_grad_fn(rounded_reference(apply))(p64, t64))
    err = lambda g: float(np.linalg.norm(g - g64) / np.linalg.norm(g64))  # noqa: E731
    out = {"float64 at bf16-rounded params and images": err(floor)}
    for mode in MODES:
        g = flat(meta_grad_fn(wrap(apply, mode))(params, tasks))
        out[mode] = err(g)
        if mode == "bf16":
            out["bf16 vs its float64 twin (rounded_reference)"] = float(
                np.linalg.norm(g - twin) / np.linalg.norm(twin)
            )
    fo = mg.fomaml(steps=1, lr=LR)
    loss_fn = cross_entropy_loss(apply)
    gfo = jax.jit(
        lambda p, t: (
            mg.batch_value_and_grad(fo, loss_fn, mg.MetaParams(p), t, 0, task_batching="map")[
                1
            ].params
        )
    )(params, tasks)
    out["first-order MAML (float32), for scale"] = err(flat(gfo))
    print(f"  error {out}", flush=True)
    return out


def train_rows(args, samplers) -> list[dict]:
    params, apply = conv4()
    rows = []
    for mode in MODES:
        wrapped = wrap(apply, mode)
        est = mg.maml(steps=1, lr=LR, metrics_fn=accuracy(wrapped))
        learner = mg.meta_learner(
            cross_entropy_loss(wrapped), est, optax.adam(1e-3), task_batching="map", jit=False
        )
        if samplers is None:
            sample = lambda k: harness.conv4_tasks(k, 8, queries=5)  # noqa: E731
            test = harness.conv4_tasks(jax.random.key(7), args.test_tasks, queries=5)
        else:
            sample = lambda k: samplers[0].sample_batch(k, 8)  # noqa: E731
            test = samplers[1].sample_batch(jax.random.key(7), args.test_tasks)

        def step(carry, _, learner=learner, sample=sample):
            state, key = carry
            key, sub = jax.random.split(key)
            state, metrics = learner.update(state, sample(sub))
            return (state, key), metrics["meta_loss"]

        chunk = jax.jit(lambda s, k, step=step: lax.scan(step, (s, k), None, length=args.chunk))
        state, key = learner.init(mg.MetaParams(params)), jax.random.key(5)
        losses, t0 = [], time.perf_counter()
        for _ in range(args.train_steps // args.chunk):
            (state, key), loss = chunk(state, key)
            losses.append(np.asarray(loss))
        train_s = time.perf_counter() - t0
        losses = np.concatenate(losses)
        evaluate = jax.jit(
            lambda mp, t, est=est, wrapped=wrapped: lax.map(
                lambda task: est.objective(cross_entropy_loss(wrapped), mp, task, 0)[1]["acc_post"],
                t,
            )
        )
        acc = np.asarray(evaluate(state.meta_params, test), np.float64)
        rows.append(
            {
                "mode": mode,
                "meta_steps": len(losses),
                "finite": bool(np.all(np.isfinite(losses))),
                "loss_first_50": float(np.mean(losses[:50])),
                "loss_last_50": float(np.mean(losses[-50:])),
                "test_acc_post": float(acc.mean()),
                "test_acc_ci95": float(1.96 * acc.std(ddof=1) / np.sqrt(len(acc))),
                "test_tasks": args.test_tasks,
                "train_s": train_s,
            }
        )
        print(f"  train {rows[-1]}", flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meta-batch", type=int, default=8, help="tasks per meta-step (memory)")
    p.add_argument("--batching", default="map,vmap", help="task batchings for the memory rows")
    p.add_argument("--error-tasks", type=int, default=4, help="tasks in the error's meta-batch")
    p.add_argument("--train-steps", type=int, default=300, help="0: no training comparison")
    p.add_argument("--chunk", type=int, default=50, help="meta-steps per compiled call")
    p.add_argument("--test-tasks", type=int, default=200)
    p.add_argument("--data-dir", default=None, help="Omniglot (default: $METAGRAD_DATA/omniglot)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: memory,error,train")
    p.add_argument("--json", type=Path, default=None)
    harness.add_timing_args(p, harness.Timing(target_s=1.0, blocks=3, max_call_s=5.0))
    args = p.parse_args(argv)
    args.timing = harness.timing_of(args)
    skip = set(filter(None, args.skip.split(",")))
    data_dir = args.data_dir
    if data_dir is None:
        default = Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"
        data_dir = str(default) if default.exists() else None
    samplers = omniglot_samplers(data_dir) if {"error", "train"} - skip else None
    report = {"environment": harness.environment(), "args": harness.args_dict(args)}
    report["data"] = "omniglot" if samplers is not None else "random images"
    if "memory" not in skip:
        report["memory"] = memory_rows(args)
    if "error" not in skip:
        report["error"] = error_rows(args, samplers)
    if "train" not in skip and args.train_steps > 0:
        report["train"] = train_rows(args, samplers)
    print_report(report)
    harness.write_json(args.json, report)
    return report


def print_report(report: dict) -> None:
    if "memory" in report:
        print("\n| precision | task batching | peak MiB | temp MiB | meta-steps/s (CPU) |")
        print("| --- | --- | --- | --- | --- |")
        for r in report["memory"]:
            if "residual_mib" in r:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r["residual_mib"].items() if v >= 0.05)
                total = sum(r["residual_mib"].values())
                print(f"| {r['mode']} | saved residuals | {total:.1f} ({parts}) | | |")
                continue
            print(
                f"| {r['mode']} | {r['task_batching']} | {r['peak_mib']:.1f} | "
                f"{r['temp_mib']:.1f} | {r['meta_steps_per_s']:.2f} |"
            )
    if "error" in report:
        print(f"\nmeta-gradient relative error against float64 ({report['data']}):")
        for k, v in report["error"].items():
            print(f"  {k}: {v:.2e}")
    if "train" in report:
        print("\n| precision | meta-steps | loss first/last 50 | test acc (95% CI) | finite |")
        print("| --- | --- | --- | --- | --- |")
        for r in report["train"]:
            print(
                f"| {r['mode']} | {r['meta_steps']} | {r['loss_first_50']:.3f} / "
                f"{r['loss_last_50']:.3f} | {r['test_acc_post']:.3f} +- {r['test_acc_ci95']:.3f} | "
                f"{r['finite']} |"
            )


if __name__ == "__main__":
    main()
