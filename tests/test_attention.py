"""Scaled dot-product and multi-head attention: against torch.nn, path against path, masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transformer_mt.model.attention import (
    CrossAttention,
    SelfAttention,
    attention_weights,
    scaled_dot_product_attention,
)
from transformer_mt.model.cache import LayerCache

D, H = 16, 4
B, T, S = 3, 5, 7
TOL = {"atol": 1e-5, "rtol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def _torch_mha(seed: int = 0) -> nn.MultiheadAttention:
    """A torch.nn.MultiheadAttention with random weights *and* biases (its biases start at 0)."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha.eval()


def _self_attention_like(mha: nn.MultiheadAttention, fast: bool) -> SelfAttention:
    ours = SelfAttention(D, H, fast=fast)
    with torch.no_grad():
        ours.qkv_proj.weight.copy_(mha.in_proj_weight)  # rows: Q, then K, then V
        ours.qkv_proj.bias.copy_(mha.in_proj_bias)
        ours.out_proj.load_state_dict(mha.out_proj.state_dict())
    return ours.eval()


def _cross_attention_like(mha: nn.MultiheadAttention, fast: bool) -> CrossAttention:
    ours = CrossAttention(D, H, fast=fast)
    with torch.no_grad():
        ours.q_proj.weight.copy_(mha.in_proj_weight[:D])
        ours.q_proj.bias.copy_(mha.in_proj_bias[:D])
        ours.kv_proj.weight.copy_(mha.in_proj_weight[D:])
        ours.kv_proj.bias.copy_(mha.in_proj_bias[D:])
        ours.out_proj.load_state_dict(mha.out_proj.state_dict())
    return ours.eval()


def _pad_mask(lengths: list[int], max_len: int) -> torch.Tensor:
    """(B, L) bool, True = pad, for right-padded sequences of the given lengths."""
    return torch.arange(max_len)[None, :] >= torch.tensor(lengths)[:, None]


