"""Process-group set-up for `torchrun`, and the few collectives the trainer needs.

One process per device. Under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the
process group is initialised with NCCL on GPUs and gloo on CPUs; without it, every helper here is a
no-op on a world of one, so the trainer has a single code path.

Small host-side agreements (token counts, "stop now?", rank 0's metrics or error) travel over a
second, gloo group on CPU tensors, so asking them never waits for the GPU to finish its queue.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from transformer_mt.devices import resolve_device
from transformer_mt.errors import UserError

T = TypeVar("T")

# Rank 0 validates on the whole split while the others wait at a barrier: give it time.
_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    control: object = None  # the gloo process group for host-side collectives

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_preference: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job if there is one; return this process's rank info and device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(), resolve_device(device_preference, 0, setting="trainer.device")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank, setting="trainer.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=_TIMEOUT) if device.type == "cuda" else None
    return DistInfo(rank, world_size, local_rank, control or dist.group.WORLD), device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_floats(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sum of a few host numbers over all ranks (float64: exact for counts < 2**53)."""
    if not info.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.control)
    return tensor.tolist()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not info.enabled:
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.control)
    return bool(tensor.item())


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (small picklable objects: metrics, a name, a message)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0, group=info.control)
    return holder[0]


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, obj, group=info.control)
    return gathered


def run_on_main(info: DistInfo, fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 only (None elsewhere); if it raises, every rank raises.

    The other ranks wait for rank 0 to finish; a failure there (a full disk, a bad corpus) becomes
    an error on every rank instead of leaving them blocked at their next collective.
    """
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as err:
            error = err
    if info.enabled:
        failure = None if error is None else (isinstance(error, UserError), str(error))
        failure = broadcast_object(failure, info)
        if failure is not None and not info.is_main:
            is_user_error, message = failure
            if is_user_error:
                raise UserError(message)
            raise RuntimeError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result
