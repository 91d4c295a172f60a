"""Atomic, verified checkpoints with orbax: ``last/`` (every N steps and at the end) and ``best/``.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed mid-write keeps its previous checkpoint. Arrays are stored as arrays (no pickle). Beside
each one metagrad writes ``checksums.json``, the SHA-256 of every file orbax wrote and of every
array, and checks both on restore (the files before orbax reads them): flipped bits are an error
naming the file, and a resume falls back to the newest intact checkpoint with a warning naming
both.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from metagrad._files import file_sha256

CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint is missing or damaged; the message names it."""


def array_checksums(tree: Any) -> list[str]:
    """SHA-256 of each leaf's bytes, in leaf order (dtype and shape included).

    Example:
        >>> sums = array_checksums({"a": np.zeros(2, np.float32)})
        >>> len(sums), len(sums[0]), sums == array_checksums({"a": np.ones(2, np.float32)})
        (1, 64, False)
    """
    out = []
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out.append(h.hexdigest())
    return out


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file orbax wrote for one checkpoint, by path relative to ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    return {str(p.relative_to(folder)): file_sha256(p) for p in files}


class Checkpoints:
    """The run directory's checkpoints: ``save_last``, ``save_best``, ``restore``."""

    def __init__(self, run_dir: str | Path, *, keep: int = 2):
        root = Path(run_dir).absolute() / "checkpoints"
        opts = lambda n: ocp.CheckpointManagerOptions(
            max_to_keep=n,
            create=False,  # a refused run creates nothing; the first save makes the folders
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )  # a write cut short by a kill is dropped on restart
        self.last = ocp.CheckpointManager(root / "last", options=opts(keep))
        self.best = ocp.CheckpointManager(root / "best", options=opts(1))
        # Verification needs every array on this host; multi-host runs rely on orbax alone.
        self.verify = jax.process_count() == 1

    def _step_dir(self, manager, step: int) -> Path:
        return Path(manager.directory) / str(step)

    def _save(self, manager, step: int, state: Any, extra: dict) -> None:
        item = {"state": state, "extra": {k: np.asarray(v) for k, v in extra.items()}}
        if step in manager.all_steps():
            # Written for this step before a kill, by a run whose resume is bit-identical: keep
            # it if it is intact, else write it anew.
            if self._intact(manager, step, item):
                return
            manager.delete(step)
        Path(manager.directory).mkdir(parents=True, exist_ok=True)
        manager.save(step, args=ocp.args.StandardSave(item), force=True)
        manager.wait_until_finished()
        if self.verify and jax.process_index() == 0:
            where = self._step_dir(manager, step)
            sums = {"files": file_checksums(where), "arrays": array_checksums(item)}
            tmp = where / f".{CHECKSUMS}.tmp"
            tmp.write_text(json.dumps(sums))
            os.replace(tmp, where / CHECKSUMS)

    def save_last(self, step: int, state: Any, **extra) -> None:
        self._save(self.last, step, state, extra)

    def save_best(self, step: int, state: Any, **extra) -> None:
        self._save(self.best, step, state, extra)

    def latest_step(self, which: str = "last") -> int | None:
        return getattr(self, which).latest_step()

    def _load(self, manager, step: int, template: dict) -> dict:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        where = self._step_dir(manager, step)
        sums_path = where / CHECKSUMS
        sums = json.loads(sums_path.read_text()) if self.verify and sums_path.is_file() else None
        if sums is not None:  # the files first: orbax never reads a damaged one
            for name, digest in sums["files"].items():
                path = where / name
                if not path.is_file() or file_sha256(path) != digest:
                    raise CheckpointError(
                        f"checkpoint {where} is damaged: {name} is missing or fails its checksum"
                    )
        try:
            item = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # orbax raises many types for a damaged or foreign checkpoint
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {where} cannot be read: {reason[:300]}") from err
        if self.verify:
            if sums is None:  # killed between orbax's commit and the checksums
                warnings.warn(
                    f"checkpoint {where} has no {CHECKSUMS} (its save was cut short after the "
                    "arrays were committed); restored without verification",
                    stacklevel=3,
                )
            elif sums["arrays"] != array_checksums(item):
                raise CheckpointError(
                    f"checkpoint {where} is damaged: its arrays fail their checksums"
                )
        return item

    def _intact(self, manager, step: int, template: dict) -> bool:
        try:
            self._load(manager, step, template)
            return True
        except CheckpointError:
            return False

    def restore(
        self,
        template_state: Any,
        which: str = "last",
        extra: dict | None = None,
        *,
        fall_back: bool = False,
    ):
        """``(step, state, extra)`` from the newest ``which`` checkpoint (structure from the
        template; extra entries as numpy arrays). A damaged newest checkpoint is a
        `CheckpointError`, or with ``fall_back`` a warning and the newest intact older one."""
        manager = getattr(self, which)
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no '{which}' checkpoint in {manager.directory}")
        template = {
            "state": template_state,
            "extra": {k: np.asarray(v) for k, v in (extra or {}).items()},
        }
        errors = []
        for step in steps if fall_back else steps[:1]:
            try:
                item = self._load(manager, step, template)
            except CheckpointError as err:
                errors.append(str(err))
                continue
            if errors:
                warnings.warn(
                    f"{errors[0]}; resuming from the newest intact checkpoint, "
                    f"{self._step_dir(manager, step)}",
                    stacklevel=2,
                )
            extra_out = {k: np.asarray(v) for k, v in item["extra"].items()}
            return step, item["state"], extra_out
        raise CheckpointError("; ".join(errors))

    def close(self) -> None:
        self.last.close()
        self.best.close()
