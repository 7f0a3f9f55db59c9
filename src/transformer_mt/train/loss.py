"""Token-level cross-entropy that ignores target padding, with optional label smoothing.

The functions return *sums* over real target tokens, not means: the trainer divides by the number of
target tokens of the whole optimizer step (all accumulated batches, all ranks), so every token weighs
the same however the step was split into batches.
"""

from __future__ import annotations

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
