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

(<side> is src or tgt.) Loading reads the manifest and the vocabularies, and opens the `.npy` files
of a split only when that split is asked for: constant time and memory whatever the corpus size.
The files are `.npy` (`np.load(mmap_mode="r")` maps them for a look by hand), but they are read
with `os.pread`, a sentence at a time when its batch is collated (`ArrayFile`): every process
that reads the same files shares one copy in the page cache, and a process's own memory holds
only the lengths (4 bytes a sentence) and the batches it is working on. No Python object
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
import os
import re
import shutil
import weakref
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


class ArrayFile:
    """A one-dimensional `.npy` array read from its file a slice at a time (`os.pread`), never
    mapped: what a process reads lands in the page cache, shared by every process that reads the
    same file and reclaimable, and only the slices it asked for are in its own memory. (A mapping
    would count every page the kernel maps around a touched one in the process's RSS: hundreds
    of MB after a few hundred batches drawn from all over a corpus of millions of sentences.)

    Indexing with an int gives a numpy scalar, with a contiguous slice a numpy array.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)  # closed with the object, without a warning
        with open(self._fd, "rb", closefd=False) as header:
            self._read_header(header)

    def _read_header(self, header) -> None:
        version = np.lib.format.read_magic(header)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"{self.path.name}: .npy format {version} is not read here")
        shape, fortran, dtype = read_header(header)
        if len(shape) != 1 or fortran or dtype.hasobject:
            raise ValueError(f"{self.path.name}: not a one-dimensional array of numbers")
        self.dtype: np.dtype = dtype
        self._start = header.tell()
        self._length = shape[0]
        if self._start + self._length * dtype.itemsize > os.fstat(self._fd).st_size:
            raise ValueError(f"{self.path.name}: shorter than its header says")

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step != 1:
                raise IndexError("an ArrayFile is read in contiguous slices only")
            return self._read(start, max(stop - start, 0))
        position = range(self._length)[index]  # IndexError past either end, as for a list
        return self._read(position, 1)[0]

    def chunks(self, size: int = 1 << 20) -> Iterator[np.ndarray]:
        """The whole array, `size` elements at a time."""
        for start in range(0, self._length, size):
            yield self._read(start, min(size, self._length - start))

    def _read(self, start: int, count: int) -> np.ndarray:
        size = self.dtype.itemsize
        data = os.pread(self._fd, count * size, self._start + start * size)
        if len(data) != count * size:
            raise OSError(f"{self.path}: read {len(data)} of {count * size} bytes (truncated?)")
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict[str, Any]:  # a process that receives it opens the file again
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])


class Sentences(Sequence):
    """Token ids of many sentences stored end to end: sentence i is `ids[offsets[i]:offsets[i + 1]]`.

    `ids` and `offsets` are numpy arrays (small data) or `ArrayFile`s (a prepared cache), from
    which a sentence is read when it is asked for; indexing gives it as a list of ints.
    Which stored sentences this object holds: the first `count` (default: all), or, given
    `positions`, sentence i is the stored sentence `positions[i]`. `lengths()` reads the offsets
    only.
    """

    def __init__(
        self, ids, offsets, positions: np.ndarray | None = None, count: int | None = None
    ) -> None:
        self.ids, self.offsets, self.positions = ids, offsets, positions
        self.count = len(offsets) - 1 if count is None else min(count, len(offsets) - 1)

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Sentences:
        """Sentences held in memory (small data, tests)."""
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        ids = np.fromiter((i for s in seqs for i in s), dtype=np.int64, count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return self.count if self.positions is None else len(self.positions)

    def __getitem__(self, index):  # type: ignore[override]
        """Sentence `index` as a list of ids; a slice gives a list of them."""
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        stored = range(len(self))[index] if self.positions is None else self.positions[index]
        start, end = self.offsets[stored : stored + 2].tolist()
        return self.ids[start:end].tolist()

    def lengths(self) -> np.ndarray:
        """Tokens per sentence (int32, 4 bytes a sentence), read from the offsets in chunks."""
        stored = np.empty(len(self.offsets) - 1, dtype=np.int32)
        done, last = 0, None
        chunks = self.offsets.chunks() if isinstance(self.offsets, ArrayFile) else [self.offsets]
        for chunk in chunks:
            if not len(chunk):
                continue
            if last is not None:
                stored[done] = chunk[0] - last
                done += 1
            stored[done : done + len(chunk) - 1] = np.diff(chunk)
            done += len(chunk) - 1
            last = chunk[-1]
        return stored[: self.count] if self.positions is None else stored[self.positions]

    def select(self, indices: np.ndarray) -> Sentences:
        """The sentences at `indices`, in that order (the ids are not copied)."""
        indices = np.asarray(indices, dtype=np.int64)
        positions = indices if self.positions is None else self.positions[indices]
        return Sentences(self.ids, self.offsets, positions)

    def head(self, n: int) -> Sentences:
        """The first `n` sentences (nothing is copied)."""
        if self.positions is None:
            return Sentences(self.ids, self.offsets, count=min(n, self.count))
        return Sentences(self.ids, self.offsets, self.positions[:n])


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

    The ids and the offsets go to raw files as they arrive (memory: one chunk); `close` puts the
    `.npy` headers in front of them, as `<split>.<side>.ids.npy` and `.offsets.npy`.
    """

    def __init__(self, folder: Path, split: str, side: str, dtype: np.dtype) -> None:
        self.folder, self.split, self.side, self.dtype = folder, split, side, np.dtype(dtype)
        self._raw = {kind: folder / f".{split}.{side}.{kind}.raw" for kind in ("ids", "offsets")}
        self._files = {kind: open(path, "wb") for kind, path in self._raw.items()}  # noqa: SIM115
        self._files["offsets"].write(np.zeros(1, dtype=np.int64).tobytes())
        self.tokens = 0
        self.sentences = 0

    def append(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """`ids` of `len(lengths)` sentences end to end."""
        self._files["ids"].write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        offsets = self.tokens + np.cumsum(lengths, dtype=np.int64)
        self._files["offsets"].write(offsets.tobytes())
        self.tokens += len(ids)
        self.sentences += len(lengths)

    def close(self) -> None:
        shapes = {"ids": (self.tokens, self.dtype), "offsets": (self.sentences + 1, np.int64)}
        for kind, (length, dtype) in shapes.items():
            self._files[kind].close()
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                      "fortran_order": False, "shape": (length,)}  # fmt: skip
            with (
                open(array_path(self.folder, self.split, self.side, kind), "wb") as out,
                open(self._raw[kind], "rb") as raw,
            ):
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(raw, out, 1 << 22)
            self._raw[kind].unlink()


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
            ids = ArrayFile(array_path(self.path, name, side, "ids"))
            offsets = ArrayFile(array_path(self.path, name, side, "offsets"))
            if len(offsets) == 0 or offsets[-1] != len(ids):
                raise ValueError(f"{name}.{side}: its offsets do not match its ids")
            sides.append(Sentences(ids, offsets))
        if len(sides[0]) != len(sides[1]):
            raise ValueError(f"{name}: {len(sides[0])} source but {len(sides[1])} target sentences")
        split = SplitData(name, *sides)
        text_path = self.path / f"{name}.text.json"
        if text_path.is_file():
            text = json.loads(text_path.read_text(encoding="utf-8"))
            split.src_text, split.ref_text = text["src"], text["ref"]
        return split
