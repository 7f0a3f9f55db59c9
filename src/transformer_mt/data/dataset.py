"""The prepared cache: every split tokenized and numericalized once, loaded in well under a second.

`prepare(cfg)` writes `<data.root>/cache/<key>/`:

    manifest.json        settings, raw-file SHA-256s, counts (pairs, dropped, filtered), vocabulary sizes
    src_vocab.json       list of tokens, index = id (tgt_vocab.json likewise; equal when shared)
    src_subword.model    with data.vocab=bpe|unigram: the SentencePiece model of each side
    tgt_subword.model    (the same bytes in both when the vocabulary is shared, i.e. joint)
    <split>.npz          src_ids / tgt_ids: all sentences' ids end to end (int32, no specials), and
                         src_offsets / tgt_offsets (int64, n + 1): sentence i is ids[offsets[i]:offsets[i+1]]
    <split>.text.json    {"src": [...], "ref": [...]}: the raw lines of every split but train

`<key>` hashes everything that changes the result (corpus, file checksums, languages, tokenizer and
vocabulary settings, max_len, the format version) but not what applies at load time (max_tokens,
limit_train): a changed setting prepares anew, an unchanged one loads. A fine-tuning run passes the
vocabularies (and subword models) of the checkpoint it starts from (`Vocabularies`): they replace
the ones that would be learnt from the training split, and their digest is part of the key. The folder is built under a
temporary name and renamed into place, so a cache folder is complete or absent.

Training split: pairs with an empty (or whitespace-only) side are dropped, pairs longer than
`data.max_len` tokens on either side are filtered out; both are counted. Other splits keep every line,
so hypotheses stay aligned with references. Loading imports neither spaCy nor torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from transformer_mt.config import DataConfig
from transformer_mt.data.corpus import SplitFiles, corpus_files, read_parallel
from transformer_mt.data.subword import Subword
from transformer_mt.data.vocab import Vocab
from transformer_mt.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Settings that change the prepared result (max_tokens and limit_train apply at load time).
KEY_SETTINGS = (
    "name",
    "src",
    "tgt",
    "lowercase",
    "vocab",
    "vocab_size",
    "min_freq",
    "max_size",
    "shared_vocab",
    "max_len",
)
WORD_ONLY = ("min_freq", "max_size")  # settings that subword vocabularies ignore, and vice versa
SUBWORD_ONLY = ("vocab_size",)


@dataclass
class SplitData:
    """One split: token ids per sentence (no specials) and, except for train, the raw lines."""

    name: str
    src: list[list[int]]
    tgt: list[list[int]]
    src_text: list[str] | None = None
    ref_text: list[str] | None = None

    def __len__(self) -> int:
        return len(self.src)

    def src_lengths(self) -> list[int]:
        return [len(ids) for ids in self.src]

    def tgt_lengths(self) -> list[int]:
        return [len(ids) for ids in self.tgt]


@dataclass
class Vocabularies:
    """Vocabularies fixed in advance (a fine-tuning run takes them from its checkpoint)."""

    src_vocab: Vocab
    tgt_vocab: Vocab
    src_subword: Subword | None = None  # both None for word-level vocabularies
    tgt_subword: Subword | None = None

    def digest(self) -> str:
        h = hashlib.sha256()
        for vocab in (self.src_vocab, self.tgt_vocab):
            h.update(json.dumps(vocab.to_list()).encode())
        for subword in (self.src_subword, self.tgt_subword):
            h.update(subword.to_bytes() if subword is not None else b"-")
        return h.hexdigest()


@dataclass
class PreparedData:
    """A loaded cache: its folder and manifest, both vocabularies and every prepared split."""

    path: Path
    manifest: dict[str, Any]
    src_vocab: Vocab
    tgt_vocab: Vocab
    splits: dict[str, SplitData] = field(default_factory=dict)
    src_subword: Subword | None = None  # data.vocab=bpe|unigram: the pieces' models
    tgt_subword: Subword | None = None

    def split(self, name: str) -> SplitData:
        """The split called `name`; a DataError naming the prepared ones if there is none."""
        if name not in self.splits:
            raise DataError(
                f"split {name!r} is not in the prepared data {self.path} "
                f"(prepared: {', '.join(self.splits)})"
            )
        return self.splits[name]


# ---------------------------------------------------------------------------------------------
# Cache location


def cache_key(
    cfg: DataConfig,
    files: dict[str, SplitFiles] | None = None,
    vocabs: Vocabularies | None = None,
) -> str:
    """A readable, unique folder name for the prepared result of `cfg`, e.g. `multi30k-de-en-3f2a...`.

    `files` defaults to the corpus files already on disk (nothing is fetched).
    """
    if files is None:
        files = corpus_files(cfg, fetch=False)
    spec = {
        "format_version": FORMAT_VERSION,
        "settings": key_settings(cfg),
        "tokenizer": f"spacy-{_spacy_version()}",
        "files": {split: [f.src_sha256, f.tgt_sha256] for split, f in sorted(files.items())},
    }
    if vocabs is not None:
        spec["vocabularies"] = vocabs.digest()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{cfg.name}-{cfg.src}-{cfg.tgt}")
    return f"{readable}-{digest}"


def key_settings(cfg: DataConfig) -> dict[str, Any]:
    """The `KEY_SETTINGS` of `cfg` that apply to its kind of vocabulary."""
    ignored = SUBWORD_ONLY if cfg.vocab == "word" else WORD_ONLY
    return {name: getattr(cfg, name) for name in KEY_SETTINGS if name not in ignored}


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "cache"


def _spacy_version() -> str:
    try:
        return metadata.version("spacy")
    except metadata.PackageNotFoundError:
        return "none"


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
        "tokenizer": f"spacy-{_spacy_version()}",
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
    _write_cache(target, manifest, src_vocab, tgt_vocab, splits, subwords)
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
    from transformer_mt.data.tokenize import Tokenizer

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


def _write_cache(
    target: Path,
    manifest: dict[str, Any],
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    splits: dict[str, _TokenizedSplit],
    subwords: tuple[Subword, Subword] | None,
) -> None:
    """Write the cache folder under a temporary name, then rename it to `target` in one step."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_json(building / "src_vocab.json", src_vocab.to_list())
        _write_json(building / "tgt_vocab.json", tgt_vocab.to_list())
        if subwords is not None:
            (building / "src_subword.model").write_bytes(subwords[0].to_bytes())
            (building / "tgt_subword.model").write_bytes(subwords[1].to_bytes())
        for name, split in splits.items():
            _save_ids(
                building / f"{name}.npz",
                [src_vocab.encode(tokens) for tokens in split.src_tokens],
                [tgt_vocab.encode(tokens) for tokens in split.tgt_tokens],
            )
            if split.src_lines is not None:
                text = {"src": split.src_lines, "ref": split.ref_lines}
                _write_json(building / f"{name}.text.json", text)
        _write_json(building / "manifest.json", manifest)
        building.chmod(0o755)  # mkdtemp makes it private
        try:
            building.rename(target)
        except OSError:
            if not (target / "manifest.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


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


def _save_ids(path: Path, src: list[list[int]], tgt: list[list[int]]) -> None:
    src_ids, src_offsets = _flatten(src)
    tgt_ids, tgt_offsets = _flatten(tgt)
    with open(path, "wb") as handle:
        np.savez(
            handle,
            src_ids=src_ids,
            src_offsets=src_offsets,
            tgt_ids=tgt_ids,
            tgt_offsets=tgt_offsets,
        )


def _flatten(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    ids = np.fromiter((i for s in seqs for i in s), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Load


def load_prepared(cfg: DataConfig) -> PreparedData:
    """Load the prepared cache of `cfg` (run `prepare` first); applies `data.limit_train`."""
    path = _existing_cache(cfg)
    if path is None:
        raise DataError(
            f"no prepared data for these data.* settings under {cache_root(cfg)}: "
            "run `python scripts/prepare_data.py` with the same settings first"
        )
    return _load(path, cfg)


def load_or_prepare(cfg: DataConfig, vocabs: Vocabularies | None = None) -> PreparedData:
    """Load the prepared cache of `cfg`, fetching and preparing the corpus first when needed.

    A cache built from the files already on disk is used as it is: no network access, no mirror.
    `vocabs` fixes the vocabularies instead of learning them from the training split.
    """
    path = _existing_cache(cfg, vocabs)
    if path is None:
        path = _prepare(cfg, corpus_files(cfg), vocabs)
    return _load(path, cfg)


def _existing_cache(cfg: DataConfig, vocabs: Vocabularies | None = None) -> Path | None:
    """The cache folder made from the corpus files on disk, if there is one."""
    try:
        files = corpus_files(cfg, fetch=False)
    except DataError:
        return None
    path = cache_root(cfg) / cache_key(cfg, files, vocabs)
    return path if (path / "manifest.json").is_file() else None


def _load(path: Path, cfg: DataConfig) -> PreparedData:
    try:
        data = _read_cache(path)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"the prepared data {path} is damaged ({err}): delete that folder and prepare again"
        ) from None
    if cfg.limit_train is not None and "train" in data.splits:
        train = data.splits["train"]
        train.src, train.tgt = train.src[: cfg.limit_train], train.tgt[: cfg.limit_train]
    return data


def _read_cache(path: Path) -> PreparedData:
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    src_vocab = Vocab(json.loads((path / "src_vocab.json").read_text(encoding="utf-8")))
    tgt_vocab = Vocab(json.loads((path / "tgt_vocab.json").read_text(encoding="utf-8")))
    splits = {}
    for name in manifest["splits"]:
        with np.load(path / f"{name}.npz") as arrays:
            src = _unflatten(arrays["src_ids"], arrays["src_offsets"])
            tgt = _unflatten(arrays["tgt_ids"], arrays["tgt_offsets"])
        split = SplitData(name, src, tgt)
        text_path = path / f"{name}.text.json"
        if text_path.is_file():
            text = json.loads(text_path.read_text(encoding="utf-8"))
            split.src_text, split.ref_text = text["src"], text["ref"]
        splits[name] = split
    src_subword = tgt_subword = None
    kind = manifest["settings"].get("vocab", "word")
    if kind != "word":
        src_subword = Subword((path / "src_subword.model").read_bytes(), kind)
        tgt_subword = Subword((path / "tgt_subword.model").read_bytes(), kind)
    return PreparedData(path, manifest, src_vocab, tgt_vocab, splits, src_subword, tgt_subword)


def _unflatten(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = ids.tolist()
    bounds = offsets.tolist()
    return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
