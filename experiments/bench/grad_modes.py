"""Each differentiation mode's compiled memory and time per meta-gradient at 1, 10 and 100 inner
steps, on Finn et al.'s sinusoid MLP (1-40-40-1), measured in one run.

Modes: ``second_order`` (MAML), ``first_order`` (FOMAML), ``truncated`` (backpropagation through
the last ``--truncate`` steps), ``implicit`` (the implicit estimator on iMAML's proximal problem,
CG on Hessian-vector products), ``es`` (antithetic ES, ``--es-samples`` pairs). Memory is XLA's
memory analysis of the compiled meta-gradient (``peak = argument + output + temporary - alias``);
time is the median of timed blocks after a warm-up call (`experiments.bench.harness`). On a
shared machine compare the rows of one run, not numbers across runs.

    python -m experiments.bench.grad_modes [--steps 1,10,100] [--meta-batch 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import jax

import metagrad as mg
from experiments.bench import harness
from metagrad.estimators import implicit
from metagrad.nn import mse_loss

MODES = ("second_order", "first_order", "truncated", "implicit", "es")


def make_mode(mode: str, *, steps: int, lr: float, truncate: int, reg: float, es_samples: int):
    """The estimator for one mode (the keywords the CLI's ``grad_mode`` maps to)."""
    if mode == "second_order":
        return mg.maml(steps=steps, lr=lr)
    if mode == "first_order":
        return mg.fomaml(steps=steps, lr=lr)
    if mode == "truncated":
        return mg.truncated(min(truncate, steps), steps=steps, lr=lr)
    if mode == "implicit":
        return implicit(inner_solver=mg.InnerLoop(steps=steps, lr=lr), reg=reg, maxiter=10)
    if mode == "es":
        return mg.es(0.01, es_samples, steps=steps, lr=lr)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def measure(mode: str, steps: int, args, timing: harness.Timing) -> dict:
    params, apply = harness.sinusoid_mlp()
    loss_fn = mse_loss(apply)
    tasks = harness.sinusoid_tasks(jax.random.key(0), args.meta_batch)
    est = make_mode(
        mode, steps=steps, lr=args.lr, truncate=args.truncate, reg=args.reg,
        es_samples=args.es_samples,
    )  # fmt: skip
    meta_grad = lambda mp, t: mg.batch_value_and_grad(est, loss_fn, mp, t, 0)[1]
    mp = mg.MetaParams(params)
    compiled, compile_s = harness.compile_step(meta_grad, mp, tasks)
    cm = harness.cost_and_memory(compiled)
    t = harness.time_calls(lambda: compiled(mp, tasks), timing)
    return {
        "mode": mode,
        "steps": steps,
        "peak_bytes": cm.get("peak_bytes"),
        "temp_bytes": cm.get("temp_bytes"),
        "ms_per_meta_grad": 1e3 / t["calls_per_s"],
        "compile_s": compile_s,
        "foreign_cpu": t["foreign_cpu"],
    }


def print_table(rows: list[dict]) -> None:
    steps = sorted({r["steps"] for r in rows})
    by = {(r["mode"], r["steps"]): r for r in rows}
    head = " | ".join(f"{s} step{'s' * (s != 1)}: MiB, ms" for s in steps)
    print(f"| mode | {head} |")
    print("| --- |" + " --- |" * len(steps))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        cells = []
        for s in steps:
            r = by.get((mode, s))
            mib = r["peak_bytes"] / 2**20 if r and r["peak_bytes"] is not None else float("nan")
            cells.append(f"{mib:.2f}, {r['ms_per_meta_grad']:.2f}" if r else "-")
        print(f"| {mode} | " + " | ".join(cells) + " |")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="1,10,100", help="inner step counts, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help="modes, comma-separated")
    parser.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-gradient")
    parser.add_argument("--lr", type=float, default=0.01, help="inner learning rate")
    parser.add_argument("--truncate", type=int, default=5, help="truncated: steps backpropagated")
    parser.add_argument("--reg", type=float, default=1.0, help="implicit: proximal lambda")
    parser.add_argument("--es-samples", type=int, default=16, help="es: antithetic pairs")
    parser.add_argument("--json", help="also write the rows here")
    harness.add_timing_args(parser, harness.Timing(target_s=0.5, blocks=3, max_call_s=10.0))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            parser.error(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
    steps = [int(s) for s in args.steps.split(",") if s]
    timing = harness.timing_of(args)
    rows = []
    for mode in modes:
        for s in steps:
            r = measure(mode, s, args, timing)
            print(
                f"{mode:>12} steps={s:<4d} peak {r['peak_bytes'] / 2**20:8.2f} MiB  "
                f"{r['ms_per_meta_grad']:9.2f} ms  (compile {r['compile_s']:.1f} s)",
                flush=True,
            )
            rows.append(r)
    print()
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args), "env": harness.environment()}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
