"""The progress of a training run, and the random-number states, as checkpoint-friendly plain data.

Everything here turns into numbers, strings, lists and tensors, so that a checkpoint holding it still
loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class Progress:
    """Where the run stands. `epoch` counts completed epochs; a checkpoint written in the middle of
    epoch `epoch + 1` also records how many of that epoch's batches this rank has consumed."""

    epoch: int = 0
    step: int = 0  # optimizer steps taken
    batches_in_epoch: int = 0  # batches of the current epoch already trained on (0 at a boundary)
    best_metric: float | None = None  # best value of trainer.monitor so far
    best_epoch: int = 0  # the epoch in progress when best_metric was measured ...
    best_step: int = 0  # ... and the step
    bad_validations: int = 0  # validations since best_metric last improved (early stopping)
    # Training and validation wall-clock over all sessions (trainer.max_time).
    train_seconds: float = 0.0

    @property
    def current_epoch(self) -> int:
        """The epoch a validation now belongs to: the one in progress, or at a boundary the one
        just completed (1-based)."""
        return self.epoch + 1 if self.batches_in_epoch else self.epoch

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Progress:
        state = dict(state)
        if "bad_epochs" in state:  # checkpoints written before validations could come mid-epoch
            state["bad_validations"] = state.pop("bad_epochs")
        return cls(**state)


def rng_state(device: torch.device) -> dict:
    """The state of every random generator training touches: torch (CPU and CUDA), Python, NumPy."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _python_state_to_list(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore the generators saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_list(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss_next = state
    return (version, tuple(internal), gauss_next)
