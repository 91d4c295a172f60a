"""Atomic checkpoints with orbax: ``last/`` (every N steps and at the end) and ``best/``.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
killed mid-write keeps its previous checkpoint. Arrays are stored as arrays (no pickle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """The run directory's checkpoints: ``save_last``, ``save_best``, ``restore``."""

    def __init__(self, run_dir: str | Path, *, keep: int = 2):
        root = Path(run_dir).absolute() / "checkpoints"
        opts = lambda n: ocp.CheckpointManagerOptions(
            max_to_keep=n,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )  # a write cut short by a kill is dropped on restart
        self.last = ocp.CheckpointManager(root / "last", options=opts(keep))
        self.best = ocp.CheckpointManager(root / "best", options=opts(1))

    def _save(self, manager, step: int, state: Any, extra: dict) -> None:
        item = {"state": state, "extra": {k: np.asarray(v) for k, v in extra.items()}}
        manager.save(step, args=ocp.args.StandardSave(item), force=True)
        manager.wait_until_finished()

    def save_last(self, step: int, state: Any, **extra) -> None:
        self._save(self.last, step, state, extra)

    def save_best(self, step: int, state: Any, **extra) -> None:
        self._save(self.best, step, state, extra)

    def latest_step(self, which: str = "last") -> int | None:
        return getattr(self, which).latest_step()

    def restore(self, template_state: Any, which: str = "last", extra: dict | None = None):
        """``(step, state, extra)`` from the newest ``which`` checkpoint (structure from the
        template; extra entries as numpy arrays)."""
        manager = getattr(self, which)
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {which!r} checkpoint in {manager.directory}")
        template = {
            "state": template_state,
            "extra": {k: np.asarray(v) for k, v in (extra or {}).items()},
        }
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        item = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return step, item["state"], {k: np.asarray(v) for k, v in item["extra"].items()}

    def close(self) -> None:
        self.last.close()
        self.best.close()
