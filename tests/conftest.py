"""Shared fixtures: float64 for finite-difference oracles, a persistent compilation cache."""

import os
import zlib
from pathlib import Path

import jax
import pytest

# Oracles (central finite differences) need float64; library code must be dtype-agnostic.
jax.config.update("jax_enable_x64", True)
# Compiled programs are reused across test runs and by the CLI subprocesses the tests start.
CACHE_DIR = Path(
    os.environ.get("METAGRAD_TEST_JAX_CACHE", Path.home() / ".cache" / "metagrad-jax-tests")
)
jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def key(request):
    """A fresh PRNG key per test, derived from the test's name so failures reproduce."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return jax.random.key(seed)
