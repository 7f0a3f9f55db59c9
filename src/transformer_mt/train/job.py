"""`train(cfg)`: set up one training job and run it.

Under `torchrun` every process runs this: rank 0 alone opens the run folders and writes the
config; the first process of each machine prepares the data cache when it is missing (the others
wait for it on disk, then map the same files); each process then trains on its own shard of every
epoch (train/trainer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from transformer_mt.config import TrainConfig
from transformer_mt.data.cache import PreparedData
from transformer_mt.data.dataset import load_or_prepare, wait_for_prepared
from transformer_mt.errors import ConfigError
from transformer_mt.train import distributed as dist
from transformer_mt.train.allocator import PRELOADED, keep_freed_memory, malloc_library
from transformer_mt.train.finetune import InitCheckpoint
from transformer_mt.train.logging import log_file, write_config
from transformer_mt.train.rundir import (
    RunPaths,
    check_logs_belong,
    check_start,
    check_unlocked,
    file_version,
    new_run_id,
    open_run,
    write_run_id,
)
from transformer_mt.train.stopping import TrainingInterrupted
from transformer_mt.train.trainer import Trainer

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the training job `cfg` describes; return its final validation metrics.

    Raises UserError for anything the user can fix (existing run, lock held, unwritable folder,
    divergence) and TrainingInterrupted after saving on SIGINT / SIGTERM. Everything that can
    refuse the start is checked before the run's folders are touched: a refused start leaves them
    as it found them.
    """
    init = None
    if cfg.trainer.init_from is not None:
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
        held = cleanup.enter_context(_held_records()) if info.is_main else None
        # The checks: folders, data, validation split, the checkpoint to continue or start from.
        dist.run_on_main(info, lambda: _check_may_start(paths, cfg.trainer.resume))
        vocabs = init.vocabs if init is not None else None
        data = _load_data(cfg, vocabs, info)
        trainer = Trainer(cfg, data, paths, info, device)
        cleanup.callback(trainer.step.release_ddp)  # runs before shutdown_distributed: see there
        _check_validation_split(trainer, cfg)
        resumed = None
        if cfg.trainer.resume:
            resumed = dist.run_on_main(info, lambda: file_version(paths.last))
            trainer.load(paths.last)
            run_id = dist.run_on_main(
                info, lambda: check_logs_belong(paths, trainer.checkpoints.run_id)
            )
            trainer.checkpoints.run_id = run_id or new_run_id()
        elif init is not None:
            trainer.init_weights(init)
        # Then the run's folders: lock, log file, config and identity.
        lock = dist.run_on_main(info, lambda: open_run(paths, cfg.trainer.resume, resumed))
        if info.is_main:
            cleanup.callback(lock.release)
            cleanup.enter_context(log_file(paths.result / "train.log"))
            _replay(held, paths.result / "train.log")
            write_config(paths.result / "config.yaml", cfg)
            write_run_id(paths, trainer.checkpoints.run_id)
            _warn_if_slow(cfg, device)
        # Not under torchrun: there the whole batch's logits go through DDP (no loss chunks), and
        # a heap that keeps them grew each rank by 300-700 MB over 100 steps (docs/benchmarks.md).
        allocator = malloc_library()
        tune = cfg.trainer.malloc_tuning and device.type == "cpu" and not info.enabled
        if allocator in PRELOADED.values():
            log.info("memory allocator: %s (preloaded), which keeps freed memory itself", allocator)
        elif tune and keep_freed_memory():
            log.info("malloc keeps freed memory for reuse (trainer.malloc_tuning=false: off)")
        try:
            return trainer.fit()
        except TrainingInterrupted as stop:
            log.warning("%s", stop)  # while train.log is still open
            raise


def _load_data(cfg: TrainConfig, vocabs, info: dist.DistInfo) -> PreparedData:
    """The first process of each machine prepares the data when it is not prepared yet; the
    others wait for its manifest on disk (`data.prepare_wait` minutes), never in a collective,
    then map the same files. A failure on the first process ends the job (torchrun stops every
    process when one fails)."""
    if info.local_rank == 0:
        return load_or_prepare(cfg.data, vocabs)
    return wait_for_prepared(cfg.data, vocabs)


def _check_may_start(paths: RunPaths, resume: bool) -> None:
    """The folder checks `open_run` repeats under the lock, done first so a refusal costs nothing."""
    check_start(paths, resume)
    check_unlocked(paths)


def _check_validation_split(trainer: Trainer, cfg: TrainConfig) -> None:
    """Validation needs at least one pair the model can read: refuse the run before training."""
    if len(trainer.validator.val) == 0:
        raise ConfigError(
            f"every validation pair is longer than model.max_positions={cfg.model.max_positions} "
            "tokens (with BOS/EOS), so there is nothing to validate on: raise "
            "model.max_positions or give shorter validation pairs"
        )


@contextlib.contextmanager
def _held_records() -> Iterator[_Held]:
    """Keep the root logger's records (they are also printed as usual) until the run's log file
    is open, so that train.log also holds what the checks before it said."""
    held = _Held()
    root = logging.getLogger()
    root.addHandler(held)
    try:
        yield held
    finally:
        root.removeHandler(held)


class _Held(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _replay(held: _Held, path: Path) -> None:
    """Stop holding records; write those held into the open log file at `path`."""
    root = logging.getLogger()
    root.removeHandler(held)
    target = os.path.abspath(path)
    for handler in root.handlers:
        if getattr(handler, "baseFilename", None) == target:
            for record in held.records:
                handler.handle(record)
    held.records.clear()


def _warn_if_slow(cfg: TrainConfig, device: torch.device) -> None:
    if device.type == "cpu" and cfg.model.name in ("base", "big"):
        log.warning(
            "training model=%s on a CPU: this will be slow (hours per epoch on Multi30k); "
            "for a CPU run pick the CPU preset: python scripts/train.py experiment=cpu",
            cfg.model.name,
        )
