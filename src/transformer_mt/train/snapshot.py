"""What a run saves and what a resume checks: the checkpoints of an epoch, and the rules that
keep a resumed run the same run.

`RunCheckpoints` puts a run's model, vocabularies and tokenizer settings into the checkpoint
format (transformer_mt/checkpoint.py) and writes last.pt and, when due, the epoch copy (the last
`trainer.keep_last` kept) and best.pt. `check_resumable` refuses a resume that could not continue
the saved run exactly; `average_epochs` writes averaged.pt at the end of a run and makes best.pt
the better of the average and the best validated checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from transformer_mt.checkpoint import (
    average_checkpoints,
    build_checkpoint,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from transformer_mt.config import ModelConfig, TrainConfig, to_dataclass
from transformer_mt.data.cache import PreparedData
from transformer_mt.data.subword import subword_state
from transformer_mt.errors import CheckpointError
from transformer_mt.train import distributed as dist
from transformer_mt.train.finetune import check_weights
from transformer_mt.train.optim import PlateauSchedule, is_improvement
from transformer_mt.train.rundir import RunPaths, new_run_id
from transformer_mt.train.state import Progress, rng_state, set_rng_state
from transformer_mt.train.step import Meter
from transformer_mt.train.validation import Validation

log = logging.getLogger(__name__)

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


class RunCheckpoints:
    """The checkpoint files of one run: writing them, reading last.pt back for a resume, and the
    newest one with training state (the one a diverged run names)."""

    def __init__(
        self, paths: RunPaths, cfg: TrainConfig, data: PreparedData, model: torch.nn.Module
    ):
        self.paths, self.cfg, self.data, self.model = paths, cfg, data, model
        self.last_saved: Path | None = None
        self.saved_step = 0
        self.run_id: str | None = new_run_id()  # a resume takes its checkpoint's

    def checkpoint(
        self, progress: Progress, metrics: dict[str, float], train_state: dict | None = None
    ) -> dict[str, Any]:
        """The run's checkpoint at `progress`: plain data only."""
        cfg, data = self.cfg, self.data
        return build_checkpoint(
            weights=unwrap_model(self.model).state_dict(),
            model_config=asdict(cfg.model),
            config=asdict(cfg),
            src_vocab=data.src_vocab.to_list(),
            tgt_vocab=data.tgt_vocab.to_list(),
            tokenizer={
                "src_lang": cfg.data.src,
                "tgt_lang": cfg.data.tgt,
                "lowercase": cfg.data.lowercase,
                "subword": subword_state(data.src_subword, data.tgt_subword),
            },
            epoch=progress.epoch,
            step=progress.step,
            metrics=dict(metrics),
            train_state=train_state,
        )

    def write(
        self,
        progress: Progress,
        metrics: dict[str, float],
        train_state: dict[str, Any],
        epoch_file: bool,
        best: bool,
    ) -> None:
        """last.pt; the epoch's copy epoch_<n>.pt if `epoch_file` (the last `trainer.keep_last`
        kept); best.pt if `best`. Each is written atomically: a crash leaves the previous one."""
        paths, keep_last = self.paths, self.cfg.trainer.keep_last
        save_checkpoint(self.checkpoint(progress, metrics, train_state), paths.last)
        if epoch_file and keep_last > 0:
            copy_checkpoint(paths.last, paths.epoch(progress.epoch))
            for old in paths.epoch_checkpoints()[:-keep_last]:
                old.unlink(missing_ok=True)
        if best:
            save_checkpoint(self.checkpoint(progress, metrics), paths.best)

    def saved(self, path: Path, step: int) -> None:
        """`path` holds the run's training state as of optimizer step `step`."""
        self.last_saved, self.saved_step = path, step

    def read(self, path: Path) -> dict[str, Any]:
        """Checkpoint `path`, checked to be one this run can continue (see `check_resumable`)."""
        payload = load_checkpoint(path)
        check_resumable(path, payload, self.cfg, self.data)
        check_weights(path, payload["model"], self.model)
        return payload


