"""Prepare a corpus once, load it in well under a second: every split tokenized and numericalized.

`prepare(cfg)` reads the raw files of every split (corpus.py), tokenizes them (tokenize.py), learns
the vocabularies from the training split (word level, or SentencePiece subwords) and writes the
prepared cache `<data.root>/cache/<key>/` (its layout and key: cache.py). `load_prepared(cfg)` loads
it; `load_or_prepare(cfg)` prepares first when needed. A fine-tuning run passes the vocabularies
(and subword models) of the checkpoint it starts from (`Vocabularies`): they replace the ones that
would be learnt from the training split.

Training split: pairs with an empty (or whitespace-only) side are dropped, pairs longer than
`data.max_len` tokens on either side are filtered out; both are counted. Other splits keep every line,
so hypotheses stay aligned with references. Loading imports neither spaCy nor torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformer_mt.config import DataConfig
from transformer_mt.data.cache import (
    FORMAT_VERSION,
    PreparedData,
    SplitData,
    Vocabularies,
    cache_key,
    cache_root,
    existing_cache,
    key_settings,
    read_cache,
    tokenizer_version,
    write_cache,
)
from transformer_mt.data.corpus import SplitFiles, corpus_files, read_parallel
from transformer_mt.data.subword import Subword
from transformer_mt.data.tokenize import Tokenizer
from transformer_mt.data.vocab import Vocab
from transformer_mt.errors import DataError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Prepare


def prepare(cfg: DataConfig) -> Path:
    """Fetch, tokenize, numericalize and cache the corpus of `cfg`; return the cache folder.

    Does nothing but return the folder when it already exists.
    """
    return _prepare(cfg, corpus_files(cfg))


def _prepare(
    cfg: DataConfig, files: dict[str, SplitFiles], vocabs: Vocabularies | None = None
) -> Path:
    key = cache_key(cfg, files, vocabs)
    target = cache_root(cfg) / key
    if (target / "manifest.json").is_file():
        return target
    started = time.perf_counter()
    splits, counts = _tokenize(cfg, files)
    subwords = None
    if vocabs is not None:
        src_vocab, tgt_vocab = vocabs.src_vocab, vocabs.tgt_vocab
        if vocabs.src_subword is not None and vocabs.tgt_subword is not None:
            subwords = (vocabs.src_subword, vocabs.tgt_subword)
            _segment(splits, *subwords)
    elif cfg.vocab == "word":
        src_vocab, tgt_vocab = _word_vocabs(cfg, splits["train"])
    else:
        subwords = _train_subwords(cfg, splits["train"])
        _segment(splits, *subwords)
        src_vocab, tgt_vocab = subwords[0].vocab(), subwords[1].vocab()
    manifest = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "settings": key_settings(cfg),
        "tokenizer": tokenizer_version(),
        "files": {
            split: {
                "src": {"path": str(f.src), "sha256": f.src_sha256},
                "tgt": {"path": str(f.tgt), "sha256": f.tgt_sha256},
            }
            for split, f in files.items()
        },
        "splits": list(splits),
        "counts": counts,
        "vocab_sizes": {"src": len(src_vocab), "tgt": len(tgt_vocab)},
        "vocabularies": "given" if vocabs is not None else "learnt from train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    src_subword, tgt_subword = subwords or (None, None)
    numericalized = {
        name: _numericalize(name, split, src_vocab, tgt_vocab) for name, split in splits.items()
    }
    write_cache(
        PreparedData(
            target, manifest, src_vocab, tgt_vocab, numericalized, src_subword, tgt_subword
        )
    )
    log.info("prepared %s in %.1f s", target, time.perf_counter() - started)
    return target


def _word_vocabs(cfg: DataConfig, train: _TokenizedSplit) -> tuple[Vocab, Vocab]:
    if cfg.shared_vocab:
        both = [*train.src_tokens, *train.tgt_tokens]
        vocab = Vocab.build(both, cfg.min_freq, cfg.max_size)
        return vocab, vocab
    return (
        Vocab.build(train.src_tokens, cfg.min_freq, cfg.max_size),
        Vocab.build(train.tgt_tokens, cfg.min_freq, cfg.max_size),
    )


def _train_subwords(cfg: DataConfig, train: _TokenizedSplit) -> tuple[Subword, Subword]:
    """SentencePiece model(s) of the training split's tokens: one joint model when shared."""
    started = time.perf_counter()
    if cfg.shared_vocab:
        both = [*train.src_tokens, *train.tgt_tokens]
        joint = Subword.train(both, cfg.vocab, cfg.vocab_size)
        models = (joint, joint)
    else:
        models = (
            Subword.train(train.src_tokens, cfg.vocab, cfg.vocab_size),
            Subword.train(train.tgt_tokens, cfg.vocab, cfg.vocab_size),
        )
    sizes = str(len(models[0])) if cfg.shared_vocab else f"{len(models[0])} / {len(models[1])}"
    log.info(
        "trained %s %s subword model (%s pieces) in %.1f s",
        "a joint" if cfg.shared_vocab else "a per-side",
        cfg.vocab,
        sizes,
        time.perf_counter() - started,
    )
    return models


