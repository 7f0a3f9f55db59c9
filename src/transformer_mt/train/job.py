"""`train(cfg)`: set up one training job and run it.

Under `torchrun` every process runs this: rank 0 alone opens the run folders, writes the config
and prepares the data cache (the others wait, then load it); each process then trains on its own
shard of every epoch (train/trainer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from transformer_mt.config import TrainConfig
from transformer_mt.data.dataset import load_or_prepare
from transformer_mt.train import distributed as dist
from transformer_mt.train.finetune import InitCheckpoint
from transformer_mt.train.logging import log_file, write_config
from transformer_mt.train.rundir import RunPaths, open_run
from transformer_mt.train.stopping import TrainingInterrupted
from transformer_mt.train.trainer import Trainer

log = logging.getLogger(__name__)


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
