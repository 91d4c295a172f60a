"""The one place for shared test fixtures and constants.

Fixtures:
    key: a fresh PRNG key per test, seeded by the test's name.
    x64: float64 for the test that requests it (finite-difference and closed-form oracles).
        Library code is dtype-agnostic, so no global ``jax_enable_x64`` is set: a test that
        does not ask for float64 runs in float32, as users do.
    subprocess_env: the environment for a subprocess (a CLI, a script, a notebook kernel).
    omniglot_dir: the folder holding the official Omniglot release; skips when there is none.

Constants (importable with ``from conftest import ...``, e.g. in ``pytest.mark.skipif``):
    REPO_ROOT, CACHE_DIR, SUBPROCESS_ENV, OMNIGLOT_DIR (a Path or None), OMNIGLOT_MISSING (the
    skip reason), find_omniglot_dir().
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import jax
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Compiled programs are reused across test runs and by the subprocesses the tests start.
CACHE_DIR = Path(
    os.environ.get("METAGRAD_TEST_JAX_CACHE", Path.home() / ".cache" / "metagrad-jax-tests")
)
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SUBPROCESS_ENV: dict[str, str] = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=str(CACHE_DIR),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    JAX_PLATFORMS="cpu",
    MPLBACKEND="Agg",
)
"""What a subprocess started by a test runs with: this environment, the tests' persistent
compilation cache, CPU only, a non-interactive matplotlib backend. Copy it before changing it."""

OMNIGLOT_HALVES = ("images_background", "images_evaluation")


def find_omniglot_dir() -> Path | None:
    """The Omniglot release folder, or None: the first of ``$METAGRAD_OMNIGLOT_DIR``,
    ``$METAGRAD_DATA/omniglot`` and ``<repo>/../shared/data/omniglot`` that holds both halves
    (each as the official zip or as its extracted folder)."""
    candidates = []
    if os.environ.get("METAGRAD_OMNIGLOT_DIR"):
        candidates.append(Path(os.environ["METAGRAD_OMNIGLOT_DIR"]))
    if os.environ.get("METAGRAD_DATA"):
        candidates.append(Path(os.environ["METAGRAD_DATA"]) / "omniglot")
    candidates.append(REPO_ROOT.parent / "shared" / "data" / "omniglot")
    for folder in candidates:
        if all((folder / f"{h}.zip").is_file() or (folder / h).is_dir() for h in OMNIGLOT_HALVES):
            return folder
    return None


OMNIGLOT_DIR = find_omniglot_dir()
OMNIGLOT_MISSING = (
    "Omniglot not found: set METAGRAD_OMNIGLOT_DIR (or METAGRAD_DATA, with an omniglot/ folder "
    "in it), or put images_background.zip and images_evaluation.zip in "
    "<repo>/../shared/data/omniglot"
)


@pytest.fixture
def key(request):
    """A fresh PRNG key per test, derived from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return jax.random.key(seed)


# Docstring examples that compile a large model: in the full run only (``pytest -m slow``).
SLOW_DOCTESTS = {
    "metagrad.nn.resnet.ResNet12",
    "metagrad.nn.models.Conv4",
    "metagrad.nn.quant.QuantConv4",
    "metagrad.nn.stateful.stateful_estimator",
    "metagrad.tasks.sinusoid.sample_batch",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW_DOCTESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def x64():
    """float64 for the requesting test (its oracle needs it); float32 again afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """A fresh copy of :data:`SUBPROCESS_ENV`, for a test to change as it likes."""
    return dict(SUBPROCESS_ENV)


@pytest.fixture(scope="session")
def omniglot_dir() -> Path:
    """The Omniglot release folder (see :func:`find_omniglot_dir`); skips the test without it."""
    if OMNIGLOT_DIR is None:
        pytest.skip(OMNIGLOT_MISSING)
    return OMNIGLOT_DIR


def disk_full_at_step(monkeypatch, step: int) -> None:
    """``Checkpoints.save_last`` fails with ENOSPC at ``step`` (wrapped in another error, as
    orbax does) and writes normally otherwise; ``monkeypatch.undo()`` restores it."""
    import errno

    from metagrad.experiment.checkpoint import Checkpoints

    original = Checkpoints.save_last

    def save_last(self, at, state, **extra):
        if at == step:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as err:
                raise RuntimeError("checkpoint write failed") from err
        original(self, at, state, **extra)

    monkeypatch.setattr(Checkpoints, "save_last", save_last)


def final_params(run_dir):
    """``(step, meta_params)`` of a run directory's newest ``last`` checkpoint."""
    from metagrad.experiment.checkpoint import Checkpoints

    ckpt = Checkpoints(run_dir)
    step = ckpt.latest_step()
    item = ckpt.last.restore(step)
    ckpt.close()
    return step, item["state"]["meta_params"]
