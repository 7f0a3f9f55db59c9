"""`mt-train` / `python scripts/train.py [overrides]`: train a model as configs/train.yaml says.

    python scripts/train.py                                        # Multi30k de→en, model=base
    python scripts/train.py model=small trainer.max_epochs=20 run_name=de-en-small
    python scripts/train.py run_name=de-en-small trainer.resume=true   # continue after Ctrl-C
    python scripts/train.py -m model=small,base optim.lr=3e-4,5e-4     # sweep: one run per job
    torchrun --nproc_per_node=4 scripts/train.py model=base            # DistributedDataParallel

Checkpoints go to saved/<run_name>/, logs, metrics and plots to result/<run_name>/. In a sweep each
job's run_name gets its job number appended (`<run_name>-0`, `<run_name>-1`, ...), so jobs never
share a folder. Ctrl-C saves last.pt and exits with status 130.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from transformer_mt.cli.common import CONFIG_PATH, register_configs, report_user_errors, run_hydra
from transformer_mt.config import TrainConfig, to_dataclass
from transformer_mt.train.job import train
from transformer_mt.train.stopping import Aborted, TrainingInterrupted

log = logging.getLogger(__name__)


def job_run_name(run_name: str) -> str:
    """`run_name`, with the job number appended when Hydra runs a multirun sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return run_name
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"{run_name}-{hydra_cfg.job.num}"
    return run_name


@hydra.main(config_path=CONFIG_PATH, config_name="train", version_base="1.3")
@report_user_errors
def run(node: DictConfig) -> float:
    """Hydra's task: validate the config, train, return the monitored metric (for sweepers)."""
    cfg = to_dataclass(TrainConfig, node)
    cfg.run_name = job_run_name(cfg.run_name)
    try:
        metrics = train(cfg)
    except TrainingInterrupted as stop:  # the trainer has logged it
        logging.shutdown()
        sys.exit(stop.exit_code)
    except Aborted as abort:
        log.warning(
            "aborted by a second %s without saving: saved/%s/last.pt is the last complete save",
            signal.Signals(abort.signum).name,
            cfg.run_name,
        )
        logging.shutdown()
        sys.exit(128 + abort.signum)
    return metrics.get(cfg.trainer.monitor, float("nan"))


def main() -> None:
    register_configs()
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun only rank 0 writes: the others get no Hydra run folder and no log file.
        sys.argv += ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"]
    run_hydra(run)


if __name__ == "__main__":
    main()
