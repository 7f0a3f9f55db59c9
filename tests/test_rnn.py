"""The GRU baseline behind the same interface: cache, reorder, padding, attention, options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_support import (
    TGT_VOCAB,
    loss_before_and_after_steps,
    padded_batch,
    seeded_model,
)

from transformer_mt.config import ModelConfig
from transformer_mt.errors import ConfigError
from transformer_mt.model import PAD, RNNCache, build_model

TOL = {"atol": 1e-5, "rtol": 1e-5}
RNN = ModelConfig(name="rnn", arch="rnn", d_model=16, enc_layers=1, dec_layers=1, dropout=0.0)
VARIANTS = {
    "1-layer": RNN,
    "2-layers": dataclasses.replace(RNN, enc_layers=2, dec_layers=2),
    "input-feeding": dataclasses.replace(RNN, input_feeding=True, enc_layers=2, dec_layers=1),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_interface_shapes(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    enc = model.encode(src)
    assert enc.memory.shape == (3, 6, cfg.d_model)
    assert torch.equal(enc.src_pad_mask, src.eq(PAD))
    assert torch.all(enc.memory[enc.src_pad_mask] == 0.0)
    assert model(src, tgt).shape == (3, 5, TGT_VOCAB)
    assert model.cross_attention(src, tgt).shape == (3, 5, 6)
    assert model.pad_idx == 0 and model.config is cfg


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_step_by_step_decoding_equals_the_full_forward(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    full = model(src, tgt)
    enc = model.encode(src)
    cache = model.init_cache(enc)
    assert isinstance(cache, RNNCache)
    steps = [model.decode(tgt[:, t : t + 1], enc, cache) for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.length == 5


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_cache_reorder_follows_the_batch(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    enc = model.encode(src)
    for rows in (torch.tensor([2, 0, 1]), torch.tensor([1, 1, 0, 2, 2])):
        cache = model.init_cache(enc)
        for t in range(2):
            model.decode(tgt[:, t : t + 1], enc, cache)
        cache.reorder(rows)
        enc_rows, tgt_rows = enc.index_select(rows), tgt[rows]
        steps = [model.decode(tgt_rows[:, t : t + 1], enc_rows, cache) for t in range(2, 5)]
        torch.testing.assert_close(
            torch.cat(steps, dim=1), model(src[rows], tgt_rows)[:, 2:], **TOL
        )


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_appending_source_padding_changes_no_output(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    longer = torch.cat([src, torch.full((3, 3), PAD)], dim=1)
    torch.testing.assert_close(model.encode(longer).memory[:, :6], model.encode(src).memory, **TOL)
    torch.testing.assert_close(model(longer, tgt), model(src, tgt), **TOL)


def test_changing_target_token_t_changes_no_output_before_t():
    model = seeded_model(RNN)
    src, tgt = padded_batch()
    logits = model(src, tgt)
    changed = tgt.clone()
    changed[:, 3] = (changed[:, 3] - 3) % (TGT_VOCAB - 4) + 4
    logits_changed = model(src, changed)
    torch.testing.assert_close(logits_changed[:, :3], logits[:, :3], **TOL)
    assert not torch.allclose(logits_changed[:, 3], logits[:, 3])


def test_attention_weights_cover_real_source_positions_only():
    model = seeded_model(RNN)
    src, tgt = padded_batch()
    attn = model.cross_attention(src, tgt)
    assert torch.all(attn.masked_select(src.eq(PAD)[:, None, :].expand_as(attn)) == 0.0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 5), **TOL)


def test_no_nan_when_a_whole_source_row_is_padding():
    model = seeded_model(VARIANTS["input-feeding"]).train()
    src, tgt = padded_batch()
    src[1] = PAD
    logits = model(src, tgt)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_training_steps_reduce_the_loss():
    model = seeded_model(dataclasses.replace(RNN, dropout=0.1)).train()
    src, tgt = padded_batch()
    first, last = loss_before_and_after_steps(model, src, tgt, lr=1e-2)
    assert last < 0.5 * first


def test_tied_and_shared_embeddings_share_one_parameter():
    tied = build_model(dataclasses.replace(RNN, tie_output=True, share_embeddings=True), 20, 20)
    assert tied.output_proj.weight is tied.tgt_embed.weight
    assert tied.src_embed is tied.tgt_embed
    with pytest.raises(ConfigError, match="data.shared_vocab=true"):
        build_model(dataclasses.replace(RNN, share_embeddings=True), 20, 21)


def test_odd_width_is_refused_for_the_bidirectional_encoder():
    with pytest.raises(ConfigError, match=r"model.d_model=15 must be even for arch=rnn"):
        dataclasses.replace(RNN, d_model=15, n_heads=1)
