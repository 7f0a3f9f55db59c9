"""The Transformer: layers against torch.nn, padding, causality, the KV cache, sizes and options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_support import (
    SRC_VOCAB,
    TGT_VOCAB,
    loss_before_and_after_steps,
    padded_batch,
    seeded_model,
)
from torch import nn

from transformer_mt.cli.common import report_user_errors
from transformer_mt.config import ModelConfig
from transformer_mt.errors import ConfigError
from transformer_mt.model import (
    PAD,
    DecoderCache,
    EncoderOutput,
    RNNSeq2Seq,
    Transformer,
    build_model,
)
from transformer_mt.model.attention import CrossAttention, SelfAttention
from transformer_mt.model.layers import DecoderLayer, EncoderLayer

TOL = {"atol": 1e-5, "rtol": 1e-5}
TINY = ModelConfig(
    name="tiny", d_model=32, n_heads=4, enc_layers=2, dec_layers=2, d_ff=64, dropout=0.0
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


# --- equality with torch.nn layers ---------------------------------------------------------------


def _randomise(module: nn.Module, seed: int) -> None:
    """Random values in every parameter (biases and LayerNorms included), so copies are tested."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.2)


def _copy_self_attention(ours: SelfAttention, mha: nn.MultiheadAttention) -> None:
    ours.qkv_proj.weight.copy_(mha.in_proj_weight)
    ours.qkv_proj.bias.copy_(mha.in_proj_bias)
    ours.out_proj.load_state_dict(mha.out_proj.state_dict())


def _copy_cross_attention(ours: CrossAttention, mha: nn.MultiheadAttention) -> None:
    d = ours.q_proj.in_features
    ours.q_proj.weight.copy_(mha.in_proj_weight[:d])
    ours.q_proj.bias.copy_(mha.in_proj_bias[:d])
    ours.kv_proj.weight.copy_(mha.in_proj_weight[d:])
    ours.kv_proj.bias.copy_(mha.in_proj_bias[d:])
    ours.out_proj.load_state_dict(mha.out_proj.state_dict())


def _copy_common(ours: EncoderLayer | DecoderLayer, ref: nn.Module) -> None:
    ours.ffn.linear1.load_state_dict(ref.linear1.state_dict())
    ours.ffn.linear2.load_state_dict(ref.linear2.state_dict())
    ours.norm1.load_state_dict(ref.norm1.state_dict())
    ours.norm2.load_state_dict(ref.norm2.state_dict())


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
def test_encoder_layer_equals_torch_transformer_encoder_layer(pre_norm, fast):
    cfg = _tiny(pre_norm=pre_norm, fast_attention=fast)
    ref = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, batch_first=True, norm_first=pre_norm
    )
    _randomise(ref, 1)
    ours = EncoderLayer(cfg)
    with torch.no_grad():
        _copy_self_attention(ours.self_attn, ref.self_attn)
        _copy_common(ours, ref)
    ref.eval(), ours.eval()
    x = torch.randn(3, 6, cfg.d_model)
    pad = torch.tensor([[0] * 6, [0] * 4 + [1] * 2, [0] * 5 + [1]], dtype=torch.bool)

    torch.testing.assert_close(ours(x, pad), ref(x, src_key_padding_mask=pad), **TOL)


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("fast", [True, False], ids=["sdpa", "explicit"])
def test_decoder_layer_equals_torch_transformer_decoder_layer(pre_norm, fast):
    cfg = _tiny(pre_norm=pre_norm, fast_attention=fast)
    ref = nn.TransformerDecoderLayer(
        cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=0.0, batch_first=True, norm_first=pre_norm
    )
    _randomise(ref, 2)
    ours = DecoderLayer(cfg)
    with torch.no_grad():
        _copy_self_attention(ours.self_attn, ref.self_attn)
        _copy_cross_attention(ours.cross_attn, ref.multihead_attn)
        _copy_common(ours, ref)
        ours.norm3.load_state_dict(ref.norm3.state_dict())
    ref.eval(), ours.eval()
    x, memory = torch.randn(3, 5, cfg.d_model), torch.randn(3, 6, cfg.d_model)
    pad = torch.tensor([[0] * 6, [0] * 4 + [1] * 2, [0] * 5 + [1]], dtype=torch.bool)
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=pad, tgt_is_causal=True)
    torch.testing.assert_close(ours(x, EncoderOutput(memory, pad)), expected, **TOL)


