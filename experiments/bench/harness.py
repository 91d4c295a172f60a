"""What the benchmarks share: the workloads, how a compiled meta-step is timed and measured, the
PyTorch peers, and the rows and tables of the report. Entry points import this module; it
imports no entry point (and neither Hydra nor torch: the peers run in their own interpreter).

Measuring: meta-steps/s is the median over timed blocks after a warm-up call; GFLOP/s comes from
XLA's cost analysis of the compiled step (loops are counted once by XLA, so a ``lax.map`` step
takes its flops from its ``vmap`` twin); memory from XLA's memory analysis, ``peak = argument +
output + temporary - alias`` bytes. On Linux each timing window also records the CPU time other
processes used (``foreign_cpu``): on a shared machine, compare ratios measured in one run, never
absolute numbers across runs.

Peers: the scripts in ``shared/peers`` (their own virtualenv with torch). Correctness is
established in the same invocation: each script's ``--check`` compares one meta-gradient of
every implementation with the hand-written autograd loop, and only peers whose relative error is
below ``CORRECT_RTOL`` count as the speed to beat (torch.func's vmap is wrong through batch norm,
so it is excluded on Conv4). Torch's two-thread runs collapse when another process holds a core
(its OpenMP workers wait for each other), so the peers can run with several thread counts and
the fastest counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

import metagrad as mg
from metagrad.estimators.base import query_loss
from metagrad.nn import MLP, Conv4, cross_entropy_loss, default_conv_impl, functional, mse_loss
from metagrad.outer import default_compiler_options
from metagrad.tasks import sinusoid

CONV_IMPLS = ("lax", "patches")


# --- measuring ---------------------------------------------------------------------------------


class Timing(NamedTuple):
    """How long to time one configuration: ``blocks`` blocks of about ``target_s`` seconds each,
    after a warm-up call; a call slower than ``max_call_s`` is timed once."""

    target_s: float = 2.0
    blocks: int = 5
    max_call_s: float = 10.0


def add_timing_args(p: argparse.ArgumentParser, default: Timing | None = None) -> None:
    """``--target-s``, ``--blocks`` and ``--max-call-s`` (read back by :func:`timing_of`)."""
    default = default or Timing()
    p.add_argument("--target-s", type=float, default=default.target_s, help="seconds per block")
    p.add_argument("--blocks", type=int, default=default.blocks, help="timed blocks per config")
    p.add_argument(
        "--max-call-s",
        type=float,
        default=default.max_call_s,
        help="time slower calls once instead of in blocks",
    )


def timing_of(args: argparse.Namespace) -> Timing:
    return Timing(args.target_s, args.blocks, args.max_call_s)


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


def compile_step(fn: Callable, *args, compiler_options: dict | None = None):
    """``(compiled, seconds to trace, lower and compile)``; ``compiler_options`` are XLA debug
    options for this compilation alone (as ``XLA_FLAGS`` would set them for every one)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=compiler_options or None)
    return compiled, time.perf_counter() - t0


def small_model_xla_options() -> dict:
    """The sinusoid rows' XLA options: :func:`metagrad.outer.default_compiler_options` for a
    model without convolutions (YNNPACK for dots alone on CPU, 1.16x there; nothing elsewhere).
    Conv4's rows keep XLA's defaults, as that function's measurements say they should."""
    return default_compiler_options(convolutional=False)


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


def time_calls(call: Callable[[], object], timing: Timing) -> dict:
    """Median calls/s over ``timing.blocks`` timed blocks of about ``timing.target_s`` each,
    after one warm-up call. A call slower than ``timing.max_call_s`` is timed once (the warm-up
    excluded)."""
    t0 = time.perf_counter()
    jax.block_until_ready(call())  # warm-up: first-touch allocations, thread pools
    first = time.perf_counter() - t0
    blocks = timing.blocks
    if first > timing.max_call_s:
        blocks, per_block = 1, 1
    else:
        per_block = max(1, round(timing.target_s / max(first, 1e-6)))
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


def stateful(compiled, state, *args):
    """A no-argument call that threads the meta-state through successive calls."""
    box = [state]

    def call():
        box[0], _ = compiled(box[0], *args)
        return box[0]

    return call


def keyed(compiled, state, key):
    """A no-argument call of ``compiled(state, key) -> (state, (key, ...))`` that threads the
    meta-state and the key through successive calls (tasks sampled on the device)."""
    box = [state, key]

    def call():
        box[0], (box[1], _) = compiled(box[0], box[1])
        return box[0]

    return call


# --- workloads ---------------------------------------------------------------------------------


