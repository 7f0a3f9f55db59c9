"""Raw parallel text: fetch Multi30k (or point at a custom corpus), verify it, read it.

Multi30k Task 1 files come from the multi30k/dataset repository and are checked against the SHA-256
sums below. They are stored under `<data.root>/multi30k/`, written atomically (a temp file renamed
into place only once its sum is right) and never fetched twice. A mirror, a local folder or a base
URL set by `data.mirror` or the `MT_DATA_MIRROR` environment variable, replaces the source.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import itertools
import json
import logging
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from transformer_mt.config import DataConfig
from transformer_mt.errors import ConfigError, DataError
from transformer_mt.files import atomic_file

log = logging.getLogger(__name__)

BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw"
MIRROR_ENV = "MT_DATA_MIRROR"
DOWNLOAD_TIMEOUT_S = 60

# Split name -> file stem of Multi30k Task 1; files are <stem>.<lang>.gz.
SPLITS = {
    "train": "train",
    "val": "val",
    "test2016": "test_2016_flickr",
    "test2017": "test_2017_flickr",
    "mscoco2017": "test_2017_mscoco",
    "test2018": "test_2018_flickr",
}
# Split name -> the data.* key that lists a custom corpus's [source_file, target_file].
CUSTOM_SPLITS = {"train": "train", "val": "valid", "test": "test"}
# The 2017 test sets were never translated into Czech.
MISSING_SPLITS = {"cs": ("test2017", "mscoco2017")}

SHA256 = {
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2017_flickr.de.gz": "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
    "test_2017_flickr.en.gz": "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
    "test_2017_flickr.fr.gz": "3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496",
    "test_2017_mscoco.de.gz": "799e4854c25d601cb6cb6be29eabe5667734c61ace2f495e03e429031a0bc338",
    "test_2017_mscoco.en.gz": "aab300bfb4427697987e02cd0aacd44bfe8aa50456231b6474c08038bbed2b58",
    "test_2017_mscoco.fr.gz": "754f3072ba9f124569ba5258b32730fc1d214bbf8e0c6dfb2b74401676220db0",
    "test_2018_flickr.cs.gz": "7d0a9db904f94c554a8c58049a9f3a5357c27f46cc3d710d70cb0b4a2585b8c2",
    "test_2018_flickr.de.gz": "ddd0130c7d97482dc5197a02141dae8dd79f20f03586c480d675c09a32daf608",
    "test_2018_flickr.en.gz": "ef4f4844037d4c5dea75c9a8ed5fd78905967a26f67c255e230cc9780032654d",
    "test_2018_flickr.fr.gz": "fb2b83fcceb937a4f7e3e93c1c51c22aba92f1e342391e6b5ba392b16a920501",
}

MIRROR_HINT = (
    f"to work offline, set data.mirror=<folder or URL> (or {MIRROR_ENV}) to a copy of the "
    "Multi30k task1/raw files"
)


@dataclass(frozen=True)
class SplitFiles:
    """The two files of one split and their SHA-256 sums (the sums key the prepared cache)."""

    src: Path
    tgt: Path
    src_sha256: str
    tgt_sha256: str


# ---------------------------------------------------------------------------------------------
# Which splits and files a configuration uses


def available_splits(cfg: DataConfig) -> tuple[str, ...]:
    """Split names this corpus and language pair can have (custom: those given in the config)."""
    if cfg.name == "custom":
        return tuple(s for s in CUSTOM_SPLITS if _custom_pair(cfg, s) is not None)
    missing = set(MISSING_SPLITS.get(cfg.src, ())) | set(MISSING_SPLITS.get(cfg.tgt, ()))
    return tuple(s for s in SPLITS if s not in missing)


def check_split(cfg: DataConfig, split: str) -> None:
    """Raise DataError unless `split` exists for this corpus and language pair."""
    known = tuple(CUSTOM_SPLITS if cfg.name == "custom" else SPLITS)
    if split not in known:
        raise DataError(f"unknown split {split!r} for {cfg.name} (choose from {', '.join(known)})")
    splits = available_splits(cfg)
    if split not in splits:
        if cfg.name == "custom":
            raise DataError(
                f"split {split!r} has no files: "
                f"set data.{CUSTOM_SPLITS[split]}=[source_file,target_file]"
            )
        raise DataError(
            f"Multi30k has no {split} split for {cfg.src}-{cfg.tgt} "
            f"(available: {', '.join(splits)})"
        )


def multi30k_file(split: str, lang: str) -> str:
    """File name of one side of a Multi30k split, e.g. `test_2016_flickr.de.gz`."""
    return f"{SPLITS[split]}.{lang}.gz"


def resolve_mirror(cfg: DataConfig) -> str | None:
    """The mirror in use: `data.mirror` first, then $MT_DATA_MIRROR, else None (the real source)."""
    return cfg.mirror or os.environ.get(MIRROR_ENV) or None


def _custom_pair(cfg: DataConfig, split: str) -> list[str] | None:
    key = CUSTOM_SPLITS[split]
    files = getattr(cfg, key)
    if files is None:
        return None
    if len(files) != 2:
        raise ConfigError(
            f"data.{key} must list two files, [source_file,target_file] (got {len(files)})"
        )
    return list(files)


# ---------------------------------------------------------------------------------------------
# Fetching


def corpus_files(
    cfg: DataConfig, splits: Iterable[str] | None = None, fetch: bool = True
) -> dict[str, SplitFiles]:
    """Locate (and for Multi30k, fetch and verify) the files of each split.

    `splits=None` asks for what a training run needs: train and val, which must exist, plus every
    test split of the pair that can be had; a test split the source lacks (test2018 on an offline
    mirror) or that fails to download is skipped with a log line. Splits named explicitly must all
    exist. With `fetch=False` nothing is downloaded or changed: only verified files already under
    `<data.root>/multi30k` count.
    """
    if splits is None:
        optional = [s for s in available_splits(cfg) if s not in ("train", "val")]
        names = ["train", "val", *optional]
    else:
        optional, names = [], list(splits)
    for split in names:
        check_split(cfg, split)
    if cfg.name == "custom":
        known = _known_checksums(cfg)
        return {split: _custom_files(cfg, split, known) for split in names}
    source = resolve_mirror(cfg)
    folder = multi30k_dir(cfg)
    found: dict[str, SplitFiles] = {}
    for split in names:
        try:
            src, tgt = (
                _ensure_file(multi30k_file(split, lang), folder, source, fetch)
                for lang in (cfg.src, cfg.tgt)
            )
        except (_Unavailable, _DownloadFailed) as missing:
            if split not in optional:
                raise DataError(str(missing)) from None
            if isinstance(missing, _DownloadFailed):
                level = logging.WARNING
            else:
                level = logging.INFO if fetch else logging.DEBUG
            log.log(level, "skipping split %s: %s", split, missing)
            continue
        found[split] = SplitFiles(src, tgt, SHA256[src.name], SHA256[tgt.name])
    return found


def split_paths(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """(source file, target file) of `split`, fetched if needed; an error if it cannot be had."""
    files = corpus_files(cfg, [split])[split]
    return files.src, files.tgt


def multi30k_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "multi30k"


class _Unavailable(Exception):
    """A file the source does not have (or, without fetching, that is not here yet)."""


class _DownloadFailed(DataError):
    """The source could not be reached or refused the file (optional test splits are skipped)."""


def _ensure_file(name: str, folder: Path, source: str | None, fetch: bool) -> Path:
    """Return `folder/name` with the right SHA-256, copying or downloading it when needed."""
    path = folder / name
    expected = SHA256[name]
    if path.is_file():
        if sha256_file(path) == expected:
            return path
        if not fetch:
            raise _Unavailable(f"{path} fails its SHA-256 check (run mt-prepare to fetch it again)")
        log.warning("%s fails its SHA-256 check: fetching it again", path)
        path.unlink()
    if not fetch:
        raise _Unavailable(f"{path} is missing (run mt-prepare to fetch the corpus)")
    folder.mkdir(parents=True, exist_ok=True)
    if source is None or "://" in source:
        base = (source or BASE_URL).rstrip("/")
        _download(f"{base}/{name}", path, expected, mirrored=source is not None)
    else:
        if not Path(source).expanduser().is_dir():
            raise DataError(
                f"the mirror folder {source} does not exist (check data.mirror or {MIRROR_ENV})"
            )
        origin = Path(source).expanduser() / name
        if not origin.is_file():
            raise _Unavailable(f"{name} is not in the mirror folder {source}")
        log.info("copying %s", origin)
        with open(origin, "rb") as handle:
            _write_verified(handle, path, expected, origin=str(origin))
    return path


def _download(url: str, path: Path, expected: str, mirrored: bool) -> None:
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            _write_verified(response, path, expected, origin=url)
        return
    except urllib.error.HTTPError as err:
        if err.code == 404 and mirrored:
            raise _Unavailable(f"{path.name} is not on the mirror ({url}: HTTP 404)") from None
        reason = f"HTTP {err.code} {err.reason}"
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
    hint = f"check the mirror (data.mirror or {MIRROR_ENV})" if mirrored else MIRROR_HINT
    raise _DownloadFailed(f"cannot download {url}: {reason}; {hint}")


def _write_verified(stream, path: Path, expected: str, origin: str) -> None:
    """Copy `stream` to `path` atomically (files.py), renamed into place only if its sum is right."""
    digest = hashlib.sha256()
    with atomic_file(path, binary=True) as out:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != expected:
            raise DataError(
                f"{path.name} from {origin} fails its SHA-256 check (got {digest.hexdigest()[:16]}..., "
                f"expected {expected[:16]}...): the bad copy was deleted; fetch it again or fix the mirror"
            )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Checksums of custom corpus files, remembered by the preparation: hashing a 1 GB corpus takes
# seconds, and every load computes the cache's key from them. A file whose size, modification
# time (ns) and inode are unchanged keeps its sum, as `make` and rsync assume.
CHECKSUMS_FILE = "checksums.json"


def _checksums_path(cfg: DataConfig) -> Path:
    return Path(cfg.root) / "cache" / CHECKSUMS_FILE


def _file_stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"


def _known_checksums(cfg: DataConfig) -> dict[str, dict[str, str]]:
    try:
        known = json.loads(_checksums_path(cfg).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _checksum(path: Path, known: dict[str, dict[str, str]]) -> str:
    entry = known.get(str(path.resolve()))
    if isinstance(entry, dict) and entry.get("stamp") == _file_stamp(path):
        return str(entry.get("sha256"))
    return sha256_file(path)


def remember_checksums(cfg: DataConfig, files: dict[str, SplitFiles]) -> None:
    """Record the sums of a custom corpus's files once its cache is prepared (best effort)."""
    if cfg.name != "custom":
        return
    known = _known_checksums(cfg)
    for pair in files.values():
        for path, digest in ((pair.src, pair.src_sha256), (pair.tgt, pair.tgt_sha256)):
            known[str(path.resolve())] = {"stamp": _file_stamp(path), "sha256": digest}
    try:
        with atomic_file(_checksums_path(cfg)) as out:
            json.dump(known, out)
    except OSError as err:
        log.warning("could not record the corpus checksums in %s: %s", _checksums_path(cfg), err)


