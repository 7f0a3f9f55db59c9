"""The one model a server holds: tokenize, decode a batch, read attention, describe itself.

Decoding goes through `decode_ids` and `ids_to_text`, the code `mt-translate` runs, so a sentence
gets the same translation from both for the same settings. Every call that touches the model runs
on one worker thread (`Engine.model_thread`), off the event loop; tokenizing runs on another, so
spaCy and SentencePiece never see two threads at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformer_mt.config import DecodeConfig
from transformer_mt.data.corpus import sha256_file
from transformer_mt.inference.translator import Translator, decode_ids, ids_to_text
from transformer_mt.serve.attention import attention_maps, in_words

Scored = list[tuple[str, float]]  # a sentence's n-best list: (translation, score), best first


class Engine:
    """A `Translator` with the two threads that use it and what `/info` tells about it."""

    def __init__(self, translator: Translator, checkpoint: str | os.PathLike) -> None:
        self.translator = translator
        self.checkpoint = Path(checkpoint)
        self.checkpoint_sha256 = sha256_file(self.checkpoint)
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="mt-model")
        self.text_thread = ThreadPoolExecutor(1, thread_name_prefix="mt-text")
        translator.encode([""])  # spaCy loads now, not on the first request

    @property
    def defaults(self) -> DecodeConfig:
        return self.translator.decode_cfg

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Source ids of raw sentences (call on `text_thread`)."""
        return self.translator.encode(lines)

    def decode(self, sources: Sequence[Sequence[int]], decode_cfg: DecodeConfig) -> list[Scored]:
        """n-best lists of source id lists, in input order (call on `model_thread`)."""
        t = self.translator
        nbest = decode_ids(t.model, sources, decode_cfg, t.device, t.ban_unk)
        return [
            [(ids_to_text(h.tokens, t.tgt_vocab, t.detokenizer), h.score) for h in hyps]
            for hyps in nbest
        ]

    def attention(self, source_ids: Sequence[int], words: bool) -> dict[str, Any]:
        """Every layer's and head's attention for one sentence, over pieces or over words
        (call on `model_thread`)."""
        maps = attention_maps(self.translator, source_ids)
        if words:
            maps = in_words(maps, self.translator.src_subword is not None)
        return maps.as_json()

    def info(self) -> dict[str, Any]:
        """Languages, vocabulary, model size, decoding defaults and which checkpoint this is."""
        t = self.translator
        cfg = t.model.config
        stat = self.checkpoint.stat()
        return {
            "source_language": t.src_lang,
            "target_language": t.tgt_lang,
            "lowercase": t.lowercase,
            "vocabulary": {
                "kind": t.src_subword.kind if t.src_subword else "word",
                "source_size": len(t.src_vocab),
                "target_size": len(t.tgt_vocab),
            },
            "model": {
                "arch": cfg.arch,
                "parameters": sum(p.numel() for p in t.model.parameters()),
                "d_model": cfg.d_model,
                "heads": cfg.n_heads,
                "encoder_layers": cfg.enc_layers,
                "decoder_layers": cfg.dec_layers,
                "max_positions": cfg.max_positions,
            },
            "device": str(t.device),
            "decode_defaults": {
                "beam_size": self.defaults.beam_size,
                "length_penalty": self.defaults.length_penalty,
                "nbest": self.defaults.nbest,
                "max_len_a": self.defaults.max_len_a,
                "max_len_b": self.defaults.max_len_b,
            },
            "checkpoint": {
                "path": str(self.checkpoint.resolve()),
                "sha256": self.checkpoint_sha256,
                "bytes": stat.st_size,
                "run_name": t.train_config.get("run_name"),
            },
        }

    def close(self) -> None:
        self.text_thread.shutdown(wait=True)
        self.model_thread.shutdown(wait=True)
