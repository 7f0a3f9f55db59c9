"""The training loop: `Trainer.fit` trains epoch after epoch until a stopping rule fires.

    one epoch   the step (train/step.py) on every batch of this rank's shard
    then        save last.pt → validate (train/validation.py) → record the metric → write the
                epoch's checkpoints (train/snapshot.py) and logs (train/reporting.py)
    until       train/stopping.py says why not to start another epoch

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
        self._train_started: float | None = None  # when the running train_epoch began
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
                # An epoch saved but not validated when the last session stopped: validate it.
                if self.pending_row is not None:
                    log.info(
                        "epoch %d was saved but not validated when the last session stopped: "
                        "validating it now",
                        p.epoch,
                    )
                    self._validate_epoch(self.pending_row, True, self._rank_states())
                    self.pending_row = None
                    trained = True
                while (reason := stop_reason(p, self.cfg.trainer, self.last_epoch_seconds)) is None:
                    self._raise_if_stop_requested()
                    # Train on this rank's shard of the epoch (from the saved position on a resume).
                    ended = self.train_epoch()
                    trained = True
                    if ended == "signal":
                        self._save_interrupted()
                    # Save, validate on rank 0, record, write checkpoints and logs.
                    self.end_epoch(completed=ended == "epoch")
            log.info("training stopped: %s", reason)
            # Average the last epochs, write the hyper-parameters.
            if trained:
                self.finish()
            return self.metrics
        finally:
            self.report.close()

    def train_epoch(self) -> str:
        """Train on the rest of the current epoch; say why it ended: epoch, max_steps or signal."""
        p, tc = self.progress, self.cfg.trainer
        self.sampler.set_epoch(p.epoch + 1)
        batches = list(self.sampler.iter_from(p.batches_in_epoch))  # all of them but on a resume
        if p.batches_in_epoch == 0:
            self.epoch_meter = Meter()
        self.window = Meter()
        bar = epoch_bar(
            len(self.sampler), p.batches_in_epoch, p.epoch + 1, tc.progress and self.info.is_main
        )
        self.step.train_model.train()
        started = self._train_started = time.perf_counter()
        ended = "epoch"
        with bar:
            for group in chunks(batches, tc.accumulate):
                self.train_step([collate([self.train_set[i] for i in ids]) for ids in group])
                p.batches_in_epoch += len(group)
                bar.update(len(group))
                if p.step % tc.log_every == 0:
                    self._log_train_point(bar)
                if self._stop_requested():
                    ended = "signal"
                    break
                if tc.max_steps is not None and p.step >= tc.max_steps:
                    ended = "max_steps"
                    break
        p.train_seconds += time.perf_counter() - started
        self._train_started = None
        return ended

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

    def _budget_used(self, step: int) -> float:
        seconds = self.progress.train_seconds
        if self._train_started is not None:
            seconds += time.perf_counter() - self._train_started
        steps_per_epoch = math.ceil(len(self.sampler) / self.cfg.trainer.accumulate)
        return budget_used(step, seconds, self.cfg.trainer, steps_per_epoch)

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
    # End of an epoch

    def end_epoch(self, completed: bool) -> None:
        """Save the epoch's training, then validate, record the metric, write checkpoints and logs.

        A completed epoch is in last.pt before validation starts, marked as not yet validated
        (`pending_row`): if validation crashes or the process dies, the resume validates that
        epoch first instead of training it again.
        """
        p = self.progress
        started = time.perf_counter()
        self._check_finite()
        train_loss, train_tokens = self._reduce(self.epoch_meter)
        train_seconds = max(started - self.epoch_meter.started, 1e-9)
        if completed:
            p.epoch += 1
            p.batches_in_epoch = 0
        row = {
            "epoch": p.epoch if completed else p.epoch + 1,
            "step": p.step,
            "train_loss": train_loss,
            "tokens_per_s": train_tokens / train_seconds if train_tokens else 0.0,
        }
        rank_states = self._rank_states()
        if completed:
            dist.run_on_main(self.info, lambda: self.save(rank_states, pending_row=row))
        p.train_seconds += time.perf_counter() - started
        self._validate_epoch(row, completed, rank_states)

    def _validate_epoch(self, row: dict, completed: bool, rank_states: list[dict]) -> None:
        """Validate the epoch `row` describes, then write its checkpoints and its log row."""
        p = self.progress
        started = time.perf_counter()
        validation = dist.run_on_main(self.info, self.validate)
        self.metrics = dist.broadcast_object(validation and validation.metrics, self.info)
        improved = self._record(self.metrics, completed)
        p.train_seconds += time.perf_counter() - started
        row = {
            **row,
            **self.metrics,
            "lr": self.schedule.lr(p.step + 1, self._budget_used(p.step + 1)),
            "epoch_seconds": time.perf_counter() - self.epoch_meter.started,
        }
        if completed and row["tokens_per_s"]:
            self.last_epoch_seconds = row["epoch_seconds"]
        dist.run_on_main(
            self.info, lambda: self._write_epoch(row, validation, rank_states, completed, improved)
        )
        self._saved(self.paths.last)

    def _write_epoch(self, row, validation, rank_states, completed: bool, best: bool) -> None:
        """Rank 0: the epoch's checkpoints (the epoch copy if `completed`), then its logs."""
        self.save(rank_states, epoch_file=completed, best=best)
        self.report.epoch(row, validation, self.model)

    def _record(self, metrics: dict[str, float], completed: bool) -> bool:
        """Best metric, early-stopping count and plateau schedule; True if the metric improved."""
        monitor = self.cfg.trainer.monitor
        improved = record_metric(self.progress, metrics[monitor], monitor, completed)
        if completed and self.schedule.epoch_end(metrics[monitor]):
            log.info("%s stalled: learning rate lowered to %.3g", monitor, self.schedule.level)
        return improved

    def validate(self, model: torch.nn.Module | None = None) -> Validation:
        """Loss, perplexity and BLEU of `model` (default: the one training) on the val split."""
        return self.validator(self.model if model is None else model)

    def _save_interrupted(self) -> None:
        """Write last.pt in the middle of an epoch (after a signal) and raise TrainingInterrupted."""
        self._check_finite()
        rank_states = self._rank_states()
        dist.run_on_main(self.info, lambda: self.save(rank_states))
        self._saved(self.paths.last)
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
        """Average the last `trainer.average_last` epoch checkpoints into averaged.pt; validate it."""
        model = build_model(self.cfg.model, len(self.data.src_vocab), len(self.data.tgt_vocab))
        k, last_bleu = self.cfg.trainer.average_last, self.metrics["val_bleu"]
        metrics = snapshot.average_epochs(
            self.paths, k, model.to(self.device), self.validate, last_bleu
        )
        if metrics is not None:
            self.report.scalars("averaged", metrics, self.progress.step)
        return metrics
