"""The training loop: `Trainer.fit` trains epoch after epoch until a stopping rule fires.

    one epoch   the step (train/step.py) on every batch of this rank's shard
    then        save last.pt → validate (train/validation.py) → record the metric → write the
                epoch's checkpoints (train/snapshot.py) and logs (train/reporting.py)
    until       train/stopping.py says why not to start another epoch
    at the end  validate the last weights if no validation has seen them

With `trainer.validate_every=N` the validation, its row and its checkpoints come every N optimizer
steps instead, wherever they fall in an epoch (an epoch end then writes last.pt and epoch_<n>.pt
only); with `trainer.save_every=N` last.pt is also written every N steps. Either makes
`trainer.max_time` a check between steps, so a run of long epochs stops on its budget mid-epoch.

Under `torchrun` every process trains on its own shard of each epoch's batches (DDP averages the
gradients); `data.max_tokens` is the budget of one batch *per process*, so a step sees
`world_size x accumulate x max_tokens` padded tokens at most. Rank 0 alone validates, prints and
writes files while the others wait; it then hands its metrics to every rank, so all of them take
the same learning-rate and early-stopping decisions.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from transformer_mt.config import TrainConfig
from transformer_mt.data.batching import Batch, PairDataset, TokenBucketSampler, collate
from transformer_mt.data.cache import PreparedData
from transformer_mt.inference.translator import max_source_tokens
from transformer_mt.model import build_model
from transformer_mt.train import distributed as dist
from transformer_mt.train import snapshot
from transformer_mt.train.finetune import InitCheckpoint
from transformer_mt.train.optim import PlateauSchedule, build_optimizer
from transformer_mt.train.reporting import Reporter, epoch_bar
from transformer_mt.train.rundir import RunPaths
from transformer_mt.train.state import Progress
from transformer_mt.train.step import Meter, Step, chunks, use_amp
from transformer_mt.train.stopping import (
    StopRequest,
    budget_used,
    diverged,
    interrupted,
    out_of_time,
    record_metric,
    stop_reason,
)
from transformer_mt.train.validation import Validation, Validator, within_positions

log = logging.getLogger(__name__)


class Trainer(snapshot.Resumable):
    """Model, optimizer, schedule and data of one run, and the loop that trains them. Saving and
    resuming (`save`, `load`, `state_dict`) come from `snapshot.Resumable`."""

    def __init__(
        self,
        cfg: TrainConfig,
        data: PreparedData,
        paths: RunPaths,
        info: dist.DistInfo,
        device: torch.device,
    ):
        self.cfg, self.data, self.paths, self.info, self.device = cfg, data, paths, info, device
        tc = cfg.trainer
        self.amp = use_amp(tc.amp, device)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank
        self.model = build_model(cfg.model, len(data.src_vocab), len(data.tgt_vocab)).to(device)
        self.optimizer = build_optimizer(self.model, cfg.optim, device)
        self.schedule = PlateauSchedule.from_config(cfg.optim, tc.monitor)
        self.step = Step(self.model, self.optimizer, cfg, info, device, self.amp)
        torch.manual_seed(tc.seed + info.rank)  # but each rank its own dropout masks
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")

        limit = max_source_tokens(self.model)  # the translator's rule: None for the RNN
        train = within_positions(data.split("train"), limit)
        self.train_set = PairDataset(train)
        self.sampler = TokenBucketSampler(
            train.src_lengths(),
            train.tgt_lengths(),
            cfg.data.max_tokens,
            shuffle=True,
            seed=tc.seed,
            num_replicas=info.world_size,
            rank=info.rank,
        )
        self.validator = Validator(
            within_positions(data.split("val"), limit), data, cfg, device, self.amp
        )
        self.report = Reporter(paths, data, self.validator, tc.num_samples)
        self.checkpoints = snapshot.RunCheckpoints(paths, cfg, data, self.model)

        self.progress = Progress()
        self.metrics: dict[str, float] = {}  # the last validation metrics
        self.pending_row: dict | None = None  # resumed from an epoch saved before its validation
        self.init: InitCheckpoint | None = None  # fine-tuning: the checkpoint it started from
        self.start_metrics: dict[str, float] = {}  # fine-tuning: validation before the first step
        self.last_epoch_seconds = 0.0  # training + validation of the last whole epoch
        self._clock: float | None = None  # while fit runs: up to when train_seconds is counted
        self._validated_step = -1  # the step of the last validation in this session
        self.stop = StopRequest()
        self.window = Meter()  # since the last log point
        self.epoch_meter = Meter()  # since the start of the epoch

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, float]:
        """Train until a stopping rule fires; return the final validation metrics."""
        p = self.progress
        self.report.open(self.info.is_main, start_step=p.step)
        self.report.start(
            self.cfg, self.model, self.device, self.info.world_size, self.amp,
            len(self.train_set), len(self.sampler), p.step, p.epoch,
        )  # fmt: skip
        if self.init is not None and p.step == 0:
            self._validate_start(self.init)
        trained = False
        try:
            with self.stop:
                self._clock = time.perf_counter()
                # An epoch saved but not validated when the last session stopped: validate it.
                if self.pending_row is not None:
                    log.info(
                        "epoch %d was saved but not validated when the last session stopped: "
                        "validating it now",
                        p.epoch,
                    )
                    self._validate(self.pending_row, self._rank_states(), epoch_done=True)
                    self.pending_row = None
                    trained = True
                while (reason := self._stop_reason()) is None:
                    self._raise_if_stop_requested()
                    # Train on this rank's shard of the epoch (from the saved position on a
                    # resume), validating and saving every N steps where asked to.
                    ended = self.train_epoch()
                    trained = True
                    if ended == "signal":
                        self._save_interrupted()
                    # Save, validate on rank 0, record, write checkpoints and logs.
                    self.end_epoch(completed=ended == "epoch")
                log.info("training stopped: %s", reason)
                # Weights no validation has seen yet (validate_every): validate them.
                if trained and self._validated_step != p.step:
                    self._validate(self._row(), self._rank_states(), counts=False)
                self._clock = None
            # Average the last epochs, write the hyper-parameters.
            if trained:
                self.finish()
            return self.metrics
        finally:
            self.report.close()

    def train_epoch(self) -> str:
        """Train on the rest of the current epoch, validating and saving every
        `trainer.validate_every` / `save_every` steps if set; say why it ended: epoch, signal, or
        a stopping rule (`_stop_in_epoch`)."""
        p, tc = self.progress, self.cfg.trainer
        self.sampler.set_epoch(p.epoch + 1)
        # Index arrays, all of them but on a resume: nothing per sentence is held for the epoch.
        batches = self.sampler.batches()[p.batches_in_epoch :]
        if p.batches_in_epoch == 0:
            self.epoch_meter = Meter()
        self.window = Meter()
        bar = epoch_bar(
            len(self.sampler), p.batches_in_epoch, p.epoch + 1, tc.progress and self.info.is_main
        )
        self.step.train_model.train()
        with bar:
            for group in chunks(batches, tc.accumulate):
                self.train_step(
                    [collate([self.train_set[i] for i in ids.tolist()]) for ids in group]
                )
                p.batches_in_epoch += len(group)
                bar.update(len(group))
                if p.step % tc.log_every == 0:
                    self._log_train_point(bar)
                if self._stop_requested():
                    return "signal"
                self._validate_or_save_if_due()
                if (reason := self._stop_in_epoch()) is not None:
                    return reason
        return "epoch"

    def train_step(self, batches: Sequence[Batch]) -> None:
        """One optimizer step on `batches` at the schedule's learning rate."""
        step = self.progress.step + 1
        step_loss = self.step(batches, step, self.schedule.lr(step, self._budget_used(step)))
        if step_loss is None:
            log.warning("step %d: non-finite loss or gradient, batch skipped", step)
            return
        self.progress.step = step
        tokens = sum(batch.num_tgt_tokens for batch in batches)
        self.window.add(step_loss, tokens)
        self.epoch_meter.add(step_loss, tokens)

    def _validate_or_save_if_due(self) -> None:
        """Every `trainer.validate_every` steps validate (which saves too), every `save_every`
        steps save last.pt. The time they take is left out of the training speed."""
        p, tc = self.progress, self.cfg.trainer
        validate = _due(p.step, tc.validate_every) and self._validated_step != p.step
        save = _due(p.step, tc.save_every) and self.checkpoints.saved_step != p.step
        if not (validate or save):
            return
        started = time.perf_counter()
        if validate:
            self._validate(self._row(), self._rank_states())
        else:
            self._save_progress()
        paused = time.perf_counter() - started
        self.window.leave_out(paused)
        self.epoch_meter.leave_out(paused)

    def _budget_used(self, step: int) -> float:
        steps_per_epoch = math.ceil(len(self.sampler) / self.cfg.trainer.accumulate)
        return budget_used(step, self._train_seconds(), self.cfg.trainer, steps_per_epoch)

    def _train_seconds(self) -> float:
        """Seconds of training and validation over all sessions, up to now."""
        running = time.perf_counter() - self._clock if self._clock is not None else 0.0
        return self.progress.train_seconds + running

    def _count_time(self) -> None:
        """Move the seconds since the last count into `progress.train_seconds` (before a save)."""
        if self._clock is not None:
            now = time.perf_counter()
            self.progress.train_seconds += now - self._clock
            self._clock = now

    def _stop_reason(self) -> str | None:
        """`stop_reason` by rank 0's clock, the same on every rank."""
        self._count_time()
        reason = stop_reason(self.progress, self.cfg.trainer, self.last_epoch_seconds)
        return dist.broadcast_object(reason, self.info)

    def _stop_in_epoch(self) -> str | None:
        """Why to stop before the epoch's next step (max_steps, patience after a validation every
        N steps, max_time with validate_every or save_every), or None. Rank 0's clock decides
        the time for every rank."""
        p, tc = self.progress, self.cfg.trainer
        if tc.max_steps is not None and p.step >= tc.max_steps:
            return "max_steps"
        if tc.patience and p.bad_validations >= tc.patience:
            return "patience"
        if tc.max_time is not None and tc.by_steps:
            spent = self.info.is_main and out_of_time(self._train_seconds(), tc)
            if dist.any_rank(spent, self.info):
                return "max_time"
        return None

    def _log_train_point(self, bar: tqdm) -> None:
        """Sync once: train loss, lr, gradient norm and speed since the last point."""
        self._check_finite()
        loss, tokens = self._reduce(self.window)
        lr, grad_norm = self.optimizer.param_groups[0]["lr"], float(self.step.grad_norm)
        self.report.train_point(self.progress.step, loss, tokens, self.window, lr, grad_norm, bar)
        self.window = Meter()

    def _reduce(self, meter: Meter) -> tuple[float, int]:
        """(mean loss per target token, target tokens) of `meter` over all ranks (one sync)."""
        loss_sum, tokens = dist.sum_floats([float(meter.loss_sum), meter.tokens], self.info)
        return loss_sum / max(tokens, 1.0), int(tokens)

    def _stop_requested(self) -> bool:
        return dist.any_rank(self.stop.requested, self.info)

    def _raise_if_stop_requested(self) -> None:
        """A signal that arrived during validation: last.pt is already up to date."""
        if self._stop_requested():
            raise self._interrupted()

    def _check_finite(self) -> None:
        """Stop the run if any step since the start had a non-finite loss (one host sync)."""
        bad_step = int(self.step.first_bad_step)
        if bad_step >= 0:
            raise diverged(bad_step, self.checkpoints.last_saved, self.checkpoints.saved_step)

    # ------------------------------------------------------------------------------------------
    # Validation and saving: at epoch ends, every N steps, at the end of the run

    def end_epoch(self, completed: bool) -> None:
        """Save the epoch's training, then validate, record the metric, write checkpoints and logs.

        A completed epoch is in last.pt before validation starts, marked as not yet validated
        (`pending_row`): if validation crashes or the process dies, the resume validates that
        epoch first instead of training it again. With `trainer.validate_every` an epoch end only
        writes last.pt and epoch_<n>.pt; a run stopped in an epoch is validated by `fit` last.
        """
        p = self.progress
        if completed:
            p.epoch += 1
            p.batches_in_epoch = 0
        if self.cfg.trainer.validate_every is not None:
            if completed:
                self._save_progress(epoch_file=True)
            return
        row = self._row()
        rank_states = self._rank_states()
        if completed:
            self._count_time()
            dist.run_on_main(self.info, lambda: self.save(rank_states, pending_row=row))
        self._validate(row, rank_states, epoch_done=completed, counts=completed)

    def _row(self) -> dict:
        """The training half of a metrics row now: the epoch it belongs to, the step, the train
        loss and speed over the epoch so far."""
        p = self.progress
        train_seconds = max(time.perf_counter() - self.epoch_meter.started, 1e-9)
        self._check_finite()
        train_loss, train_tokens = self._reduce(self.epoch_meter)
        return {
            "epoch": p.current_epoch,
            "step": p.step,
            "train_loss": train_loss,
            "tokens_per_s": train_tokens / train_seconds if train_tokens else 0.0,
        }

    def _validate(
        self, row: dict, rank_states: list[dict], epoch_done: bool = False, counts: bool = True
    ) -> None:
        """Validate on rank 0 and record the metric, then write the checkpoints (epoch_<n>.pt if
        `epoch_done`, best.pt if the metric improved) and the log row that `row` begins.

        `counts`: a regular validation (each epoch, or every `trainer.validate_every` steps),
        which early stopping and the plateau schedule count; one made because the run stopped in
        between only updates the best metric.
        """
        p = self.progress
        validation = dist.run_on_main(self.info, self.validate)
        self.metrics = dist.broadcast_object(validation and validation.metrics, self.info)
        improved = self._record(self.metrics, counts)
        self._validated_step = p.step
        row = {
            **row,
            **self.metrics,
            "lr": self.schedule.lr(p.step + 1, self._budget_used(p.step + 1)),
            "epoch_seconds": time.perf_counter() - self.epoch_meter.started,
        }
        if epoch_done and row["tokens_per_s"]:
            self.last_epoch_seconds = row["epoch_seconds"]
        self._count_time()
        dist.run_on_main(
            self.info,
            lambda: self._write_validation(row, validation, rank_states, epoch_done, improved),
        )
        self._saved(self.paths.last)

    def _write_validation(self, row, validation, rank_states, epoch_done: bool, best: bool) -> None:
        """Rank 0: the checkpoints (the epoch copy if `epoch_done`), then the logs."""
        self.save(rank_states, epoch_file=epoch_done, best=best)
        self.report.validation(row, validation, self.model, epoch_done)

    def _record(self, metrics: dict[str, float], counts: bool) -> bool:
        """Best metric, early-stopping count and plateau schedule; True if the metric improved."""
        monitor = self.cfg.trainer.monitor
        improved = record_metric(self.progress, metrics[monitor], monitor, counts)
        if counts and self.schedule.record(metrics[monitor]):
            log.info("%s stalled: learning rate lowered to %.3g", monitor, self.schedule.level)
        return improved

    def validate(self, model: torch.nn.Module | None = None) -> Validation:
        """Loss, perplexity and BLEU of `model` (default: the one training) on the val split."""
        return self.validator(self.model if model is None else model)

    def _save_progress(self, epoch_file: bool = False) -> None:
        """Write last.pt (and the epoch's copy if `epoch_file`) without validating. In the middle
        of an epoch it holds the batch position and every rank's random state: a resume continues
        exactly."""
        self._check_finite()
        rank_states = self._rank_states()
        self._count_time()
        dist.run_on_main(self.info, lambda: self.save(rank_states, epoch_file=epoch_file))
        self._saved(self.paths.last)

    def _save_interrupted(self) -> None:
        """Write last.pt in the middle of an epoch (after a signal) and raise TrainingInterrupted."""
        self._save_progress()
        raise self._interrupted()

    def _interrupted(self) -> Exception:  # the signal may have reached another rank only
        return interrupted(self.stop.signum or signal.SIGTERM, self.progress, self.paths)

    # ------------------------------------------------------------------------------------------
    # Fine-tuning: the start from another run's checkpoint

    def init_weights(self, init: InitCheckpoint) -> None:
        """Fine-tuning: start from `init`'s weights (and Adam moments if trainer.init_optimizer)."""
        init.load_into(self.model, self.optimizer, self.cfg.trainer.init_optimizer)
        self.init = init

    def _validate_start(self, init: InitCheckpoint) -> None:
        """Validate before the first step, the run's starting point (step 0). On the checkpoint's
        own validation data this is the checkpoint's BLEU again."""
        validation = dist.run_on_main(self.info, self.validate)
        if validation is not None:
            self.start_metrics = validation.metrics
            init.log_start(validation.metrics, self.cfg.trainer.init_optimizer)
            self.report.scalars("val", validation.metrics, 0)

    # ------------------------------------------------------------------------------------------
    # The end of the run

    def finish(self) -> None:
        """Average the last epoch checkpoints if asked; write the run's hyper-parameters."""
        averaged = None
        if self.cfg.trainer.average_last:
            averaged = dist.broadcast_object(dist.run_on_main(self.info, self.average), self.info)
        self.report.end(self.cfg, self.info.world_size, self.progress, self.metrics, averaged)

    def average(self) -> dict[str, float] | None:
        """Average the last `trainer.average_last` epoch checkpoints into averaged.pt; validate
        it; best.pt becomes the better of it and the best validated checkpoint."""
        model = build_model(self.cfg.model, len(self.data.src_vocab), len(self.data.tgt_vocab))
        tc = self.cfg.trainer
        metrics = snapshot.average_epochs(
            self.paths, tc.average_last, model.to(self.device), self.validate, tc.monitor
        )
        if metrics is not None:
            self.report.scalars("averaged", metrics, self.progress.step)
        return metrics


def _due(step: int, every: int | None) -> bool:
    """Whether step `step` is one of every `every` steps (never when `every` is None)."""
    return every is not None and step % every == 0
