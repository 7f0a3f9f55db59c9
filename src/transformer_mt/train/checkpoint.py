"""Self-contained checkpoints, written atomically and read without running foreign code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that
`torch.load(weights_only=True)` can read it: a file crafted to run code on load is refused.

Keys (format 1):

    format_version  int, CHECKPOINT_FORMAT
    model           state_dict of the *unwrapped* model (no `module.` / `_orig_mod.` prefixes)
    model_config    dict of ModelConfig fields
    config          the resolved training config (nested plain dict)
    src_vocab       list[str], index = token id
    tgt_vocab       list[str]
    tokenizer       {"src_lang": str, "tgt_lang": str, "lowercase": bool}
    epoch, step     ints: epochs and optimizer steps completed
    metrics         dict[str, float]: the last validation metrics
    train_state     dict (only in last.pt / epoch_<n>.pt): optimizer, scheduler, scaler,
                    sampler position, RNG states, best metric, ... enough to resume exactly.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from transformer_mt.errors import CheckpointError

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "src_vocab", "tgt_vocab", "tokenizer")


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename.

    A crash at any moment leaves either the previous file or the new one, never a truncated one.
    Raises CheckpointError naming the path when the folder is not writable or the disk is full.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as err:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (`weights_only=True`) and check that it is one of ours.

    Every failure is a CheckpointError whose one-line message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint ({first[:160]})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt)") from err
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a transformer-mt checkpoint (missing keys)")
    if payload["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, "
            f"this version reads format {CHECKPOINT_FORMAT}"
        )
    return payload


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