def _segment(splits: dict[str, _TokenizedSplit], src: Subword, tgt: Subword) -> None:
    """Replace every split's word tokens by their subword pieces, in place."""
    for split in splits.values():
        split.src_tokens = src.segment_many(split.src_tokens)
        split.tgt_tokens = tgt.segment_many(split.tgt_tokens)


@dataclass
class _TokenizedSplit:
    src_tokens: list[list[str]]
    tgt_tokens: list[list[str]]
    src_lines: list[str] | None  # raw text, kept for every split but train
    ref_lines: list[str] | None


def _tokenize(
    cfg: DataConfig, files: dict[str, SplitFiles]
) -> tuple[dict[str, _TokenizedSplit], dict[str, dict[str, int]]]:
    """Read and tokenize every split, cleaning the training split; return them and their counts."""
    src_tok = Tokenizer(cfg.src, cfg.lowercase)
    tgt_tok = Tokenizer(cfg.tgt, cfg.lowercase)
    splits: dict[str, _TokenizedSplit] = {}
    counts: dict[str, dict[str, int]] = {}
    for split, pair in files.items():
        src_lines, tgt_lines = read_parallel(
            pair.src, pair.tgt, allow_empty=split not in ("train", "val")
        )
        src_tokens = list(src_tok.pipe(src_lines))
        tgt_tokens = list(tgt_tok.pipe(tgt_lines))
        if split != "train":
            splits[split] = _TokenizedSplit(src_tokens, tgt_tokens, src_lines, tgt_lines)
            counts[split] = {"lines": len(src_lines), "pairs": len(src_lines)}
            continue
        src_tokens, tgt_tokens, dropped, filtered = _clean_train(
            src_tokens, tgt_tokens, cfg.max_len
        )
        log.info(
            "train: dropped %d pairs with an empty side, filtered %d pairs longer than "
            "data.max_len=%d tokens",
            dropped,
            filtered,
            cfg.max_len,
        )
        if not src_tokens:
            raise DataError(
                f"no training pairs left in {pair.src} and {pair.tgt} after dropping empty pairs "
                f"and pairs longer than data.max_len={cfg.max_len}"
            )
        splits[split] = _TokenizedSplit(src_tokens, tgt_tokens, None, None)
        counts[split] = {
            "lines": len(src_lines),
            "dropped_empty": dropped,
            "filtered_long": filtered,
            "pairs": len(src_tokens),
        }
    return splits, counts


def _clean_train(
    src_tokens: list[list[str]], tgt_tokens: list[list[str]], max_len: int
) -> tuple[list[list[str]], list[list[str]], int, int]:
    """Drop pairs with an empty side and pairs longer than `max_len`; return the rest and both counts."""
    kept_src, kept_tgt = [], []
    dropped = filtered = 0
    for src, tgt in zip(src_tokens, tgt_tokens, strict=True):
        if not src or not tgt:
            dropped += 1
        elif len(src) > max_len or len(tgt) > max_len:
            filtered += 1
        else:
            kept_src.append(src)
            kept_tgt.append(tgt)
    return kept_src, kept_tgt, dropped, filtered


def _numericalize(
    name: str, split: _TokenizedSplit, src_vocab: Vocab, tgt_vocab: Vocab
) -> SplitData:
    return SplitData(
        name,
        [src_vocab.encode(tokens) for tokens in split.src_tokens],
        [tgt_vocab.encode(tokens) for tokens in split.tgt_tokens],
        split.src_lines,
        split.ref_lines,
    )


# ---------------------------------------------------------------------------------------------
# Load


def load_prepared(cfg: DataConfig) -> PreparedData:
    """Load the prepared cache of `cfg` (run `prepare` first); applies `data.limit_train`."""
    path = existing_cache(cfg)
    if path is None:
        raise DataError(
            f"no prepared data for these data.* settings under {cache_root(cfg)}: "
            "run `python scripts/prepare_data.py` with the same settings first"
        )
    return read_cache(path, cfg)


def load_or_prepare(cfg: DataConfig, vocabs: Vocabularies | None = None) -> PreparedData:
    """Load the prepared cache of `cfg`, fetching and preparing the corpus first when needed.

    A cache built from the files already on disk is used as it is: no network access, no mirror.
    `vocabs` fixes the vocabularies instead of learning them from the training split.
    """
    path = existing_cache(cfg, vocabs)
    if path is None:
        path = _prepare(cfg, corpus_files(cfg), vocabs)
    return read_cache(path, cfg)
