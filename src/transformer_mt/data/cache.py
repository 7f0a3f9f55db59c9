"""The prepared cache on disk: its key, its layout, and the objects it loads into.

A prepared corpus lives in `<data.root>/cache/<key>/`:

    manifest.json            format_version (read first), settings, raw-file SHA-256s, counts
                             (pairs, dropped, filtered), vocabulary sizes, the id arrays' dtype
    src_vocab.json           list of tokens, index = id (tgt_vocab.json likewise; equal when shared)
    src_subword.model        with data.vocab=bpe|unigram: the SentencePiece model of each side
    tgt_subword.model        (the same bytes in both when the vocabulary is shared, i.e. joint)
    <split>.<side>.ids.npy   every sentence's token ids end to end, no specials, in the smallest
                             unsigned type the vocabulary fits (uint16 below 65,536 entries)
    <split>.<side>.offsets.npy   int64, n + 1: sentence i is ids[offsets[i]:offsets[i + 1]]
    <split>.text.json        {"src": [...], "ref": [...]}: the raw lines of every split but train

(<side> is src or tgt.) Loading reads the manifest and the vocabularies, and maps the `.npy` files
(`np.load(mmap_mode="r")`) of a split only when that split is asked for: constant time and memory
whatever the corpus size, and every process that maps the same files shares one copy in the page
cache. A sentence is sliced out of the mapped arrays when its batch is collated; no Python object
per sentence is ever built. Caches of an older format are refused with one line.

`<key>` hashes everything that changes the result (corpus, file checksums, languages, tokenizer and
vocabulary settings, max_len, the format version) but not what applies at load time (max_tokens,
limit_train) or only how fast it is made (workers): a changed setting prepares anew, an unchanged
one loads. Vocabularies fixed in advance (`Vocabularies`, a fine-tuning run's) are part of the key
through their digest. The folder is built under a temporary name and renamed into place
(files.py), so a cache folder is complete or absent. Reading it imports neither spaCy nor torch;
prepare.py writes it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
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

FORMAT_VERSION = 2  # 1: one .npz per split, read into Python lists
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
    "subword_sample",
)
CUSTOM_WORD_CAP = (
    50_000  # a custom corpus's word vocabulary, specials included, unless data.max_size
)
WORD_ONLY = ("min_freq", "max_size")  # settings that subword vocabularies ignore, and vice versa
SUBWORD_ONLY = ("vocab_size", "subword_sample")


class Sentences(Sequence):
    """Token ids of many sentences stored end to end: sentence i is `ids[starts[i]:ends[i]]`.

    `ids` is usually a memory-mapped array; indexing gives one sentence as a list of ints, read
    when it is needed. `lengths()` comes from the bounds alone.
    """

    def __init__(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        self.ids, self.starts, self.ends = ids, starts, ends

    @classmethod
    def from_offsets(cls, ids: np.ndarray, offsets: np.ndarray) -> Sentences:
        return cls(ids, offsets[:-1], offsets[1:])

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Sentences:
        """Sentences held in memory (small data, tests)."""
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        ids = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(offsets[-1]))
        return cls.from_offsets(ids, offsets)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index):  # type: ignore[override]
        """Sentence `index` as a list of ids; a slice gives a list of them."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.ids[self.starts[index] : self.ends[index]].tolist()

    def lengths(self) -> np.ndarray:
        """Tokens per sentence (int64)."""
        return np.asarray(self.ends, dtype=np.int64) - self.starts

    def select(self, indices: np.ndarray) -> Sentences:
        """The sentences at `indices`, in that order (the ids are not copied)."""
        return Sentences(self.ids, self.starts[indices], self.ends[indices])

    def head(self, n: int) -> Sentences:
        """The first `n` sentences (views: nothing is copied)."""
        return Sentences(self.ids, self.starts[:n], self.ends[:n])


@dataclass
class SplitData:
    """One split: token ids per sentence (no specials) and, except for train, the raw lines.

    `src` and `tgt` are `Sentences`; lists of id lists are accepted and converted (small data).
    """

    name: str
    src: Sentences
    tgt: Sentences
    src_text: list[str] | None = None
    ref_text: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.src, Sentences):
            self.src = Sentences.from_lists(self.src)
        if not isinstance(self.tgt, Sentences):
            self.tgt = Sentences.from_lists(self.tgt)

    def __len__(self) -> int:
        return len(self.src)

    def src_lengths(self) -> np.ndarray:
        return self.src.lengths()

    def tgt_lengths(self) -> np.ndarray:
        return self.tgt.lengths()

    def select(self, indices: np.ndarray) -> SplitData:
        """The pairs at `indices` (an int array), with their raw lines."""

        def pick(lines: list[str] | None) -> list[str] | None:
            return None if lines is None else [lines[i] for i in indices.tolist()]

        return SplitData(
            self.name,
            self.src.select(indices),
            self.tgt.select(indices),
            pick(self.src_text),
            pick(self.ref_text),
        )

    def head(self, n: int) -> SplitData:
        """The first `n` pairs (`data.limit_train`)."""
        return SplitData(
            self.name,
            self.src.head(n),
            self.tgt.head(n),
            None if self.src_text is None else self.src_text[:n],
            None if self.ref_text is None else self.ref_text[:n],
        )


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
    splits: Mapping[str, SplitData] = field(default_factory=dict)
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
    """The `KEY_SETTINGS` of `cfg` that apply to its kind of vocabulary (`max_size` as applied)."""
    ignored = SUBWORD_ONLY if cfg.vocab == "word" else WORD_ONLY
    settings = {name: getattr(cfg, name) for name in KEY_SETTINGS if name not in ignored}
    if "max_size" in settings:
        settings["max_size"] = word_max_size(cfg)
    return settings


