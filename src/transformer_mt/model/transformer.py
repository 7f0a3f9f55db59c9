"""The encoder-decoder Transformer of "Attention Is All You Need".

    src ─► Embeddings ─► N × EncoderLayer ─► memory ─┐
    tgt ─► Embeddings ─► N × DecoderLayer(memory) ───┴─► Linear(D -> V) ─► logits

Initialisation: every matrix of the layers is Xavier-uniform (variance-preserving for the
linear maps between width-D activations), biases are zero, LayerNorms are (1, 0), and the
embedding tables are N(0, 1/D) (see `token_embeddings`).
"""

from __future__ import annotations

from torch import Tensor

from transformer_mt.config import ModelConfig
from transformer_mt.model.base import PAD, EncoderOutput, Seq2Seq
from transformer_mt.model.cache import DecoderCache
from transformer_mt.model.embedding import (
    Embeddings,
    SinusoidalPositionalEncoding,
    output_projection,
    token_embeddings,
)
from transformer_mt.model.layers import Decoder, Encoder


class Transformer(Seq2Seq):
    """Encoder-decoder Transformer (post-norm by default, pre-norm as an option).

    Options: `tie_output` makes the output projection the target embedding table;
    `share_embeddings` gives source and target one table (needs equal vocabulary sizes).
    """

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__(cfg)
        src_tokens, tgt_tokens = token_embeddings(cfg, src_vocab_size, tgt_vocab_size)
        positions = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_positions)
        self.encoder = Encoder(cfg, Embeddings(src_tokens, positions, cfg.dropout))
        self.decoder = Decoder(cfg, Embeddings(tgt_tokens, positions, cfg.dropout))
        self.output_proj = output_projection(cfg, tgt_tokens)

    def encode(self, src: Tensor) -> EncoderOutput:
        """Shape: src (B, S) -> EncoderOutput(memory (B, S, D), src_pad_mask (B, S))."""
        src_pad_mask = src.eq(PAD)  # (B, S) True = pad
        return EncoderOutput(self.encoder(src, src_pad_mask), src_pad_mask)

    def decode(self, tgt: Tensor, enc: EncoderOutput, cache: DecoderCache | None = None) -> Tensor:
        """Next-token logits for `tgt`, teacher forced and causal; with `cache`, `tgt` holds only
        the new step(s) and the cache grows in place.

        Shape: tgt (B, T) -> (B, T, V).
        """
        return self.output_proj(self.decoder(tgt, enc, cache))

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Shape: src (B, S), tgt_in (B, T) -> (B, T, D), the decoder's output."""
        return self.decoder(tgt_in, self.encode(src))

    def init_cache(self, enc: EncoderOutput) -> DecoderCache:
        """An empty cache; the first decoding step fills the source keys/values from `enc`."""
        return DecoderCache.empty(len(self.decoder.layers))

    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Last decoder layer's cross-attention weights, mean over heads, on the explicit path.

        Call it in eval mode (and under torch.no_grad()) for plots.
        Shape: src (B, S), tgt_in (B, T) -> (B, T, S).
        """
        enc = self.encode(src)
        return self.decoder.cross_attention_weights(tgt_in, enc).mean(dim=1)
