"""The key/value cache of incremental Transformer decoding.

Generating token t needs the keys and values of positions 0..t-1 in every decoder self-attention,
and the keys and values of the source in every cross-attention. Recomputing them would make step t
cost O(t²) (O(T³) for a whole sentence); keeping them makes it O(t): each step projects only its
new token and appends one key/value row per layer. The source keys/values are computed on the
first step and never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """What one decoder layer keeps between steps (None until the first step fills it).

    self_k, self_v:   (B, H, t, Dh) self-attention keys/values of the t positions decoded so far.
    cross_k, cross_v: (B, H, S, Dh) cross-attention keys/values of the encoder memory.
    """

    self_k: Tensor | None = None
    self_v: Tensor | None = None
    cross_k: Tensor | None = None
    cross_v: Tensor | None = None

    def append_self(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' keys/values (B, H, T, Dh); return all of them (B, H, t+T, Dh)."""
        if self.self_k is not None:
            k = torch.cat([self.self_k, k], dim=2)
            v = torch.cat([self.self_v, v], dim=2)
        self.self_k, self.self_v = k, v
        return k, v

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows `indices` (in that order), in place."""
        for name in ("self_k", "self_v", "cross_k", "cross_v"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, indices))


@dataclass
class DecoderCache:
    """The Transformer decoder's state between steps: one LayerCache per decoder layer, and the
    number of positions decoded so far (the position of the next token, for the positional
    encoding)."""

    layers: list[LayerCache]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> DecoderCache:
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows `indices` (a LongTensor over the batch, in that order), in place.

        Beam search calls this after choosing, for each new beam, the hypothesis it extends.
        """
        for layer in self.layers:
            layer.reorder(indices)
