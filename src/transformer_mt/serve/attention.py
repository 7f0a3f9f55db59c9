"""Every attention weight behind one translation: encoder self-attention, decoder self-attention
and cross-attention, for each layer and head.

The model's attention modules can compute their weights (`weights()`, the explicit path) but the
layers do not hand them out; forward hooks on each module catch the arguments of a teacher-forced
pass over the best translation and ask the module for the weights of exactly those arguments.
Nothing in the model changes and the hooks are gone when the pass ends.

Subword pieces can be joined into words: a word's row is the mean of its pieces' rows (where it
looks from), its column the sum of its pieces' columns (how much is looked at it), so each row
still sums to 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from transformer_mt.data.subword import WORD_START
from transformer_mt.data.vocab import BOS, EOS
from transformer_mt.errors import ConfigError
from transformer_mt.inference.translator import Translator, decode_ids, fit_source, pad_batch
from transformer_mt.model.attention import CrossAttention, SelfAttention

KINDS = ("encoder", "decoder", "cross")  # encoder self-, decoder self-, cross-attention


@dataclass
class AttentionMaps:
    """The attention of one sentence's best translation.

    Shape: encoder (L_enc, H, S, S); decoder (L_dec, H, T, T); cross (L_dec, H, T, S), where S =
    len(source), T = len(output) = len(target_in). A decoder row t is the step that produced
    output[t] from target_in[: t + 1].
    """

    source: list[str]  # source tokens, <eos> last
    target_in: list[str]  # <bos> and the translation's tokens: the decoder's input
    output: list[str]  # the translation's tokens and <eos>: what each decoder step produced
    translation: str
    encoder: np.ndarray
    decoder: np.ndarray
    cross: np.ndarray

    def as_json(self) -> dict:
        return {
            "source": self.source,
            "target_in": self.target_in,
            "output": self.output,
            "translation": self.translation,
            **{kind: rounded(getattr(self, kind)) for kind in KINDS},
        }


def rounded(weights: np.ndarray) -> list:
    return np.round(weights.astype(np.float64), 4).tolist()  # float32 would print 0.018699999


@torch.inference_mode()
def attention_maps(translator: Translator, source_ids: Sequence[int]) -> AttentionMaps:
    """Translate `source_ids` (no specials) with the translator's settings, then read every
    layer's and head's attention over that translation."""
    model = translator.model
    if model.config.arch != "transformer":
        raise ConfigError("attention maps need a Transformer checkpoint (this one is an RNN)")
    src_ids = fit_source(source_ids, model.config.max_positions)
    cfg = translator.decode_cfg
    best = decode_ids(model, [src_ids[:-1]], cfg, translator.device, translator.ban_unk)[0][0]
    src = pad_batch([src_ids], translator.device)
    tgt_in = pad_batch([[BOS, *best.tokens]], translator.device)
    maps = {kind: np.stack(weights) for kind, weights in hooked_weights(model, src, tgt_in).items()}
    tgt = translator.tgt_vocab
    return AttentionMaps(
        source=translator.src_vocab.decode(src_ids),
        target_in=tgt.decode([BOS, *best.tokens]),
        output=tgt.decode([*best.tokens, EOS]),
        translation=translator.detokenizer.detokenize(tgt.decode(best.tokens, strip=True)),
        **maps,
    )


def hooked_weights(model: nn.Module, src: Tensor, tgt_in: Tensor) -> dict[str, list[np.ndarray]]:
    """Each attention module's weights (H, Tq, Tk) during `model(src, tgt_in)`, by kind, in
    layer order. Shape: src (1, S), tgt_in (1, T)."""
    found: dict[str, list[np.ndarray]] = {kind: [] for kind in KINDS}
    modules = [
        *(("encoder", layer.self_attn) for layer in model.encoder.layers),
        *(("decoder", layer.self_attn) for layer in model.decoder.layers),
        *(("cross", layer.cross_attn) for layer in model.decoder.layers),
    ]
    handles = [
        module.register_forward_hook(recorder(found[kind]), with_kwargs=True)
        for kind, module in modules
    ]
    try:
        model(src, tgt_in)
    finally:
        for handle in handles:
            handle.remove()
    return found


def recorder(store: list[np.ndarray]):
    """A forward hook that appends the weights of the call it sees to `store`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        call = inspect.signature(module.forward).bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        if isinstance(module, CrossAttention):
            weights = module.weights(a["x"], a["memory"], a["src_pad_mask"])
        elif isinstance(module, SelfAttention):
            weights = module.weights(a["x"], a["key_pad_mask"], a["causal"])
        else:
            raise TypeError(f"no attention weights for {type(module).__name__}")
        store.append(weights[0].float().cpu().numpy())  # (1, H, Tq, Tk) -> (H, Tq, Tk)

    return hook


def word_groups(tokens: Sequence[str], subword: bool) -> list[list[int]]:
    """Positions of the tokens that form each word: with subwords a piece starting with `▁` (or a
    special such as <eos>) starts a word and the pieces after it join it; otherwise each token is
    its own word."""
    groups: list[list[int]] = []
    for i, token in enumerate(tokens):
        starts = not subword or not groups or token.startswith(WORD_START) or is_special(token)
        if starts or is_special(tokens[i - 1]):
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def is_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">")


def word_label(tokens: Sequence[str], group: Sequence[int]) -> str:
    return "".join(tokens[i] for i in group).removeprefix(WORD_START).replace(WORD_START, " ")


def join_words(weights: np.ndarray, rows: list[list[int]], cols: list[list[int]]) -> np.ndarray:
    """Weights (..., Tq, Tk) -> (..., words in rows, words in cols): rows averaged, columns summed.

    Shape: weights (..., Tq, Tk) -> (..., len(rows), len(cols)).
    """
    summed = np.stack([weights[..., group].sum(axis=-1) for group in cols], axis=-1)
    return np.stack([summed[..., group, :].mean(axis=-2) for group in rows], axis=-2)


def in_words(maps: AttentionMaps, subword: bool) -> AttentionMaps:
    """The same maps over words instead of subword pieces."""
    src = word_groups(maps.source, subword)
    tgt_in = word_groups(maps.target_in, subword)
    out = word_groups(maps.output, subword)
    return AttentionMaps(
        source=[word_label(maps.source, g) for g in src],
        target_in=[word_label(maps.target_in, g) for g in tgt_in],
        output=[word_label(maps.output, g) for g in out],
        translation=maps.translation,
        encoder=join_words(maps.encoder, src, src),
        decoder=join_words(maps.decoder, out, tgt_in),
        cross=join_words(maps.cross, out, src),
    )
