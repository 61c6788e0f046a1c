"""Ctrl-C during training: finish the current step, save ``last.pt``, stop with a resumable state.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, for example between
``optimizer.step()`` and ``scheduler.step()``; a checkpoint written then would not resume
exactly. :class:`StepGuard` installs a SIGINT handler that, inside :meth:`StepGuard.step` (one
optimiser step and its bookkeeping), only records the request and raises when the step is done.
Outside a step (while the next batch loads, during evaluation) it raises at once as usual. A
second Ctrl-C inside a step raises at once too, for a step that hangs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``last.pt`` holds the state after iteration ``iteration`` (``saved``)
    or, under DDP, the last periodic checkpoint."""

    def __init__(self, iteration: int, output_dir: str, saved: bool, resume_command: str | None = None):
        self.iteration, self.output_dir, self.saved = iteration, output_dir, saved
        self.resume_command = resume_command
        where = f"{output_dir}/last.pt saved" if saved else f"{output_dir}/last.pt holds the last periodic checkpoint"
        resume = f"`{resume_command}`" if resume_command else "resume=True"
        super().__init__(f"interrupted at iteration {iteration} ({where}); resume with {resume}")

    def with_resume_hint(self, resume_command: str) -> "TrainingInterrupted":
        """The same interruption, its message naming the command that resumes it."""
        return TrainingInterrupted(self.iteration, self.output_dir, self.saved, resume_command)


class StepGuard:
    """Defers SIGINT to the end of the current :meth:`step` (see the module docstring).

    Used as a context manager around the training loop; a no-op outside the main thread (where
    Python does not allow signal handlers).
    """

    def __init__(self):
        self.in_step = False
        self.pending = False
        self._previous = None

    def __enter__(self) -> "StepGuard":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """A section that a first Ctrl-C does not cut; the interrupt is raised after it."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
