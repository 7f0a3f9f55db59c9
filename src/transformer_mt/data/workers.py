"""The pure work of a preparation, one chunk of lines at a time, and the pool that runs it.

`prepare` (dataset.py) owns the files, the order and the counts; the functions here take a chunk
of plain data and return plain data, so that they run the same in the preparing process
(`data.workers=1`) or in a pool of worker processes. Each process sets its tools up once
(`start_tokenizing`, `start_encoding`) and keeps them in `_tools`.

    tokenize_chunk(src_text, tgt_text, clean)    -> TokenizedChunk   spaCy, then (train) filtering
    encode_chunk(token_text, side)                -> (ids, lengths)   SentencePiece or word ids

A token line is a sentence's tokens joined by single spaces (spaCy never puts a space inside a
token), the form the temporary token files and SentencePiece's training both use.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from transformer_mt.data.corpus import split_text
from transformer_mt.data.subword import Subword
from transformer_mt.data.tokenize import Tokenizer
from transformer_mt.data.vocab import UNK, Vocab
from transformer_mt.errors import DataError

_tools: dict[str, Any] = {}  # this process's tokenizers or encoders


SMALL_CORPUS_BYTES = 32 << 20  # below this, worker processes cost more than they save


def resolve_workers(workers: int | None, corpus_bytes: int = SMALL_CORPUS_BYTES) -> int:
    """`data.workers`, None meaning every core this process may use, or one (this process) for a
    corpus under `SMALL_CORPUS_BYTES`: starting a process and its spaCy tokenizers takes seconds
    (Multi30k, 4 MB, prepares in 12 s in one process and 18 s with two)."""
    if workers is not None:
        return workers
    if corpus_bytes < SMALL_CORPUS_BYTES:
        return 1
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Tokenizing


@dataclass
class TokenizedChunk:
    """One chunk's token lines ("\\n"-joined, one per kept pair) and what cleaning removed."""

    src: str
    tgt: str
    pairs: int
    dropped_empty: int = 0
    filtered_long: int = 0
    src_counts: Counter | None = None  # token counts, when a word vocabulary is being learnt
    tgt_counts: Counter | None = None


def start_tokenizing(src_lang: str, tgt_lang: str, lowercase: bool, max_len: int) -> None:
    _tools.clear()
    _tools.update(src=Tokenizer(src_lang, lowercase), tgt=Tokenizer(tgt_lang, lowercase))
    _tools["max_len"] = max_len


def tokenize_chunk(task: tuple[str, str, bool, bool]) -> TokenizedChunk:
    """spaCy tokens of a chunk of pairs, given as the two sides' texts (lines each ended by
    "\n"). With `clean` (the training split) pairs with an empty side or longer than max_len
    tokens are left out and counted; with `count`, tokens are counted."""
    src_text, tgt_text, clean, count = task
    src_tokens = list(_tools["src"].pipe(split_text(src_text)))
    tgt_tokens = list(_tools["tgt"].pipe(split_text(tgt_text)))
    chunk = TokenizedChunk("", "", 0)
    if clean:
        max_len = _tools["max_len"]
        kept_src, kept_tgt = [], []
        for src, tgt in zip(src_tokens, tgt_tokens, strict=True):
            if not src or not tgt:
                chunk.dropped_empty += 1
            elif len(src) > max_len or len(tgt) > max_len:
                chunk.filtered_long += 1
            else:
                kept_src.append(src)
                kept_tgt.append(tgt)
        src_tokens, tgt_tokens = kept_src, kept_tgt
    if count:
        chunk.src_counts = Counter(itertools.chain.from_iterable(src_tokens))
        chunk.tgt_counts = Counter(itertools.chain.from_iterable(tgt_tokens))
    chunk.src = "".join(" ".join(tokens) + "\n" for tokens in src_tokens)
    chunk.tgt = "".join(" ".join(tokens) + "\n" for tokens in tgt_tokens)
    chunk.pairs = len(src_tokens)
    return chunk


# ---------------------------------------------------------------------------------------------
# Encoding


def start_encoding(
    src_vocab: list[str],
    tgt_vocab: list[str],
    subword: tuple[str, bytes, bytes] | None,
    dtypes: tuple[str, str],
) -> None:
    """Set up both sides' encoders: vocabularies (as lists), subword (kind, src bytes, tgt bytes)."""
    _tools.clear()
    models = (None, None) if subword is None else (
        Subword(subword[1], subword[0]), Subword(subword[2], subword[0])
    )  # fmt: skip
    for side, itos, model, dtype in zip(
        ("src", "tgt"), (src_vocab, tgt_vocab), models, dtypes, strict=True
    ):
        _tools[side] = _Encoder(Vocab(itos), model, np.dtype(dtype))


