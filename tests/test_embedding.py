"""Token embedding × √D and the sinusoidal positional encoding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transformer_mt.config import ModelConfig
from transformer_mt.errors import ConfigError
from transformer_mt.model import build_model
from transformer_mt.model.embedding import Embeddings, SinusoidalPositionalEncoding, sinusoid_table

pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_matches_the_closed_form_at_hand_checked_entries():
    # D = 8: the frequencies are 1 / 10000^(2i/8) = 1, 1/10, 1/100, 1/1000 for i = 0..3.
    table = sinusoid_table(16, 8)
    assert table.shape == (16, 8)
    assert table[0].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # sin 0, cos 0
    expected = {
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (3, 2): math.sin(0.3),  # 3 / 10
        (3, 3): math.cos(0.3),
        (5, 4): math.sin(0.05),  # 5 / 100
        (5, 7): math.cos(0.005),  # 5 / 1000
        (15, 6): math.sin(0.015),
    }
    for (pos, dim), value in expected.items():
        assert table[pos, dim].item() == pytest.approx(value, abs=1e-7), (pos, dim)


def test_table_with_an_odd_width_has_one_cosine_column_fewer():
    table = sinusoid_table(4, 5)
    assert table.shape == (4, 5)
    assert table[2, 4].item() == pytest.approx(math.sin(2 / 10000 ** (4 / 5)), abs=1e-7)
    assert table[2, 3].item() == pytest.approx(math.cos(2 / 10000 ** (2 / 5)), abs=1e-7)


def test_positional_table_is_a_buffer_not_a_parameter_nor_saved():
    pe = SinusoidalPositionalEncoding(8, 32)
    assert list(pe.parameters()) == []
    assert [name for name, _ in pe.named_buffers()] == ["table"]
    assert pe.state_dict() == {}  # recomputed from D and max_positions, not stored in checkpoints
    model = build_model(ModelConfig(d_model=8, n_heads=2, enc_layers=1, dec_layers=1, d_ff=8), 9, 9)
    assert not any("table" in name for name in model.state_dict())


def test_embeddings_scale_tokens_by_sqrt_d_and_add_positions_from_start():
    torch.manual_seed(0)
    token = nn.Embedding(10, 8)
    embed = Embeddings(token, SinusoidalPositionalEncoding(8, 32), dropout=0.0)
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    table = sinusoid_table(32, 8)

    out = embed(tokens)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, token.weight[tokens] * math.sqrt(8) + table[:3])

    shifted = embed(tokens[:, :1], start=5)  # one decoding step after 5 cached positions
    torch.testing.assert_close(shifted, token.weight[tokens[:, :1]] * math.sqrt(8) + table[5:6])


def test_sequence_longer_than_the_table_is_a_clear_error():
    pe = SinusoidalPositionalEncoding(8, 10)
    assert pe(10).shape == (10, 8)  # exactly max_positions fits
    assert pe(1, start=9).shape == (1, 8)
    with pytest.raises(ConfigError, match=r"needs 11 positions but model.max_positions=10"):
        pe(11)
    with pytest.raises(ConfigError, match=r"needs 11 positions"):
        pe(1, start=10)


def test_model_refuses_to_decode_past_max_positions():
    cfg = ModelConfig(d_model=8, n_heads=2, enc_layers=1, dec_layers=1, d_ff=8, max_positions=4)
    model = build_model(cfg, 9, 9).eval()
    src = torch.tensor([[4, 5, 3]])
    enc = model.encode(src)
    cache = model.init_cache(enc)
    for _ in range(4):
        model.decode(torch.tensor([[2]]), enc, cache)
    with pytest.raises(ConfigError, match="model.max_positions=4"):
        model.decode(torch.tensor([[2]]), enc, cache)
    with pytest.raises(ConfigError, match="model.max_positions=4"):
        model.encode(torch.tensor([[4, 5, 6, 7, 3]]))