def sinusoid_tasks(key, meta_batch: int, shots: int = 10, query: int = 10) -> mg.Task:
    """Finn et al.'s tasks, as training samples them (`metagrad.tasks.sinusoid`, one draw)."""
    return sinusoid.sample_batch_flat(key, meta_batch, shots=shots, query=query)


def sinusoid_mlp():
    """Finn et al.'s MLP 1-40-40-1 as ``(params, apply)``."""
    return functional(MLP(1, (40, 40), 1, rngs=nnx.Rngs(0)))


def conv4_tasks(key, meta_batch: int, ways=5, shots=1, queries=15, size=28) -> mg.Task:
    """Random images with the peers' shapes: 5-way 1-shot, 15 queries per class, 28x28x1."""
    ks, kq = jax.random.split(key)
    xs = jax.random.normal(ks, (meta_batch, ways * shots, size, size, 1))
    xq = jax.random.normal(kq, (meta_batch, ways * queries, size, size, 1))
    ys = jnp.tile(jnp.repeat(jnp.arange(ways), shots), (meta_batch, 1))
    yq = jnp.tile(jnp.repeat(jnp.arange(ways), queries), (meta_batch, 1))
    return mg.Task((xs, ys), (xq, yq))


def lean_maml(steps: int, lr: float) -> mg.MetaGradEstimator:
    """Second-order MAML without the pre-adaptation query metrics (``loss_pre`` costs a forward
    pass of the query set at the meta-parameters): :func:`metagrad.maml`'s objective, its inner
    loop included, with no metrics."""
    full = mg.maml(steps=steps, lr=lr)
    inner = full.inner

    def objective(loss_fn, meta_params, task, step):
        adapted = inner.run(loss_fn, meta_params, task.support)
        return query_loss(loss_fn, inner, adapted, task.query, max(steps - 1, 0)), {}

    value_and_grad = jax.value_and_grad(objective, argnums=1, has_aux=True)
    return mg.MetaGradEstimator("maml_lean", full.objective, value_and_grad, inner)


def bench_sinusoid(timing: Timing, *, chunk: int) -> list[dict]:
    """Sinusoid MAML (meta-batch 25, K = 10 + 10, one inner step at 0.01, Adam 1e-3): one
    dispatch per meta-step with vmap over tasks, and ``chunk`` meta-steps per compiled call
    (``lax.scan``) with vmap and with ``lax.map``. The chunked calls draw the chunk's tasks on
    the device ahead of the scan, in one call batched over steps, as the CLI's training loop
    does (`metagrad.experiment.chunks`); the per-step call draws its own. Every row compiles
    with :func:`small_model_xla_options` (``xla_options`` in the row) but one, the vmap scan
    with XLA's defaults, which shows what the options give; one, ``maml_lean``, without the
    pre-adaptation query loss (the peers compute no such metric); and one, ``given``, over
    ``chunk`` steps' tasks drawn before the timed calls, as the peers draw theirs (their timed
    loop samples nothing), so that its ratio compares the same work."""
    mb, k = 25, 10
    params, apply = sinusoid_mlp()
    rows, step_flops = [], {}
    tuned = small_model_xla_options()
    estimators = {"maml": mg.maml(steps=1, lr=0.01), "maml_lean": lean_maml(1, 0.01)}
    # (task batching, timing mode, XLA options, estimator): vmap is timed both ways, lax.map to
    # choose the default; every estimator's first row is a dispatch row, whose flops XLA counts
    configs = [
        ("vmap", "dispatch", tuned, "maml"),
        ("vmap", "scan", tuned, "maml"),
        ("map", "scan", tuned, "maml"),
        ("vmap", "dispatch", tuned, "maml_lean"),
        ("vmap", "scan", tuned, "maml_lean"),
        ("vmap", "given", tuned, "maml"),
    ]
    if tuned:
        configs.insert(2, ("vmap", "scan", {}, "maml"))
    for tb, mode, xla_options, estimator in configs:
        learner = mg.meta_learner(
            mse_loss(apply),
            estimators[estimator],
            optax.adam(1e-3),
            task_batching=tb,
            jit=False,
        )
        state = learner.init(mg.MetaParams(params))

        def dispatch(state, key, learner=learner):  # one dispatch per meta-step
            key, sub = jax.random.split(key)
            state, metrics = learner.update(state, sinusoid_tasks(sub, mb, k, k))
            return state, (key, metrics["meta_loss"])

        def scanned(state, key, learner=learner):  # `chunk` meta-steps per dispatch
            key, sub = jax.random.split(key)
            keys = jax.random.split(sub, chunk)
            tasks = jax.vmap(lambda kk: sinusoid_tasks(kk, mb, k, k))(keys)
            state, metrics = lax.scan(learner.update, state, tasks)
            return state, (key, metrics["meta_loss"][-1])

        def given(state, tasks, learner=learner):  # `chunk` meta-steps on the tasks passed
            state, metrics = lax.scan(learner.update, state, tasks)
            return state, metrics["meta_loss"][-1]

        if mode == "given":
            keys = jax.random.split(jax.random.key(0), chunk)
            tasks = jax.vmap(lambda kk: sinusoid_tasks(kk, mb, k, k))(keys)
            compiled, compile_s = compile_step(given, state, tasks, compiler_options=xla_options)
            call, steps_per_call = stateful(compiled, state, tasks), chunk
        else:
            fn, steps_per_call = (dispatch, 1) if mode == "dispatch" else (scanned, chunk)
            compiled, compile_s = compile_step(
                fn, state, jax.random.key(0), compiler_options=xla_options
            )
            call = keyed(compiled, state, jax.random.key(0))
        cm = cost_and_memory(compiled)
        if mode == "dispatch":  # loop-free: XLA counts every op once
            step_flops[estimator] = cm["flops"]
        t = time_calls(call, timing)
        config = {
            "mode": mode,
            "meta_batch": mb,
            "estimator": estimator,
            "inner_steps": 1,
            "task_batching": tb,
            "steps_per_call": steps_per_call,
            "xla_options": xla_options,
        }
        sps = t["calls_per_s"] * steps_per_call
        rows.append(row("sinusoid", config, sps, mb, compile_s, step_flops[estimator], cm, t))
    return rows


