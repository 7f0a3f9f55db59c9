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
    tokenizer       {"src_lang": str, "tgt_lang": str, "lowercase": bool, "subword": ...}
                    where "subword" is None (word level; also when the key is absent, as in
                    checkpoints written before subwords existed) or {"kind": "bpe" | "unigram",
                    "src": bytes, "tgt": bytes}, the SentencePiece models of both sides
    epoch, step     ints: epochs and optimizer steps completed
    metrics         dict[str, float]: the last validation metrics of these weights (empty in
                    an averaged checkpoint that was not validated: `mt-average`'s)
    train_state     dict (only in last.pt / epoch_<n>.pt): optimizer, schedule, progress (epoch,
                    step, batch position, best metric, ...), per-rank RNG states and partial-epoch
                    loss, world_size: enough to resume exactly; and pending_row, the epoch's log
                    row so far when last.pt was written after its training but before its
                    validation (None otherwise)
    averaged_from   list[str] (only in an averaged checkpoint): the files whose weights it averages
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from transformer_mt.errors import CheckpointError
from transformer_mt.files import atomic_file, atomic_link

CHECKPOINT_FORMAT = 1
REQUIRED_KEYS = ("format_version", "model", "model_config", "src_vocab", "tgt_vocab", "tokenizer")


def build_checkpoint(
    *,
    weights: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    config: dict[str, Any],
    src_vocab: list[str],
    tgt_vocab: list[str],
    tokenizer: dict[str, Any],
    epoch: int,
    step: int,
    metrics: dict[str, float],
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of the format above, the one place it is put together.

    `weights` is the state_dict of the unwrapped model; `train_state` is left out when None
    (best.pt, averaged and exported files are for translating, not for resuming).
    """
    payload: dict[str, Any] = {
        "format_version": CHECKPOINT_FORMAT,
        "model": weights,
        "model_config": model_config,
        "config": config,
        "src_vocab": src_vocab,
        "tgt_vocab": tgt_vocab,
        "tokenizer": tokenizer,
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    return payload


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `payload` to `path` atomically (see files.py): a crash at any moment leaves either the
    previous file or the new one, never a truncated one.

    Raises CheckpointError naming the path when the folder is not writable or the disk is full.
    """
    path = Path(path)
    try:
        with atomic_file(path, binary=True) as handle:
            torch.save(payload, handle)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
    except RuntimeError as err:
        if _is_write_failure(err):
            raise CheckpointError(
                f"cannot write checkpoint {path}: the write failed (is the disk full?)"
            ) from err
        raise
    return path


def _is_write_failure(err: RuntimeError) -> bool:
    """torch.save reports a failed write (e.g. a full disk) as a RuntimeError of its zip writer."""
    message = str(err)
    return "inline_container" in message or "write failed" in message or "unexpected pos" in message


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make `path` an atomic copy of the checkpoint `source` (a hard link where the disk allows).

    `path` is replaced in one step, as by `save_checkpoint`; later replacing either file leaves the
    other intact.
    """
    path = Path(path)
    try:
        atomic_link(source, path)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint safely (`weights_only=True`) and check that it is one of ours.

    Every failure is a CheckpointError whose one-line message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # Garbage bytes often start with a PROTO opcode of a made-up protocol number.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail, pickled_object = _unpickling_detail(err)
        if not pickled_object:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (truncated or corrupt: {detail[:160]})"
            ) from err
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint ({detail[:160]})"
        ) from err
    # Arbitrary bytes read as pickle opcodes can also fail inside the weights-only unpickler
    # itself (an empty stack, a memo index never stored): IndexError, KeyError and the like.
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, LookupError,
            TypeError, AttributeError, OverflowError) as err:  # fmt: skip
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt)"
        ) from err
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a transformer-mt checkpoint (missing keys)")
    if payload["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, "
            f"this version reads format {CHECKPOINT_FORMAT}"
        )
    _check_finite_weights(path, payload["model"])
    return payload


def _check_finite_weights(path: Path, weights: Any) -> None:
    """A model with a NaN or infinite weight translates into garbage (or crashes beam search)."""
    if not isinstance(weights, dict):
        return  # not a state dict: loading it into a model reports the problem
    for name, tensor in weights.items():
        floating = torch.is_tensor(tensor) and tensor.is_floating_point()
        if floating and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"{path} holds NaN or infinite weights ({name}): it was saved by a run that "
                "diverged; use an earlier checkpoint (an epoch_<n>.pt or best.pt)"
            )


def _unpickling_detail(err: pickle.UnpicklingError) -> tuple[str, bool]:
    """(the line of torch's weights-only refusal that says what was refused, whether it refused a
    pickled object rather than bytes that are no pickle at all). Its first lines are a generic
    paragraph about the `weights_only` default."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line:
            return line.removeprefix("WeightsUnpickler error: "), True
    for line in lines:
        if line.startswith("Unsupported operand"):
            return line, False
    return (lines[0] if lines else type(err).__name__), True


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def average_checkpoints(paths: list[str | os.PathLike]) -> dict[str, Any]:
    """A checkpoint whose weights are the element-wise mean of those in `paths`.

    Averaging the last few epoch checkpoints usually gains a little BLEU for free. Config,
    vocabularies and counters come from the last file; the training state is dropped (an averaged
    model is for evaluation, not for resuming), and so are the metrics, which were measured on
    other weights: they are empty until the average is validated. Integer buffers are taken from
    the last file.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    payloads = [load_checkpoint(path) for path in paths]
    last = payloads[-1]
    for path, payload in zip(paths, payloads, strict=True):
        if (
            payload["model_config"] != last["model_config"]
            or payload["model"].keys() != last["model"].keys()
        ):
            raise CheckpointError(
                f"cannot average {path} with {paths[-1]}: they hold different model architectures"
            )
    weights = {}
    for name, tensor in last["model"].items():
        if tensor.is_floating_point():
            total = sum(payload["model"][name].double() for payload in payloads)
            weights[name] = (total / len(payloads)).to(tensor.dtype)
        else:
            weights[name] = tensor
    averaged = {key: value for key, value in last.items() if key != "train_state"}
    averaged["model"] = weights
    averaged["metrics"] = {}
    averaged["averaged_from"] = [Path(path).name for path in paths]
    return averaged
