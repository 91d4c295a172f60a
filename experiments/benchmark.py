"""metagrad's speed and memory numbers, and the PyTorch peers' in the same invocation.

Workloads (second-order MAML unless said otherwise):

- ``sinusoid``: Finn et al.'s regression (MLP 1-40-40-1, meta-batch 25, K = 10 support and 10
  query points, one inner step at 0.01, Adam 1e-3). Timed two ways: one dispatch per meta-step,
  and a chunk of meta-steps per compiled call (``lax.scan`` with on-device task sampling); the
  chunked timing also with ``lax.map`` over tasks, to choose the default task batching.
- ``conv4``: Omniglot 5-way 1-shot, 15 queries per class, random 28x28x1 inputs (as the peers),
  one inner step at 0.4, Adam 1e-3; strided and max-pool Conv4; meta-batch 32 and 4; every conv
  implementation x task batching, so that the defaults can be chosen from data. ``lean`` rows
  drop the pre-adaptation query metrics (a custom estimator) to show what they cost.
- ``inner_steps``: Conv4 strided, meta-batch 4: MAML, MAML with remat, first-order MAML and iMAML
  at 1, 5, 10, 20 and 100 inner steps; peak memory and step time, plotted to a PNG.

For each: meta-steps/s (median over timed blocks, after a warm-up call), tasks/s, compile time,
GFLOP/s (XLA's cost analysis of the compiled step; loops are counted once by XLA, so the flops of
a ``lax.map`` step are taken from its ``vmap`` twin), and the compiled step's memory from XLA's
memory analysis: ``peak = argument + output + temporary - alias`` bytes. On Linux each timing
window also records the CPU time other processes used (``foreign_cpu``): on a shared machine,
compare ratios measured in one run, never absolute numbers across runs.

    python experiments/benchmark.py --quick                      # smoke run, a few minutes
    python experiments/benchmark.py --out bench.json --peers     # everything, with the peers
    JAX_PLATFORMS=cuda python experiments/benchmark.py ...       # same script on GPU

``--peers`` needs the peers' virtualenv (``shared/peers/setup.sh``): ``--peers-python`` or
``$PEERS_PYTHON``. Only the library API is used (no Hydra).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

import metagrad as mg
from metagrad.nn import MLP, Conv4, cross_entropy_loss, default_conv_impl, functional, mse_loss
from metagrad.outer import TASK_BATCHING
from metagrad.tasks import Task

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peers  # noqa: E402  (a sibling helper, not part of the package)

CONV_IMPLS = ("lax", "patches")


# --- measuring ---------------------------------------------------------------------------------


def _cpu_snapshot() -> tuple[float, float] | None:
    """(machine-wide busy CPU seconds, this process's CPU seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return busy, time.process_time()


def _foreign_cpu(c0, c1, window_s: float) -> float | None:
    """Fraction of the machine's CPUs that other processes used during the window."""
    if c0 is None or c1 is None or window_s <= 0:
        return None
    foreign = max((c1[0] - c0[0]) - (c1[1] - c0[1]), 0.0)
    return foreign / (window_s * (os.cpu_count() or 1))


def compile_step(fn: Callable, *args):
    """``(compiled, seconds to trace, lower and compile)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def cost_and_memory(compiled) -> dict:
    """Flops from XLA's cost analysis and bytes from its memory analysis of a compiled step."""
    out: dict = {"flops": None, "peak_bytes": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        if cost and cost.get("flops", 0) > 0:
            out["flops"] = float(cost["flops"])
    except Exception:  # noqa: BLE001 - not every backend implements it
        pass
    try:
        mem = compiled.memory_analysis()
        parts = {
            k: int(getattr(mem, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "temp", "alias")
        }
        out.update({f"{k}_bytes": v for k, v in parts.items()})
        out["peak_bytes"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    except Exception:  # noqa: BLE001
        pass
    return out


def time_calls(
    call: Callable[[], object], *, target_s: float, blocks: int, max_call_s: float
) -> dict:
    """Median calls/s over ``blocks`` timed blocks of about ``target_s`` each, after one warm-up
    call. A call slower than ``max_call_s`` is timed once (the warm-up excluded)."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())  # warm-up: first-touch allocations, thread pools
    first = time.perf_counter() - t0
    if first > max_call_s:
        blocks, per_block = 1, 1
    else:
        per_block = max(1, round(target_s / max(first, 1e-6)))
    rates, c0, w0 = [], _cpu_snapshot(), time.perf_counter()
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(per_block):
            out = call()
        jax.block_until_ready(out)
        rates.append(per_block / (time.perf_counter() - t))
    window = time.perf_counter() - w0
    return {
        "calls_per_s": statistics.median(rates),
        "calls_per_s_blocks": rates,
        "calls_per_block": per_block,
        "warmup_call_s": first,
        "foreign_cpu": _foreign_cpu(c0, _cpu_snapshot(), window),
        "window_s": window,
    }


def _stateful(compiled, state, *args):
    """A no-argument call that threads the meta-state through successive calls."""
    box = [state]

    def call():
        box[0], _ = compiled(box[0], *args)
        return box[0]

    return call


# --- workloads ---------------------------------------------------------------------------------


def sample_sinusoid(key, meta_batch: int, k_support: int, k_query: int) -> Task:
    """Finn et al.'s tasks: y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5]."""
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (meta_batch, 1, 1), minval=0.1, maxval=5.0)
    phase = jax.random.uniform(kp, (meta_batch, 1, 1), maxval=math.pi)
    x = jax.random.uniform(kx, (meta_batch, k_support + k_query, 1), minval=-5.0, maxval=5.0)
    y = amp * jnp.sin(x - phase)
    return Task((x[:, :k_support], y[:, :k_support]), (x[:, k_support:], y[:, k_support:]))


def bench_sinusoid(args) -> list[dict]:
    mb, k = 25, 10
    params, apply = functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))
    chunk = 20 if args.quick else 200
    rows, step_flops = [], None
    # (task batching, timing mode): vmap is timed both ways, lax.map to choose the default
    for tb, mode in (("vmap", "dispatch"), ("vmap", "scan"), ("map", "scan")):
        learner = mg.meta_learner(
            mse_loss(apply),
            mg.maml(steps=1, lr=0.01),
            optax.adam(1e-3),
            task_batching=tb,
            jit=False,
        )
        state = learner.init({"params": params})

        def one_step(state, key, learner=learner):
            key, sub = jax.random.split(key)
            state, metrics = learner.update(state, sample_sinusoid(sub, mb, k, k))
            return (state, key), metrics["meta_loss"]

        def dispatch(state, key, one_step=one_step):  # one dispatch per meta-step
            (state, key), loss = one_step(state, key)
            return state, (key, loss)

        def scanned(state, key, one_step=one_step):  # `chunk` meta-steps per dispatch
            (state, key), losses = lax.scan(
                lambda c, _: one_step(*c), (state, key), None, length=chunk
            )
            return state, (key, losses[-1])

        fn, steps_per_call = (dispatch, 1) if mode == "dispatch" else (scanned, chunk)
        compiled, compile_s = compile_step(fn, state, jax.random.key(0))
        cm = cost_and_memory(compiled)
        if mode == "dispatch":  # loop-free: XLA counts every op once
            step_flops = cm["flops"]
        box = [state, jax.random.key(0)]

        def call(compiled=compiled, box=box):
            box[0], (box[1], _) = compiled(box[0], box[1])
            return box[0]

        t = time_calls(call, target_s=args.target_s, blocks=args.blocks, max_call_s=args.max_call_s)
        sps = t["calls_per_s"] * steps_per_call
        rows.append(
            _row(
                "sinusoid",
                {
                    "mode": mode,
                    "meta_batch": mb,
                    "estimator": "maml",
                    "inner_steps": 1,
                    "task_batching": tb,
                    "steps_per_call": steps_per_call,
                },
                sps,
                mb,
                compile_s,
                step_flops,
                cm,
                t,
            )
        )
    return rows


def conv4_tasks(key, meta_batch: int, ways=5, shots=1, queries=15, size=28) -> Task:
    """Random images with the peers' shapes: 5-way 1-shot, 15 queries per class, 28x28x1."""
    ks, kq = jax.random.split(key)
    xs = jax.random.normal(ks, (meta_batch, ways * shots, size, size, 1))
    xq = jax.random.normal(kq, (meta_batch, ways * queries, size, size, 1))
    ys = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (meta_batch, 1))
    yq = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (meta_batch, 1))
    return Task((xs, ys), (xq, yq))


