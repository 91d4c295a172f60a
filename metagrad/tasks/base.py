"""The task container shared by every task family and by the outer loop."""

from __future__ import annotations

from typing import Any, NamedTuple


class Task(NamedTuple):
    """One few-shot task (or a batch of them, with a leading task axis on every leaf).

    ``support`` and ``query`` are batches in the form the loss takes, ``loss_fn(params, batch)``:
    for regression and classification, ``(inputs, targets)``.
    """

    support: Any
    query: Any
