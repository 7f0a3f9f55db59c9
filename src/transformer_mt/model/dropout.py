"""Dropout with a mask that is cheap to draw on a CPU.

Dropout zeroes each unit with probability p and scales the rest by 1 / (1 - p), so that the
expected activation is unchanged. `F.dropout` draws its mask with `bernoulli_`, one call to the
random-number generator per unit; on a CPU that drawing is most of dropout's cost. Here one 64-bit
draw gives four 16-bit uniform integers u, and a unit is kept when u ≥ round(p · 2¹⁶) − 2¹⁵, that
is with probability 1 − p to within 2⁻¹⁷. Forward and backward of a (2048, 256) bf16 tensor take
2.8 ms instead of 10.9 ms on the 2-core CPU of docs/benchmarks.md ("CPU: dropout's mask"), and the
CPU preset's step has 17 of them.

The mask comes from torch's global generator, as `F.dropout`'s does, so seeding and the resume of
a run's random state work as before. On other devices `F.dropout` is used: its fused kernel is
fast there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_HALF = 1 << 15  # 16-bit draws are signed: uniform on [-2¹⁵, 2¹⁵)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element of `x` with probability `p` and scale the rest by 1 / (1 - p), in
    training; `x` unchanged otherwise. Any shape."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits
    draws = words.view(torch.int16)[:n].view(x.shape)
    keep = draws >= round(p * 2 * _HALF) - _HALF
    # The mask in x's dtype, already scaled: one multiply forward and one backward.
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """`nn.Dropout` (same argument, same behaviour) drawing its mask as `dropout` above."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
