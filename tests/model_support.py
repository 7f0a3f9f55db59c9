"""Shared by the model tests (test_model.py, test_rnn.py): a seeded model, a padded batch, and a
few training steps on it."""

from __future__ import annotations

import torch

from transformer_mt.config import ModelConfig
from transformer_mt.model import PAD, build_model

SRC_VOCAB, TGT_VOCAB = 23, 19


def seeded_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """`cfg`'s model over the test vocabularies, initialised from `seed`, in eval mode."""
    torch.manual_seed(seed)
    return build_model(cfg, SRC_VOCAB, TGT_VOCAB).eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded sources (lengths 6, 4, 5) and targets (lengths 5, 3, 4); no PAD inside."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(4, SRC_VOCAB, (3, 6), generator=gen)
    tgt = torch.randint(4, TGT_VOCAB, (3, 5), generator=gen)
    src[1, 4:] = PAD
    src[2, 5:] = PAD
    tgt[1, 3:] = PAD
    tgt[2, 4:] = PAD
    return src, tgt


def loss_before_and_after_steps(
    model: torch.nn.Module, src: torch.Tensor, tgt: torch.Tensor, lr: float, steps: int = 30
) -> tuple[float, float]:
    """Teacher-forced cross-entropy of `model` on one batch (`tgt` shifted left by one is the
    output), before and after `steps` Adam steps on that batch."""
    tgt_out = torch.roll(tgt, -1, dims=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def loss() -> torch.Tensor:
        logits = model(src, tgt)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD
        )

    first = loss().item()
    for _ in range(steps):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    return first, loss().item()