def bench_matmul_peak(timing: Timing, n: int = 2048) -> dict:
    """The machine's float32 matrix-multiply rate: ``jnp.dot`` of two ``n x n`` matrices, timed
    as every other row (median of blocks); the "fraction of peak" of the other rows is theirs
    against this one, measured in the same run."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    compiled, compile_s = compile_step(jnp.dot, a, b)
    t = time_calls(lambda: compiled(a, b), timing)
    config = {"mode": f"jnp.dot {n}x{n} float32"}
    return row(
        "peak", config, t["calls_per_s"], 1, compile_s, 2.0 * n**3, cost_and_memory(compiled), t
    )


def add_fraction_of_peak(results: list[dict]) -> float | None:
    """Sets each row's ``fraction_of_peak`` (its GFLOP/s over the ``peak`` row's); returns the
    peak GFLOP/s, or None without a peak row."""
    peak = next((r["gflop_per_s"] for r in results if r.get("workload") == "peak"), None)
    for r in results:
        if peak and r.get("gflop_per_s") and r["workload"] != "peak":
            r["fraction_of_peak"] = r["gflop_per_s"] / peak
    return peak


def conv4_learner(*, arch: str, impl: str, task_batching, estimator, meta_batch: int):
    """``(update, state, tasks)`` of Conv4 (``arch``: strided or maxpool) MAML with Adam 1e-3."""
    model = Conv4(1, 5, downsample=arch, conv_impl=impl, rngs=nnx.Rngs(0))
    params, apply = functional(model)
    learner = mg.meta_learner(
        cross_entropy_loss(apply),
        estimator,
        optax.adam(1e-3),
        task_batching=task_batching,
        jit=False,
    )
    state = learner.init(mg.MetaParams(params))
    return learner.update, state, conv4_tasks(jax.random.key(1), meta_batch)


def run_conv4(config: dict, timing: Timing, estimator, flops_cache: dict) -> dict:
    """One row of Conv4 MAML on fixed random tasks; ``config`` names the workload, ``arch``,
    ``meta_batch``, ``conv_impl``, ``task_batching`` (and ``estimator``, ``inner_steps``).
    ``flops_cache`` carries a vmap row's flops to its ``lax.map`` twin."""
    config = dict(config)
    update, state, tasks = conv4_learner(
        arch=config["arch"],
        impl=config["conv_impl"],
        task_batching=config["task_batching"],
        estimator=estimator,
        meta_batch=config["meta_batch"],
    )
    compiled, compile_s = compile_step(update, state, tasks)
    cm = cost_and_memory(compiled)
    flops_key = tuple(
        config.get(k) for k in ("arch", "meta_batch", "conv_impl", "estimator", "inner_steps")
    )
    if config["task_batching"] == "vmap" and cm["flops"]:
        flops_cache[flops_key] = cm["flops"]
    t = time_calls(stateful(compiled, state, tasks), timing)
    mb = config["meta_batch"]
    flops = flops_cache.get(flops_key)
    if flops is None and config["task_batching"] == "map" and cm["flops"]:
        # No vmap twin measured (the lean rows): XLA counted the loop body, one task, once.
        # Times the meta-batch this overcounts only the optimizer update (Conv4 mb4: 0.09%).
        flops = cm["flops"] * mb
        config["flops_from"] = "one task's lax.map body x meta-batch"
    return row(config.pop("workload"), config, t["calls_per_s"], mb, compile_s, flops, cm, t)


