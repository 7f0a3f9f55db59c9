"""Encoder and decoder layers and their stacks.

Every sub-layer (attention or feed-forward) is wrapped in a residual connection with dropout and
LayerNorm. Post-norm, as in "Attention Is All You Need" (the default):

    x = LayerNorm(x + Dropout(sublayer(x)))

Pre-norm (`ModelConfig.pre_norm`), which trains more stably in deep stacks and needs a final
LayerNorm after the last layer because the residual stream itself is never normalised:

    x = x + Dropout(sublayer(LayerNorm(x)))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from transformer_mt.config import ModelConfig
from transformer_mt.model.attention import CrossAttention, SelfAttention
from transformer_mt.model.base import EncoderOutput
from transformer_mt.model.cache import DecoderCache, LayerCache
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import Embeddings


class FeedForward(nn.Module):
    """Position-wise feed-forward network: Linear(D -> d_ff), ReLU, dropout, Linear(d_ff -> D)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Shape: x (..., D) -> (..., D)."""
        return self.linear2(self.dropout(self.linear1(x).relu()))


class _ResidualLayer(nn.Module):
    """Residual connection + dropout + LayerNorm around a sub-layer, post- or pre-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.dropout = Dropout(cfg.dropout)

    def residual(
        self, x: Tensor, norm: nn.LayerNorm, sublayer: Callable[[Tensor], Tensor]
    ) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(_ResidualLayer):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.attention_dropout, cfg.fast_attention)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.ffn_dropout)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, x: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """Shape: x (B, S, D), src_pad_mask (B, S) True = pad -> (B, S, D)."""
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, key_pad_mask=src_pad_mask))
        return self.residual(x, self.norm2, self.ffn)


class DecoderLayer(_ResidualLayer):
    """Causal self-attention over the target, attention over the source memory, feed-forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.self_attn = SelfAttention(d, cfg.n_heads, cfg.attention_dropout, cfg.fast_attention)
        self.cross_attn = CrossAttention(d, cfg.n_heads, cfg.attention_dropout, cfg.fast_attention)
        self.ffn = FeedForward(d, cfg.d_ff, cfg.ffn_dropout)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, x: Tensor, enc: EncoderOutput, cache: LayerCache | None = None) -> Tensor:
        """Shape: x (B, T, D), enc.memory (B, S, D) -> (B, T, D).

        With `cache`, x holds only the new positions, which follow the cached ones.
        """
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, causal=True, cache=cache))
        x = self.residual(
            x, self.norm2, lambda h: self.cross_attn(h, enc.memory, enc.src_pad_mask, cache)
        )
        return self.residual(x, self.norm3, self.ffn)

    def cross_attention_weights(self, x: Tensor, enc: EncoderOutput) -> Tensor:
        """Weights (B, H, T, S) of this layer's cross-attention for input x (B, T, D)."""
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, causal=True))
        query = self.norm2(x) if self.pre_norm else x
        return self.cross_attn.weights(query, enc.memory, enc.src_pad_mask)


class Encoder(nn.Module):
    """Embeddings, then `enc_layers` encoder layers (then a LayerNorm if pre-norm)."""

    def __init__(self, cfg: ModelConfig, embed: Embeddings) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()

    def forward(self, src: Tensor, src_pad_mask: Tensor) -> Tensor:
        """Shape: src (B, S) ids, src_pad_mask (B, S) True = pad -> memory (B, S, D)."""
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, src_pad_mask)
        return self.final_norm(x)


class Decoder(nn.Module):
    """Embeddings, then `dec_layers` decoder layers (then a LayerNorm if pre-norm)."""

    def __init__(self, cfg: ModelConfig, embed: Embeddings) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()

    def forward(self, tgt: Tensor, enc: EncoderOutput, cache: DecoderCache | None = None) -> Tensor:
        """Decoder states for target ids `tgt`; with `cache`, `tgt` holds only the new positions
        (placed after `cache.length`), and the cache grows by them.

        Shape: tgt (B, T) -> (B, T, D).
        """
        start = 0 if cache is None else cache.length
        x = self.embed(tgt, start)
        for i, layer in enumerate(self.layers):
            x = layer(x, enc, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tgt.size(1)
        return self.final_norm(x)

    def cross_attention_weights(self, tgt: Tensor, enc: EncoderOutput) -> Tensor:
        """Cross-attention weights (B, H, T, S) of the last layer, teacher forced on `tgt` (B, T)."""
        x = self.embed(tgt)
        for layer in self.layers[:-1]:
            x = layer(x, enc)
        return self.layers[-1].cross_attention_weights(x, enc)
