"""Which torch device a `device` setting names: the one rule for training and translating."""

from __future__ import annotations

import torch

from transformer_mt.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(
    name: str, local_rank: int | None = None, setting: str = "device"
) -> torch.device:
    """The device `name` (auto, cpu, cuda or cuda:N) stands for.

    `auto` picks CUDA when available, else the CPU. A bare `cuda` is GPU `local_rank` when given
    (this process's GPU under torchrun), else the current CUDA device. A device torch does not
    know, one the package does not run on (mps, meta, ...) or a CUDA device on a machine without
    one is a ConfigError that names the `setting` it came from (`trainer.device`, `--device`).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"{setting} {name!r} is not supported: {setting} must be {DEVICE_CHOICES}"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{setting} {name!r} asked for, but no CUDA device is available: "
            f"set {setting} to cpu (or auto)"
        )
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", local_rank)
    return device