def _future_mask(length: int) -> torch.Tensor:
    """torch.nn's bool attn_mask convention: True = may not attend."""
    return torch.ones(length, length, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("masks", ["none", "padding", "causal", "padding+causal"])
def test_self_attention_equals_torch_multihead_attention(fast, masks):
    mha = _torch_mha()
    ours = _self_attention_like(mha, fast)
    x = torch.randn(B, T, D)
    pad = _pad_mask([5, 3, 4], T) if "padding" in masks else None
    causal = "causal" in masks

    expected, _ = mha(
        x,
        x,
        x,
        key_padding_mask=pad,
        attn_mask=_future_mask(T) if causal else None,
        need_weights=False,
    )
    torch.testing.assert_close(ours(x, key_pad_mask=pad, causal=causal), expected, **TOL)


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "padding"])
def test_cross_attention_equals_torch_multihead_attention(fast, padded):
    mha = _torch_mha(1)
    ours = _cross_attention_like(mha, fast)
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    pad = _pad_mask([7, 2, 5], S) if padded else None

    expected, _ = mha(x, memory, memory, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(ours(x, memory, pad), expected, **TOL)


def test_cross_attention_weights_equal_torch_head_averaged_weights():
    mha = _torch_mha(2)
    ours = _cross_attention_like(mha, fast=True)  # weights() always takes the explicit path
    x, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    pad = _pad_mask([7, 2, 5], S)

    _, expected = mha(x, memory, memory, key_padding_mask=pad, need_weights=True)  # (B, T, S)
    weights = ours.weights(x, memory, pad)
    assert weights.shape == (B, H, T, S)
    torch.testing.assert_close(weights.mean(dim=1), expected, **TOL)


@pytest.mark.parametrize(
    ("t_q", "t_k", "padded", "causal"),
    [
        (5, 7, False, False),
        (5, 7, True, False),
        (6, 6, False, True),  # whole target: is_causal=True on the SDPA path
        (6, 6, True, True),
        (1, 6, False, True),  # one cached decoding step: no mask at all
        (3, 6, True, True),  # three new queries after three cached positions
    ],
)
def test_explicit_and_sdpa_paths_agree(t_q, t_k, padded, causal):
    torch.manual_seed(3)
    q, k, v = torch.randn(B, H, t_q, 8), torch.randn(B, H, t_k, 8), torch.randn(B, H, t_k, 8)
    pad = _pad_mask([t_k, t_k - 2, t_k - 1], t_k) if padded else None
    fast = scaled_dot_product_attention(q, k, v, pad, causal, fast=True)
    explicit = scaled_dot_product_attention(q, k, v, pad, causal, fast=False)
    assert fast.shape == (B, H, t_q, 8)
    torch.testing.assert_close(fast, explicit, **TOL)


def test_new_queries_after_a_cache_see_the_keys_a_full_causal_pass_shows_them():
    torch.manual_seed(4)
    q, k, v = torch.randn(B, H, 6, 8), torch.randn(B, H, 6, 8), torch.randn(B, H, 6, 8)
    full = scaled_dot_product_attention(q, k, v, causal=True)
    for fast in (True, False):
        last_two = scaled_dot_product_attention(q[:, :, 4:], k, v, causal=True, fast=fast)
        torch.testing.assert_close(last_two, full[:, :, 4:], **TOL)


def test_explicit_weights_sum_to_one_over_real_keys_and_are_exactly_zero_on_pads():
    torch.manual_seed(5)
    q, k = torch.randn(B, H, T, 8), torch.randn(B, H, S, 8)
    lengths = [7, 2, 5]
    pad = _pad_mask(lengths, S)
    weights = attention_weights(q, k, pad)
    assert weights.shape == (B, H, T, S)
    for row, length in enumerate(lengths):
        assert torch.all(weights[row, :, :, length:] == 0.0)
        assert torch.all(weights[row, :, :, :length] > 0.0)
        torch.testing.assert_close(weights[row].sum(-1), torch.ones(H, T), **TOL)


def test_causal_weights_are_exactly_zero_above_the_diagonal():
    torch.manual_seed(6)
    q, k = torch.randn(B, H, T, 8), torch.randn(B, H, T, 8)
    weights = attention_weights(q, k, causal=True)
    assert torch.all(weights.masked_select(_future_mask(T)) == 0.0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T), **TOL)


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
def test_a_row_whose_keys_are_all_padding_gives_zeros_not_nan(fast):
    torch.manual_seed(7)
    q = torch.randn(B, H, T, 8, requires_grad=True)
    k, v = torch.randn(B, H, S, 8), torch.randn(B, H, S, 8)
    pad = _pad_mask([7, 0, 5], S)  # the second source is all padding

    out = scaled_dot_product_attention(q, k, v, pad, fast=fast)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0.0)
    alone = scaled_dot_product_attention(q[[0]], k[[0]], v[[0]], pad[[0]], fast=fast)
    torch.testing.assert_close(out[[0]], alone, **TOL)  # other rows are unaffected
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.isfinite(attention_weights(q, k, pad)).all()


@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
def test_self_attention_with_a_cache_equals_the_full_causal_pass(fast):
    ours = _self_attention_like(_torch_mha(8), fast)
    x = torch.randn(B, T, D)
    full = ours(x, causal=True)
    cache = LayerCache()
    steps = [ours(x[:, t : t + 1], causal=True, cache=cache) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.self_k.shape == (B, H, T, D // H)


def test_attention_dropout_is_active_in_training_only():
    ours = SelfAttention(D, H, dropout=0.5)
    x = torch.randn(B, T, D)
    ours.eval()
    torch.testing.assert_close(ours(x), ours(x))
    ours.train()
    torch.manual_seed(0)
    first = ours(x)
    torch.manual_seed(1)
    assert not torch.allclose(first, ours(x))
