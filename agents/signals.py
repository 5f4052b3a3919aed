"""SIGINT/SIGTERM during training: deferred to the next update boundary, then a checkpoint.

:func:`deferred_signals` turns the first signal into a flag the training loop checks (it then
saves the last update-boundary state and raises :class:`TrainingInterrupted`); a second signal
interrupts at once with ``KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, signum: int, checkpoint: Path | None, num_timesteps: int) -> None:
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint directory"
        super().__init__(f"training interrupted by {name} at {num_timesteps} env steps; {where}")
        self.signum, self.checkpoint, self.num_timesteps = signum, checkpoint, num_timesteps


@contextmanager
def deferred_signals(pending: Callable[[], bool], record: Callable[[int], None]) -> Iterator[None]:
    """While inside: SIGINT/SIGTERM call ``record(signum)`` if no signal is ``pending()``, else
    raise ``KeyboardInterrupt``; the previous handlers come back on exit. Outside the main
    thread (where Python cannot install handlers) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if pending():
            raise KeyboardInterrupt
        record(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
