"""Task families: each samples `Task(support, query)` batches on the device from an explicit key.

- :mod:`metagrad.tasks.sinusoid`: Finn et al.'s sinusoid regression.
- :mod:`metagrad.tasks.omniglot`: Omniglot N-way K-shot classification from the official zips
  (Pillow is loaded only when images are read).
"""

from metagrad._types import Task

__all__ = ["Task"]
