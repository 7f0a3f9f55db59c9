"""Ctrl-C and `kill` as a polite request: finish the current step, save, then stop.

Inside `with StopRequest() as stop:` the first SIGINT, SIGTERM or SIGHUP only sets `stop.signum`; the
training loop looks at it between optimizer steps, writes `last.pt` and raises `TrainingInterrupted`.
A second signal aborts at once (`Aborted`), for a user who really wants out; checkpoints are
written atomically, so `last.pt` is then the previous save or the new one, never half of one.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

# SIGHUP: the terminal the run was started from was closed.
HANDLED = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving its state; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Aborted(KeyboardInterrupt):
    """A second signal while stopping: leave now, without saving."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    """Remembers the first SIGINT / SIGTERM / SIGHUP received while active (main thread only)."""

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
            raise Aborted(signum)
        self.signum = signum
        log.warning(
            "%s received: finishing the current step, then saving last.pt and stopping "
            "(send it again to abort without saving)",
            signal.Signals(signum).name,
        )
