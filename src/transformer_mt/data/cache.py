"""The prepared cache on disk: its key, its layout, and the objects it loads into.

A prepared corpus lives in `<data.root>/cache/<key>/`:

    manifest.json        settings, raw-file SHA-256s, counts (pairs, dropped, filtered), vocabulary sizes
    src_vocab.json       list of tokens, index = id (tgt_vocab.json likewise; equal when shared)
    src_subword.model    with data.vocab=bpe|unigram: the SentencePiece model of each side
    tgt_subword.model    (the same bytes in both when the vocabulary is shared, i.e. joint)
    <split>.npz          src_ids / tgt_ids: all sentences' ids end to end (int32, no specials), and
                         src_offsets / tgt_offsets (int64, n + 1): sentence i is ids[offsets[i]:offsets[i+1]]
    <split>.text.json    {"src": [...], "ref": [...]}: the raw lines of every split but train

`<key>` hashes everything that changes the result (corpus, file checksums, languages, tokenizer and
vocabulary settings, max_len, the format version) but not what applies at load time (max_tokens,
limit_train): a changed setting prepares anew, an unchanged one loads. Vocabularies fixed in
advance (`Vocabularies`, a fine-tuning run's) are part of the key through their digest. The folder
is built under a temporary name and renamed into place (files.py), so a cache folder is complete
or absent. Reading it imports neither spaCy nor torch; dataset.py prepares it.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from transformer_mt.config import DataConfig
from transformer_mt.data.corpus import SplitFiles, corpus_files
from transformer_mt.data.subword import Subword
from transformer_mt.data.vocab import Vocab
from transformer_mt.errors import DataError
from transformer_mt.files import atomic_directory

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
# Key and location


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
        "tokenizer": tokenizer_version(),
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


def tokenizer_version() -> str:
    """The word tokenizer a cache was made with, e.g. `spacy-3.7.5`: a new spaCy prepares anew."""
    try:
        return f"spacy-{metadata.version('spacy')}"
    except metadata.PackageNotFoundError:
        return "spacy-none"


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "cache"


def existing_cache(cfg: DataConfig, vocabs: Vocabularies | None = None) -> Path | None:
    """The cache folder made from the corpus files on disk, if there is one."""
    try:
        files = corpus_files(cfg, fetch=False)
    except DataError:
        return None
    path = cache_root(cfg) / cache_key(cfg, files, vocabs)
    return path if (path / "manifest.json").is_file() else None


# ---------------------------------------------------------------------------------------------
# Write


def write_cache(data: PreparedData) -> None:
    """Write `data` as the cache folder `data.path`, complete or not at all.

    When another process finished the same folder first, its folder is kept.
    """
    try:
        with atomic_directory(data.path) as building:
            _write_json(building / "src_vocab.json", data.src_vocab.to_list())
            _write_json(building / "tgt_vocab.json", data.tgt_vocab.to_list())
            for side, subword in (("src", data.src_subword), ("tgt", data.tgt_subword)):
                if subword is not None:
                    (building / f"{side}_subword.model").write_bytes(subword.to_bytes())
            for name, split in data.splits.items():
                _save_ids(building / f"{name}.npz", split.src, split.tgt)
                if split.src_text is not None:
                    text = {"src": split.src_text, "ref": split.ref_text}
                    _write_json(building / f"{name}.text.json", text)
            _write_json(building / "manifest.json", data.manifest)
    except OSError:
        if not (data.path / "manifest.json").is_file():  # not another process winning the race
            raise


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
# Read


def read_cache(path: Path, cfg: DataConfig) -> PreparedData:
    """Load the cache folder `path`, applying `data.limit_train`; a DataError if it is damaged."""
    try:
        data = _read(path)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(
            f"the prepared data {path} is damaged ({err}): delete that folder and prepare again"
        ) from None
    if cfg.limit_train is not None and "train" in data.splits:
        train = data.splits["train"]
        train.src, train.tgt = train.src[: cfg.limit_train], train.tgt[: cfg.limit_train]
    return data


def _read(path: Path) -> PreparedData:
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
