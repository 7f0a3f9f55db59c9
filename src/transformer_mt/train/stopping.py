"""Why a run stops: its budget and early stopping, divergence, and signals.

`stop_reason` applies the budget rules between epochs (`trainer.max_epochs`, `max_steps`,
`max_time`, `patience`), and `budget_used` says how much of that budget is spent (the linear
learning-rate decay follows it). Inside an epoch the trainer stops on `max_steps` and, with
`trainer.validate_every` or `save_every` set, on `max_time` (`out_of_time`). A NaN or infinite
loss ends the run with `TrainingDiverged`.

Ctrl-C and `kill` are a polite request: finish the current step, save, then stop. Inside `with StopRequest() as stop:` the first SIGINT, SIGTERM or SIGHUP only sets `stop.signum`; the
training loop looks at it between optimizer steps, writes `last.pt` and raises `TrainingInterrupted`.
A second signal aborts at once (`Aborted`), for a user who really wants out; checkpoints are
written atomically, so `last.pt` is then the previous save or the new one, never half of one.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from transformer_mt.config import TrainerConfig
from transformer_mt.errors import UserError
from transformer_mt.train.optim import is_improvement
from transformer_mt.train.rundir import RunPaths
from transformer_mt.train.state import Progress

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


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def diverged(bad_step: int, last_saved: Path | None, saved_step: int) -> TrainingDiverged:
    """The error for a loss that became non-finite at `bad_step`, naming the last good save."""
    if last_saved is not None:
        last = f"the last good checkpoint is {last_saved} (step {saved_step})"
    else:
        last = "no checkpoint was written before it"
    return TrainingDiverged(
        f"training diverged: the loss became NaN or infinite at step {bad_step} and nothing "
        f"after it was saved; {last}. Lower optim.lr or optim.clip_norm, or set "
        "trainer.skip_nonfinite=true to skip such batches"
    )


def interrupted(signum: int, p: Progress, paths: RunPaths) -> TrainingInterrupted:
    """The exception that ends a run stopped by `signum` after it saved its last.pt."""
    message = (
        f"interrupted by {signal.Signals(signum).name} at step {p.step} "
        f"(epoch {p.epoch + 1}, batch {p.batches_in_epoch}); saved {paths.last}. "
        f"Continue with: python scripts/train.py run_name={paths.name} trainer.resume=true"
    )
    return TrainingInterrupted(signum, message)


def stop_reason(p: Progress, tc: TrainerConfig, last_epoch_seconds: float) -> str | None:
    """Why training should stop before another epoch (or the rest of one), or None to go on.

    With `trainer.max_time` and validation and saving once per epoch, no epoch starts that would
    end after the budget at the pace of the last whole epoch (`last_epoch_seconds`, its training
    and validation). With `validate_every` or `save_every` the budget is checked between steps
    (`out_of_time`) instead, so an epoch of hours may start and stop in its middle.
    """
    if p.epoch >= tc.max_epochs:
        return f"reached trainer.max_epochs={tc.max_epochs}"
    if tc.max_steps is not None and p.step >= tc.max_steps:
        return f"reached trainer.max_steps={tc.max_steps}"
    if tc.max_time is not None:
        if out_of_time(p.train_seconds, tc):
            return f"reached trainer.max_time={tc.max_time} minutes"
        if not tc.by_steps and p.train_seconds + last_epoch_seconds > tc.max_time * 60:
            return (
                f"another epoch (about {last_epoch_seconds / 60:.1f} minutes) would end "
                f"after trainer.max_time={tc.max_time} minutes"
            )
    if tc.patience and p.bad_validations >= tc.patience:
        return (
            f"early stopping: {tc.monitor} has not improved for {p.bad_validations} validations "
            f"(best {p.best_metric:.4g} at step {p.best_step}, epoch {p.best_epoch})"
        )
    return None


def out_of_time(train_seconds: float, tc: TrainerConfig) -> bool:
    """Whether `train_seconds` of training and validation have spent `trainer.max_time`."""
    return tc.max_time is not None and train_seconds >= tc.max_time * 60


def record_metric(p: Progress, value: float, monitor: str, counts: bool) -> bool:
    """Count `value` of `monitor` into the best metric and the early-stopping count (a
    validation that `counts` and did not improve adds one); True if it improved.

    The validations that count are the regular ones (each epoch, or every
    `trainer.validate_every` steps), not one made because the run stopped in between.
    """
    improved = is_improvement(value, p.best_metric, monitor)
    if improved:
        p.best_metric, p.best_epoch, p.best_step = value, p.current_epoch, p.step
        p.bad_validations = 0
    elif counts:
        p.bad_validations += 1
    return improved


def budget_used(step: int, seconds: float, tc: TrainerConfig, steps_per_epoch: int) -> float:
    """Fraction of the run's budget spent at optimizer step `step` after `seconds` of training:
    the largest of the epoch, step and time fractions, at most 1."""
    used = step / max(tc.max_epochs * steps_per_epoch, 1)
    if tc.max_steps is not None:
        used = max(used, step / tc.max_steps)
    if tc.max_time is not None:
        used = max(used, seconds / (tc.max_time * 60))
    return min(used, 1.0)