# --- behaviour of the whole model ----------------------------------------------------------------

VARIANTS = {
    "post-norm": _tiny(),
    "pre-norm": _tiny(pre_norm=True),
    "explicit": _tiny(fast_attention=False),
}


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_interface_shapes(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    enc = model.encode(src)
    assert enc.memory.shape == (3, 6, cfg.d_model)
    assert torch.equal(enc.src_pad_mask, src.eq(PAD))
    assert model(src, tgt).shape == (3, 5, TGT_VOCAB)
    assert model.decode(tgt, enc).shape == (3, 5, TGT_VOCAB)
    assert model.config is cfg
    assert model.pad_idx == 0


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_appending_source_padding_changes_no_output(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    longer = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    real = ~src.eq(PAD)

    memory, memory_longer = model.encode(src).memory, model.encode(longer).memory[:, :6]
    torch.testing.assert_close(memory[real], memory_longer[real], **TOL)
    torch.testing.assert_close(model(src, tgt), model(longer, tgt), **TOL)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_changing_target_token_t_changes_no_output_before_t(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    logits = model(src, tgt)
    for t in range(1, 5):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % (TGT_VOCAB - 4) + 4  # another real token
        logits_changed = model(src, changed)
        torch.testing.assert_close(logits_changed[:, :t], logits[:, :t], **TOL)
        assert not torch.allclose(logits_changed[:, t], logits[:, t])  # position t itself moves


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_cached_step_by_step_decoding_equals_the_full_forward(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    full = model(src, tgt)
    enc = model.encode(src)
    cache = model.init_cache(enc)
    assert isinstance(cache, DecoderCache)
    steps = [model.decode(tgt[:, t : t + 1], enc, cache) for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.length == 5
    assert cache.layers[0].self_k.shape == (3, cfg.n_heads, 5, cfg.d_model // cfg.n_heads)
    assert cache.layers[0].cross_k.shape == (3, cfg.n_heads, 6, cfg.d_model // cfg.n_heads)


def test_cache_accepts_several_new_positions_at_once():
    model = seeded_model(TINY)
    src, tgt = padded_batch()
    full = model(src, tgt)
    enc = model.encode(src)
    cache = model.init_cache(enc)
    parts = [tgt[:, :2], tgt[:, 2:4], tgt[:, 4:]]  # a prefix, then two new positions, then one
    steps = [model.decode(part, enc, cache) for part in parts]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_cache_reorder_follows_the_batch(cfg):
    model = seeded_model(cfg)
    src, tgt = padded_batch()
    enc = model.encode(src)
    cache = model.init_cache(enc)
    for t in range(2):
        model.decode(tgt[:, t : t + 1], enc, cache)

    # A permutation, then a beam-style expansion that repeats rows.
    for rows in (torch.tensor([2, 0, 1]), torch.tensor([0, 0, 1, 2, 2, 2])):
        cache_rows = model.init_cache(enc)
        for t in range(2):
            model.decode(tgt[:, t : t + 1], enc, cache_rows)
        cache_rows.reorder(rows)
        enc_rows = enc.index_select(rows)
        tgt_rows = tgt[rows]
        steps = [model.decode(tgt_rows[:, t : t + 1], enc_rows, cache_rows) for t in range(2, 5)]
        expected = model(src[rows], tgt_rows)[:, 2:]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_sdpa_and_explicit_models_give_the_same_logits():
    fast, explicit = seeded_model(_tiny()), seeded_model(_tiny(fast_attention=False), seed=9)
    explicit.load_state_dict(fast.state_dict())
    src, tgt = padded_batch()
    torch.testing.assert_close(fast(src, tgt), explicit(src, tgt), **TOL)


@pytest.mark.parametrize("cfg", VARIANTS.values(), ids=VARIANTS.keys())
def test_no_nan_when_a_whole_source_row_is_padding(cfg):
    model = seeded_model(cfg).train()
    src, tgt = padded_batch()
    src[1] = PAD
    logits = model(src, tgt)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cross_attention_weights_cover_real_source_positions_only():
    model = seeded_model(TINY)
    src, tgt = padded_batch()
    attn = model.cross_attention(src, tgt)
    assert attn.shape == (3, 5, 6)
    assert torch.all(attn.masked_select(src.eq(PAD)[:, None, :].expand_as(attn)) == 0.0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 5), **TOL)


def test_training_steps_reduce_the_loss():
    model = seeded_model(_tiny(dropout=0.1)).train()
    src, tgt = padded_batch()
    first, last = loss_before_and_after_steps(model, src, tgt, lr=3e-3)
    assert last < 0.5 * first


# --- size and weight sharing ---------------------------------------------------------------------


def test_base_parameter_count_matches_the_hand_computation():
    # base: D=512, 6+6 layers, 8 heads, FFN 2048, tied output; Multi30k-like vocabularies
    # (about 8k German and 6k English types at min_freq=2): source 8,000, target 6,000.
    cfg = ModelConfig()  # the defaults are the base preset
    d, d_ff, src_vocab, tgt_vocab = 512, 2048, 8000, 6000
    attention = 4 * (d * d + d)  # Q, K, V and output projections, weights and biases
    ffn = (d * d_ff + d_ff) + (d_ff * d + d)
    layer_norm = 2 * d
    encoder_layer = attention + ffn + 2 * layer_norm
    decoder_layer = 2 * attention + ffn + 3 * layer_norm
    embeddings = src_vocab * d + tgt_vocab * d
    output = 0  # tied: the output projection is the target embedding table
    expected = embeddings + 6 * encoder_layer + 6 * decoder_layer + output
    assert expected == 51_306_496

    with torch.device("meta"):  # sizes only: no memory, no initialisation work
        model = build_model(cfg, src_vocab, tgt_vocab)
        reference = nn.Transformer(d, 8, 6, 6, d_ff, batch_first=True)
        untied = build_model(dataclasses.replace(cfg, tie_output=False), src_vocab, tgt_vocab)
    count = sum(p.numel() for p in model.parameters())
    print(f"base, vocabularies {src_vocab}/{tgt_vocab}, tied output: {count:,} parameters")
    assert count == expected

    # The layer stacks alone are torch.nn.Transformer's, less its two final LayerNorms.
    layers = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name)
    assert layers == sum(p.numel() for p in reference.parameters()) - 2 * layer_norm

    assert sum(p.numel() for p in untied.parameters()) == expected + d * tgt_vocab


def test_tied_output_and_shared_embeddings_share_one_parameter():
    tied = seeded_model(_tiny(tie_output=True))
    assert tied.output_proj.weight is tied.decoder.embed.token.weight
    assert tied.encoder.embed.token.weight is not tied.decoder.embed.token.weight

    torch.manual_seed(0)
    shared = build_model(_tiny(share_embeddings=True, tie_output=True), 20, 20)
    table = shared.decoder.embed.token.weight
    assert shared.encoder.embed.token.weight is table
    assert shared.output_proj.weight is table
    assert (
        sum(p.numel() for p in shared.parameters())
        == sum(p.numel() for p in build_model(_tiny(tie_output=True), 20, 20).parameters())
        - 20 * TINY.d_model
    )

    untied = seeded_model(_tiny(tie_output=False))
    assert untied.output_proj.weight is not untied.decoder.embed.token.weight


def test_state_dict_round_trip_keeps_the_sharing():
    cfg = _tiny(share_embeddings=True)
    source, target = build_model(cfg, 20, 20), build_model(cfg, 20, 20)
    target.load_state_dict(source.state_dict())
    assert target.encoder.embed.token.weight is target.output_proj.weight
    src, tgt = padded_batch()
    src, tgt = src.clamp(max=19), tgt.clamp(max=19)
    torch.testing.assert_close(source.eval()(src, tgt), target.eval()(src, tgt))


def test_sharing_embeddings_with_unequal_vocabularies_is_a_clear_error(capsys):
    cfg = _tiny(share_embeddings=True)
    with pytest.raises(
        ConfigError, match=r"source has 23 tokens, target 19.*data.shared_vocab=true"
    ):
        build_model(cfg, SRC_VOCAB, TGT_VOCAB)

    with pytest.raises(SystemExit) as exit_info:  # as an entry point reports it
        report_user_errors(build_model)(cfg, SRC_VOCAB, TGT_VOCAB)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.share_embeddings needs one vocabulary")
    assert "\n" not in err


def test_build_model_picks_the_architecture():
    assert isinstance(build_model(TINY, 9, 9), Transformer)
    rnn = build_model(_tiny(arch="rnn"), 9, 9)
    assert isinstance(rnn, RNNSeq2Seq)
