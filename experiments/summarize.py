"""Summarise a multirun: each setting's test metric as mean +- 95% CI over seeds.

    python experiments/summarize.py multirun/2026-11-27_12-00-00 [--metric eval_loss_post]

Runs are grouped by their command-line overrides less ``seed``; each group's per-seed values
are averaged, with the CI half-width 1.96 * sd / sqrt(n) (0 for a single seed). Prints a plain
text table and writes ``summary.txt`` and ``summary.csv`` into the multirun directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf


def collect(sweep_dir: Path, metric: str) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        overrides_file = metrics_file.parent / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
        setting = " ".join(o for o in overrides if not o.lstrip("+").startswith("seed="))
        metrics = json.loads(metrics_file.read_text())
        if metric not in metrics:
            raise KeyError(f"{metrics_file} has no {metric!r}")
        if metrics[metric] is None:  # a non-finite value, written as null
            print(
                f"warning: {metrics_file}: {metric} is null (not finite); left out", file=sys.stderr
            )
            continue
        groups[setting or "(defaults)"].append(float(metrics[metric]))
    return groups


def summarize(sweep_dir: Path, metric: str = "eval_loss_post") -> list[dict]:
    groups = collect(sweep_dir, metric)
    if not groups:
        raise FileNotFoundError(f"no */metrics.json under {sweep_dir}: is it a finished multirun?")
    rows = []
    for setting, values in groups.items():
        v = np.asarray(values)
        ci = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        rows.append(
            {
                "setting": setting,
                "seeds": len(v),
                f"{metric}_mean": float(v.mean()),
                f"{metric}_ci95": float(ci),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Summarise a Hydra multirun directory.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="eval_loss_post")
    args = parser.parse_args(argv)
    try:
        rows = summarize(args.sweep_dir, args.metric)
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    width = max(len(r["setting"]) for r in rows)
    lines = [f"{'setting':<{width}}  seeds  {args.metric} (mean +- 95% CI)"]
    for r in rows:
        lines.append(
            f"{r['setting']:<{width}}  {r['seeds']:>5}  "
            f"{r[f'{args.metric}_mean']:.4f} +- {r[f'{args.metric}_ci95']:.4f}"
        )
    text = "\n".join(lines)
    print(text)
    (args.sweep_dir / "summary.txt").write_text(text + "\n")
    with (args.sweep_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
