"""Scaled dot-product attention and multi-head attention.

    Attention(Q, K, V) = softmax(Q Kᵀ / √Dh) V

Two paths compute it behind one interface and agree to float32 rounding:

- the fast path calls `torch.nn.functional.scaled_dot_product_attention` (fused kernels: flash,
  memory-efficient, or the fused CPU kernel). Decoder self-attention over a whole target passes
  `is_causal=True` and no mask at all, which keeps the flash kernel eligible (it refuses masks);
- the explicit path writes the formula out and is the one that can return the attention weights
  (`attention_weights`, used for plots).

Which path runs is `ModelConfig.fast_attention`: True or False pick one, None picks per device
what `scripts/bench_train.py` measures faster: SDPA on CUDA, the explicit path on the CPU (at
Multi30k lengths its plain matmuls beat the CPU SDPA kernel, in fp32 and even more under bf16).
Asking for the weights (the modules' `weights()`) always takes the explicit path.

Masks (see the package docstring): `key_pad_mask` (B, Tk) is True at padded keys, which get -inf
before the softmax and so exactly zero weight; `causal=True` lets query i see keys up to its own
position only. With a cache, the Tq new queries are the *last* Tq positions of the Tk keys
(query i sits at position Tk - Tq + i), so a single new query sees every key and needs no mask.
A query that can see no key at all (an all-padding source) gets zero weights and a zero output,
never NaN; this matches what PyTorch's SDPA kernels return for such rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer_mt.model.cache import LayerCache
from transformer_mt.model.dropout import dropout


def _blocked(
    key_pad_mask: Tensor | None, causal: bool, t_q: int, t_k: int, device: torch.device
) -> Tensor | None:
    """Bool mask, True where a query may not look (padded keys, future keys); None if nowhere.

    Shape: broadcastable to (B, H, Tq, Tk): (B, 1, 1, Tk), (Tq, Tk) or (B, 1, Tq, Tk).
    """
    blocked = None
    if causal and t_q > 1:
        # Query i sits at position t_k - t_q + i and may not see keys after it.
        blocked = torch.ones(t_q, t_k, dtype=torch.bool, device=device).triu(t_k - t_q + 1)
    if key_pad_mask is not None:
        pad = key_pad_mask[:, None, None, :]  # (B, Tk) -> (B, 1, 1, Tk)
        blocked = pad if blocked is None else pad | blocked
    return blocked


def attention_weights(
    q: Tensor, k: Tensor, key_pad_mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """softmax(Q Kᵀ / √Dh) with masked keys at exactly 0 (the explicit path).

    Shape:
        q: (B, H, Tq, Dh); k: (B, H, Tk, Dh); key_pad_mask: (B, Tk) bool, True = pad.
        output: (B, H, Tq, Tk); each row sums to 1 over its visible keys (0 if it sees none).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    blocked = _blocked(key_pad_mask, causal, q.size(-2), k.size(-2), q.device)
    if blocked is None:
        return scores.softmax(dim=-1)
    weights = scores.masked_fill(blocked, float("-inf")).softmax(dim=-1)
    # A row with every key blocked is softmax(-inf, ..., -inf) = 0/0 = NaN; it attends to nothing.
    return weights.masked_fill(blocked, 0.0)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_pad_mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    fast: bool | None = True,
) -> Tensor:
    """softmax(Q Kᵀ / √Dh) V on the SDPA kernel (`fast`) or written out (explicit path).

    `fast=None` takes SDPA on CUDA and the explicit path elsewhere. `dropout_p` drops attention
    weights; pass 0 outside training.

    Shape:
        q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh); key_pad_mask: (B, Tk) bool, True = pad.
        output: (B, H, Tq, Dh).
    """
    if fast is None:
        fast = q.is_cuda
    if not fast:
        weights = attention_weights(q, k, key_pad_mask, causal)
        return dropout(weights, dropout_p) @ v
    t_q, t_k = q.size(-2), k.size(-2)
    if causal and key_pad_mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    blocked = _blocked(key_pad_mask, causal, t_q, t_k, q.device)
    allowed = None if blocked is None else ~blocked  # SDPA's bool mask means True = may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """The part shared by self- and cross-attention: heads, the attention call, output projection.

    H heads of width Dh = D / H each attend on their own (a view + transpose gives every head its
    slice of the projected vectors); their outputs are concatenated and projected back to D.
    Subclasses project the inputs to queries, keys and values.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, fast: bool | None = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout  # on the attention weights
        self.fast = fast
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, H, L, Dh)."""
        b, length, _ = x.shape
        x = x.view(b, length, self.n_heads, self.d_head)  # (B, L, D) -> (B, L, H, Dh)
        return x.transpose(1, 2)  # (B, L, H, Dh) -> (B, H, L, Dh)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, key_pad_mask: Tensor | None, causal: bool
    ) -> Tensor:
        """Attention over heads, heads merged, output projection: (B, H, Tq, Dh) -> (B, Tq, D)."""
        dropout_p = self.dropout if self.training else 0.0
        out = scaled_dot_product_attention(q, k, v, key_pad_mask, causal, dropout_p, self.fast)
        b, h, t_q, d_head = out.shape
        out = out.transpose(1, 2)  # (B, H, Tq, Dh) -> (B, Tq, H, Dh)
        return self.out_proj(out.reshape(b, t_q, h * d_head))  # (B, Tq, H, Dh) -> (B, Tq, D)

    def _init_projections(self, *fused: nn.Linear) -> None:
        """Xavier-uniform init of each D×D block of the (fused) input projections and of the output
        projection, zero biases: the per-block bounds are those of separate Q, K, V matrices, so
        fusing them for speed does not change the initial scale."""
        for proj in fused:
            for block in proj.weight.split(self.n_heads * self.d_head, dim=0):
                nn.init.xavier_uniform_(block)
            nn.init.zeros_(proj.bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)


class SelfAttention(MultiHeadAttention):
    """Multi-head self-attention with one fused Q/K/V projection (D -> 3D).

    With a `LayerCache`, the new keys and values are appended to the cached ones, so the new
    queries attend over every position decoded so far at O(t) cost per step.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, fast: bool | None = True):
        super().__init__(d_model, n_heads, dropout, fast)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self._init_projections(self.qkv_proj)

    def _project(self, x: Tensor, cache: LayerCache | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (self.split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))  # (B,H,T,Dh)
        if cache is not None:
            k, v = cache.append_self(k, v)  # (B, H, t + T, Dh): every position so far
        return q, k, v

    def forward(
        self,
        x: Tensor,
        key_pad_mask: Tensor | None = None,
        causal: bool = False,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Shape:
        x: (B, T, D); key_pad_mask: (B, T) (or (B, t + T) with a cache), True = pad.
        output: (B, T, D).
        """
        q, k, v = self._project(x, cache)
        return self.attend(q, k, v, key_pad_mask, causal)

    def weights(
        self, x: Tensor, key_pad_mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        """Attention weights (B, H, T, T) of the explicit path."""
        q, k, _ = self._project(x, None)
        return attention_weights(q, k, key_pad_mask, causal)


class CrossAttention(MultiHeadAttention):
    """Encoder-decoder attention: queries from the decoder (D -> D), keys and values from the
    encoder memory with one fused projection (D -> 2D).

    With a `LayerCache`, the memory's keys and values are computed on the first step and reused.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, fast: bool | None = True):
        super().__init__(d_model, n_heads, dropout, fast)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self._init_projections(self.q_proj, self.kv_proj)

    def _project(
        self, x: Tensor, memory: Tensor, cache: LayerCache | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        if cache is not None and cache.cross_k is not None:
            return q, cache.cross_k, cache.cross_v
        k, v = (self.split_heads(t) for t in self.kv_proj(memory).chunk(2, dim=-1))  # (B,H,S,Dh)
        if cache is not None:
            cache.cross_k, cache.cross_v = k, v
        return q, k, v

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        src_pad_mask: Tensor | None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """Shape:
        x: (B, T, D); memory: (B, S, D); src_pad_mask: (B, S), True = pad.
        output: (B, T, D).
        """
        q, k, v = self._project(x, memory, cache)
        return self.attend(q, k, v, src_pad_mask, causal=False)

    def weights(self, x: Tensor, memory: Tensor, src_pad_mask: Tensor | None) -> Tensor:
        """Attention weights (B, H, T, S) of the explicit path."""
        q, k, _ = self._project(x, memory, None)
        return attention_weights(q, k, src_pad_mask)