# --- rows and reports --------------------------------------------------------------------------


def row(workload, config, meta_steps_per_s, meta_batch, compile_s, flops, cm, t) -> dict:
    """One result: the configuration, the speed, compile time, flops and memory, the timing."""
    return {
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


def label(r: dict) -> str:
    if r["workload"] == "devices":
        mb, tb = r.get("meta_batch"), r.get("task_batching")
        return f"devices={r['devices']} {r['model']} mb{mb} {tb}"
    if r["workload"] == "sinusoid":
        xla = " (XLA defaults)" if "xla_options" in r and not r["xla_options"] else ""
        lean = " maml_lean" if r.get("estimator") == "maml_lean" else ""
        return f"sinusoid mb{r['meta_batch']} {r['task_batching']} {r['mode']}{xla}{lean}"
    if r["workload"] == "peak":
        return f"peak: {r['mode']}"
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


def fmt(x, spec):
    """``format(x, spec)``, or a dash as wide as the spec asks when there is no number."""
    if isinstance(x, int | float) and not isinstance(x, bool):
        return format(x, spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return "-".rjust(int(width) if width else 1)


def print_progress(r: dict) -> None:
    if "error" in r:
        print(f"  {label(r)}: ERROR {r['error']}", flush=True)
        return
    print(
        f"  {label(r):55s} {r['meta_steps_per_s']:9.3f} steps/s  compile "
        f"{r['compile_s']:5.1f} s  peak {fmt((r['peak_bytes'] or 0) / 2**20, '8.1f')} MiB"
        f"  foreign cpu {fmt(r['foreign_cpu'], '.0%')}",
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
        best = fastest_correct(peers, **match)
        if best is None:
            continue
        r["peer"] = best["impl"]
        r["peer_meta_steps_per_s"] = best["meta_steps_per_s"]
        r["peer_threads"] = best.get("threads")
        r["ratio_to_peer"] = r["meta_steps_per_s"] / best["meta_steps_per_s"]
        ratios.append(
            {
                "ours": label(r),
                "peer": best["impl"],
                "peer_threads": best.get("threads"),
                "ratio": r["ratio_to_peer"],
                "ours_foreign_cpu": r.get("foreign_cpu"),
                "peer_foreign_cpu_s": best.get("foreign_cpu_s"),
                "peer_window_s": best.get("window_s"),
            }
        )
    return ratios


def print_table(results: list[dict], peers: list[dict]) -> None:
    header = (
        f"{'workload':55s} {'steps/s':>9s} {'tasks/s':>8s} {'compile':>8s} {'GFLOP/s':>8s} "
        f"{'of peak':>8s} {'peak MiB':>9s} {'foreign':>8s} {'x peer':>7s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{label(r):55s} ERROR {r['error'][:60]}")
            continue
        print(
            f"{label(r):55s} {r['meta_steps_per_s']:9.3f} {r['tasks_per_s']:8.1f} "
            f"{r['compile_s']:7.1f}s {fmt(r['gflop_per_s'], '8.1f')} "
            f"{fmt(r.get('fraction_of_peak'), '8.0%')} "
            f"{fmt((r['peak_bytes'] or 0) / 2**20, '9.1f')} {fmt(r['foreign_cpu'], '8.0%')} "
            f"{fmt(r.get('ratio_to_peer'), '7.2f')}"
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
                f"{fmt(p.get('rel_l2_err'), '9.1e')} {fmt(p.get('foreign_cpu_s'), '9.2f')}"
            )


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


def args_dict(args: argparse.Namespace) -> dict:
    """The parsed arguments as JSON values (paths and sets as strings and lists)."""
    out = {}
    for k, v in vars(args).items():
        out[k] = str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v
    return out


def write_json(path: Path | None, report: dict) -> None:
    """Writes ``report`` to ``path`` (its folder made), or nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


# --- the PyTorch peers -------------------------------------------------------------------------

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


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """``--peers``, ``--peers-python``, ``--peers-dir`` and ``--peer-threads``."""
    p.add_argument("--peers", action="store_true", help="also run the PyTorch reference scripts")
    p.add_argument(
        "--peers-python",
        default=os.environ.get("PEERS_PYTHON"),
        help="python of the peers' virtualenv (default $PEERS_PYTHON)",
    )
    p.add_argument(
        "--peers-dir", type=Path, default=None, help="default: $PEERS_DIR, else ../shared/peers"
    )
    p.add_argument(
        "--peer-threads",
        default=f"{os.cpu_count() or 1},1",
        help="torch thread counts to run the peers with (the fastest counts)",
    )


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


def _run_peer(
    python: str, script: Path, args: list[str], timeout: float, prefix: tuple[str, ...] = ()
) -> list[dict]:
    """The JSON lines of ``python [*prefix] script args`` (``prefix``: e.g. a device launcher),
    run in the peers' folder with that folder on ``PYTHONPATH`` (the peers import each other,
    also when a launcher runs them)."""
    cmd = [python, *prefix, str(script), *args]
    path = os.pathsep.join(p for p in (str(script.parent), os.environ.get("PYTHONPATH")) if p)
    print("  $", " ".join(cmd[1:]), flush=True)
    try:
        proc = subprocess.run(
            cmd,
            cwd=script.parent,
            env=dict(os.environ, PYTHONPATH=path),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
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
    for r in check_rows:
        if r.get("check") == "meta_grad" and r.get("vs") == REFERENCE:
            err = r.get("rel_l2_err")
            out[r["impl"]] = {"correct": err is not None and err < CORRECT_RTOL, "rel_l2_err": err}
    for impl in impls:
        out.setdefault(impl, {"correct": False, "rel_l2_err": None})
    return out


def peers_sinusoid(
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
    check = _run_peer(python, script, ["--check", "--impls", ",".join(order)], 600, prefix)
    checks = _correct(check, impls)
    warmup, timing = (10, 50) if quick else (20, 200)
    rows = []
    for n in threads:
        args = ["--impls", ",".join(impls), "--steps", str(warmup + timing)]
        args += ["--warmup", str(warmup), "--timing-steps", str(timing), "--test-tasks", "10"]
        args += ["--threads", str(n)]
        rows += _run_peer(python, script, args, 1800, prefix)
    out = []
    for r in rows:
        if "error" in r:
            out.append({"workload": "sinusoid", "impl": r.get("impl"), "error": r["error"]})
            continue
        out.append(
            {
                "workload": "sinusoid",
                "impl": r["impl"],
                "meta_batch": r.get("meta_batch", 25),
                "threads": r.get("threads"),
                "meta_steps_per_s": r.get("steps_per_s_block_median", r.get("steps_per_s")),
                "meta_steps_per_s_overall": r.get("steps_per_s"),
                "foreign_cpu_s": r.get("foreign_cpu_s_in_window"),
                "window_s": r.get("window_s"),
                **checks.get(r["impl"], {"correct": False, "rel_l2_err": None}),
            }
        )
    return out


def peers_conv4(
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
    checks = _correct(_run_peer(python, script, check_args, 600, prefix), impls)
    warmup, timing = (1, 3) if quick else (2, 6)
    rows = []
    for n in threads:
        args = ["--arch", arch, "--impls", ",".join(impls)]
        args += ["--meta-batches", ",".join(map(str, meta_batches))]
        args += ["--warmup", str(warmup), "--timing-steps", str(timing), "--threads", str(n)]
        rows += _run_peer(python, script, args, 3600, prefix)
    out = []
    for r in rows:
        base = {
            "workload": "conv4",
            "arch": arch,
            "impl": r.get("impl"),
            "meta_batch": r.get("meta_batch"),
            "threads": r.get("threads"),
        }
        if "error" in r:
            out.append({**base, "error": r["error"]})
            continue
        median_s = r.get("s_per_meta_step_median") or r["s_per_meta_step"]
        out.append(
            {
                **base,
                "meta_steps_per_s": 1.0 / median_s,
                "meta_steps_per_s_overall": r.get("meta_steps_per_s"),
                "tasks_per_s": r["meta_batch"] / median_s,
                "foreign_cpu_s": r.get("foreign_cpu_s_in_window"),
                "window_s": r.get("window_s"),
                **checks.get(r["impl"], {"correct": False, "rel_l2_err": None}),
            }
        )
    return out


def run_peers(
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
        rows += peers_sinusoid(python, peers_dir, impls=impls.get("sinusoid"), **common)
    if "conv4" in only:
        for arch in archs:
            rows += peers_conv4(
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
