"""Prepare a corpus of any size once, then load it in constant time: every split tokenized and
numericalized into memory-mapped arrays.

`prepare(cfg)` streams the raw files of every split (corpus.py) in chunks of lines through a pool
of `data.workers` processes (workers.py) and writes the prepared cache `<data.root>/cache/<key>/`
(its layout and key: cache.py). Two passes, each a pipeline of chunks, results kept in order:

    1. read a chunk of pairs (one text a side) -> spaCy tokens (workers) -> clean (train) ->
       append to a token file, count word tokens (word vocabularies)
    2. vocabularies: the word counts, or a SentencePiece model trained on a uniform sample of at
       most `data.subword_sample` training sentences (all of them when the corpus is smaller)
    3. read a chunk of token lines -> ids (workers) -> append to the split's id arrays

Memory is a few chunks, the vocabularies and the subword sample, whatever the corpus size; the
token files are temporary, inside the folder being built. `load_prepared(cfg)` loads the cache;
`load_or_prepare(cfg)` prepares first when needed; `wait_for_prepared(cfg)` is how the other
processes of a torchrun job wait for the one that prepares. A fine-tuning run passes the
vocabularies (and subword models) of the checkpoint it starts from (`Vocabularies`): they replace
the ones that would be learnt from the training split.

Training split: pairs with an empty (or whitespace-only) side are dropped, pairs longer than
`data.max_len` tokens on either side are filtered out; both are counted. Other splits keep every line,
so hypotheses stay aligned with references. Loading imports neither spaCy nor torch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transformer_mt.config import DataConfig
from transformer_mt.data.cache import (
    FORMAT_VERSION,
    IdsWriter,
    PreparedData,
    Vocabularies,
    cache_key,
    cache_root,
    existing_cache,
    ids_dtype,
    key_settings,
    read_cache,
    tokenizer_version,
    word_max_size,
    write_json,
)
from transformer_mt.data.corpus import (
    SplitFiles,
    corpus_files,
    parallel_text_chunks,
    remember_checksums,
    split_text,
)
from transformer_mt.data.subword import Subword
from transformer_mt.data.tokenize import check_language
from transformer_mt.data.vocab import Vocab
from transformer_mt.data.workers import (
    ChunkPool,
    encode_chunk,
    resolve_workers,
    start_encoding,
    start_tokenizing,
    tokenize_chunk,
)
from transformer_mt.errors import DataError
from transformer_mt.files import atomic_directory

log = logging.getLogger(__name__)

SAMPLE_SEED = 1234  # which sentences SentencePiece trains on, when it trains on a sample
WAIT_POLL_S = 2.0

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
    for lang in (cfg.src, cfg.tgt):
        check_language(lang)  # here, before anything is written or a worker starts
    started = time.perf_counter()
    workers = resolve_workers(cfg.workers, _corpus_bytes(files))
    _warn_about_word_cap(cfg)
    try:
        with atomic_directory(target) as building:
            tokens = building / ".tokens"
            tokens.mkdir()
            # 1. spaCy tokens of every split, in token files; word counts of the training split.
            counting = vocabs is None and cfg.vocab == "word"
            args = (cfg.src, cfg.tgt, cfg.lowercase, cfg.max_len)
            with ChunkPool(workers, start_tokenizing, args) as pool:
                tokenized = {
                    name: _tokenize_split(name, pair, pool, tokens, counting)
                    for name, pair in files.items()
                }
            log.info("tokenized every split in %.1f s", time.perf_counter() - started)
            counts = {name: split.counts for name, split in tokenized.items()}
            # 2. The vocabularies.
            subwords = None
            if vocabs is not None:
                src_vocab, tgt_vocab = vocabs.src_vocab, vocabs.tgt_vocab
                if vocabs.src_subword is not None and vocabs.tgt_subword is not None:
                    subwords = (vocabs.src_subword, vocabs.tgt_subword)
            elif cfg.vocab == "word":
                src_vocab, tgt_vocab = _word_vocabs(cfg, tokenized["train"])
            else:
                subwords = _train_subwords(cfg, tokens, counts["train"]["pairs"], workers)
                src_vocab, tgt_vocab = subwords[0].vocab(), subwords[1].vocab()
            # 3. Ids of every split, appended chunk by chunk.
            encoding = time.perf_counter()
            dtypes = (ids_dtype(len(src_vocab)), ids_dtype(len(tgt_vocab)))
            state = None if subwords is None else (cfg.vocab, *(s.to_bytes() for s in subwords))
            args = (src_vocab.to_list(), tgt_vocab.to_list(), state, tuple(map(str, dtypes)))
            with ChunkPool(workers, start_encoding, args) as pool:
                for name in files:
                    for side, dtype in zip(("src", "tgt"), dtypes, strict=True):
                        _encode_side(name, side, dtype, pool, tokens, building)
            log.info("encoded every split's ids in %.1f s", time.perf_counter() - encoding)
            _write_vocabularies(building, src_vocab, tgt_vocab, subwords)
            for name, split in tokenized.items():
                if split.text is not None:
                    write_json(building / f"{name}.text.json", split.text)
            for path in tokens.iterdir():
                path.unlink()
            tokens.rmdir()
            manifest = _manifest(cfg, key, files, counts, src_vocab, tgt_vocab, vocabs, dtypes)
            write_json(building / "manifest.json", manifest)
    except OSError:
        if not (target / "manifest.json").is_file():  # not another process winning the race
            raise
    remember_checksums(cfg, files)
    log.info(
        "prepared %s in %.1f s with %d worker%s",
        target,
        time.perf_counter() - started,
        workers,
        "" if workers == 1 else "s",
    )
    return target


def _corpus_bytes(files: dict[str, SplitFiles]) -> int:
    return sum(path.stat().st_size for pair in files.values() for path in (pair.src, pair.tgt))


class _Tokenized:
    """Where pass 1 left a split: its counts, word counts (train) and raw lines (not train)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.src_counts: Counter = Counter()
        self.tgt_counts: Counter = Counter()
        self.text: dict[str, list[str]] | None = None


