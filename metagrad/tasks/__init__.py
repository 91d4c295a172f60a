"""Task families: each samples `Task(support, query)` batches on the device from an explicit key."""

from metagrad.tasks.base import Task

__all__ = ["Task"]
