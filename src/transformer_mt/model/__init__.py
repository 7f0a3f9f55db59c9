"""Encoder-decoder models for translation, written from the operations up.

Read the files in this order; each builds on the one before:

    embedding.py    token embedding × √D + sinusoidal positions
    attention.py    scaled dot-product attention (SDPA kernel or explicit softmax), multi-head attention
    layers.py       feed-forward, encoder / decoder layers, encoder / decoder stacks
    cache.py        the typed key/value cache of incremental decoding
    transformer.py  the Transformer: encode(), decode(), init_cache(), cross_attention()
    rnn.py          the baseline: bidirectional GRU encoder, GRU decoder with additive attention
    base.py         what every model offers (Seq2Seq, EncoderOutput)

Shape letters, used in every shape comment and `Shape:` section of the package:

    B batch   S source length   T target length   H heads
    D model width (d_model)   Dh head width (D / H)   V vocabulary size

Mask convention, the only one: a mask is a bool tensor and True means *padding*, a key that must
receive zero attention weight. `encode()` builds `src_pad_mask = src.eq(PAD)` (B, S) once; attention
converts it to the form a kernel wants at the last moment. Target self-attention is causal only: targets
are right-padded, so a padded position never precedes a real one and is ignored by the loss.
"""

from __future__ import annotations

from transformer_mt.config import ModelConfig
from transformer_mt.model.base import PAD, EncoderOutput, Seq2Seq
from transformer_mt.model.cache import DecoderCache, LayerCache
from transformer_mt.model.rnn import RNNCache, RNNSeq2Seq
from transformer_mt.model.transformer import Transformer

__all__ = [
    "PAD",
    "DecoderCache",
    "EncoderOutput",
    "LayerCache",
    "RNNCache",
    "RNNSeq2Seq",
    "Seq2Seq",
    "Transformer",
    "build_model",
]


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    """The model `cfg.arch` names ("transformer" or "rnn"), freshly initialised.

    Raises ConfigError when `cfg.share_embeddings` is set and the vocabularies differ in size.
    """
    if cfg.arch == "rnn":
        return RNNSeq2Seq(cfg, src_vocab_size, tgt_vocab_size)
    return Transformer(cfg, src_vocab_size, tgt_vocab_size)
