"""The training loop: `train(cfg)` runs a whole job; `Trainer` holds the loop's four verbs.

    train_step   one optimizer step over `trainer.accumulate` batches (loss per target token)
    validate     teacher-forced loss / perplexity and BLEU of real decoding on the whole val split
    save / load  self-contained checkpoints, enough to continue a run exactly

Under `torchrun` every process trains on its own shard of each epoch's batches (DDP averages the
gradients); `data.max_tokens` is the budget of one batch *per process*, so a step sees
`world_size x accumulate x max_tokens` padded tokens at most. Rank 0 alone validates, prints and
writes files while the others wait; it then hands its metrics to every rank, so all of them take
the same learning-rate and early-stopping decisions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from transformer_mt.config import ModelConfig, TrainConfig, to_dataclass
from transformer_mt.data.batching import Batch, PairDataset, TokenBucketSampler, collate
from transformer_mt.data.dataset import PreparedData, SplitData, load_or_prepare
from transformer_mt.data.subword import subword_state
from transformer_mt.data.tokenize import Detokenizer
from transformer_mt.data.vocab import BOS, EOS
from transformer_mt.errors import CheckpointError, ConfigError, UserError
from transformer_mt.metrics import corpus_bleu
from transformer_mt.model import build_model
from transformer_mt.train import distributed as dist
from transformer_mt.checkpoint import (
    CHECKPOINT_FORMAT,
    average_checkpoints,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from transformer_mt.train.finetune import InitCheckpoint
from transformer_mt.train.logging import RunLogger, log_file, write_config
from transformer_mt.train.loss import token_loss_sum
from transformer_mt.train.optim import PlateauSchedule, build_optimizer, is_improvement, set_lr
from transformer_mt.train.rundir import RunPaths, open_run
from transformer_mt.train.signals import StopRequest, TrainingInterrupted
from transformer_mt.train.state import Progress, rng_state, set_rng_state
from transformer_mt.inference.translator import decode_ids, max_source_tokens, translate_ids

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing after the last good checkpoint was saved."""


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the training job `cfg` describes; return its final validation metrics.

    Raises UserError for anything the user can fix (existing run, lock held, unwritable folder,
    divergence) and TrainingInterrupted after saving on SIGINT / SIGTERM.
    """
    init = None
    if cfg.trainer.init_from is not None:  # checked before anything is written
        init = InitCheckpoint.load(cfg)
        cfg = dataclasses.replace(cfg, data=init.data_config(cfg.data))
    info, device = dist.init_distributed(cfg.trainer.device)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(dist.shutdown_distributed)
        if not info.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        # Under torchrun each process resolved the timestamp in the default run name on its own.
        cfg = dataclasses.replace(cfg, run_name=dist.broadcast_object(cfg.run_name, info))
        paths = RunPaths.create(cfg.run_name, cfg.saved_dir, cfg.result_dir)
        lock = dist.run_on_main(info, lambda: open_run(paths, cfg.trainer.resume))
        if info.is_main:
            cleanup.callback(lock.release)
            cleanup.enter_context(log_file(paths.result / "train.log"))
            write_config(paths.result / "config.yaml", cfg)
            _warn_if_slow(cfg, device)
        vocabs = init.vocabs if init is not None else None
        data = dist.run_on_main(info, lambda: load_or_prepare(cfg.data, vocabs))
        if data is None:  # the other ranks load the cache rank 0 has just prepared
            data = load_or_prepare(cfg.data, vocabs)
        trainer = Trainer(cfg, data, paths, info, device)
        if cfg.trainer.resume:
            trainer.load(paths.last)
        elif init is not None:
            trainer.init_weights(init)
        try:
            return trainer.fit()
        except TrainingInterrupted as stop:
            log.warning("%s", stop)  # while train.log is still open
            raise


def _warn_if_slow(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu" and cfg.model.name in ("base", "big"):
        log.warning(
            "training model=%s on a CPU: this will be slow (hours per epoch on Multi30k); "
            "for a CPU run pick the CPU preset: python scripts/train.py experiment=cpu",
            cfg.model.name,
        )


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): autocast pays off there."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_amp(requested: bool | None, device: torch.device) -> bool:
    """Resolve `trainer.amp`: None = bf16 autocast wherever the device computes bf16 natively.

    Raises ConfigError when bf16 is asked for on a CPU without native support (it would be
    emulated, several times slower than float32).
    """
    if device.type == "cuda":
        return requested is not False
    if device.type != "cpu":
        return bool(requested)
    supported = cpu_supports_bf16()
    if requested and not supported:
        raise ConfigError(
            "trainer.amp=true, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
            "use trainer.amp=false (or leave it unset to choose automatically)"
        )
    return supported if requested is None else requested


def within_positions(split: SplitData, limit: int | None) -> SplitData:
    """`split` without the pairs a Transformer of `limit` positions cannot read or predict (a
    source with its EOS, a target with its BOS longer than `limit`), with a warning that counts
    them. Found when the data is loaded, so one long validation sentence never fails an epoch."""
    if limit is None:
        return split
    keep = [
        i
        for i, (src, tgt) in enumerate(zip(split.src, split.tgt, strict=True))
        if len(src) < limit and len(tgt) < limit
    ]
    if len(keep) == len(split):
        return split
    log.warning(
        "%s: left out %d of %d pairs longer than model.max_positions=%d tokens "
        "(with BOS/EOS); raise model.max_positions to keep them",
        split.name,
        len(split) - len(keep),
        len(split),
        limit,
    )

    def pick(values: list | None) -> list | None:
        return None if values is None else [values[i] for i in keep]

    return SplitData(
        split.name, pick(split.src), pick(split.tgt), pick(split.src_text), pick(split.ref_text)
    )


@dataclass
class Validation:
    """What `Trainer.validate` measured: metrics, and the hypotheses in split order."""

    metrics: dict[str, float]
    hypotheses: list[str]


@dataclass
class _Meter:
    """Summed training loss (a device tensor: no sync per step) and target tokens since `started`."""

    loss_sum: torch.Tensor | float = 0.0
    tokens: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)


class Trainer:
    """Model, optimizer, schedule and data of one run, and the loop that trains them."""

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
        self.ddp, self.train_model = self._wrap(self.model)
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
        self.val = within_positions(data.split("val"), limit)
        self.val_batches = TokenBucketSampler(
            self.val.src_lengths(), self.val.tgt_lengths(), cfg.data.max_tokens, shuffle=False
        ).batches()
        self.val_decode = dataclasses.replace(cfg.decode, batch_size=tc.val_batch_size)
        self.detokenizer = Detokenizer(cfg.data.tgt, data.tgt_subword)
        count = min(tc.num_samples, len(self.val))
        self.sample_ids = [round(i * (len(self.val) - 1) / max(count - 1, 1)) for i in range(count)]

        self.progress = Progress()
        self.metrics: dict[str, float] = {}  # the last validation metrics
        self.pending_row: dict | None = None  # resumed from an epoch saved before its validation
        self.init: InitCheckpoint | None = None  # fine-tuning: the checkpoint it started from
        self.start_metrics: dict[str, float] = {}  # fine-tuning: validation before the first step
        self.last_saved: Path | None = None  # the newest checkpoint with training state
        self.last_epoch_seconds = 0.0  # training + validation of the last whole epoch
        self._train_started: float | None = None  # when the running train_epoch began
        self._saved_step = 0
        self.stop = StopRequest()
        self.logger = RunLogger(paths.result, enabled=False)
        self.window = _Meter()  # since the last log point
        self.epoch_meter = _Meter()  # since the start of the epoch
        self.grad_norm = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def _wrap(self, model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module]:
        """(the DDP wrapper or None, the module the training step calls)."""
        ddp = None
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = model = DistributedDataParallel(model, device_ids=device_ids)
        if self.cfg.trainer.compile:
            model = torch.compile(model, dynamic=True)
        return ddp, model

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, float]:
        """Train until a stopping rule fires; return the final validation metrics."""
        p = self.progress
        self.logger = RunLogger(self.paths.result, enabled=self.info.is_main, start_step=p.step)
        self._log_start()
        if self.init is not None and p.step == 0:
            self._validate_start(self.init)
        trained = False
        try:
            with self.stop:
                if self.pending_row is not None:
                    log.info(
                        "epoch %d was saved but not validated when the last session stopped: "
                        "validating it now",
                        p.epoch,
                    )
                    self._validate_epoch(self.pending_row, True, self._gather_rank_states())
                    self.pending_row = None
                    trained = True
                # One epoch: every rank trains on its shard of the epoch's shuffled, length-bucketed
                # batches (from the saved position when resuming mid-epoch); then rank 0 validates
                # on the whole validation split, logs and writes checkpoints, and every rank
                # applies the same learning-rate and early-stopping decision.
                while (reason := self._finished()) is None:
                    self._raise_if_stop_requested()
                    ended = self.train_epoch()
                    trained = True
                    if ended == "signal":
                        self._save_interrupted()
                    self.end_epoch(completed=ended == "epoch")
            log.info("training stopped: %s", reason)
            if trained:
                self.finish()
            return self.metrics
        finally:
            self.logger.close()

    def _finished(self) -> str | None:
        """Why training should stop now, or None to go on."""
        p, tc = self.progress, self.cfg.trainer
        if p.epoch >= tc.max_epochs:
            return f"reached trainer.max_epochs={tc.max_epochs}"
        if tc.max_steps is not None and p.step >= tc.max_steps:
            return f"reached trainer.max_steps={tc.max_steps}"
        if tc.max_time is not None:
            if p.train_seconds >= tc.max_time * 60:
                return f"reached trainer.max_time={tc.max_time} minutes"
            if p.train_seconds + self.last_epoch_seconds > tc.max_time * 60:
                return (
                    f"another epoch (about {self.last_epoch_seconds / 60:.1f} minutes) would end "
                    f"after trainer.max_time={tc.max_time} minutes"
                )
        if tc.patience and p.bad_epochs >= tc.patience:
            return (
                f"early stopping: {tc.monitor} has not improved for {p.bad_epochs} epochs "
                f"(best {p.best_metric:.4g} at epoch {p.best_epoch})"
            )
        return None

    def train_epoch(self) -> str:
        """Train on the rest of the current epoch; say why it ended: epoch, max_steps or signal."""
        p, tc = self.progress, self.cfg.trainer
        self.sampler.set_epoch(p.epoch + 1)
        batches = self.sampler.batches()
        if p.batches_in_epoch == 0:
            self.epoch_meter = _Meter()
        self.window = _Meter()
        bar = tqdm(
            total=len(batches),
            initial=p.batches_in_epoch,
            desc=f"epoch {p.epoch + 1}",
            unit="batch",
            disable=not (tc.progress and self.info.is_main),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self.train_model.train()
        started = self._train_started = time.perf_counter()
        ended = "epoch"
        with bar:
            for group in _chunks(batches[p.batches_in_epoch :], tc.accumulate):
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

    def _budget_used(self, step: int) -> float:
        """Fraction of the run's budget spent by step `step`: the largest of time, steps, epochs."""
        p, tc = self.progress, self.cfg.trainer
        steps_per_epoch = math.ceil(len(self.sampler) / tc.accumulate)
        used = step / max(tc.max_epochs * steps_per_epoch, 1)
        if tc.max_steps is not None:
            used = max(used, step / tc.max_steps)
        if tc.max_time is not None:
            seconds = p.train_seconds
            if self._train_started is not None:
                seconds += time.perf_counter() - self._train_started
            used = max(used, seconds / (tc.max_time * 60))
        return min(used, 1.0)

    def train_step(self, batches: Sequence[Batch]) -> None:
        """One optimizer step on `batches`, their gradients accumulated.

        The loss is normalised by the target tokens of the whole step (every batch, every rank),
        so each token weighs the same however the step was split. No host sync happens here:
        losses and the non-finite check stay on the device until the next log point.
        """
        p, tc = self.progress, self.cfg.trainer
        step = p.step + 1
        set_lr(self.optimizer, self.schedule.lr(step, self._budget_used(step)))
        tokens = sum(batch.num_tgt_tokens for batch in batches)
        (global_tokens,) = dist.sum_floats([tokens], self.info)
        scale = self.info.world_size / global_tokens  # DDP averages gradients over ranks
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device, non_blocking=True)
            with self._gradient_sync(i == len(batches) - 1):
                with self._autocast():
                    logits = self.train_model(batch.src, batch.tgt_in)
                    loss_sum = token_loss_sum(logits, batch.tgt_out, self.cfg.optim.label_smoothing)
                (loss_sum * scale).backward()
            step_loss += loss_sum.detach()
        clip = self.cfg.optim.clip_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if tc.skip_nonfinite and not torch.isfinite(grad_norm):  # a host sync, only when asked
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss or gradient, batch skipped", step)
            return
        bad = ~torch.isfinite(grad_norm) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        p.step = step
        self.grad_norm = grad_norm.detach()
        for meter in (self.window, self.epoch_meter):
            meter.loss_sum = meter.loss_sum + step_loss
            meter.tokens += tokens

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last batch of a step only."""
        if self.ddp is None or sync:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _decode_autocast(self) -> contextlib.AbstractContextManager:
        """Validation decoding: bf16 on CUDA only. On the CPU it runs in float32, as `evaluate`
        does, so validation BLEU is the figure evaluate reports (docs/benchmarks.md, "Presets")."""
        enabled = self.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _log_train_point(self, bar: tqdm) -> None:
        """Sync once: train loss, lr, gradient norm and speed since the last point."""
        self._check_finite()
        loss, tokens = self._reduce(self.window)
        elapsed = max(time.perf_counter() - self.window.started, 1e-9)
        scalars = {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(self.grad_norm),
            "tokens_per_s": tokens / elapsed,
        }
        self.logger.train_point(self.progress.step, scalars)
        bar.set_postfix(
            loss=f"{loss:.3f}", lr=f"{scalars['lr']:.2e}", tok_s=f"{scalars['tokens_per_s']:.0f}"
        )
        self.window = _Meter()

    def _reduce(self, meter: _Meter) -> tuple[float, int]:
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
        bad_step = int(self.first_bad_step)
        if bad_step < 0:
            return
        if self.last_saved is not None:
            last = f"the last good checkpoint is {self.last_saved} (step {self._saved_step})"
        else:
            last = "no checkpoint was written before it"
        raise TrainingDiverged(
            f"training diverged: the loss became NaN or infinite at step {bad_step} and nothing "
            f"after it was saved; {last}. Lower optim.lr or optim.clip_norm, or set "
            "trainer.skip_nonfinite=true to skip such batches"
        )

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
        rank_states = self._gather_rank_states()
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

        def save_and_log() -> None:
            self.save(rank_states, epoch_file=completed, best=improved)
            self._log_epoch(row, validation)

        dist.run_on_main(self.info, save_and_log)
        self._saved(self.paths.last)

    def _record(self, metrics: dict[str, float], completed: bool) -> bool:
        """Best metric, early-stopping count and plateau schedule; True if the metric improved."""
        p, monitor = self.progress, self.cfg.trainer.monitor
        value = metrics[monitor]
        improved = is_improvement(value, p.best_metric, monitor)
        if improved:
            p.best_metric, p.best_epoch, p.bad_epochs = value, p.epoch, 0
        elif completed:
            p.bad_epochs += 1
        if completed and self.schedule.epoch_end(value):
            log.info("%s stalled: learning rate lowered to %.3g", monitor, self.schedule.level)
        return improved

    def _log_epoch(self, row: dict, validation: Validation) -> None:
        log.info(
            "epoch %d (step %d): train loss %.4f | val loss %.4f, ppl %.2f, BLEU %.2f | lr %.3g | "
            "%.0f tokens/s | %.0f s",
            row["epoch"],
            row["step"],
            row["train_loss"],
            row["val_loss"],
            row["val_ppl"],
            row["val_bleu"],
            row["lr"],
            row["tokens_per_s"],
            row["epoch_seconds"],
        )
        self.logger.epoch_row(row)
        lines = []
        for n, i in enumerate(self.sample_ids, start=1):
            source, reference, hypothesis = (
                self.val.src_text[i],
                self.val.ref_text[i],
                validation.hypotheses[i],
            )
            log.info(
                "sample %d/%d\n  source:     %s\n  reference:  %s\n  hypothesis: %s",
                n,
                len(self.sample_ids),
                source,
                reference,
                hypothesis,
            )
            lines.append(
                f"**source:** {source}  \n**reference:** {reference}  \n"
                f"**hypothesis:** {hypothesis}"
            )
        self.logger.text("val/samples", "\n\n".join(lines), row["step"])
        if self.sample_ids:
            self._log_attention(self.sample_ids[0], row["step"])

    @torch.no_grad()
    def _log_attention(self, index: int, step: int) -> None:
        """Heat-map of the cross-attention behind one validation translation (file + TensorBoard)."""
        from matplotlib.image import imread

        from transformer_mt.plots import plot_attention

        src_ids = [*self.val.src[index], EOS]
        ban_unk = self.data.tgt_subword is not None
        best = decode_ids(self.model, [self.val.src[index]], self.val_decode, self.device, ban_unk)[
            0
        ][0]
        src = torch.tensor([src_ids], device=self.device)
        tgt_in = torch.tensor([[BOS, *best.tokens]], device=self.device)
        was_training = self.model.training
        self.model.eval()
        weights = self.model.cross_attention(src, tgt_in)[0].float().cpu().numpy()  # (T, S)
        self.model.train(was_training)
        path = self.paths.result / "attention.png"
        plot_attention(
            weights,
            self.data.src_vocab.decode(src_ids),
            self.data.tgt_vocab.decode([*best.tokens, EOS]),
            path,
            title=f"validation sentence {index}, step {step}",
        )
        self.logger.image("val/attention", imread(path)[..., :3], step)

    # ------------------------------------------------------------------------------------------
    # Validation

    @torch.no_grad()
    def validate(self, model: torch.nn.Module | None = None) -> Validation:
        """Teacher-forced loss and perplexity, then BLEU of real decoding, on the whole val split.

        `val_loss` is the plain cross-entropy per target token (no label smoothing), so
        `val_ppl = exp(val_loss)`. BLEU decodes every validation sentence with the `decode`
        settings (greedy by default), through the same code as `evaluate`. The loss runs under
        the training autocast, decoding under `_decode_autocast`.
        """
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for ids in self.val_batches:
            batch = collate([(i, self.val.src[i], self.val.tgt[i]) for i in ids]).to(self.device)
            with self._autocast():
                logits = model(batch.src, batch.tgt_in)
            loss_sum += token_loss_sum(logits, batch.tgt_out)
            tokens += batch.num_tgt_tokens
        with self._decode_autocast():
            hypotheses = translate_ids(
                model,
                self.val.src,
                self.data.tgt_vocab,
                self.detokenizer,
                self.val_decode,
                self.device,
            )
        model.train(was_training)
        val_loss = float(loss_sum) / max(tokens, 1)
        metrics = {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bleu": corpus_bleu(hypotheses, self.val.ref_text),
        }
        return Validation(metrics, hypotheses)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def _payload(self, with_state: bool, rank_states: list[dict] | None = None) -> dict:
        """The checkpoint dict (format in train/checkpoint.py): plain data only."""
        p, cfg = self.progress, self.cfg
        payload = {
            "format_version": CHECKPOINT_FORMAT,
            "model": unwrap_model(self.model).state_dict(),
            "model_config": asdict(cfg.model),
            "config": asdict(cfg),
            "src_vocab": self.data.src_vocab.to_list(),
            "tgt_vocab": self.data.tgt_vocab.to_list(),
            "tokenizer": {
                "src_lang": cfg.data.src,
                "tgt_lang": cfg.data.tgt,
                "lowercase": cfg.data.lowercase,
                "subword": subword_state(self.data.src_subword, self.data.tgt_subword),
            },
            "epoch": p.epoch,
            "step": p.step,
            "metrics": dict(self.metrics),
        }
        if with_state:
            payload["train_state"] = {
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "progress": p.state_dict(),
                "ranks": rank_states,  # per rank: RNG states, partial-epoch loss
                "world_size": self.info.world_size,
            }
        return payload

    def save(
        self,
        rank_states: list[dict],
        epoch_file: bool = False,
        best: bool = False,
        pending_row: dict | None = None,
    ) -> None:
        """Write last.pt; also epoch_<n>.pt (the last `keep_last` kept) and best.pt when due.

        `pending_row`: the epoch is trained but not validated yet (its log row so far).
        Rank 0 only. Every file is written atomically: a crash leaves the previous version.
        """
        payload = self._payload(with_state=True, rank_states=rank_states)
        payload["train_state"]["pending_row"] = pending_row
        save_checkpoint(payload, self.paths.last)
        keep_last = self.cfg.trainer.keep_last
        if epoch_file and keep_last > 0:
            copy_checkpoint(self.paths.last, self.paths.epoch(self.progress.epoch))
            for old in self.paths.epoch_checkpoints()[:-keep_last]:
                old.unlink(missing_ok=True)
        if best:
            save_checkpoint(self._payload(with_state=False), self.paths.best)

    def _saved(self, path: Path) -> None:
        self.last_saved, self._saved_step = path, self.progress.step

    def _gather_rank_states(self) -> list[dict]:
        """Each rank's random-generator states and partial-epoch loss, for an exact resume."""
        meter = self.epoch_meter
        local = {
            "rng": rng_state(self.device),
            "epoch_loss_sum": float(meter.loss_sum),
            "epoch_tokens": meter.tokens,
            "epoch_seconds": time.perf_counter() - meter.started,
        }
        return dist.gather_objects(local, self.info)

    def _save_interrupted(self) -> None:
        """Write last.pt in the middle of an epoch (after a signal) and raise TrainingInterrupted."""
        self._check_finite()
        rank_states = self._gather_rank_states()
        dist.run_on_main(self.info, lambda: self.save(rank_states))
        self._saved(self.paths.last)
        raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        signum = self.stop.signum or signal.SIGTERM  # another rank may have received it
        p = self.progress
        message = (
            f"interrupted by {signal.Signals(signum).name} at step {p.step} "
            f"(epoch {p.epoch + 1}, batch {p.batches_in_epoch}); saved {self.paths.last}. "
            f"Continue with: python scripts/train.py run_name={self.paths.name} trainer.resume=true"
        )
        return TrainingInterrupted(signum, message)

    def init_weights(self, init: InitCheckpoint) -> None:
        """Start from `init`'s weights (and Adam moments if trainer.init_optimizer)."""
        self.model.load_state_dict(init.payload["model"])
        if self.cfg.trainer.init_optimizer:
            try:
                self.optimizer.load_state_dict(init.payload["train_state"]["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(
                    f"the optimizer state of {init.path} does not fit this run's optimizer "
                    f"({err}); drop trainer.init_optimizer or keep optim.weight_decay as it was"
                ) from None
        self.init = init

    def _validate_start(self, init: InitCheckpoint) -> None:
        """Fine-tuning: validate before the first step, the run's starting point (step 0).

        On the checkpoint's own validation data this is the checkpoint's BLEU again.
        """
        validation = dist.run_on_main(self.info, self.validate)
        if validation is None:
            return
        self.start_metrics = m = validation.metrics
        log.info(
            "fine-tuning from %s%s: before training val loss %.4f, ppl %.2f, BLEU %.2f",
            init.describe(),
            " with its optimizer state" if self.cfg.trainer.init_optimizer else "",
            m["val_loss"],
            m["val_ppl"],
            m["val_bleu"],
        )
        for name in ("loss", "ppl", "bleu"):
            self.logger.scalar(f"val/{name}", m[f"val_{name}"], 0)

    def load(self, path: Path) -> None:
        """Continue from checkpoint `path` exactly: weights, optimizer, schedule, position, RNG."""
        payload = load_checkpoint(path)
        state = payload.get("train_state")
        if state is None:
            raise CheckpointError(f"{path} holds no training state (best.pt or averaged.pt?)")
        if to_dataclass(ModelConfig, payload["model_config"]) != self.cfg.model:
            raise CheckpointError(
                f"{path} was trained with other model settings than this run's model.*: "
                "resume with the same model preset and overrides"
            )
        if (payload["src_vocab"], payload["tgt_vocab"]) != (
            self.data.src_vocab.to_list(),
            self.data.tgt_vocab.to_list(),
        ):
            raise CheckpointError(
                f"{path} was trained on other vocabularies than the prepared data gives: "
                "resume with the same data.* settings"
            )
        self._check_resumed_config(path, payload.get("config") or {})
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.progress = p = Progress.from_state_dict(state["progress"])
        self.pending_row = state.get("pending_row")
        self.metrics = dict(payload["metrics"])
        ranks = state["ranks"]
        if state["world_size"] == self.info.world_size:
            mine = ranks[self.info.rank]
            set_rng_state(mine["rng"], self.device)
            self.epoch_meter = _Meter(
                torch.tensor(mine["epoch_loss_sum"], device=self.device),
                mine["epoch_tokens"],
                started=time.perf_counter() - mine["epoch_seconds"],
            )
        elif p.batches_in_epoch:
            p.batches_in_epoch = p.batches_in_epoch * state["world_size"] // self.info.world_size
            log.warning(
                "resuming with %d processes instead of %d: the data order inside the current "
                "epoch and the random streams are not exactly those of the interrupted run",
                self.info.world_size,
                state["world_size"],
            )
        self._saved(path)
        log.info(
            "resumed %s: epoch %d, step %d, batch %d of the epoch",
            path,
            p.epoch,
            p.step,
            p.batches_in_epoch,
        )

    def _check_resumed_config(self, path: Path, stored: dict) -> None:
        """Refuse a resume that changes the data order or the optimizer state; log other changes.

        A changed batch budget, accumulation or seed would skip or repeat data inside the epoch,
        a changed Adam setting would not fit the saved optimizer state. Anything else (a new
        optim.lr, a longer trainer.max_time, ...) is allowed and logged.
        """
        before, now = _flatten(stored), _flatten(asdict(self.cfg))
        changed = {
            key: (before[key], now[key])
            for key in before.keys() & now.keys()
            if before[key] != now[key] and key not in RESUME_IGNORED
        }
        for key in RESUME_FIXED:
            if key in changed:
                old, new = changed[key]
                raise CheckpointError(
                    f"{path} was trained with {key}={old}, this resume asks for {key}={new}: "
                    f"it decides the data order or the optimizer state, so resume with "
                    f"{key}={old} (or start a new run from this one's weights)"
                )
        for key, (old, new) in sorted(changed.items()):
            log.warning("resuming with %s=%s (the run so far used %s)", key, new, old)

    # ------------------------------------------------------------------------------------------
    # The end of the run

    def finish(self) -> None:
        """Average the last epoch checkpoints if asked; write the run's hyper-parameters."""
        final = {f"final_{key}": value for key, value in self.metrics.items()}
        final[f"best_{self.cfg.trainer.monitor}"] = self.progress.best_metric
        if self.cfg.trainer.average_last:
            averaged = dist.run_on_main(self.info, self.average)
            averaged = dist.broadcast_object(averaged, self.info)
            if averaged:
                final.update({f"averaged_{key}": value for key, value in averaged.items()})
        self.logger.hparams(self._hparams(), final, self.progress.step)

    def average(self) -> dict[str, float] | None:
        """Average the last `trainer.average_last` epoch checkpoints into averaged.pt; validate it."""
        k = self.cfg.trainer.average_last
        files = self.paths.epoch_checkpoints()[-k:]
        if len(files) < 2:
            log.warning(
                "trainer.average_last=%d: %d epoch checkpoint(s), nothing to average", k, len(files)
            )
            return None
        payload = average_checkpoints(files)
        model = build_model(self.cfg.model, len(self.data.src_vocab), len(self.data.tgt_vocab))
        model.load_state_dict(payload["model"])
        metrics = self.validate(model.to(self.device)).metrics
        payload["metrics"] = metrics
        save_checkpoint(payload, self.paths.averaged)
        log.info(
            "averaged %s into %s: val loss %.4f, ppl %.2f, BLEU %.2f (last epoch: BLEU %.2f)",
            ", ".join(path.name for path in files),
            self.paths.averaged,
            metrics["val_loss"],
            metrics["val_ppl"],
            metrics["val_bleu"],
            self.metrics["val_bleu"],
        )
        for name in ("loss", "ppl", "bleu"):
            self.logger.scalar(f"averaged/{name}", metrics[f"val_{name}"], self.progress.step)
        return metrics

    def _hparams(self) -> dict:
        cfg = self.cfg
        hparams = {f"model.{k}": v for k, v in asdict(cfg.model).items()}
        hparams.update({f"optim.{k}": v for k, v in asdict(cfg.optim).items()})
        for key in ("src", "tgt", "max_tokens", "limit_train"):
            hparams[f"data.{key}"] = getattr(cfg.data, key)
        for key in ("accumulate", "seed", "monitor"):
            hparams[f"trainer.{key}"] = getattr(cfg.trainer, key)
        hparams["world_size"] = self.info.world_size
        return hparams

    def _log_start(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        p = self.progress
        log.info(
            "run %s: %s model (%.2fM parameters) on %s%s%s; %d train / %d val pairs, "
            "%d batches per epoch per process (data.max_tokens=%d per process); "
            "checkpoints in %s, logs in %s",
            self.paths.name,
            self.cfg.model.name,
            n_params / 1e6,
            self.device,
            f" x {self.info.world_size} processes" if self.info.enabled else "",
            ", bf16 autocast" if self.amp else ", float32",
            len(self.train_set),
            len(self.val),
            len(self.sampler),
            self.cfg.data.max_tokens,
            self.paths.saved,
            self.paths.result,
        )
        if p.step:
            log.info("continuing from epoch %d, step %d", p.epoch, p.step)


# Settings a resumed run must keep (they decide the data order or the optimizer state) ...
RESUME_FIXED = (
    "data.max_tokens",
    "data.limit_train",
    "trainer.accumulate",
    "trainer.seed",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
)
# ... and those that differ by nature between a run and its resume.
RESUME_IGNORED = (
    "trainer.resume",
    "run_name",
    "saved_dir",
    "result_dir",
    "data.root",
    "data.mirror",
    "trainer.progress",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim.lr": 5e-4, ...} of a nested config dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
