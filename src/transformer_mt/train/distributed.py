"""Process-group set-up for `torchrun`, and the few collectives the trainer needs.

One process per device. Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
process group is initialised with NCCL on GPUs and gloo on CPUs; without it, every helper here is a
no-op on a world of one, so the trainer has a single code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from transformer_mt.errors import ConfigError

# Rank 0 validates on the whole split while the others wait at a barrier: give it time.
_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` → CUDA when present, else CPU; `cuda` → this process's GPU under torchrun."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={preference} but no CUDA device is available: "
                "use trainer.device=cpu (or auto)"
            )
        if preference == "cuda":
            return torch.device("cuda", local_rank)
    if preference != "cpu" and not preference.startswith("cuda:"):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:N (got {preference!r})")
    return torch.device(preference)


def init_distributed(device_preference: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one; return this process's rank info and device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), resolve_device(device_preference)
    info = DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = resolve_device(device_preference, info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    return info, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; returns it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise maximum of `tensor` over all ranks, in place; returns it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (small Python objects: metrics, an error message)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
