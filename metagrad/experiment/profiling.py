"""``train.profile_steps=[a, b]``: a ``jax.profiler`` trace of meta-steps a..b-1 in
``<run>/profile``, for TensorBoard's profile plugin / XProf (``*.xplane.pb``) or Perfetto
(``*.trace.json.gz``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax


class StepTrace:
    """Starts ``jax.profiler`` before the first compiled chunk that runs a meta-step in
    ``[a, b)`` and stops it after the chunk that reaches ``b`` (or when the run ends); each chunk
    inside is a ``StepTraceAnnotation`` numbered by its first meta-step.

    The loop runs whole chunks of ``train.chunk_steps`` meta-steps per compiled call, so the
    trace holds the chunks that overlap ``[a, b)``: chunk ``[s, s + n)`` is traced when
    :math:`s < b` and :math:`s + n > a`. With ``window=None`` it does nothing.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> trace = StepTrace([10, 20], Path(folder) / "profile")
        >>> [trace.traces(s, 10) for s in (0, 10, 20)]  # chunks of 10 meta-steps
        [False, True, False]
        >>> with trace.chunk(10, 10):
        ...     _ = jax.numpy.ones(3).sum().block_until_ready()
        >>> trace.close()
        >>> sorted(p.suffix for p in (Path(folder) / "profile").rglob("*.pb"))
        ['.pb']
    """

    def __init__(self, window: list[int] | None, folder: Path):
        self.window, self.folder, self.active = window, Path(folder), False

    def traces(self, step: int, n: int) -> bool:
        """Whether chunk ``[step, step + n)`` overlaps the window."""
        return self.window is not None and step < self.window[1] and step + n > self.window[0]

    @contextlib.contextmanager
    def chunk(self, step: int, n: int):
        """Around one compiled chunk of ``n`` meta-steps from ``step`` (its results fetched
        inside, so the device work is in the trace)."""
        if not self.traces(step, n):
            yield
            return
        if not self.active:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.active = True
        with jax.profiler.StepTraceAnnotation("meta_steps", step_num=step):
            yield
        if step + n >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
