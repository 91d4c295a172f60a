"""A preset end to end on one GPU, Omniglot 5-way 1-shot MAML
(``conf/experiment/maml_omniglot_5w1s.yaml``) by default, any preset with ``--preset`` (the
image benchmarks' too, with their data folder: ``--preset maml_miniimagenet_5w1s --data-dir
/path/to/miniimagenet``): the preset is composed by Hydra's compose API
(`experiments._hydra.compose_config`, as the CLI would), trained by
`metagrad.experiment.train`, and summarised on stdout and in one JSON file.

With ``--time-budget-s`` a throwaway calibration run first trains two chunks
(``train.chunk_steps`` meta-steps each) and takes the speed of the second (the first call also
warms up); the real run then trains, from scratch, as many whole chunks as fit the budget (at
most ``--steps``, default the preset's 60,000). The budget covers the real run's timed
meta-steps only: compilation, validation and the test evaluation come on top. The real run
compiles the same program as the calibration run and finds it in JAX's persistent compilation
cache. (Resuming the calibration run instead would lower a different program, from restored
arrays, and compile it again.) Run from the checkout's root (installed or not):

    python -m experiments.gpu.omniglot --data-dir /path/to/omniglot --out omniglot.json
    python -m experiments.gpu.omniglot --data-dir D --time-budget-s 200 --out omniglot.json \\
        --set train.meta_batch_size=16          # any Config key, as on the Hydra command line
    python -m experiments.gpu.omniglot --preset maml_miniimagenet_5w1s \\
        --data-dir /path/to/miniimagenet --out mini.json   # pickles, csv + images/, or folders

On the device machine (the `run` tool), after ``bash experiments/gpu/prepare.sh`` here has put
the Omniglot zips, the preprocessed cache, the PyTorch peers and wheels of Hydra (which that
machine lacks) into ``.gpu_carry/`` (carry ``[".gpu_carry"]``; the whole command, which installs
the wheels first, is in `experiments.gpu.benchmark`'s docstring):

    python -m experiments.gpu.omniglot --data-dir .gpu_carry/omniglot \\
        --cache-dir .gpu_carry/cache --time-budget-s 150 --out $OUT/omniglot.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from experiments._hydra import compose_config
from metagrad.experiment.config import ConfigError

TEST_METRICS = [f"eval_{k}_{x}" for k in ("acc", "loss") for x in ("post", "post_ci95", "pre")]


def steps_within(budget_s: float, steps_per_s: float, *, chunk: int, cap: int) -> int:
    """The whole chunks of meta-steps that fit ``budget_s`` at ``steps_per_s`` (at least one),
    and at most ``cap``."""
    fit = math.floor(budget_s * steps_per_s / chunk) * chunk
    return min(max(fit, chunk), cap)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="maml_omniglot_5w1s", help="a conf/experiment/ name")
    p.add_argument(
        "--data-dir",
        default=None,
        help="the preset's data folder (the two Omniglot zips, the mini-ImageNet files, ...)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="metagrad's preprocessed cache folder (optional)"
    )
    p.add_argument("--steps", type=int, default=None, help="meta-steps (default: the preset's)")
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="train only as many meta-steps as fit this many seconds (after a calibration run)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    p.add_argument("--run-dir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = ["train.progress=false", *args.set]
    if args.data_dir:
        overrides.append(f"task.data_dir={args.data_dir}")
    if args.cache_dir:
        overrides.append(f"task.cache_dir={args.cache_dir}")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:  # bad input fails here, before JAX compiles anything
        cfg = compose_config([f"+experiment={args.preset}", *overrides])
        if args.time_budget_s is not None and not args.time_budget_s > 0:
            raise ConfigError(f"--time-budget-s={args.time_budget_s}: must be positive")
    except ConfigError as e:
        sys.exit(f"error: {e}")

    import jax

    from metagrad.experiment.loop import train

    # The calibration run and the real run compile the same program: cache it on disk.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "jaxc"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} (jax {jax.__version__})", flush=True)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="gpu_omniglot_"))
    t = cfg.train
    summary = {"preset": args.preset, "device": device.device_kind, "backend": device.platform}
    wall0 = time.perf_counter()
    asked, chunk = t.steps, t.chunk_steps
    summary["steps_asked"] = asked
    if args.time_budget_s is not None and asked > 2 * chunk:
        # Two chunks to measure the speed; the throwaway test evaluation is kept small.
        e = cfg.eval
        calibration = dataclasses.replace(
            cfg,
            train=dataclasses.replace(t, steps=2 * chunk),
            eval=dataclasses.replace(e, tasks=e.val_tasks, figure=False),
        )
        calibration_dir = Path(tempfile.mkdtemp(prefix="gpu_omniglot_calibration_"))
        first = train(calibration, calibration_dir)
        log = [json.loads(x) for x in (calibration_dir / "metrics.jsonl").read_text().splitlines()]
        speed = chunk / [r for r in log if r["kind"] == "train"][-1]["seconds"]
        target = steps_within(args.time_budget_s, speed, chunk=chunk, cap=asked)
        summary.update(
            calibration_steps_per_s=speed,
            calibration_compile_s=first["compile_seconds"],
            time_budget_s=args.time_budget_s,
        )
        print(
            f"calibration: {speed:.2f} meta-steps/s over the second chunk of {chunk}, compile "
            f"{first['compile_seconds']:.1f} s -> {target} of the {asked} meta-steps asked fit "
            f"{args.time_budget_s:g} s",
            flush=True,
        )
        t.steps = target
    results = train(cfg, run_dir)
    compile_s = results["compile_seconds"]
    wall = time.perf_counter() - wall0
    summary.update(
        train_steps=results["train_steps"],
        steps_per_s=results["steps_per_sec"],
        compile_s=compile_s,
        wall_s=wall,
        **{k: results[k] for k in TEST_METRICS if k in results},
        test_tasks=cfg.eval.tasks,
        test_inner_steps=results.get("eval_inner_steps"),
        checkpoint=results.get("checkpoint"),
        checkpoint_step=results.get("checkpoint_step"),
        data=json.loads((run_dir / "run_info.json").read_text()).get("data"),
    )
    kind = "acc" if "eval_acc_post" in results else "loss"  # classification or regression
    post, ci, pre = (results[f"eval_{kind}_{x}"] for x in ("post", "post_ci95", "pre"))
    print(
        f"{summary['train_steps']} meta-steps at {summary['steps_per_s'] or 0:.2f}/s, compile "
        f"{compile_s:.1f} s, wall {wall:.0f} s; test {kind} {post:.4f} +- {ci:.4f} "
        f"({cfg.eval.tasks} tasks, {summary['test_inner_steps']} inner steps, "
        f"{summary['checkpoint']} checkpoint at step {summary['checkpoint_step']}; "
        f"before adaptation {pre:.4f})",
        flush=True,
    )
    if args.out:
        log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        report = {
            "summary": summary,
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "run_info": json.loads((run_dir / "run_info.json").read_text()),
            "config": dataclasses.asdict(cfg),
            "log": log,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"json: {args.out}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # the data folder, a checkpoint: as train.py
        sys.exit(f"error: {e}")