class Resumable:
    """The Trainer's saving and resuming (train/trainer.py mixes this in): the state a checkpoint
    carries has `state_dict()` / `load_state_dict()`, and `save` / `load` write and read it."""

    cfg: TrainConfig
    info: dist.DistInfo
    device: torch.device
    paths: RunPaths
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: PlateauSchedule
    progress: Progress
    metrics: dict[str, float]
    pending_row: dict | None
    epoch_meter: Meter
    checkpoints: RunCheckpoints

    def state_dict(self, rank_states: list[dict]) -> dict[str, Any]:
        """The training state a checkpoint carries: enough to continue exactly."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "progress": self.progress.state_dict(),
            "ranks": rank_states,  # per rank: RNG states, partial-epoch loss
            "world_size": self.info.world_size,
            "run_id": self.checkpoints.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s result (this rank's RNG and partial epoch included)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.progress = p = Progress.from_state_dict(state["progress"])
        self.pending_row = state.get("pending_row")
        meter = restore_rank(state, p, self.info, self.device)
        self.epoch_meter = meter if meter is not None else self.epoch_meter

    def save(
        self,
        rank_states: list[dict],
        epoch_file: bool = False,
        best: bool = False,
        pending_row: dict | None = None,
    ) -> None:
        """Write last.pt; also epoch_<n>.pt and best.pt when due. Rank 0 only.

        `pending_row`: the epoch is trained but not validated yet (its log row so far).
        """
        state = {**self.state_dict(rank_states), "pending_row": pending_row}
        self.checkpoints.write(self.progress, self.metrics, state, epoch_file, best)

    def load(self, path: Path) -> None:
        """Continue from checkpoint `path` exactly: weights, optimizer, schedule, position, RNG."""
        payload = self.checkpoints.read(path)
        self.load_state_dict(payload["train_state"])
        self.model.load_state_dict(payload["model"])
        self.metrics = dict(payload["metrics"])
        self.checkpoints.run_id = payload["train_state"].get("run_id")
        self._saved(path)
        p = self.progress
        log.info(
            "resumed %s: epoch %d, step %d, batch %d of the epoch",
            path,
            p.epoch,
            p.step,
            p.batches_in_epoch,
        )

    def _saved(self, path: Path) -> None:
        self.checkpoints.saved(path, self.progress.step)

    def _rank_states(self) -> list[dict]:
        return dist.gather_objects(rank_state(self.epoch_meter, self.device), self.info)


def average_epochs(
    paths: RunPaths,
    k: int,
    model: torch.nn.Module,
    validate: Callable[[torch.nn.Module], Validation],
    monitor: str,
) -> dict[str, float] | None:
    """Average the last `k` epoch checkpoints into averaged.pt, its validation metrics inside,
    and make best.pt the better of the average and the best validated checkpoint on `monitor`
    (averaged.pt stays); return the average's metrics (None, with a warning, when fewer than 2
    epoch files are kept)."""
    files = paths.epoch_checkpoints()[-k:]
    if len(files) < 2:
        log.warning(
            "trainer.average_last=%d: %d epoch checkpoint(s), nothing to average", k, len(files)
        )
        return None
    payload = average_checkpoints(files)
    model.load_state_dict(payload["model"])
    metrics = payload["metrics"] = validate(model).metrics
    save_checkpoint(payload, paths.averaged)
    log.info(
        "averaged %s into %s: val loss %.4f, ppl %.2f, BLEU %.2f",
        ", ".join(path.name for path in files),
        paths.averaged,
        metrics["val_loss"],
        metrics["val_ppl"],
        metrics["val_bleu"],
    )
    keep_the_better(paths, metrics, monitor)
    return metrics


def keep_the_better(paths: RunPaths, averaged_metrics: dict[str, float], monitor: str) -> bool:
    """Copy averaged.pt over best.pt when the average validates better on `monitor` than best.pt
    did (or there is no best.pt); log both scores and the choice; return whether it was copied."""
    best_score = None
    if paths.best.is_file():
        best_score = load_checkpoint(paths.best)["metrics"].get(monitor)
    averaged_score = averaged_metrics[monitor]
    better = is_improvement(averaged_score, best_score, monitor)
    if better:
        copy_checkpoint(paths.averaged, paths.best)
    best_text = "none" if best_score is None else f"{best_score:.4g}"
    log.info(
        "final checkpoint %s holds the %s weights: %s %.4g averaged, %s best validated",
        paths.best,
        "averaged" if better else "best validated",
        monitor,
        averaged_score,
        best_text,
    )
    return better


def rank_state(meter: Meter, device: torch.device) -> dict[str, Any]:
    """This rank's random-generator states and partial-epoch loss, for an exact resume."""
    return {
        "rng": rng_state(device),
        "epoch_loss_sum": float(meter.loss_sum),
        "epoch_tokens": meter.tokens,
        "epoch_seconds": time.perf_counter() - meter.started,
    }


