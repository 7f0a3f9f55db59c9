"""Token-level cross-entropy that ignores target padding, with optional label smoothing.

The functions return *sums* over real target tokens, not means: the trainer divides by the number of
target tokens of the whole optimizer step (all accumulated batches, all ranks), so every token weighs
the same however the step was split into batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from transformer_mt.data.vocab import PAD


def token_loss_sum(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy of `logits` (B,T,V) against `target` (B,T); PAD positions count zero.

    With `label_smoothing` = ε the target distribution is (1 - ε) on the reference token plus ε
    spread uniformly over the vocabulary, as in "Rethinking the Inception Architecture".
    Returns a float32 scalar.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        target.reshape(-1),
        ignore_index=PAD,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def backward_in_chunks(
    states: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    label_smoothing: float,
    scale: float,
    chunk_tokens: int,
) -> torch.Tensor:
    """Backpropagate `scale` × `token_loss_sum(project(states), target)` through `states` (B,T,D),
    computing the logits of `chunk_tokens` target positions at a time; return the summed loss.

    Each chunk's logits, their log-softmax and their gradient are freed before the next chunk is
    projected, so no tensor of tokens × vocabulary outlives its chunk: peak memory falls, and on a
    CPU the step's largest tensors stay below the C library's mmap threshold. The loss and every
    gradient equal those of the whole batch at once, up to float rounding.
    """
    pieces = states.detach().reshape(-1, states.size(-1)).split(chunk_tokens)  # (≤chunk, D) each
    targets = target.reshape(-1).split(chunk_tokens)
    total = torch.zeros((), device=states.device)
    grads = []
    for piece, piece_target in zip(pieces, targets, strict=True):
        piece = piece.requires_grad_()
        loss_sum = token_loss_sum(project(piece), piece_target, label_smoothing)
        (loss_sum * scale).backward()  # into the projection's weight and into piece.grad
        total += loss_sum.detach()
        grads.append(piece.grad)
    states.backward(torch.cat(grads).view_as(states))
    return total
