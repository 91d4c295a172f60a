"""Multi-host runs: one JAX process per host (or per GPU), joined by ``jax.distributed``.

Every process runs the same program (JAX's multi-controller model). The task axis is sharded
over all global devices (:func:`metagrad.outer.task_mesh`). Every process samples the whole
meta-batch from the same replicated key inside the compiled step, and each device keeps its own
share (where the sharding reaches the sampler, XLA draws only that share: random bits are
partitionable). So no process feeds data to another and the task stream is the single-process
one, by construction. Only process 0 writes logs, metrics and figures; every process takes part
in orbax checkpoint saves, as orbax requires.
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import numpy as np

# What `jax.distributed.initialize` takes from the `distributed` config node; null (None) lets
# JAX detect it from the cluster (SLURM, Open MPI, ...).
INIT_KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


def initialize(dist: Any) -> bool:
    """Joins the processes of a multi-host run if ``dist.enabled``; returns whether it did.

    Must run before anything else touches a JAX backend. Calling it again in a process that is
    already initialized does nothing (a library user may have initialized JAX themselves).

    Example:
        >>> from metagrad.experiment.config import DistributedConfig
        >>> initialize(DistributedConfig(enabled=False))
        False
    """
    if not dist.enabled:
        return False
    if not jax.distributed.is_initialized():
        kwargs = {k: getattr(dist, k) for k in INIT_KEYS if getattr(dist, k) is not None}
        if "local_device_ids" in kwargs:  # a config list, not necessarily a Python list
            kwargs["local_device_ids"] = list(kwargs["local_device_ids"])
        jax.distributed.initialize(**kwargs)
    return True


def is_primary() -> bool:
    """Whether this process writes logs, metrics and figures (process 0)."""
    return jax.process_index() == 0


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` as global arrays replicated over ``mesh``, from values every process holds.

    Orbax saves and restores global arrays; a process-local array would be saved by each process
    on its own.
    """
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def agree(value: bool) -> bool:
    """Process 0's ``value`` on every process: a decision that all processes must act on alike
    (saving a checkpoint is collective), even if their floating-point results differ slightly."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def check_same_everywhere(text: str, what: str) -> None:
    """Raises ``ValueError`` on every process unless all processes hold the same ``text``."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    crc = np.asarray(zlib.crc32(text.encode()), np.uint32)
    if len(set(np.asarray(multihost_utils.process_allgather(crc)).tolist())) > 1:
        raise ValueError(
            f"{what} differs between processes (process {jax.process_index()}: {text}); "
            "every process must use the same one"
        )