def encode_chunk(task: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of a chunk of token lines of one side (`src` or `tgt`), end to end, and their lengths.
    The lines come as one text, each ended by "\n" (cheaper to send than a list of lines)."""
    text, side = task
    return _tools[side](text.split("\n")[:-1])


class _Encoder:
    """Token lines -> ids, through a table of the words seen so far and their ids.

    SentencePiece (with its whitespace splitting, as here) segments each space-separated word on
    its own, so a sentence's ids are its words' ids end to end: each distinct word is encoded
    once (SentencePiece's batch call for the new words of a chunk, or a vocabulary lookup), and a
    chunk's ids are gathered from the table with numpy. A frequent word costs a dictionary lookup
    instead of a segmentation. The table holds at most `WORD_TABLE_SIZE` words; when full it
    starts again (memory stays bounded however many distinct words a corpus has).
    """

    def __init__(self, vocab: Vocab, subword: Subword | None, dtype: np.dtype) -> None:
        self.vocab, self.subword, self.dtype = vocab, subword, dtype
        self.native_ids = subword is not None and subword.vocab() == vocab
        self._clear()

    def _clear(self) -> None:
        self._slots: dict[str, int] = {}  # word -> its row in the table
        self._starts = np.zeros(0, dtype=np.int64)  # row -> where its ids start in _ids
        self._counts = np.zeros(0, dtype=np.int64)  # row -> how many ids
        self._ids = np.zeros(0, dtype=self.dtype)

    def __call__(self, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
        words = " ".join(line for line in lines if line).split(" ") if any(lines) else []
        new = [word for word in dict.fromkeys(words) if word not in self._slots]
        if len(self._slots) + len(new) > WORD_TABLE_SIZE:
            self._clear()
            new = list(dict.fromkeys(words))
        if new:
            self._add(new)
        rows = np.fromiter(map(self._slots.__getitem__, words), dtype=np.int64, count=len(words))
        counts = self._counts[rows]
        ends = np.cumsum(counts)
        # Word k's ids are _ids[starts[k] : starts[k] + counts[k]], laid end to end.
        shift = np.repeat(self._starts[rows] - (ends - counts), counts)
        ids = self._ids[shift + np.arange(len(shift))]
        words_per_line = [line.count(" ") + 1 if line else 0 for line in lines]
        word_ends = np.cumsum(words_per_line, dtype=np.int64)
        id_ends = np.concatenate(([0], ends))[word_ends]
        lengths = np.diff(id_ends, prepend=0)
        return ids, lengths

    def _add(self, words: list[str]) -> None:
        """Encode `words` (new to the table) and append them to it."""
        if self.subword is not None:
            seqs = self.subword.encode_lines(words, as_ids=self.native_ids)
        else:
            seqs = [[word] for word in words]
        if not (self.subword is not None and self.native_ids):
            stoi = self.vocab.stoi
            seqs = [[stoi.get(token, UNK) for token in seq] for seq in seqs]
        counts = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        starts = len(self._ids) + np.cumsum(counts) - counts
        first = len(self._slots)
        self._slots.update(zip(words, range(first, first + len(words)), strict=True))
        self._starts = np.concatenate((self._starts, starts))
        self._counts = np.concatenate((self._counts, counts))
        added = np.fromiter(itertools.chain.from_iterable(seqs), self.dtype, int(counts.sum()))
        self._ids = np.concatenate((self._ids, added))


WORD_TABLE_SIZE = 500_000  # distinct words an encoding process keeps (tens of MB)


# ---------------------------------------------------------------------------------------------
# The pool


class ChunkPool:
    """`map` of a chunk function in `workers` processes (spawned: safe after torch is loaded),
    results in input order, at most two chunks per worker in flight; `workers=1` runs in this
    process. Use as a context manager: leaving it stops the workers.

    An error while a worker sets up (say, a language spaCy does not know) or runs a chunk is
    raised here, in the caller, as it was raised there; a worker that dies (killed, out of
    memory) is a DataError, never a hang.
    """

    def __init__(self, workers: int, start: Callable[..., None], args: tuple) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_or_keep_error,
                initargs=(start, args),
            )
        else:
            start(*args)

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
        if self._pool is None:
            yield from map(fn, tasks)
            return
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(self._pool.submit(_run, fn, task))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as error:
            raise DataError(
                "a data preparation worker process died: out of memory or killed (try fewer "
                "data.workers), or a script of yours that prepares data lacks the "
                '`if __name__ == "__main__":` guard that spawned processes need'
            ) from error

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=exc_info[0] is not None)
        _tools.clear()


def _start_or_keep_error(start: Callable[..., None], args: tuple) -> None:
    """A worker's initializer: an error is kept for its first chunk to raise (an initializer
    that raises would break the whole pool and lose the error's message)."""
    try:
        start(*args)
    except Exception as error:  # noqa: BLE001 - raised again by _run, in the caller
        _tools["error"] = error


def _run(fn: Callable[[Any], Any], task: Any) -> Any:
    if "error" in _tools:
        raise _tools["error"]
    return fn(task)