def word_max_size(cfg: DataConfig) -> int | None:
    """The word vocabulary's cap: `data.max_size`, else `CUSTOM_WORD_CAP` for a custom corpus
    (whose vocabulary of rare words grows without bound with its size), else none."""
    if cfg.max_size is None and cfg.name == "custom":
        return CUSTOM_WORD_CAP
    return cfg.max_size


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


def ids_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of a vocabulary of `vocab_size` entries."""
    for dtype in (np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def array_path(folder: Path, split: str, side: str, kind: str) -> Path:
    """`<split>.<side>.<kind>.npy`, kind `ids` or `offsets`."""
    return folder / f"{split}.{side}.{kind}.npy"


class IdsWriter:
    """Appends sentences' ids to one side of a split as they come, then writes its two `.npy` files.

    The ids go to a raw file as they arrive (memory: one chunk); the lengths are kept (8 bytes a
    sentence) until `close`, which writes `<split>.<side>.ids.npy` and `.offsets.npy`.
    """

    def __init__(self, folder: Path, split: str, side: str, dtype: np.dtype) -> None:
        self.folder, self.split, self.side, self.dtype = folder, split, side, np.dtype(dtype)
        self._raw_path = folder / f".{split}.{side}.ids.raw"
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 (closed by close())
        self._lengths: list[np.ndarray] = []
        self.tokens = 0

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """`ids` of `len(lengths)` sentences end to end."""
        self._raw.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.tokens += len(ids)

    def close(self) -> None:
        self._raw.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(array_path(self.folder, self.split, self.side, "offsets"), offsets)
        ids_path = array_path(self.folder, self.split, self.side, "ids")
        with open(ids_path, "wb") as out, open(self._raw_path, "rb") as raw:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.tokens,)}  # fmt: skip
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 22)
        self._raw_path.unlink()


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Read


def read_cache(path: Path, cfg: DataConfig) -> PreparedData:
    """Load the cache folder `path` (splits are mapped when first asked for), applying
    `data.limit_train`; a DataError if it is damaged or of an older format."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"the prepared data {path} has cache format {version}, this version reads "
                f"format {FORMAT_VERSION}: delete that folder and prepare again (mt-prepare)"
            )
        src_vocab = Vocab(json.loads((path / "src_vocab.json").read_text(encoding="utf-8")))
        tgt_vocab = Vocab(json.loads((path / "tgt_vocab.json").read_text(encoding="utf-8")))
        src_subword = tgt_subword = None
        kind = manifest["settings"].get("vocab", "word")
        if kind != "word":
            src_subword = Subword((path / "src_subword.model").read_bytes(), kind)
            tgt_subword = Subword((path / "tgt_subword.model").read_bytes(), kind)
        splits = MappedSplits(path, list(manifest["splits"]), cfg.limit_train)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise _damaged(path, err) from None
    return PreparedData(path, manifest, src_vocab, tgt_vocab, splits, src_subword, tgt_subword)


def _damaged(path: Path, err: Exception) -> DataError:
    return DataError(
        f"the prepared data {path} is damaged ({err}): delete that folder and prepare again"
    )


class MappedSplits(Mapping):
    """The splits of a cache folder by name; each is mapped from its files when first asked for."""

    def __init__(self, path: Path, names: list[str], limit_train: int | None) -> None:
        self.path, self.names, self.limit_train = path, names, limit_train
        self._loaded: dict[str, SplitData] = {}

    def __getitem__(self, name: str) -> SplitData:
        if name not in self.names:
            raise KeyError(name)
        if name not in self._loaded:
            try:
                split = self._map(name)
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise _damaged(self.path, err) from None
            if name == "train" and self.limit_train is not None:
                split = split.head(self.limit_train)
            self._loaded[name] = split
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def _map(self, name: str) -> SplitData:
        sides = []
        for side in ("src", "tgt"):
            ids = _random_access(np.load(array_path(self.path, name, side, "ids"), mmap_mode="r"))
            offsets = np.load(array_path(self.path, name, side, "offsets"), mmap_mode="r")
            if offsets.ndim != 1 or len(offsets) == 0 or offsets[-1] != len(ids):
                raise ValueError(f"{name}.{side}: its offsets do not match its ids")
            sides.append(Sentences.from_offsets(ids, offsets))
        if len(sides[0]) != len(sides[1]):
            raise ValueError(f"{name}: {len(sides[0])} source but {len(sides[1])} target sentences")
        split = SplitData(name, *sides)
        text_path = self.path / f"{name}.text.json"
        if text_path.is_file():
            text = json.loads(text_path.read_text(encoding="utf-8"))
            split.src_text, split.ref_text = text["src"], text["ref"]
        return split


def _random_access(ids: np.ndarray) -> np.ndarray:
    """Tell the kernel that `ids` (a mapped file) is read at random: batches pick sentences all
    over it, and the default read-ahead would fault in far more of the file than they read."""
    mapping = getattr(ids, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return ids
