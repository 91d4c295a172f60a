"""The image cache's cost: load time on a cache miss and on a hit, and the build's peak memory.

Synthetic copies are written to a temporary folder (nothing is committed):

- mini-ImageNet's pickle layout (``mini-imagenet-cache-{train,val,test}.pkl``), ``--classes``
  train classes and a quarter as many val/test classes, ``--images`` random 84x84 RGB images
  each (16 x 600 is mini-ImageNet's own images per class, 203 MB of train pixels);
- tiered-ImageNet's npz re-pack and PNG release (``--tiered-classes`` x ``--tiered-images``
  train images, a small val/test), to show the build's peak memory.

Each load runs in a fresh interpreter (so the page cache is warm but nothing is memoised in the
process) and reports its wall time and the peak resident memory of the load alone (VmHWM after
``/proc/self/clear_refs`` reset it, minus the resident memory before the load). ``miss`` builds
an empty cache; ``hit`` is the median of ``--repeats`` loads of the built one (with
``$METAGRAD_VERIFY_CACHE`` unset, and with it ``full`` and ``stamp``).

    python -m experiments.bench.image_cache [--classes 16] [--images 600] [--json out.json]

Run it against an older checkout with ``PYTHONPATH=<that checkout> python -m
experiments.bench.image_cache`` (this file only uses the readers' public functions). On a shared
machine compare the rows of one run, never absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


def _kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _child(spec: dict) -> dict:
    """One load in this (fresh) interpreter: its seconds and peak memory above the baseline."""
    if spec["reader"] == "mini":
        from metagrad.tasks.miniimagenet_io import load_miniimagenet as load

        kwargs = {}
    else:
        from metagrad.tasks.tieredimagenet import load_tieredimagenet as load

        kwargs = {"layout": spec["layout"]}
    try:  # reset VmHWM to the current resident size, so it measures the load alone
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _kb("VmRSS")
    t0 = time.perf_counter()
    data = load(spec["data_dir"], cache_dir=spec["cache_dir"], expected=spec["expected"], **kwargs)
    seconds = time.perf_counter() - t0
    peak = _kb("VmHWM")
    return {
        "seconds": seconds,
        "peak_mb": None if peak is None or before is None else (peak - before) / 1024,
        "fingerprint": data.fingerprint,
        "train_mb": data.images["train"].nbytes / 1e6,
    }


def _run(spec: dict, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "experiments.bench.image_cache", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _names(prefix: str, n: int, offset: int = 0) -> list[str]:
    return [f"{prefix}{offset + i:08d}" for i in range(n)]


def write_mini(root: Path, classes: int, images: int, seed: int = 0) -> dict:
    """mini-ImageNet's pickle layout; returns the ``expected=`` that reads it."""
    rng = np.random.default_rng(seed)
    sizes = {"train": classes, "val": max(1, classes // 4), "test": max(1, classes // 4)}
    expected, offset = {"classes": {}, "images_per_class": images}, 0
    for split, n in sizes.items():
        wnids = _names("n", n, offset)
        offset += n
        data = rng.integers(0, 256, (n * images, 84, 84, 3), dtype=np.uint8)
        order = rng.permutation(n * images)  # classes interleaved, as in the real pickles
        class_dict = {
            w: sorted(order[i * images : (i + 1) * images].tolist()) for i, w in enumerate(wnids)
        }
        with (root / f"mini-imagenet-cache-{split}.pkl").open("wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
        expected["classes"][split] = wnids
    return expected


def write_tiered(root: Path, classes: int, images: int, layout: str, seed: int = 0) -> dict:
    """tiered-ImageNet's npz re-pack or PNG release; returns the ``expected=`` that reads it."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = {"train": classes, "val": 2, "test": 2}
    expected, offset = {"classes": {}}, 0
    for split, n in sizes.items():
        per = images if split == "train" else 10
        ids = np.repeat(np.arange(offset, offset + n), per)
        rng.shuffle(ids)
        expected["classes"][split] = [f"label_{k}" for k in range(offset, offset + n)]
        offset += n
        with (root / f"{split}_labels.pkl").open("wb") as f:
            pickle.dump({"labels": ids}, f, protocol=4)
        # smooth images with noise: compresses like photographs, not like white noise
        base = rng.integers(0, 200, (len(ids), 1, 1, 3), dtype=np.uint8)
        pixels = base + rng.integers(0, 56, (len(ids), 84, 84, 3), dtype=np.uint8)
        if layout == "npz":
            np.savez(root / f"{split}_images.npz", images=pixels)
        else:
            encoded = []
            for image in pixels:
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, format="PNG", compress_level=1)
                encoded.append(np.frombuffer(buf.getvalue(), np.uint8))
            with (root / f"{split}_images_png.pkl").open("wb") as f:
                pickle.dump(encoded, f, protocol=4)
    return expected


def measure(name: str, spec: dict, repeats: int) -> list[dict]:
    """A miss on an empty cache, then hits with each verification setting."""
    shutil.rmtree(spec["cache_dir"], ignore_errors=True)
    rows = [{"case": name, "load": "miss", **_run(spec)}]
    for verify in (None, "full", "stamp"):
        env = {} if verify is None else {"METAGRAD_VERIFY_CACHE": verify}
        runs = [_run(spec, {k: v for k, v in env.items()}) for _ in range(repeats)]
        rows.append(
            {
                "case": name,
                "load": "hit" if verify is None else f"hit ({verify})",
                "seconds": statistics.median(r["seconds"] for r in runs),
                "peak_mb": max(r["peak_mb"] or 0 for r in runs),
                "fingerprint": runs[0]["fingerprint"],
                "train_mb": runs[0]["train_mb"],
            }
        )
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=16, help="mini-ImageNet train classes")
    p.add_argument("--images", type=int, default=600, help="mini-ImageNet images per class")
    p.add_argument("--tiered-classes", type=int, default=40)
    p.add_argument("--tiered-images", type=int, default=300)
    p.add_argument("--no-tiered", action="store_true", help="skip the tiered-ImageNet builds")
    p.add_argument("--repeats", type=int, default=3, help="hits timed per setting (median)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="image_cache_") as tmp:
        tmp = Path(tmp)
        mini = tmp / "mini"
        mini.mkdir()
        expected = write_mini(mini, args.classes, args.images)
        spec = {
            "reader": "mini",
            "data_dir": str(mini),
            "cache_dir": str(tmp / "cache-mini"),
            "expected": expected,
        }
        rows += measure(f"miniimagenet pickle {args.classes}x{args.images}", spec, args.repeats)
        for layout in () if args.no_tiered else ("npz", "png"):
            root = tmp / f"tiered-{layout}"
            root.mkdir()
            expected = write_tiered(root, args.tiered_classes, args.tiered_images, layout)
            spec = {
                "reader": "tiered",
                "data_dir": str(root),
                "layout": layout,
                "cache_dir": str(tmp / f"cache-{layout}"),
                "expected": expected,
            }
            case = f"tieredimagenet {layout} {args.tiered_classes}x{args.tiered_images}"
            rows += measure(case, spec, 1)
            shutil.rmtree(root)
    for r in rows:
        print(
            f"{r['case']:<36} {r['load']:<13} {r['seconds']:7.3f} s  peak +{r['peak_mb']:7.1f} MB"
            f"  (train split {r['train_mb']:.0f} MB, fingerprint {r['fingerprint'][:12]})"
        )
    result = {"rows": rows, "args": {k: v for k, v in vars(args).items() if k != "child"}}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
