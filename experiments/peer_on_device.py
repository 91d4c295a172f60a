"""Runs one of the PyTorch peer scripts (``shared/peers``) on a chosen torch device, unedited.

    python experiments/peer_on_device.py --device cuda PEER_SCRIPT [its arguments ...]

The peers make every tensor with torch's factory functions and seed CPU ``torch.Generator``s:
here the default device becomes ``--device`` and generators are made there too, so the model,
the data and the optimizer all live on it. The peers time each step with ``time.perf_counter``;
on CUDA that would time kernel launches, not kernels, so every reading first waits for the
device. ``--check`` runs (one meta-gradient compared across implementations) turn TF32 off, so
that correctness is judged in full float32; timed runs keep torch's defaults. The settings used
are printed on stderr (stdout is the peers' JSON lines, which `bench_peers` parses).
"""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> None:
    device = "cpu"
    if argv[:1] == ["--device"]:
        device, argv = argv[1], argv[2:]
    if not argv or not Path(argv[0]).is_file():
        sys.exit("usage: peer_on_device.py [--device DEVICE] PEER_SCRIPT [ARGS ...]")
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"peer_on_device: --device {device}, but torch {torch.__version__} has no GPU")
        if "--check" in argv:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        perf_counter = time.perf_counter

        def synchronized_perf_counter() -> float:
            torch.cuda.synchronize()
            return perf_counter()

        time.perf_counter = synchronized_perf_counter
        print(
            f"peer_on_device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"cudnn tf32 {torch.backends.cudnn.allow_tf32}, "
            f"matmul tf32 {torch.backends.cuda.matmul.allow_tf32}",
            file=sys.stderr,
        )
    torch.set_default_device(device)

    class DeviceGenerator(torch.Generator):
        def __new__(cls, device: str = device):
            return super().__new__(cls, device)

    torch.Generator = DeviceGenerator
    script = Path(argv[0]).resolve()
    sys.path.insert(0, str(script.parent))  # the peers import each other
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