def _custom_files(
    cfg: DataConfig, split: str, known: dict[str, dict[str, str]] | None = None
) -> SplitFiles:
    known = {} if known is None else known
    src, tgt = (Path(p).expanduser() for p in _custom_pair(cfg, split))
    for path in (src, tgt):
        if path.is_file():
            continue
        if path.is_dir():
            problem = "is a folder, not a file"
        elif path.is_char_device():
            problem = "is not a regular file (a character device)"
        elif path.exists():
            problem = "is not a regular file"
        else:
            problem = "does not exist"
        raise DataError(f"{split} file {path} {problem} (check data.{CUSTOM_SPLITS[split]})")
    return SplitFiles(src, tgt, _checksum(src, known), _checksum(tgt, known))


# ---------------------------------------------------------------------------------------------
# Reading

CHUNK_LINES = 10_000  # lines per chunk when a corpus is streamed


def read_parallel(
    src_path: str | os.PathLike, tgt_path: str | os.PathLike, allow_empty: bool = True
) -> tuple[list[str], list[str]]:
    """Read two aligned files (gzip or plain UTF-8), one sentence per line; line i ↔ line i.

    The whole of both files, as lists: for test sets and other small files (`parallel_chunks`
    streams a corpus of any size). Raises DataError as `parallel_chunks` does.
    """
    src_lines: list[str] = []
    tgt_lines: list[str] = []
    for src_chunk, tgt_chunk in parallel_chunks(src_path, tgt_path, allow_empty=allow_empty):
        src_lines += src_chunk
        tgt_lines += tgt_chunk
    return src_lines, tgt_lines