def lean_maml(steps: int, lr: float) -> mg.MetaGradEstimator:
    """Second-order MAML without the pre-adaptation query metrics (``loss_pre`` costs a forward
    pass of the query set at the meta-parameters)."""
    full = mg.maml(steps=steps, lr=lr)

    def value_and_grad(loss_fn, meta_params, task, step):
        f = lambda mp: (
            mg.meta_loss(loss_fn, mp["params"], task.support, task.query, steps=steps, lr=lr),
            {},
        )
        return jax.value_and_grad(f, has_aux=True)(meta_params)

    return mg.MetaGradEstimator("maml_lean", full.objective, value_and_grad)


def conv4_learner(*, arch: str, impl: str, task_batching, estimator, meta_batch: int):
    model = Conv4(1, 5, downsample=arch, conv_impl=impl, rngs=nnx.Rngs(0))
    params, apply = functional(model)
    learner = mg.meta_learner(
        cross_entropy_loss(apply),
        estimator,
        optax.adam(1e-3),
        task_batching=task_batching,
        jit=False,
    )
    state = learner.init({"params": params})
    return learner.update, state, conv4_tasks(jax.random.key(1), meta_batch)


def run_conv4(config: dict, args, estimator, flops_cache: dict) -> dict:
    update, state, tasks = conv4_learner(
        arch=config["arch"],
        impl=config["conv_impl"],
        task_batching=config["task_batching"],
        estimator=estimator,
        meta_batch=config["meta_batch"],
    )
    compiled, compile_s = compile_step(update, state, tasks)
    cm = cost_and_memory(compiled)
    flops_key = (
        config["arch"],
        config["meta_batch"],
        config["conv_impl"],
        config.get("estimator"),
        config.get("inner_steps"),
    )
    if config["task_batching"] == "vmap" and cm["flops"]:
        flops_cache[flops_key] = cm["flops"]
    t = time_calls(
        _stateful(compiled, state, tasks),
        target_s=args.target_s,
        blocks=args.blocks,
        max_call_s=args.max_call_s,
    )
    return _row(
        config.pop("workload"),
        config,
        t["calls_per_s"],
        config["meta_batch"],
        compile_s,
        flops_cache.get(flops_key),
        cm,
        t,
    )