def _tokenize_split(
    name: str, pair: SplitFiles, pool: ChunkPool, tokens: Path, counting: bool
) -> _Tokenized:
    """Pass 1 of one split: its token files `<name>.src` / `<name>.tgt` in `tokens`."""
    train = name == "train"
    result = _Tokenized()
    if not train:
        result.text = {"src": [], "ref": []}
    chunks = parallel_text_chunks(pair.src, pair.tgt, allow_empty=name not in ("train", "val"))

    def tasks() -> Iterator[tuple[str, str, bool, bool]]:
        for src_text, tgt_text, count in chunks:
            lines[0] += count
            if result.text is not None:
                result.text["src"] += split_text(src_text)
                result.text["ref"] += split_text(tgt_text)
            yield src_text, tgt_text, train, counting and train

    lines = [0]
    pairs = dropped = filtered = 0
    with (
        open(tokens / f"{name}.src", "w", encoding="utf-8", newline="\n") as src_out,
        open(tokens / f"{name}.tgt", "w", encoding="utf-8", newline="\n") as tgt_out,
    ):
        for chunk in pool.map(tokenize_chunk, tasks()):
            src_out.write(chunk.src)
            tgt_out.write(chunk.tgt)
            pairs += chunk.pairs
            dropped += chunk.dropped_empty
            filtered += chunk.filtered_long
            if chunk.src_counts is not None:
                result.src_counts.update(chunk.src_counts)
                result.tgt_counts.update(chunk.tgt_counts)
    if not train:
        result.counts = {"lines": lines[0], "pairs": pairs}
        return result
    log.info(
        "train: dropped %d pairs with an empty side, filtered %d pairs longer than "
        "data.max_len tokens",
        dropped,
        filtered,
    )
    if pairs == 0:
        raise DataError(
            f"no training pairs left in {pair.src} and {pair.tgt} after dropping empty pairs "
            "and pairs longer than data.max_len"
        )
    result.counts = {
        "lines": lines[0],
        "dropped_empty": dropped,
        "filtered_long": filtered,
        "pairs": pairs,
    }
    return result


def _word_vocabs(cfg: DataConfig, train: _Tokenized) -> tuple[Vocab, Vocab]:
    max_size = word_max_size(cfg)
    if cfg.shared_vocab:
        vocab = Vocab.from_counts(train.src_counts + train.tgt_counts, cfg.min_freq, max_size)
        return vocab, vocab
    return (
        Vocab.from_counts(train.src_counts, cfg.min_freq, max_size),
        Vocab.from_counts(train.tgt_counts, cfg.min_freq, max_size),
    )


def _warn_about_word_cap(cfg: DataConfig) -> None:
    if cfg.vocab == "word" and cfg.max_size is None and word_max_size(cfg) is not None:
        log.warning(
            "a word vocabulary of a custom corpus is capped at data.max_size=%d tokens (rarer "
            "words become <unk>); data.vocab=bpe covers every word with subword pieces and is "
            "the better choice for a large corpus",
            word_max_size(cfg),
        )


