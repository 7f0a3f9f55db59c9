"""Ctrl-C and `kill` as a polite request: finish the current step, save, then stop.

Inside `with StopRequest() as stop:` the first SIGINT or SIGTERM only sets `stop.signum`; the
training loop looks at it between optimizer steps, writes `last.pt` and raises `TrainingInterrupted`.
A second signal aborts at once (KeyboardInterrupt), for a user who really wants out.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Remembers the first SIGINT / SIGTERM received while active (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then saving last.pt and stopping "
            "(send it again to abort without saving)",
            signal.Signals(signum).name,
        )