def restore_rank(
    state: dict[str, Any], progress: Progress, info: dist.DistInfo, device: torch.device
) -> Meter | None:
    """Restore this rank's random generators from a run's training `state`; return its
    partial-epoch meter. With another number of processes than the saved run, only the epoch
    position carries over (scaled to the new shard size) and None is returned."""
    if state["world_size"] == info.world_size:
        mine = state["ranks"][info.rank]
        set_rng_state(mine["rng"], device)
        return Meter(
            torch.tensor(mine["epoch_loss_sum"], device=device),
            mine["epoch_tokens"],
            started=time.perf_counter() - mine["epoch_seconds"],
        )
    if progress.batches_in_epoch:
        progress.batches_in_epoch = (
            progress.batches_in_epoch * state["world_size"] // info.world_size
        )
        log.warning(
            "resuming with %d processes instead of %d: the data order inside the current "
            "epoch and the random streams are not exactly those of the interrupted run",
            info.world_size,
            state["world_size"],
        )
    return None


def check_resumable(
    path: Path, payload: dict[str, Any], cfg: TrainConfig, data: PreparedData
) -> dict[str, Any]:
    """The training state of checkpoint `path`, if this run (`cfg`, `data`) can continue it.

    Raises CheckpointError for a file without training state, other model settings, other
    vocabularies, or a setting that decides the data order or the optimizer state; other changed
    settings (a new optim.lr, a longer trainer.max_time, ...) are allowed and logged. A new optim.lr
    scales the saved schedule (`PlateauSchedule.load_state_dict`).
    """
    state = payload.get("train_state")
    if state is None:
        raise CheckpointError(f"{path} holds no training state (best.pt or averaged.pt?)")
    if to_dataclass(ModelConfig, payload["model_config"]) != cfg.model:
        raise CheckpointError(
            f"{path} was trained with other model settings than this run's model.*: "
            "resume with the same model preset and overrides"
        )
    if (payload["src_vocab"], payload["tgt_vocab"]) != (
        data.src_vocab.to_list(),
        data.tgt_vocab.to_list(),
    ):
        raise CheckpointError(
            f"{path} was trained on other vocabularies than the prepared data gives: "
            "resume with the same data.* settings"
        )
    _check_changed_settings(path, payload.get("config") or {}, cfg)
    return state


def _check_changed_settings(path: Path, stored: dict, cfg: TrainConfig) -> None:
    before, now = _flatten(stored), _flatten(asdict(cfg))
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
        scaled = (
            f": the saved schedule's rates are scaled by {new / old:.4g}"
            if key == "optim.lr"
            else ""
        )
        log.warning("resuming with %s=%s (the run so far used %s)%s", key, new, old, scaled)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim.lr": 5e-4, ...} of a nested config dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
