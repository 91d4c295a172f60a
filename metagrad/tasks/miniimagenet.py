"""mini-ImageNet N-way K-shot classification (Vinyals et al. 2016; Ravi & Larochelle 2017).

Typical use::

    data = load_miniimagenet("~/data/miniimagenet")        # any of the three containers
    sampler = make_sampler(data.images["train"], ways=5, shots=1, query=15)
    task = sampler.sample_batch(key, 4)                    # Task with a leading task axis

Reading the files, the split lists and the on-disk cache live in
:mod:`metagrad.tasks.miniimagenet_io`; the restricted unpickler in
:mod:`metagrad.tasks.safe_pickle`; the sampler (any image split, per-class counts) in
:mod:`metagrad.tasks.fewshot`, re-exported here.
"""

from __future__ import annotations

from metagrad.tasks.fewshot import TaskSampler, make_sampler, sample_task
from metagrad.tasks.miniimagenet_io import (
    IMAGES_PER_CLASS,
    SPLITS,
    MiniImageNetClassError,
    MiniImageNetCountError,
    MiniImageNetData,
    MiniImageNetError,
    MiniImageNetFormatError,
    MiniImageNetImageError,
    MiniImageNetNotFoundError,
    fingerprint,
    load_miniimagenet,
    read_split_file,
    standard_split,
)

__all__ = [
    "IMAGES_PER_CLASS",
    "SPLITS",
    "MiniImageNetClassError",
    "MiniImageNetCountError",
    "MiniImageNetData",
    "MiniImageNetError",
    "MiniImageNetFormatError",
    "MiniImageNetImageError",
    "MiniImageNetNotFoundError",
    "TaskSampler",
    "fingerprint",
    "load_miniimagenet",
    "make_sampler",
    "read_split_file",
    "sample_task",
    "standard_split",
]