def _train_subwords(
    cfg: DataConfig, tokens: Path, pairs: int, workers: int
) -> tuple[Subword, Subword]:
    """SentencePiece model(s) of the training split's tokens: one joint model when shared.

    Trained on every sentence when there are at most `data.subword_sample` of them (source
    sentences first, then target ones), else on a uniform random sample of that many.
    """
    started = time.perf_counter()
    src_file, tgt_file = tokens / "train.src", tokens / "train.tgt"
    if cfg.shared_vocab:
        lines = _sample_lines([src_file, tgt_file], 2 * pairs, cfg.subword_sample)
        joint = Subword.train_lines(lines, cfg.vocab, cfg.vocab_size, threads=workers)
        models = (joint, joint)
    else:
        models = tuple(
            Subword.train_lines(
                _sample_lines([path], pairs, cfg.subword_sample),
                cfg.vocab,
                cfg.vocab_size,
                threads=workers,
            )
            for path in (src_file, tgt_file)
        )
    sizes = str(len(models[0])) if cfg.shared_vocab else f"{len(models[0])} / {len(models[1])}"
    log.info(
        "trained %s %s subword model (%s pieces) on %d sentences in %.1f s",
        "a joint" if cfg.shared_vocab else "a per-side",
        cfg.vocab,
        sizes,
        min(pairs * (2 if cfg.shared_vocab else 1), cfg.subword_sample),
        time.perf_counter() - started,
    )
    return models


def _sample_lines(paths: list[Path], total: int, sample: int) -> Iterator[str]:
    """The lines of `paths` read one after the other (`total` in all): every one when `total` is at
    most `sample`, else a uniform random sample of `sample` lines, in file order."""
    keep = None
    if total > sample:
        keep = np.sort(np.random.default_rng(SAMPLE_SEED).choice(total, sample, replace=False))
    number = 0
    cursor = 0  # position in keep
    for path in paths:
        with open(path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                if keep is None:
                    yield line[:-1]
                elif cursor < len(keep) and keep[cursor] == number:
                    cursor += 1
                    yield line[:-1]
                number += 1


def _encode_side(
    name: str, side: str, dtype: np.dtype, pool: ChunkPool, tokens: Path, folder: Path
) -> None:
    """Pass 2 of one side of a split: its token file to `<name>.<side>.ids.npy` / `.offsets.npy`."""
    writer = IdsWriter(folder, name, side, dtype)
    with open(tokens / f"{name}.{side}", encoding="utf-8", newline="\n") as handle:
        tasks = ((text, side) for text in _line_blocks(handle, CHUNK_TOKENS_CHARS))
        for ids, lengths in pool.map(encode_chunk, tasks):
            writer.append(ids, lengths)
    writer.close()


CHUNK_TOKENS_CHARS = 2_000_000  # characters of token lines per encoding task (~20,000 lines)


def _line_blocks(handle, size: int) -> Iterator[str]:
    """The text of `handle` in blocks of about `size` characters, each ending at a line's end."""
    while block := handle.read(size):
        if not block.endswith("\n"):
            block += handle.readline()
        yield block


def _write_vocabularies(
    folder: Path, src_vocab: Vocab, tgt_vocab: Vocab, subwords: tuple[Subword, Subword] | None
) -> None:
    write_json(folder / "src_vocab.json", src_vocab.to_list())
    write_json(folder / "tgt_vocab.json", tgt_vocab.to_list())
    if subwords is not None:
        for side, subword in zip(("src", "tgt"), subwords, strict=True):
            (folder / f"{side}_subword.model").write_bytes(subword.to_bytes())


def _manifest(cfg, key, files, counts, src_vocab, tgt_vocab, vocabs, dtypes) -> dict:
    return {
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
        "splits": list(files),
        "counts": counts,
        "vocab_sizes": {"src": len(src_vocab), "tgt": len(tgt_vocab)},
        "ids_dtype": {"src": str(dtypes[0]), "tgt": str(dtypes[1])},
        "vocabularies": "given" if vocabs is not None else "learnt from train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


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


def wait_for_prepared(cfg: DataConfig, vocabs: Vocabularies | None = None) -> PreparedData:
    """Load the cache another process is preparing, once its manifest exists; never prepares.

    Waits at most `data.prepare_wait` minutes, then raises a DataError that says how to prepare
    the data as a step of its own.
    """
    deadline = time.monotonic() + cfg.prepare_wait * 60
    while (path := existing_cache(cfg, vocabs)) is None:
        if time.monotonic() >= deadline:
            raise DataError(
                f"no prepared data appeared under {cache_root(cfg)} within "
                f"data.prepare_wait={cfg.prepare_wait:g} minutes (the first process prepares it; "
                "does every process see the same data.root?): prepare it first with "
                "`mt-prepare` and the same data.* settings, or raise data.prepare_wait"
            )
        time.sleep(WAIT_POLL_S)
    return read_cache(path, cfg)
