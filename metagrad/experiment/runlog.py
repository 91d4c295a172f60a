"""What a run writes besides checkpoints: the metrics log, standard JSON, and the lock that keeps
one writer per run directory.

A log record is one line written in one call and flushed, so a kill or a full disk leaves at
most a torn last line, which :func:`read_log` skips with a warning. JSON never holds ``NaN`` or
``Infinity`` (standard readers reject them): a non-finite number is written as ``null``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import secrets
import socket
import warnings
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively.

    Example:
        >>> json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
        {'a': None, 'b': [1.0, None], 'c': 'x'}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """Standard JSON (``allow_nan=False``) of :func:`json_safe` ``(value)``."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path: Path, value: Any) -> None:
    """Writes ``path`` atomically: a temporary file beside it, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(dumps(value, indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line (a kill or a full disk while it was
    written) is skipped with a warning, a damaged line elsewhere is an error naming it."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping a torn last line ({line[:40]!r}...)", stacklevel=2)
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record") from None
    return records


class RunLog:
    """``metrics.jsonl`` and, given writers, TensorBoard scalars and Weights & Biases history,
    both as ``{kind}/{name}`` at the record's meta-step.

    On resume the log is cut back to the records of steps the checkpoint has reached, so that a
    run killed after logging past its last checkpoint holds no duplicate records afterwards. The
    wandb run already holds the records cut (a resume recomputes them bit for bit), so they are
    not sent again (``sent``: the ``(step, kind)`` pairs it holds past the checkpoint, when
    ``wandb_resumed`` says the wandb run is the one that logged them).
    """

    def __init__(
        self,
        path: Path,
        *,
        tensorboard=None,
        wandb=None,
        resume_step: int | None = None,
        wandb_resumed: bool = False,
    ):
        self.path, self.tensorboard, self.wandb = path, tensorboard, wandb
        self.sent: set[tuple[int, str]] = set()
        if resume_step is not None and path.exists():
            old = read_log(path)
            kept = [r for r in old if r.get("step", 0) <= resume_step]
            if wandb_resumed:  # the wandb run holds what the log held
                cut = [r for r in old if r.get("step", 0) > resume_step]
                self.sent = {(r.get("step"), r.get("kind")) for r in cut}
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        elif path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("a") as f:  # a torn last line stays on its own line
                f.write("\n")

    def write(self, record: dict) -> None:
        line = dumps(record) + "\n"
        with self.path.open("a") as f:
            f.write(line)  # one call, one line: whole or, cut short, a torn last line
            f.flush()
        scalars = {
            f"{record['kind']}/{name}": value
            for name, value in record.items()
            if name not in ("step", "kind") and isinstance(value, int | float)
        }
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, record["step"])
        if self.wandb is not None and (record["step"], record["kind"]) not in self.sent:
            self.wandb.log(json_safe(scalars), step=record["step"])

    def summary(self, results: dict) -> None:
        """The run's final numbers (the test metrics, the speed) as the wandb run's summary;
        private entries (``_meta_params``) are left out."""
        if self.wandb is not None:
            public = {k: v for k, v in results.items() if not k.startswith("_")}
            self.wandb.summary.update(json_safe(public))

    def close(self, *, failed: bool = False) -> None:
        """Closes the writers (once; later calls do nothing); ``failed`` marks the wandb run as
        failed (exit code 1)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def open_wandb(train_cfg, config: dict, run_dir: Path):
    """A Weights & Biases run in ``run_dir/wandb`` with ``train.wandb_*``'s project, entity,
    group, tags and name, ``config`` (the resolved run config) as its config; the same run again
    on resume (its id is kept in ``run_dir/wandb/run_id``). Returns ``(run, resumed)``.
    ``WANDB_MODE=offline`` (or ``wandb offline``) writes ``wandb/offline-run-*`` and never
    touches the network; ``wandb sync`` uploads them later."""
    import wandb  # the optional extra; validate() checked it is there

    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    resumed = id_file.is_file()
    run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)  # 8 characters
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=train_cfg.wandb_project,
        entity=train_cfg.wandb_entity,
        group=train_cfg.wandb_group,
        tags=list(train_cfg.wandb_tags),
        name=train_cfg.wandb_name or run_dir.resolve().name,
        config=config,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
    )
    return run, resumed


class RunDirLocked(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """An advisory lock (``flock``) on ``<run_dir>/.lock``, held for the run's life and released
    by the OS when the process dies; a second process fails at once naming the holder.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with RunLock(folder):
        ...     RunLock(folder).acquire()
        Traceback (most recent call last):
        metagrad.experiment.runlog.RunDirLocked: ... is in use by pid ...
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirLocked(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or choose "
                "another run directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
