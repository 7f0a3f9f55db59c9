"""What every sequence-to-sequence model of the package offers, whatever its architecture.

Training, decoding and evaluation code is written against `Seq2Seq` only:

    enc = model.encode(src)                   # EncoderOutput: memory (B,S,D), src_pad_mask (B,S)
    logits = model.decode(tgt_in, enc)        # (B,T,V) teacher forced, causal
    cache = model.init_cache(enc)             # empty cache for incremental decoding
    logits = model.decode(tokens, enc, cache) # tokens (B,1): the new step only; the cache grows
    cache.reorder(idx); enc = enc.index_select(idx)   # beam search bookkeeping
    logits = model(src, tgt_in)               # encode + decode: the training path
    states = model.features(src, tgt_in)      # (B,T,D) the same before model.output_proj
    attn = model.cross_attention(src, tgt_in) # (B,T,S) for attention plots
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from transformer_mt.config import ModelConfig
from transformer_mt.data.vocab import PAD  # the padding id, fixed in every vocabulary


@dataclass
class EncoderOutput:
    """The encoded source, as the decoder reads it.

    memory:       (B, S, D) one vector per source position (garbage at padded positions: masked).
    src_pad_mask: (B, S) bool, True = padding.
    """

    memory: Tensor
    src_pad_mask: Tensor

    def index_select(self, indices: Tensor) -> EncoderOutput:
        """Rows `indices` of the batch (repeat for beams, reorder, drop finished sentences)."""
        return EncoderOutput(
            self.memory.index_select(0, indices), self.src_pad_mask.index_select(0, indices)
        )


class IncrementalCache(Protocol):
    """State carried from one decoding step to the next (each model has its own typed cache)."""

    length: int  # target positions decoded so far

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows `indices` (in that order), in place."""


class Seq2Seq(nn.Module, ABC):
    """An encoder-decoder translation model: see the module docstring for the interface."""

    output_proj: nn.Linear  # decoder state (D) -> target vocabulary logits (V)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.pad_idx = PAD

    @abstractmethod
    def encode(self, src: Tensor) -> EncoderOutput:
        """Encode right-padded source ids (B, S); builds `src_pad_mask = src.eq(PAD)`."""

    @abstractmethod
    def decode(
        self, tgt: Tensor, enc: EncoderOutput, cache: IncrementalCache | None = None
    ) -> Tensor:
        """Next-token logits (B, T, V) for target ids `tgt` (B, T).

        Without a cache, `tgt` is the whole teacher-forced prefix. With one, `tgt` holds only the new
        step(s) after the `cache.length` positions already decoded, and the cache grows in place.
        """

    @abstractmethod
    def init_cache(self, enc: EncoderOutput) -> IncrementalCache:
        """An empty cache for decoding the sources of `enc` step by step."""

    @abstractmethod
    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced decoder states (B, T, D) that `output_proj` turns into the logits of
        `forward`: the training step projects them a slice of tokens at a time."""

    @abstractmethod
    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Attention weights (B, T, S) of each target position over the source, for plots."""

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V): the training path.

        Shape:
            src: (B, S) source ids, right-padded with PAD.
            tgt_in: (B, T) `[BOS] + y`, right-padded with PAD.
            output: (B, T, V) logits predicting `y + [EOS]`.
        """
        return self.output_proj(self.features(src, tgt_in))
