"""The baseline: a GRU encoder-decoder with additive attention (Bahdanau et al., 2015).

Encoder: a bidirectional GRU (`enc_layers` layers, D/2 units per direction), so each source
position is described by the concatenation of a left-to-right and a right-to-left state (D wide).
Padded positions are skipped by packing, so padding changes nothing.

Decoder step t, from the previous state s (top layer of the GRU) and the previous token y:

    α    = softmax_j(vᵀ tanh(W s + U h_j))        additive attention over memory h_j (pads get 0)
    c    = Σ_j α_j h_j                             context
    s'   = GRU([emb(y); c (; o_prev)], s)          `input_feeding` also feeds the previous o
    o    = tanh(W_o [s'; c; emb(y)])               attentional output
    logits = Linear(o)

The first state is tanh(W_b ←h_1) per decoder layer, ←h_1 being the right-to-left state at the
first source position (it has read the whole sentence). U h_j is computed once per source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from transformer_mt.config import ModelConfig
from transformer_mt.model.base import PAD, EncoderOutput, Seq2Seq
from transformer_mt.model.embedding import output_projection, token_embeddings


@dataclass
class RNNCache:
    """The RNN decoder's state between steps.

    hidden:      (L, B, D) GRU state of each decoder layer (L = dec_layers).
    keys:        (B, S, D) U h_j, the attention keys of the source, computed once.
    prev_output: (B, D) the last attentional output o (input feeding only, else None).
    length:      steps decoded so far.
    """

    hidden: Tensor
    keys: Tensor
    prev_output: Tensor | None = None
    length: int = 0

    def reorder(self, indices: Tensor) -> None:
        """Keep batch rows `indices` (in that order), in place."""
        self.hidden = self.hidden.index_select(1, indices)
        self.keys = self.keys.index_select(0, indices)
        if self.prev_output is not None:
            self.prev_output = self.prev_output.index_select(0, indices)


class AdditiveAttention(nn.Module):
    """score(s, h_j) = vᵀ tanh(W s + U h_j), softmax over the non-padded source positions."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(d_model, d_model)  # U (its bias is the bias of the sum)
        self.query_proj = nn.Linear(d_model, d_model, bias=False)  # W
        self.energy = nn.Linear(d_model, 1, bias=False)  # v

    def keys(self, memory: Tensor) -> Tensor:
        """U h_j for every source position: (B, S, D) -> (B, S, D)."""
        return self.key_proj(memory)

    def forward(
        self, query: Tensor, keys: Tensor, memory: Tensor, src_pad_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Context vector and attention weights.

        Shape: query (B, D), keys (B, S, D), memory (B, S, D), src_pad_mask (B, S) True = pad
            -> context (B, D), weights (B, S) (zero at pads; all zero for an all-pad source).
        """
        energy = torch.tanh(keys + self.query_proj(query).unsqueeze(1))  # (B, S, D)
        scores = self.energy(energy).squeeze(-1)  # (B, S, 1) -> (B, S)
        weights = scores.masked_fill(src_pad_mask, float("-inf")).softmax(dim=-1)
        weights = weights.masked_fill(src_pad_mask, 0.0)  # an all-pad row: NaN -> 0
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)  # (B,1,S) @ (B,S,D) -> (B,D)
        return context, weights


class RNNSeq2Seq(Seq2Seq):
    """Bidirectional-GRU encoder, GRU decoder with additive attention (see the module docstring).

    `d_model` is the embedding and hidden size; `enc_layers` / `dec_layers` the GRU depths;
    `tie_output`, `share_embeddings` as for the Transformer. Embeddings are N(0, 1/D), linear maps
    Xavier-uniform, GRU weights keep PyTorch's uniform(±1/√hidden) default.
    """

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__(cfg)
        d = cfg.d_model
        self.src_embed, self.tgt_embed = token_embeddings(cfg, src_vocab_size, tgt_vocab_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder_rnn = nn.GRU(
            d,
            d // 2,
            num_layers=cfg.enc_layers,
            batch_first=True,
            bidirectional=True,
            dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0,
        )
        self.bridge = nn.Linear(d // 2, cfg.dec_layers * d)  # ←h_1 -> first state of each layer
        self.attention = AdditiveAttention(d)
        self.input_feeding = cfg.input_feeding
        step_input = 3 * d if cfg.input_feeding else 2 * d  # [emb(y); c (; o_prev)]
        self.decoder_rnn = nn.GRU(
            step_input,
            d,
            num_layers=cfg.dec_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0,
        )
        self.combine = nn.Linear(3 * d, d)  # [s'; c; emb(y)] -> o
        for linear in (self.bridge, self.attention.key_proj, self.combine):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(self.attention.query_proj.weight)
        nn.init.xavier_uniform_(self.attention.energy.weight)
        self.output_proj = output_projection(cfg, self.tgt_embed)

    def encode(self, src: Tensor) -> EncoderOutput:
        """Shape: src (B, S) -> EncoderOutput(memory (B, S, D), src_pad_mask (B, S)).

        memory is zero at padded positions.
        """
        src_pad_mask = src.eq(PAD)  # (B, S) True = pad
        # An all-pad row still needs length >= 1 to be packed; its attention masks everything.
        lengths = (~src_pad_mask).sum(dim=1).clamp(min=1).cpu()
        x = self.dropout(self.src_embed(src))  # (B, S, D)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        states, _ = self.encoder_rnn(packed)
        memory, _ = pad_packed_sequence(states, batch_first=True, total_length=src.size(1))
        return EncoderOutput(memory, src_pad_mask)  # memory (B, S, 2 × D/2)

    def init_cache(self, enc: EncoderOutput) -> RNNCache:
        """First decoder states from the encoder, and the attention keys of the source."""
        batch, d = enc.memory.size(0), self.config.d_model
        first_backward = enc.memory[:, 0, d // 2 :]  # (B, D/2) ←h_1: right-to-left, whole source
        hidden = torch.tanh(self.bridge(first_backward))  # (B, L * D)
        hidden = hidden.view(batch, -1, d).transpose(0, 1).contiguous()  # (B, L, D) -> (L, B, D)
        prev_output = enc.memory.new_zeros(batch, d) if self.input_feeding else None
        return RNNCache(hidden, self.attention.keys(enc.memory), prev_output)

    def _step(self, token: Tensor, enc: EncoderOutput, cache: RNNCache) -> tuple[Tensor, Tensor]:
        """One decoder step: token (B,) -> attentional output o (B, D), attention weights (B, S).

        Advances `cache` by one position.
        """
        emb = self.dropout(self.tgt_embed(token))  # (B, D)
        context, weights = self.attention(
            cache.hidden[-1], cache.keys, enc.memory, enc.src_pad_mask
        )
        inputs = [emb, context] if cache.prev_output is None else [emb, context, cache.prev_output]
        step_input = torch.cat(inputs, dim=-1).unsqueeze(1)  # (B, 1, 2D or 3D)
        state, cache.hidden = self.decoder_rnn(step_input, cache.hidden)  # (B, 1, D), (L, B, D)
        output = torch.tanh(self.combine(torch.cat([state.squeeze(1), context, emb], dim=-1)))
        if self.input_feeding:
            cache.prev_output = output
        cache.length += 1
        return output, weights

    def decode(self, tgt: Tensor, enc: EncoderOutput, cache: RNNCache | None = None) -> Tensor:
        """Next-token logits for `tgt`, one GRU step per position; with `cache`, `tgt` holds only
        the new step(s) and the cache advances in place.

        Shape: tgt (B, T) -> (B, T, V).
        """
        return self.output_proj(self._states(tgt, enc, cache))  # (B, T, D) -> (B, T, V)

    def features(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Shape: src (B, S), tgt_in (B, T) -> (B, T, D), the decoder's outputs."""
        return self._states(tgt_in, self.encode(src))

    def _states(self, tgt: Tensor, enc: EncoderOutput, cache: RNNCache | None = None) -> Tensor:
        if cache is None:
            cache = self.init_cache(enc)
        outputs = [self._step(tgt[:, t], enc, cache)[0] for t in range(tgt.size(1))]
        return self.dropout(torch.stack(outputs, dim=1))  # (B, T, D)

    def cross_attention(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Additive attention weights of each teacher-forced step: (B, S), (B, T) -> (B, T, S)."""
        enc = self.encode(src)
        cache = self.init_cache(enc)
        return torch.stack(
            [self._step(tgt_in[:, t], enc, cache)[1] for t in range(tgt_in.size(1))], 1
        )
