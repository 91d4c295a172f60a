"""Runs one of the PyTorch peer scripts (``shared/peers``) on a chosen torch device, unedited.

    python experiments/gpu/peer_on_device.py --device cuda PEER_SCRIPT [its arguments ...]

It runs under the peers' interpreter (torch, no metagrad), so it is started by its path, not as
a module of the package, and imports nothing of ours. The peers make every tensor with torch's
factory functions and seed CPU ``torch.Generator``s: here the default device becomes ``--device``
and generators are made there too, so the model, the data and the optimizer all live on it. The
peers time each step with ``time.perf_counter``; on CUDA that would time kernel launches, not
kernels, so every reading first waits for the device. ``--check`` runs (one meta-gradient
compared across implementations) turn TF32 off, so that correctness is judged in full float32;
timed runs keep torch's defaults. The settings used are printed on stderr (stdout is the peers'
JSON lines, which `experiments.bench.harness` parses).

The peers import each other, as scripts do from their own folder; ``runpy`` does not put that
folder on ``sys.path``, so it must be on ``PYTHONPATH`` (the harness sets it). When it is not,
this launcher starts itself again with it there rather than editing its own ``sys.path``.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path


def _importable(folder: Path) -> bool:
    return any(Path(p or ".").resolve() == folder for p in sys.path)


def main(argv: list[str]) -> None:
    device, args = "cpu", argv
    if args[:1] == ["--device"]:
        device, args = args[1], args[2:]
    if not args or not Path(args[0]).is_file():
        sys.exit("usage: peer_on_device.py [--device DEVICE] PEER_SCRIPT [ARGS ...]")
    script = Path(args[0]).resolve()
    given = os.environ.get("PYTHONPATH", "")
    if not _importable(script.parent) and str(script.parent) not in given.split(os.pathsep):
        path = os.pathsep.join(p for p in (str(script.parent), given) if p)
        env = dict(os.environ, PYTHONPATH=path)
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"peer_on_device: --device {device}, but torch {torch.__version__} has no GPU")
        if "--check" in args:
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
    sys.argv = [str(script), *args[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
