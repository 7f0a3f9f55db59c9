"""Input representation: token embedding × √D plus a sinusoidal position signal, then dropout.

Attention itself ignores order, so the position of each token is added to its embedding
("Attention Is All You Need", section 3.5):

    PE[pos, 2i]     = sin(pos / 10000^(2i/D))
    PE[pos, 2i + 1] = cos(pos / 10000^(2i/D))

Each pair of dimensions is a rotation at its own frequency, so PE[pos + k] is a linear function of
PE[pos]: relative offsets are easy for attention to read. The table is fixed (a buffer, not a
parameter) and is not saved in checkpoints: it is recomputed from D and `max_positions`.

The token tables come from `token_embeddings` (one table when source and target share it), and
`output_projection` maps decoder states back onto the target vocabulary, optionally through the
target table itself (weight tying). The RNN baseline uses both as well.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from transformer_mt.config import ModelConfig
from transformer_mt.errors import ConfigError
from transformer_mt.model.dropout import Dropout


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


def sinusoid_table(n_positions: int, d_model: int) -> Tensor:
    """The (n_positions, d_model) sinusoidal position table, float32."""
    position = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64)  # (ceil(D/2),) = 0, 2, 4, ...
    angle = position / 10000.0 ** (two_i / d_model)  # (P, ceil(D/2))
    table = torch.zeros(n_positions, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])  # an odd D has one cosine column fewer
    return table.float()


class SinusoidalPositionalEncoding(nn.Module):
    """Rows of the fixed sinusoidal table for positions `start .. start + length - 1`.

    A sequence reaching past `max_positions` is refused with a ConfigError rather than silently
    growing the table (a buffer that changes shape mid-run would desynchronise DDP ranks).
    """

    def __init__(self, d_model: int, max_positions: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoid_table(max_positions, d_model), persistent=False)

    @property
    def max_positions(self) -> int:
        return self.table.size(0)

    def forward(self, length: int, start: int = 0) -> Tensor:
        """Shape: output (length, D)."""
        end = start + length
        if end > self.max_positions:
            raise ConfigError(
                f"a sequence needs {end} positions but model.max_positions={self.max_positions}: "
                "shorten the input (or the maximum output length), or train with a larger "
                "model.max_positions"
            )
        return self.table[start:end]


class Embeddings(nn.Module):
    """Token ids -> token embedding × √D + positional encoding, with dropout.

    The √D factor brings embeddings drawn from N(0, 1/D) to unit scale, the scale of the
    positional signal. `token` and `positions` may be shared with another Embeddings (shared
    source/target vocabulary; one position table for encoder and decoder).
    """

    def __init__(
        self, token: nn.Embedding, positions: SinusoidalPositionalEncoding, dropout: float
    ) -> None:
        super().__init__()
        self.token = token
        self.positions = positions
        self.scale = math.sqrt(token.embedding_dim)
        self.dropout = Dropout(dropout)

    def forward(self, tokens: Tensor, start: int = 0) -> Tensor:
        """Embed `tokens` that sit at positions `start, start + 1, ...` (start > 0 when decoding
        step by step after `start` cached positions).

        Shape:
            tokens: (B, L) ids.
            output: (B, L, D).
        """
        x = self.token(tokens) * self.scale  # (B, L, D)
        return self.dropout(x + self.positions(tokens.size(1), start))  # (L, D) broadcasts over B


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