def bench_conv4(args) -> list[dict]:
    rows, flops_cache = [], {}
    for arch in args.archs:
        for mb in args.meta_batches:
            for impl in CONV_IMPLS:
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
                    rows.append(run_conv4(cfg, args, mg.maml(steps=1, lr=0.4), flops_cache))
                    _print_progress(rows[-1])
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
            rows.append(run_conv4(cfg, args, lean_maml(1, 0.4), flops_cache))
            _print_progress(rows[-1])
    return rows


SWEEP_ESTIMATORS = {
    "maml": lambda s: mg.maml(steps=s, lr=0.4),
    "maml_remat": lambda s: mg.maml(steps=s, lr=0.4, remat=True),
    "fomaml": lambda s: mg.fomaml(steps=s, lr=0.4),
    "imaml": lambda s: mg.imaml(steps=s, lr=0.4, reg=1.0, cg_iters=10),
}


def bench_inner_steps(args, task_batching) -> list[dict]:
    rows = []
    for name, make in SWEEP_ESTIMATORS.items():
        for steps in args.inner_steps:
            cfg = {
                "workload": "inner_steps",
                "arch": "strided",
                "meta_batch": 4,
                "conv_impl": default_conv_impl(),
                "task_batching": task_batching,
                "estimator": name,
                "inner_steps": steps,
            }
            try:
                rows.append(run_conv4(cfg, args, make(steps), {}))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at 100 steps on a GPU
                rows.append(
                    {**cfg, "workload": "inner_steps", "error": f"{type(e).__name__}: {e}"[:300]}
                )
            _print_progress(rows[-1])
    return rows


def _row(workload, config, meta_steps_per_s, meta_batch, compile_s, flops, cm, t) -> dict:
    row = {
        "workload": workload,
        **config,
        "meta_steps_per_s": meta_steps_per_s,
        "tasks_per_s": meta_steps_per_s * meta_batch,
        "compile_s": compile_s,
        "flops_per_meta_step": flops,
        "gflop_per_s": flops * meta_steps_per_s / 1e9 if flops else None,
        "peak_bytes": cm.get("peak_bytes"),
        **{
            k: cm[k]
            for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")
            if k in cm
        },
        **{
            k: t[k]
            for k in (
                "calls_per_s_blocks",
                "calls_per_block",
                "warmup_call_s",
                "foreign_cpu",
                "window_s",
            )
        },
    }
    return row


# --- reporting ---------------------------------------------------------------------------------


