"""What a run leaves in `result/<run>/`: metrics.csv / metrics.jsonl, TensorBoard events, curves.png.

Only rank 0 writes; on the other ranks a `RunLogger(enabled=False)` does nothing. Every file is
written so that a crash at any moment leaves it readable: metrics are appended a whole line at a
time and flushed; the PNG, the config and a rewrite of the metrics are written atomically
(files.py).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer_mt.errors import UserError
from transformer_mt.files import atomic_writer
from transformer_mt.plots import plot_curves

METRIC_COLUMNS = (
    "epoch",  # the epoch just completed, or the one in progress (validate_every, a stopped run)
    "step",  # optimizer steps so far
    "train_loss",  # training objective per target token over the epoch so far (label-smoothed)
    "val_loss",  # plain cross-entropy per target token, teacher forced
    "val_ppl",  # exp(val_loss)
    "val_bleu",  # corpus sacreBLEU of decoding the whole validation split
    "lr",  # learning rate of the next step (after any plateau decrease)
    "tokens_per_s",  # target tokens per second of training, all processes together
    "epoch_seconds",  # wall-clock of the epoch so far: its training and this validation
)


class RunLogger:
    """Metrics files, TensorBoard and the curves plot of one run.

    `start_step` > 0 continues a resumed run: metric rows and TensorBoard points written after
    that step by the interrupted session are dropped, so the logs match the checkpoint.
    """

    def __init__(self, folder: Path, enabled: bool = True, start_step: int = 0):
        self.folder = folder
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.writer = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "metrics.csv"
        self.jsonl_path = folder / "metrics.jsonl"
        self.curves_path = folder / "curves.png"
        self.rows = _read_rows(self.jsonl_path, start_step) if start_step > 0 else []
        _rewrite_metrics(self.csv_path, self.jsonl_path, self.rows)

        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the points an interrupted session logged after the checkpoint's step.
        self.writer = SummaryWriter(
            log_dir=str(folder), purge_step=start_step + 1 if start_step > 0 else None
        )

    def train_point(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard `train/<name>` scalars at optimizer step `step`."""
        if self.writer is None:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def metrics_row(self, row: dict[str, Any]) -> None:
        """Append one validation's metrics to metrics.csv and metrics.jsonl; TensorBoard val/*
        points at its step."""
        if not self.enabled:
            return
        row = {key: row.get(key) for key in METRIC_COLUMNS}
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=METRIC_COLUMNS).writerow(row)
        _append(self.csv_path, line.getvalue())
        _append(self.jsonl_path, json.dumps(row) + "\n")
        self.rows.append(row)
        for name in ("loss", "ppl", "bleu"):
            value = row[f"val_{name}"]
            if value is not None:
                self.writer.add_scalar(f"val/{name}", value, row["step"])
        self.writer.flush()
        write_curves(self.rows, self.curves_path)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) array with values in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """The run's hyper-parameters with its final metrics, for TensorBoard's HPARAMS tab."""
        if self.writer is None:
            return

        plain = {
            key: v if isinstance(v, int | float | str | bool) else str(v)
            for key, v in hparams.items()
        }
        metrics = {f"hparam/{key}": float(value) for key, value in metrics.items()}
        # run_name="." keeps the hparams beside this run's scalars (one run in TensorBoard's
        # HPARAMS tab) instead of in a timestamped sub-run; it also writes the metric scalars.
        self.writer.add_hparams(plain, metrics, run_name=".", global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def write_curves(rows: list[dict[str, Any]], path: Path) -> None:
    """curves.png (plots.plot_curves); a failed write is a UserError that says how to go on."""
    try:
        plot_curves(rows, path)
    except UserError as err:
        raise _write_error(path, err) from None


def _append(path: Path, text: str) -> None:
    """Append `text` whole or not at all: a failed write (a full disk) is cut off again."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", newline="", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise _write_error(path, err) from None


def _write_error(path: Path, err: OSError | UserError) -> UserError:
    what = str(err) if isinstance(err, UserError) else f"cannot write {path}: {err.strerror or err}"
    return UserError(
        f"{what}; free some space, then continue with trainer.resume=true "
        "(the epoch's checkpoint was saved before its logs)"
    )


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Also write the root logger's records to `path` while active, unless a handler already does
    (Hydra's own run log, for a single run, is that file)."""
    root = logging.getLogger()
    target = os.path.abspath(path)
    if any(getattr(handler, "baseFilename", None) == target for handler in root.handlers):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def write_config(path: Path, cfg: Any) -> None:
    """The run's resolved config as YAML (atomically; a resumed run writes its own over it)."""
    from omegaconf import OmegaConf

    with atomic_writer(path) as handle:
        handle.write(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))


def _read_rows(jsonl_path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not jsonl_path.is_file():
        return []
    rows = []
    for line in jsonl_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


def _rewrite_metrics(csv_path: Path, jsonl_path: Path, rows: list[dict[str, Any]]) -> None:
    """Start both files afresh with `rows` (temp file + rename, so a crash keeps the old ones)."""
    for path in (csv_path, jsonl_path):
        try:
            with atomic_writer(path) as handle:
                if path == csv_path:
                    writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
                    writer.writeheader()
                    writer.writerows({key: row.get(key) for key in METRIC_COLUMNS} for row in rows)
                else:
                    handle.write("".join(json.dumps(row) + "\n" for row in rows))
        except UserError as err:
            raise _write_error(path, err) from None
