"""One optimizer step, and the precision it runs in.

    lr → forward (autocast) → loss per target token → backward → clip → Adam → zero_grad

With `trainer.loss_chunk_tokens` the forward stops at the decoder states, and the output
projection, the loss and their backward run a slice of target tokens at a time (see
`loss.backward_in_chunks`): the same loss and gradients, without any tokens × vocabulary tensor
of the whole batch.

The loss of a step is normalised by the target tokens of the whole step (every accumulated batch,
every rank), so each token weighs the same however the step was split. Nothing here syncs with
the host: losses, the gradient norm and the first non-finite step stay on the device until the
trainer's next log point reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections.abc import Iterator, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer_mt.config import TrainConfig
from transformer_mt.data.batching import Batch
from transformer_mt.errors import ConfigError
from transformer_mt.train import distributed as dist
from transformer_mt.train.loss import backward_in_chunks, token_loss_sum
from transformer_mt.train.optim import set_lr


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): autocast pays off there."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def use_amp(requested: bool | None, device: torch.device) -> bool:
    """Resolve `trainer.amp`: None = bf16 autocast wherever the device computes bf16 natively.

    Raises ConfigError when bf16 is asked for on a CPU without native support (it would be
    emulated, several times slower than float32).
    """
    if device.type == "cuda":
        return requested is not False
    if device.type != "cpu":
        return bool(requested)
    supported = cpu_supports_bf16()
    if requested and not supported:
        raise ConfigError(
            "trainer.amp=true, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
            "use trainer.amp=false (or leave it unset to choose automatically)"
        )
    return supported if requested is None else requested


@dataclasses.dataclass
class Meter:
    """Summed training loss (a device tensor: no sync per step) and target tokens since `started`."""

    loss_sum: torch.Tensor | float = 0.0
    tokens: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, loss_sum: torch.Tensor, tokens: int) -> None:
        self.loss_sum = self.loss_sum + loss_sum
        self.tokens += tokens

    def leave_out(self, seconds: float) -> None:
        """Do not count `seconds` spent on something else (a validation, a save) in the rate."""
        self.started += seconds


class Step:
    """The training step of one run: the model it calls, its optimizer, and on-device records of
    the last gradient norm and of the first step whose gradient was not finite (-1: none)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        info: dist.DistInfo,
        device: torch.device,
        amp: bool,
    ):
        self.model, self.optimizer = model, optimizer
        self.info, self.device, self.amp = info, device, amp
        self.cfg, self.skip_nonfinite = cfg.optim, cfg.trainer.skip_nonfinite
        self.chunk_tokens = cfg.trainer.loss_chunk_tokens
        # What the step calls: the model under DistributedDataParallel and/or torch.compile.
        self.ddp, self.train_model = None, model
        if info.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp = self.train_model = DistributedDataParallel(model, device_ids=device_ids)
        if cfg.trainer.compile:
            self.train_model = torch.compile(self.train_model, dynamic=True)
        self.grad_norm = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def release_ddp(self) -> None:
        """Drop the DistributedDataParallel wrapper while the process group is still alive.

        Its C++ reducer holds a reference to the process group. Dropped last, that reference
        destroys a gloo group with the GIL held, and the destructor waits for the group's worker
        thread, which may itself be waiting for the GIL to free the tensors of its last
        broadcast: the process hangs at exit with its work saved. A two-process job of the
        DDP tests hung so in 3 runs of 8; with the wrapper dropped here first, in none of 16.
        """
        if self.ddp is None:
            return
        self.ddp, self.train_model = None, self.model
        gc.collect()  # the wrapper may sit in a reference cycle

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def __call__(self, batches: Sequence[Batch], step: int, lr: float) -> torch.Tensor | None:
        """Take optimizer step number `step` at learning rate `lr` on `batches`, their gradients
        accumulated; return the step's summed loss (on the device), or None if it was skipped."""
        set_lr(self.optimizer, lr)
        tokens = sum(batch.num_tgt_tokens for batch in batches)
        (global_tokens,) = dist.sum_floats([tokens], self.info)
        scale = self.info.world_size / global_tokens  # DDP averages gradients over ranks
        step_loss = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            with self._gradient_sync(i == len(batches) - 1):
                step_loss += self._forward_backward(batch, scale)
        clip = self.cfg.clip_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.skip_nonfinite and not torch.isfinite(grad_norm):  # a host sync, only when asked
            self.optimizer.zero_grad(set_to_none=True)
            return None
        bad = ~torch.isfinite(grad_norm) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(bad, step, self.first_bad_step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = grad_norm.detach()
        return step_loss

    def _forward_backward(self, batch: Batch, scale: float) -> torch.Tensor:
        """Accumulate the gradients of `scale` × the batch's summed loss; return that sum.

        In chunks only where the step calls the bare model: DDP and torch.compile need the whole
        forward to go through their wrapper.
        """
        if self.chunk_tokens and self.train_model is self.model:
            with self.autocast():
                states = self.model.features(batch.src, batch.tgt_in)

            def project(rows: torch.Tensor) -> torch.Tensor:
                with self.autocast():
                    return self.model.output_proj(rows)

            return backward_in_chunks(
                states, project, batch.tgt_out, self.cfg.label_smoothing, scale, self.chunk_tokens
            )
        with self.autocast():
            logits = self.train_model(batch.src, batch.tgt_in)
            loss_sum = token_loss_sum(logits, batch.tgt_out, self.cfg.label_smoothing)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last batch of a step only."""
        if self.ddp is None or sync:
            return contextlib.nullcontext()
        return self.ddp.no_sync()


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """`items` in consecutive slices of `size` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