def parallel_chunks(
    src_path: str | os.PathLike,
    tgt_path: str | os.PathLike,
    chunk_lines: int = CHUNK_LINES,
    allow_empty: bool = True,
) -> Iterator[tuple[list[str], list[str]]]:
    """The aligned lines of two files, `chunk_lines` pairs at a time: memory is one chunk's.

    A byte-order mark is dropped, Windows line endings are accepted, the last line may lack its
    newline. Raises DataError for a missing or unreadable file (a damaged gzip included), text that
    is not UTF-8 (with the line number), files of different lengths (naming both files and both
    counts; found when the shorter one ends), or with `allow_empty=False` an empty file.
    """
    for src_text, tgt_text, _ in parallel_text_chunks(src_path, tgt_path, chunk_lines, allow_empty):
        yield split_text(src_text), split_text(tgt_text)


def parallel_text_chunks(
    src_path: str | os.PathLike,
    tgt_path: str | os.PathLike,
    chunk_lines: int = CHUNK_LINES,
    allow_empty: bool = True,
) -> Iterator[tuple[str, str, int]]:
    """`parallel_chunks` as (source text, target text, pairs): each text is its lines, every one
    ended by "\n" (see `text_chunks`), cheaper to pass to another process than a list of lines."""
    src_chunks = text_chunks(src_path, chunk_lines)
    tgt_chunks = text_chunks(tgt_path, chunk_lines)
    src_count = tgt_count = 0
    while True:
        src_text, src_lines = next(src_chunks, ("", 0))
        tgt_text, tgt_lines = next(tgt_chunks, ("", 0))
        src_count += src_lines
        tgt_count += tgt_lines
        if src_lines != tgt_lines:
            src_count += sum(lines for _, lines in src_chunks)
            tgt_count += sum(lines for _, lines in tgt_chunks)
            raise DataError(
                f"{src_path} has {src_count} lines but {tgt_path} has {tgt_count}: "
                "line i of the source file must translate line i of the target file"
            )
        if not src_lines:
            break
        yield src_text, tgt_text, src_lines
    if not allow_empty and src_count == 0:
        raise DataError(f"{src_path} is empty: this split needs at least one sentence pair")


