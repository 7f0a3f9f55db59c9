"""What every sequence-to-sequence model of the package offers, whatever its architecture.

Training, decoding and evaluation code is written against `Seq2Seq` only:

    enc = model.encode(src)                   # EncoderOutput: memory (B,S,D), src_pad_mask (B,S)
    logits = model.decode(tgt_in, enc)        # (B,T,V) teacher forced, causal
    cache = model.init_cache(enc)             # empty cache for incremental decoding
    logits = model.decode(tokens, enc, cache) # tokens (B,1): the new step only; the cache grows
    cache.reorder(idx); enc = enc.index_select(idx)   # beam search bookkeeping
    logits = model(src, tgt_in)               # encode + decode: the training path
    attn = model.cross_attention(src, tgt_in) # (B,T,S) for attention plots
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from transformer_mt.config import ModelConfig
from transformer_mt.data.vocab import PAD  # the padding id, fixed in every vocabulary
from transformer_mt.errors import ConfigError


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
    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Attention weights (B, T, S) of each target position over the source, for plots."""

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V): the training path.

        Shape:
            src: (B, S) source ids, right-padded with PAD.
            tgt_in: (B, T) `[BOS] + y`, right-padded with PAD.
            output: (B, T, V) logits predicting `y + [EOS]`.
        """
        return self.decode(tgt_in, self.encode(src))


def token_embeddings(
    cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int
) -> tuple[nn.Embedding, nn.Embedding]:
    """Source and target embedding tables (D wide): one shared table if `cfg.share_embeddings`.

    Weights are drawn from N(0, 1/D): a row then has norm ≈ 1, so after the Transformer's √D
    scaling each input component has unit variance, and when the table doubles as the output
    projection (tie_output) the initial logits have unit variance too.
    """
    if cfg.share_embeddings and src_vocab_size != tgt_vocab_size:
        raise ConfigError(
            "model.share_embeddings needs one vocabulary for both sides "
            f"(source has {src_vocab_size} tokens, target {tgt_vocab_size}): "
            "set data.shared_vocab=true or model.share_embeddings=false"
        )
    tgt = nn.Embedding(tgt_vocab_size, cfg.d_model)
    nn.init.normal_(tgt.weight, mean=0.0, std=cfg.d_model**-0.5)
    if cfg.share_embeddings:
        return tgt, tgt
    src = nn.Embedding(src_vocab_size, cfg.d_model)
    nn.init.normal_(src.weight, mean=0.0, std=cfg.d_model**-0.5)
    return src, tgt


def output_projection(cfg: ModelConfig, tgt_embedding: nn.Embedding) -> nn.Linear:
    """Decoder state (D) -> target vocabulary logits (V), tied to `tgt_embedding` if `cfg.tie_output`.

    No bias, so that a tied projection is exactly the embedding table. An untied one gets Xavier
    initialisation like every other matrix.
    """
    vocab_size = tgt_embedding.num_embeddings
    proj = nn.Linear(cfg.d_model, vocab_size, bias=False)
    if cfg.tie_output:
        proj.weight = tgt_embedding.weight
    else:
        nn.init.xavier_uniform_(proj.weight)
    return proj
