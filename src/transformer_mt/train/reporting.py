"""What a run tells its user as it goes: the start line, training points, each validation's
metrics with a few sample translations and a cross-attention heat-map, and the final
hyper-parameters.

The console and train.log get the lines; `RunLogger` (train/logging.py) writes the metrics files,
TensorBoard events and curves. Only rank 0 reports: elsewhere the logger is disabled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

from transformer_mt.config import TrainConfig
from transformer_mt.data.cache import PreparedData
from transformer_mt.data.vocab import BOS, EOS
from transformer_mt.plots import plot_attention
from transformer_mt.train.logging import RunLogger
from transformer_mt.train.rundir import RunPaths
from transformer_mt.train.state import Progress
from transformer_mt.train.step import Meter
from transformer_mt.train.validation import Validation, Validator

log = logging.getLogger(__name__)


class Reporter:
    """The logs of one run: `open` once the run's position is known, `close` at its end."""

    def __init__(self, paths: RunPaths, data: PreparedData, validator: Validator, samples: int):
        self.paths, self.data, self.validator = paths, data, validator
        val_size = len(validator.val)
        count = min(samples, val_size)
        self.sample_ids = [round(i * (val_size - 1) / max(count - 1, 1)) for i in range(count)]
        self.logger = RunLogger(paths.result, enabled=False)

    def open(self, enabled: bool, start_step: int) -> None:
        """Start (or, after step `start_step` of a resumed run, continue) the run's log files."""
        self.logger = RunLogger(self.paths.result, enabled=enabled, start_step=start_step)

    def close(self) -> None:
        self.logger.close()

    def start(
        self,
        cfg: TrainConfig,
        model: torch.nn.Module,
        device: torch.device,
        world_size: int,
        amp: bool,
        n_train: int,
        n_batches: int,
        step: int,
        epoch: int,
    ) -> None:
        """The run's first line: model, device, precision, data and folders."""
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "run %s: %s model (%.2fM parameters) on %s%s%s; %d train / %d val pairs, "
            "%d batches per epoch per process (data.max_tokens=%d per process); "
            "checkpoints in %s, logs in %s",
            self.paths.name,
            cfg.model.name,
            n_params / 1e6,
            device,
            f" x {world_size} processes" if world_size > 1 else "",
            ", bf16 autocast" if amp else ", float32",
            n_train,
            len(self.validator.val),
            n_batches,
            cfg.data.max_tokens,
            self.paths.saved,
            self.paths.result,
        )
        if step:
            log.info("continuing from epoch %d, step %d", epoch, step)

    def train_point(
        self,
        step: int,
        loss: float,
        tokens: int,
        window: Meter,
        lr: float,
        grad_norm: float,
        bar: tqdm,
    ) -> None:
        """Train loss, lr, gradient norm and speed since the last point (TensorBoard, bar):
        `loss` per target token over the `tokens` the meter `window` counted."""
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        scalars = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / elapsed}
        self.logger.train_point(step, scalars)
        bar.set_postfix(
            loss=f"{scalars['loss']:.3f}",
            lr=f"{scalars['lr']:.2e}",
            tok_s=f"{scalars['tokens_per_s']:.0f}",
        )

    def scalars(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        """`<prefix>/loss`, `/ppl` and `/bleu` of a validation's metrics."""
        for name in ("loss", "ppl", "bleu"):
            self.logger.scalar(f"{prefix}/{name}", metrics[f"val_{name}"], step)

    def validation(
        self,
        row: dict[str, Any],
        validation: Validation,
        model: torch.nn.Module,
        epoch_done: bool,
    ) -> None:
        """One validation (at the end of an epoch if `epoch_done`): its log line and metrics row,
        sample translations, an attention map."""
        where = (
            f"epoch {row['epoch']} (step {row['step']})"
            if epoch_done
            else f"step {row['step']} (in epoch {row['epoch']})"
        )
        log.info(
            "%s: train loss %.4f | val loss %.4f, ppl %.2f, BLEU %.2f | lr %.3g | "
            "%.0f tokens/s | %.0f s",
            where,
            row["train_loss"],
            row["val_loss"],
            row["val_ppl"],
            row["val_bleu"],
            row["lr"],
            row["tokens_per_s"],
            row["epoch_seconds"],
        )
        self.logger.metrics_row(row)
        val, lines = self.validator.val, []
        for n, i in enumerate(self.sample_ids, start=1):
            source, reference, hypothesis = (
                val.src_text[i],
                val.ref_text[i],
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
            self.attention(model, self.sample_ids[0], row["step"])

    @torch.no_grad()
    def attention(self, model: torch.nn.Module, index: int, step: int) -> None:
        """Heat-map of the cross-attention behind one validation translation (file + TensorBoard)."""
        device = self.validator.device
        source = self.validator.val.src[index]
        best = self.validator.best_hypothesis(model, index)
        src_ids = [*source, EOS]
        src = torch.tensor([src_ids], device=device)
        tgt_in = torch.tensor([[BOS, *best.tokens]], device=device)
        was_training = model.training
        model.eval()
        weights = model.cross_attention(src, tgt_in)[0].float().cpu().numpy()  # (T, S)
        model.train(was_training)
        path = self.paths.result / "attention.png"
        plot_attention(
            weights,
            self.data.src_vocab.decode(src_ids),
            self.data.tgt_vocab.decode([*best.tokens, EOS]),
            path,
            title=f"validation sentence {index}, step {step}",
        )
        from matplotlib.image import imread  # loaded at the first picture, not at start-up

        self.logger.image("val/attention", imread(path)[..., :3], step)

    def end(
        self,
        cfg: TrainConfig,
        world_size: int,
        progress: Progress,
        metrics: dict[str, float],
        averaged: dict[str, float] | None,
    ) -> None:
        """The run's hyper-parameters beside its final, best and averaged metrics (TensorBoard's
        HPARAMS tab)."""
        final = {f"final_{key}": value for key, value in metrics.items()}
        final[f"best_{cfg.trainer.monitor}"] = progress.best_metric
        final.update({f"averaged_{key}": value for key, value in (averaged or {}).items()})
        hparams = {f"model.{k}": v for k, v in asdict(cfg.model).items()}
        hparams.update({f"optim.{k}": v for k, v in asdict(cfg.optim).items()})
        for key in ("src", "tgt", "max_tokens", "limit_train"):
            hparams[f"data.{key}"] = getattr(cfg.data, key)
        for key in ("accumulate", "seed", "monitor"):
            hparams[f"trainer.{key}"] = getattr(cfg.trainer, key)
        hparams["world_size"] = world_size
        self.logger.hparams(hparams, final, progress.step)


def epoch_bar(total: int, done: int, epoch: int, enabled: bool) -> tqdm:
    """The progress bar of one epoch's batches (`done` of them trained before a resume)."""
    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch}",
        unit="batch",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    )
