"""From sentences to translations: tokenize → numericalize → search → detokenize.

`translate_ids` is the one decoding routine of the package: validation during training, `evaluate` and
`translate` all go through it, so the three report the same translations for the same settings.
`Translator` wraps it with what a checkpoint holds (model, vocabularies, tokenizer settings).

Sentences longer than the model can take are truncated, with a warning on stderr: a Transformer
reads at most `model.max_positions` source tokens (its final EOS included), so only the first
`max_positions - 1` tokens are translated; outputs are likewise capped at `max_positions - 1` tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transformer_mt.checkpoint import load_checkpoint, unwrap_model
from transformer_mt.config import DecodeConfig, ModelConfig, to_dataclass
from transformer_mt.data.subword import Subword, subwords_from_state
from transformer_mt.data.tokenize import Detokenizer, Tokenizer
from transformer_mt.data.vocab import BOS, EOS, PAD, Vocab
from transformer_mt.devices import resolve_device
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.inference.search import Hypothesis, search
from transformer_mt.model import build_model

log = logging.getLogger(__name__)


def max_source_tokens(model: Any) -> int | None:
    """Longest source (EOS included) the model can read; None when it has no limit (the RNN)."""
    cfg = model.config
    return cfg.max_positions if cfg.arch == "transformer" else None


def fit_source(ids: Sequence[int], max_tokens: int | None) -> list[int]:
    """`ids + [EOS]`, cut to `max_tokens` tokens (with a warning) when it is longer."""
    if max_tokens is not None and len(ids) + 1 > max_tokens:
        log.warning(
            "a source sentence of %d tokens is longer than the model reads (%d with EOS): "
            "translating its first %d tokens only",
            len(ids),
            max_tokens,
            max_tokens - 1,
        )
        ids = ids[: max_tokens - 1]
    return [*ids, EOS]


def pad_batch(sequences: Sequence[Sequence[int]], device: torch.device) -> Tensor:
    """Right-pad id lists with PAD into one (B, S) tensor."""
    batch = torch.full((len(sequences), max(map(len, sequences))), PAD, dtype=torch.long)
    for row, ids in enumerate(sequences):
        batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return batch.to(device)


def decode_ids(
    model: Any,
    sources: Sequence[Sequence[int]],
    decode_cfg: DecodeConfig,
    device: torch.device | str,
    ban_unk: bool = False,
) -> list[list[Hypothesis]]:
    """Search every source sentence (ids without specials); n-best lists in input order.

    Sentences are decoded longest first, which keeps padding small, in batches of at most
    `decode_cfg.batch_size` sentences and `decode_cfg.max_tokens` padded source tokens x beam size
    (`decode_batches`); an empty source gives one empty hypothesis without running the model. The
    model is put in eval mode for the search and back in its previous mode afterwards; a
    DistributedDataParallel or torch.compile wrapper is looked through (decoding calls
    encode/decode directly).
    `ban_unk` keeps UNK out of the output (subword vocabularies never train on it).
    """
    model = unwrap_model(model)
    limit = max_source_tokens(model)
    results: list[list[Hypothesis]] = [[Hypothesis([], 0.0)] for _ in sources]
    order = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: -len(sources[i]))
    was_training = model.training
    model.eval()
    fitted = {i: fit_source(sources[i], limit) for i in order}
    try:
        for rows in decode_batches(order, [len(fitted[i]) for i in order], decode_cfg):
            src = pad_batch([fitted[i] for i in rows], torch.device(device))
            out_limit = None if limit is None else limit - 1
            for i, hyps in zip(
                rows,
                search(model, src, decode_cfg, max_len_limit=out_limit, ban_unk=ban_unk),
                strict=True,
            ):
                results[i] = hyps
    finally:
        model.train(was_training)
    return results


def decode_batches(
    order: Sequence[int], lengths: Sequence[int], decode_cfg: DecodeConfig
) -> Iterator[list[int]]:
    """Consecutive runs of `order` (sentence indices, longest first; `lengths[k]` is the source
    length of `order[k]`, EOS included): each at most `batch_size` sentences, and at most
    `max_tokens` padded source tokens x beam size unless it is a single sentence."""
    rows: list[int] = []
    longest = 0
    for index, length in zip(order, lengths, strict=True):
        wider = max(longest, length)
        too_many = (len(rows) + 1) * wider * decode_cfg.beam_size > decode_cfg.max_tokens
        if rows and (len(rows) == decode_cfg.batch_size or too_many):
            yield rows
            rows, wider = [], length
        rows.append(index)
        longest = wider
    if rows:
        yield rows


def ids_to_text(ids: Sequence[int], tgt_vocab: Vocab, detokenizer: Detokenizer) -> str:
    """Detokenized text of generated ids (specials stripped; `<unk>` stays visible)."""
    return detokenizer.detokenize(tgt_vocab.decode(ids, strip=True))


def translate_ids(
    model: Any,
    sources: Sequence[Sequence[int]],
    tgt_vocab: Vocab,
    detokenizer: Detokenizer,
    decode_cfg: DecodeConfig,
    device: torch.device | str,
) -> list[str]:
    """Best translation of each source (token ids without BOS/EOS), detokenized, in input order.

    The routine validation, evaluate and translate share (see `decode_ids` for batching). With a
    subword detokenizer, UNK is never generated.
    """
    nbest = decode_ids(model, sources, decode_cfg, device, detokenizer.subword is not None)
    return [ids_to_text(hyps[0].tokens, tgt_vocab, detokenizer) for hyps in nbest]


def with_overrides(cfg: DecodeConfig, overrides: dict[str, Any]) -> DecodeConfig:
    """`cfg` with `overrides` (`decode.*` names); a ConfigError names an unknown or invalid one."""
    if not overrides:
        return cfg
    known = {f.name for f in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"unknown decoding setting {unknown[0]!r}: use one of {', '.join(sorted(known))}"
        )
    return dataclasses.replace(cfg, **overrides)


@dataclass
class AttentionMap:
    """Cross-attention of one translation: `weights[t, s]` is how much output token t attended to
    source token s (last decoder layer, mean over heads). Both token lists end with `<eos>`.

    Shape: weights (T, S) with T = len(output_tokens), S = len(source_tokens).
    """

    weights: np.ndarray
    source_tokens: list[str]
    output_tokens: list[str]


class Translator:
    """A trained model with its vocabularies and tokenizers: raw sentences in, translations out."""

    def __init__(
        self,
        model: Any,
        src_vocab: Vocab,
        tgt_vocab: Vocab,
        src_lang: str,
        tgt_lang: str,
        lowercase: bool,
        decode_cfg: DecodeConfig,
        device: torch.device,
        train_config: dict[str, Any] | None = None,
        src_subword: Subword | None = None,
        tgt_subword: Subword | None = None,
    ) -> None:
        self.model = model.to(device).eval()
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab
        self.src_lang = src_lang
        self.tgt_lang = tgt_lang
        self.lowercase = lowercase
        self.decode_cfg = decode_cfg
        self.device = device
        self.train_config = train_config or {}  # the resolved config of the run that trained it
        self.src_subword = src_subword  # None for a word-level model
        self.tgt_subword = tgt_subword
        self.detokenizer = Detokenizer(tgt_lang, tgt_subword)
        self._tokenizer: Tokenizer | None = None  # spaCy loads on first use only

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str = "auto",
        decode_cfg: DecodeConfig | None = None,
    ) -> Translator:
        """Load a checkpoint once and rebuild its model, vocabularies and tokenizer settings.

        `decode_cfg=None` takes the decoding settings the checkpoint's run validated with.
        Raises CheckpointError (naming the file) when it is missing, corrupt or does not fit.
        """
        try:
            payload = load_checkpoint(path)
        except CheckpointError:
            raise
        except Exception as err:  # torch's unpickler fails in many ways on a file of another kind
            raise CheckpointError(
                f"{path} is not a readable checkpoint ({type(err).__name__})"
            ) from None
        try:
            model_cfg = to_dataclass(ModelConfig, payload["model_config"])
            src_vocab, tgt_vocab = Vocab(payload["src_vocab"]), Vocab(payload["tgt_vocab"])
            model = build_model(model_cfg, len(src_vocab), len(tgt_vocab))
            model.load_state_dict(payload["model"])
            tokenizer = payload["tokenizer"]
            src_lang, tgt_lang = tokenizer["src_lang"], tokenizer["tgt_lang"]
            lowercase = bool(tokenizer["lowercase"])
            src_subword, tgt_subword = subwords_from_state(tokenizer.get("subword"))
        except (ConfigError, ValueError, RuntimeError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            raise CheckpointError(f"{path} does not hold a usable model ({first})") from None
        if decode_cfg is None:
            stored = (payload.get("config") or {}).get("decode")
            decode_cfg = to_dataclass(DecodeConfig, stored) if stored else DecodeConfig()
        return cls(
            model,
            src_vocab,
            tgt_vocab,
            src_lang,
            tgt_lang,
            lowercase,
            decode_cfg,
            resolve_device(device),
            payload.get("config"),
            src_subword,
            tgt_subword,
        )

    @property
    def ban_unk(self) -> bool:
        return self.tgt_subword is not None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.src_lang, self.lowercase, self.src_subword)
        return self._tokenizer

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Source token ids of raw sentences (no specials; an empty line gives [])."""
        return [self.src_vocab.encode(tokens) for tokens in self.tokenizer.pipe(lines)]

    def translate(self, lines: str | Sequence[str], **decode: Any) -> str | list[str]:
        """Translate one sentence (a str gives a str) or many (one translation per line, in order).

        `decode` overrides the decoding settings for this call, by their `decode.*` names:
        `beam_size=5`, `length_penalty=1.0`, `max_len_a=...`, `batch_size=...`. An empty line
        gives an empty translation.
        """
        single = isinstance(lines, str)
        out = self.translate_ids(self.encode([lines] if single else lines), **decode)
        return out[0] if single else out

    def translate_ids(self, sources: Sequence[Sequence[int]], **decode: Any) -> list[str]:
        """Translations of already numericalized sources (ids without specials)."""
        return translate_ids(
            self.model, sources, self.tgt_vocab, self.detokenizer, self._decode(decode), self.device
        )

    def _decode(self, overrides: dict[str, Any]) -> DecodeConfig:
        return with_overrides(self.decode_cfg, overrides)

    def translate_nbest(self, lines: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Up to `decode_cfg.nbest` (translation, score) pairs per line, best first.

        The score is the hypothesis' log-probability divided by the GNMT length penalty (higher is
        better; 0.0 under greedy search, which does not score alternatives).
        """
        nbest = decode_ids(
            self.model, self.encode(lines), self.decode_cfg, self.device, self.ban_unk
        )
        return [
            [(ids_to_text(h.tokens, self.tgt_vocab, self.detokenizer), h.score) for h in hyps]
            for hyps in nbest
        ]

    @torch.inference_mode()
    def attention(self, line: str) -> AttentionMap:
        """Translate one sentence and return the cross-attention behind its best translation."""
        src_ids = fit_source(self.encode([line])[0], max_source_tokens(self.model))
        best = decode_ids(self.model, [src_ids[:-1]], self.decode_cfg, self.device, self.ban_unk)[
            0
        ][0]
        src = pad_batch([src_ids], self.device)
        tgt_in = pad_batch([[BOS, *best.tokens]], self.device)
        weights = self.model.cross_attention(src, tgt_in)[0]  # (T, S)
        return AttentionMap(
            weights.float().cpu().numpy(),
            self.src_vocab.decode(src_ids),
            self.tgt_vocab.decode([*best.tokens, EOS]),
        )