def _label(r: dict) -> str:
    if r["workload"] == "devices":
        mb, tb = r.get("meta_batch"), r.get("task_batching")
        return f"devices={r['devices']} {r['model']} mb{mb} {tb}"
    if r["workload"] == "sinusoid":
        return f"sinusoid mb{r['meta_batch']} {r['task_batching']} {r['mode']}"
    parts = [
        r["workload"],
        r.get("arch", ""),
        f"mb{r['meta_batch']}",
        r.get("conv_impl", ""),
        str(r.get("task_batching", "")),
        r.get("estimator", ""),
    ]
    if r["workload"] == "inner_steps":
        parts.append(f"k={r['inner_steps']}")
    return " ".join(p for p in parts if p)


def _fmt(x, spec):
    """``format(x, spec)``, or a dash as wide as the spec asks when there is no number."""
    if isinstance(x, int | float) and not isinstance(x, bool):
        return format(x, spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return "-".rjust(int(width) if width else 1)


def _print_progress(r: dict) -> None:
    if "error" in r:
        print(f"  {_label(r)}: ERROR {r['error']}", flush=True)
        return
    print(
        f"  {_label(r):55s} {r['meta_steps_per_s']:9.3f} steps/s  compile "
        f"{r['compile_s']:5.1f} s  peak {_fmt((r['peak_bytes'] or 0) / 2**20, '8.1f')} MiB"
        f"  foreign cpu {_fmt(r['foreign_cpu'], '.0%')}",
        flush=True,
    )


def add_ratios(results: list[dict], peers: list[dict]) -> list[dict]:
    """Each of our sinusoid/conv4 rows as a ratio to the fastest correct peer on its settings."""
    ratios = []
    for r in results:
        if "error" in r or r["workload"] not in ("sinusoid", "conv4"):
            continue
        match = {"workload": r["workload"]}
        if r["workload"] == "conv4":
            match.update(arch=r["arch"], meta_batch=r["meta_batch"])
        best = bench_peers.fastest_correct(peers, **match)
        if best is None:
            continue
        r["peer"] = best["impl"]
        r["peer_meta_steps_per_s"] = best["meta_steps_per_s"]
        r["peer_threads"] = best.get("threads")
        r["ratio_to_peer"] = r["meta_steps_per_s"] / best["meta_steps_per_s"]
        ratios.append(
            {
                "ours": _label(r),
                "peer": best["impl"],
                "peer_threads": best.get("threads"),
                "ratio": r["ratio_to_peer"],
                "ours_foreign_cpu": r.get("foreign_cpu"),
                "peer_foreign_cpu_s": best.get("foreign_cpu_s"),
                "peer_window_s": best.get("window_s"),
            }
        )
    return ratios


def fastest_configs(results: list[dict]) -> list[dict]:
    """Per (architecture, meta-batch): the fastest conv impl x task batching of full MAML."""
    out = []
    keys = sorted(
        {
            (r["arch"], r["meta_batch"])
            for r in results
            if r["workload"] == "conv4" and "error" not in r
        }
    )
    for arch, mb in keys:
        rows = [
            r
            for r in results
            if r["workload"] == "conv4"
            and "error" not in r
            and r["arch"] == arch
            and r["meta_batch"] == mb
            and r["estimator"] == "maml"
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


def print_table(results: list[dict], peers: list[dict]) -> None:
    header = (
        f"{'workload':55s} {'steps/s':>9s} {'tasks/s':>8s} {'compile':>8s} {'GFLOP/s':>8s} "
        f"{'peak MiB':>9s} {'foreign':>8s} {'x peer':>7s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{_label(r):55s} ERROR {r['error'][:60]}")
            continue
        print(
            f"{_label(r):55s} {r['meta_steps_per_s']:9.3f} {r['tasks_per_s']:8.1f} "
            f"{r['compile_s']:7.1f}s {_fmt(r['gflop_per_s'], '8.1f')} "
            f"{_fmt((r['peak_bytes'] or 0) / 2**20, '9.1f')} {_fmt(r['foreign_cpu'], '8.0%')} "
            f"{_fmt(r.get('ratio_to_peer'), '7.2f')}"
        )
    if peers:
        print(f"\n{'peer':55s} {'steps/s':>9s} {'correct':>8s} {'rel err':>9s} {'foreign s':>9s}")
        for p in peers:
            name = " ".join(str(p[k]) for k in ("workload", "arch", "impl") if p.get(k))
            name += f" mb{p.get('meta_batch')} threads {p.get('threads')}"
            if "error" in p:
                print(f"{name:55s} ERROR {p['error'][:60]}")
                continue
            print(
                f"{name:55s} {p['meta_steps_per_s']:9.3f} {str(p['correct']):>8s} "
                f"{_fmt(p.get('rel_l2_err'), '9.1e')} {_fmt(p.get('foreign_cpu_s'), '9.2f')}"
            )


def plot_inner_steps(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for name in SWEEP_ESTIMATORS:
        pts = sorted(
            (r["inner_steps"], r) for r in rows if r.get("estimator") == name and "error" not in r
        )
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
    plt.close(fig)
    return True


def environment() -> dict:
    dev = jax.devices()[0]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "default_conv_impl": default_conv_impl(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
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
        "--devices",
        default="",
        help="comma list of device counts (e.g. 1,2,4): rows with the task axis sharded over "
        "that many (forced host) devices, each in a subprocess (bench_devices.py)",
    )
    p.add_argument("--devices-workloads", default="sinusoid", help="sinusoid and/or conv4")
    p.add_argument(
        "--full-grid",
        action="store_true",
        help="also run lax convolutions at meta-batch 32 (about a minute a step)",
    )
    p.add_argument("--target-s", type=float, default=2.0, help="seconds per timed block")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks per configuration")
    p.add_argument(
        "--max-call-s", type=float, default=10.0, help="time slower calls once instead of in blocks"
    )
    p.add_argument("--peers", action="store_true", help="also run the PyTorch reference scripts")
    p.add_argument(
        "--peers-python",
        default=os.environ.get("PEERS_PYTHON"),
        help="python of the peers' virtualenv (default $PEERS_PYTHON)",
    )
    p.add_argument("--peers-dir", type=Path, default=None)
    p.add_argument(
        "--peer-threads",
        default=f"{os.cpu_count() or 1},1",
        help="torch thread counts to run the peers with (the fastest counts)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.archs, args.meta_batches, args.inner_steps = "strided", "4", "1,2"
        args.target_s, args.blocks = min(args.target_s, 0.5), min(args.blocks, 3)
    args.archs = [a for a in args.archs.split(",") if a]
    args.meta_batches = [int(m) for m in args.meta_batches.split(",") if m]
    args.inner_steps = [int(s) for s in args.inner_steps.split(",") if s]
    only = set(args.only.split(","))
    args.devices = [int(n) for n in args.devices.split(",") if n]
    args.devices_workloads = [w for w in args.devices_workloads.split(",") if w]

    env = environment()
    print(
        f"metagrad benchmark on {env['backend']} ({env['device']}, {env['cpu_count']} CPUs, "
        f"jax {env['jax']}); default conv impl {env['default_conv_impl']}",
        flush=True,
    )
    results: list[dict] = []
    if "sinusoid" in only:
        print("sinusoid MAML", flush=True)
        results += bench_sinusoid(args)
        for r in results:
            _print_progress(r)
    if "conv4" in only:
        print("Conv4 MAML", flush=True)
        results += bench_conv4(args)
    if "inner_steps" in only:
        print("Conv4 inner-step sweep", flush=True)
        results += bench_inner_steps(args, args.sweep_task_batching)
    if args.devices:
        import bench_devices  # a sibling helper, needed only here

        print(f"device counts {args.devices} (forced host devices on CPU)", flush=True)
        results += bench_devices.run(args)

    peers: list[dict] = []
    if args.peers:
        peers = run_peers(args, only)
    ratios = add_ratios(results, peers)
    print_table(results, peers)
    fastest = fastest_configs(results)
    for f in fastest:
        print(
            f"fastest on {f['backend']}, conv4 {f['arch']} mb{f['meta_batch']}: "
            + ", ".join(
                f"{r['conv_impl']}/{r['task_batching']} {r['meta_steps_per_s']:.3f}"
                for r in f["ranking"]
            )
        )

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
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "peers": peers,
        "ratios": ratios,
        "fastest": fastest,
        "plot": plot,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
        print(f"json: {args.out}")
    return report


def run_peers(args, only: set[str]) -> list[dict]:
    peers_dir = args.peers_dir or bench_peers.default_peers_dir()
    if not args.peers_python or peers_dir is None:
        print(
            "--peers needs --peers-python (or $PEERS_PYTHON) and the peers' directory "
            "(--peers-dir or $PEERS_DIR)",
            file=sys.stderr,
        )
        return []
    threads = [int(t) for t in args.peer_threads.split(",") if t]
    print(f"PyTorch peers ({peers_dir}, torch threads {threads})", flush=True)
    return bench_peers.run_workloads(
        args.peers_python,
        peers_dir,
        only=only,
        archs=args.archs,
        meta_batches=args.meta_batches,
        quick=args.quick,
        threads=threads,
    )


if __name__ == "__main__":
    main()
