"""Stopping a run between steps: Ctrl-C / SIGTERM set a flag the loop checks, agreed by every process of a
multi-process run; :class:`TrainingInterrupted` is raised once the checkpoint at the current step is saved."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`shitu.train.trainer.train` after an interrupt, once the checkpoint at the current
    step is saved."""

    def __init__(self, message: str, *, checkpoint: Path | None, epoch: int, step: int) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step = step

    def __str__(self) -> str:
        return self.message


class StopFlag:
    """Ctrl-C / SIGTERM set a flag checked between steps (a step is never cut in half: its buffers are
    donated); a second Ctrl-C interrupts at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> bool:
        """Whether to stop now, the same answer in every process of a multi-process run (a signal reaches
        them at different steps; they must stop at the same one, or the collectives would hang)."""
        from shitu.runtime.distributed import any_process, process_count

        if process_count() == 1:
            return self.requested is not None
        if any_process(self.requested is not None) and self.requested is None:
            self.requested = "a stop in another process"
        return self.requested is not None