def split_text(text: str) -> list[str]:
    """The lines of a text whose every line ends with "\n" (what `text_chunks` yields)."""
    return text.split("\n")[:-1]


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a gzip or plain UTF-8 text file, without line endings (a small file)."""
    return [line for chunk in line_chunks(path) for line in chunk]


def line_chunks(path: str | os.PathLike, chunk_lines: int = CHUNK_LINES) -> Iterator[list[str]]:
    """The lines of a gzip or plain UTF-8 file, without line endings, `chunk_lines` at a time."""
    for text, _ in text_chunks(path, chunk_lines):
        yield split_text(text)


def text_chunks(
    path: str | os.PathLike, chunk_lines: int = CHUNK_LINES
) -> Iterator[tuple[str, int]]:
    """The text of a gzip or plain UTF-8 file, `chunk_lines` lines at a time, and how many.

    Each line of a chunk ends with "\n", the last line of the file included; lines end at "\n"
    only ("\r\n" loses its "\r"; a lone "\r" stays in the line). A chunk is decoded as one
    text: a line at a time only to name the line that is not UTF-8.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 (the with block below closes it)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    with handle:
        if handle.read(2) == b"\x1f\x8b":
            handle.seek(0)
            stream: IO[bytes] = gzip.GzipFile(fileobj=handle)
        else:
            handle.seek(0)
            stream = handle
        number = 0  # lines read before this chunk
        while True:
            try:
                raw = list(itertools.islice(stream, chunk_lines))
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(
                    f"{path} is not a valid gzip file ({err}): the file is damaged or truncated"
                ) from None
            if not raw:
                return
            if number == 0 and raw[0].startswith(b"\xef\xbb\xbf"):
                raw[0] = raw[0][3:]
            try:
                text = b"".join(raw).decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError:
                _name_the_bad_line(raw, path, number)
                raise
            if not text.endswith("\n"):  # the file's last line
                text += "\n"
            yield text, len(raw)
            number += len(raw)


def _name_the_bad_line(raw: list[bytes], path: Path, before: int) -> None:
    """Raise the DataError that names the first line of `raw` that is not UTF-8."""
    for i, line in enumerate(raw):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}, line {before + i + 1}: not UTF-8 text (byte 0x{line[err.start]:02x}); "
                "convert the file to UTF-8"
            ) from None
