"""XLA's persistent compilation cache for training runs (``train.compile_cache_dir``).

The compiled chunk of meta-steps and the held-out curves are keyed by XLA on the program, its
shapes, the backend and the JAX version; a second run of the same configuration (another seed of
a sweep done one by one, a resume, eval.py) reads them from disk instead of compiling again.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Programs that compile faster than this are not worth a file (JAX's default is 1 s: the
# held-out curves of a small model compile in less and are met again on every run).
MIN_COMPILE_SECONDS = 0.25


def default_dir() -> Path:
    """``$XDG_CACHE_HOME/metagrad/xla``, else ``~/.cache/metagrad/xla``.

    Example:
        >>> default_dir().parts[-2:]
        ('metagrad', 'xla')
    """
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metagrad" / "xla"


def enable(cache_dir: str | None, *, on: bool = True) -> Path | None:
    """Turns the cache on in ``cache_dir`` (None: JAX's ``jax_compilation_cache_dir`` where set,
    else :func:`default_dir`), or off with ``on=False``; returns the folder (None when off).
    JAX reads these settings when it first compiles, so call this before the process compiles
    anything (the CLI does so first); later calls change nothing for this process.

    Example:
        >>> enable(None, on=False) is None
        True
    """
    if not on:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if cache_dir is None and jax.config.jax_compilation_cache_dir:  # JAX's own setting (e.g.
        return Path(jax.config.jax_compilation_cache_dir)  # $JAX_COMPILATION_CACHE_DIR) wins
    folder = Path(cache_dir).expanduser() if cache_dir else default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder
