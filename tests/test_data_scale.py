"""The data path at scale: a memory-mapped cache, a streamed preparation in worker processes that
gives the same cache as one process, SentencePiece on a sample, waiting for another process's
preparation, and batches packed without a loop over sentences."""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from transformer_mt.config import DataConfig
from transformer_mt.data.buckets import pack, sort_by_length, split_batches, with_specials
from transformer_mt.data.cache import ArrayFile, Sentences, ids_dtype, word_max_size
from transformer_mt.data.corpus import line_chunks, read_lines
from transformer_mt.data.dataset import load_prepared, prepare, wait_for_prepared
from transformer_mt.data.subword import Subword
from transformer_mt.data.tokenize import Tokenizer
from transformer_mt.data.vocab import Vocab
from transformer_mt.data.workers import ChunkPool, resolve_workers
from transformer_mt.errors import DataError

# ---------------------------------------------------------------------------------------------
# A small custom corpus cut from Multi30k


def _custom_corpus(mirror: Path, folder: Path, pairs: int) -> dict[str, list[str]]:
    """The first `pairs` training pairs and 200 validation pairs of Multi30k as plain files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[str]] = {}
    for split, source, count in (("train", "train", pairs), ("valid", "val", 200)):
        for lang in ("de", "en"):
            lines = read_lines(mirror / f"{source}.{lang}.gz")[:count]
            path = folder / f"{split}.{lang}"
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            paths.setdefault(split, []).append(str(path))
    return paths


def _config(paths: dict[str, list[str]], root: Path, **settings) -> DataConfig:
    return DataConfig(name="custom", root=str(root), **paths, **settings)


def _cache_files(folder: Path) -> dict[str, bytes]:
    """Every file of a cache folder but the manifest's creation time, and the subword models'
    pieces (their files also record how many threads trained them)."""
    files = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".model":
            data = json.dumps(Subword(data, "bpe").vocab().to_list()).encode()
        if path.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        files[path.name] = data
    return files


# ---------------------------------------------------------------------------------------------
# The cache


def test_the_cache_is_read_by_the_slice_and_lengths_come_from_the_offsets(multi30k_de_en):
    """Loading opens the files: no Python object per sentence (the old loader built a list of
    ints per sentence, about 1 KB each, 60 MB for Multi30k's training split)."""
    tracemalloc.start()
    try:
        data = load_prepared(multi30k_de_en)
        train = data.split("train")
        lengths = train.src_lengths(), train.tgt_lengths()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(train) == 29000
    assert isinstance(train.src.ids, ArrayFile) and isinstance(train.tgt.ids, ArrayFile)
    assert train.src.ids.dtype == np.uint16  # a vocabulary under 65,536 entries
    offsets = np.load(data.path / "train.src.offsets.npy")
    assert np.array_equal(lengths[0], np.diff(offsets))
    assert lengths[0].dtype == np.int32
    # Two int32 length arrays (116 KB each) and the vocabularies' lists, nothing per sentence.
    assert peak < 4_000_000, peak


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_reading_sentences_maps_none_of_the_cache(multi30k_de_en):
    """The ids are read, not mapped: every page of a mapping the kernel fills around a touched
    one would count in the process's RSS (hundreds of MB on a corpus of millions)."""
    data = load_prepared(multi30k_de_en)
    train = data.split("train")
    ids = np.load(data.path / "train.tgt.ids.npy")
    offsets = np.load(data.path / "train.tgt.offsets.npy")
    for i in (0, 1, 14_321, len(train) - 1):
        assert train.tgt[i] == ids[offsets[i] : offsets[i + 1]].tolist()
    assert train.tgt[-1] == train.tgt[len(train) - 1]
    maps = Path("/proc/self/maps").read_text()
    assert str(data.path) not in maps


def test_a_selection_and_a_head_read_the_sentences_they_name(multi30k_de_en):
    train = load_prepared(multi30k_de_en).split("train")
    picked = train.select(np.array([7, 3, 7]))
    assert [picked.src[i] for i in range(3)] == [train.src[7], train.src[3], train.src[7]]
    assert picked.src_lengths().tolist() == [len(train.src[i]) for i in (7, 3, 7)]
    head = train.head(5)
    assert len(head) == 5 and head.tgt[4] == train.tgt[4]
    assert head.tgt_lengths().tolist() == [len(train.tgt[i]) for i in range(5)]
    with pytest.raises(IndexError):
        head.tgt[5]


def test_only_the_splits_asked_for_are_opened(multi30k_de_en, monkeypatch):
    opened = []

    class RecordingArrayFile(ArrayFile):
        def __init__(self, path: Path) -> None:
            opened.append(Path(path).name)
            super().__init__(path)

    monkeypatch.setattr("transformer_mt.data.cache.ArrayFile", RecordingArrayFile)
    data = load_prepared(multi30k_de_en)
    assert opened == []
    data.split("test2016")
    assert sorted(opened) == sorted(
        f"test2016.{side}.{kind}.npy" for side in ("src", "tgt") for kind in ("ids", "offsets")
    )


def test_ids_take_the_smallest_unsigned_type():
    assert ids_dtype(8000) == np.uint16
    assert ids_dtype(65536) == np.uint16
    assert ids_dtype(65537) == np.uint32
    sentences = Sentences.from_lists([[5, 6, 7], [], [8]])
    assert [sentences[i] for i in range(3)] == [[5, 6, 7], [], [8]]
    assert sentences.lengths().tolist() == [3, 0, 1]
    assert sentences.select(np.array([2, 0]))[:] == [[8], [5, 6, 7]]


# ---------------------------------------------------------------------------------------------
# The preparation


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["word", "bpe"])
def test_two_workers_write_the_same_cache_as_one(multi30k_mirror, tmp_path, vocab):
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=3000)
    settings = {"vocab": vocab, "vocab_size": 1000, "shared_vocab": vocab == "bpe"}
    one = prepare(_config(paths, tmp_path / "one", workers=1, **settings))
    two = prepare(_config(paths, tmp_path / "two", workers=2, **settings))
    assert one.name == two.name  # the worker count is not part of the cache's key
    files = _cache_files(one)
    assert files == _cache_files(two)
    assert "train.src.ids.npy" in files and not any(name.startswith(".") for name in files)


@pytest.mark.parametrize("vocab", ["word", "bpe", "unigram"])
def test_the_cache_holds_the_ids_of_the_plain_pipeline(multi30k_mirror, tmp_path, vocab):
    """What preparing always meant, written plainly over whole lists (as the cache of format 1 was
    made): spaCy tokens, a vocabulary (or one SentencePiece model) learnt from every training
    sentence, ids. The streamed, chunked, worker-run preparation must give the same ids."""
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=1500)
    cfg = _config(paths, tmp_path / "data", vocab=vocab, vocab_size=800, shared_vocab=True)
    prepare(cfg)
    data = load_prepared(cfg)
    src_tok, tgt_tok = Tokenizer("de"), Tokenizer("en")
    tokens = {
        split: (list(src_tok.pipe(read_lines(src))), list(tgt_tok.pipe(read_lines(tgt))))
        for split, (src, tgt) in (("train", paths["train"]), ("val", paths["valid"]))
    }
    train_src, train_tgt = tokens["train"]
    if vocab == "word":
        vocab_ = Vocab.build(train_src + train_tgt, cfg.min_freq, word_max_size(cfg))

        def ids(sentence: list[str]) -> list[int]:
            return vocab_.encode(sentence)
    else:
        model = Subword.train(train_src + train_tgt, vocab, 800, threads=1)  # as prepare() here
        vocab_ = model.vocab()

        def ids(sentence: list[str]) -> list[int]:
            return vocab_.encode(model.segment(sentence))

    assert data.src_vocab == vocab_ == data.tgt_vocab
    for split, (src, tgt) in tokens.items():
        prepared = data.split(split)
        assert prepared.src[:] == [ids(sentence) for sentence in src]
        assert prepared.tgt[:] == [ids(sentence) for sentence in tgt]


def test_subwords_train_on_a_sample_when_the_corpus_is_larger(multi30k_mirror, tmp_path, caplog):
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=2000)
    cfg = _config(
        paths, tmp_path / "data", vocab="bpe", vocab_size=500, shared_vocab=True, workers=1
    )
    with caplog.at_level(logging.INFO, logger="transformer_mt.data.dataset"):
        sampled = prepare(replace(cfg, subword_sample=1000))
    assert "subword model (500 pieces) on 1000 sentences" in caplog.text
    full = prepare(cfg)
    assert sampled != full  # data.subword_sample is part of the key
    a, b = (path / "src_subword.model" for path in (sampled, full))
    assert a.read_bytes() != b.read_bytes()
    # The sampled model still covers the whole corpus: no <unk> piece in the training ids.
    data = load_prepared(replace(cfg, subword_sample=1000))
    assert int(np.load(data.path / "train.src.ids.npy").max()) < len(data.src_vocab)
    assert data.src_subword is not None


def test_a_worker_that_cannot_start_raises_its_error_here():
    with (
        pytest.raises(ValueError, match="no such tool"),
        ChunkPool(2, _failing_start, ("x",)) as pool,
    ):
        list(pool.map(len, [[1], [2, 3]]))


def test_a_worker_that_dies_is_a_data_error_not_a_hang():
    with pytest.raises(DataError, match="worker process died"), ChunkPool(2, _no_start, ()) as pool:
        list(pool.map(_die, [1, 2, 3]))


def test_worker_results_keep_the_order_of_the_chunks():
    with ChunkPool(2, _no_start, ()) as pool:
        assert list(pool.map(_slow_square, range(12))) == [n * n for n in range(12)]


def _failing_start(name: str) -> None:
    raise ValueError(f"no such tool: {name}")


def _no_start() -> None:
    pass


def _die(_: int) -> None:
    os._exit(1)


def _slow_square(n: int) -> int:
    time.sleep(0.01 * (n % 3))
    return n * n


# ---------------------------------------------------------------------------------------------
# Waiting for another process's preparation


def test_waiting_returns_once_another_process_has_prepared(multi30k_mirror, tmp_path):
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=300)
    cfg = _config(paths, tmp_path / "data", workers=1, prepare_wait=1.0)
    preparing = threading.Timer(0.5, prepare, args=(cfg,))
    preparing.start()
    try:
        data = wait_for_prepared(cfg)
    finally:
        preparing.join()
    assert len(data.split("train")) == 300


def test_waiting_too_long_is_a_one_line_error_that_says_how_to_prepare(multi30k_mirror, tmp_path):
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=10)
    cfg = _config(paths, tmp_path / "data", prepare_wait=0.001)
    with pytest.raises(DataError, match="data.prepare_wait=0.001 minutes") as err:
        wait_for_prepared(cfg)
    assert "mt-prepare" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "data" / "cache").exists()  # it never prepares


# ---------------------------------------------------------------------------------------------
# Batches


def _greedy_pack(src: np.ndarray, tgt: np.ndarray, order: np.ndarray, max_tokens: int):
    """The plain loop over sentences that `pack` must agree with."""
    longest_side = np.maximum(src, tgt)
    batches, batch, longest = [], [], 0
    for index in order.tolist():
        length = int(longest_side[index])
        if batch and max(longest, length) * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, length)
    if batch:
        batches.append(batch)
    return batches


@pytest.mark.parametrize("max_tokens", [1, 30, 400, 4096])
def test_packing_equals_the_greedy_loop_over_sentences(max_tokens):
    rng = np.random.default_rng(max_tokens)
    # Source and target lengths that do not rise together, and some over the budget alone.
    src = with_specials(rng.integers(0, 120, 5000))
    tgt = with_specials(rng.integers(0, 120, 5000))
    for order in (sort_by_length(src, tgt, np.arange(5000)), rng.permutation(5000)):
        batches = split_batches(order, pack(src, tgt, order, max_tokens))
        assert [b.tolist() for b in batches] == _greedy_pack(src, tgt, order, max_tokens)


# ---------------------------------------------------------------------------------------------
# Damaged input


def test_a_damaged_gzip_file_is_a_one_line_error_naming_it(tmp_path):
    """Truncated, or 16 random bytes anywhere in the compressed data (some of which zlib itself
    reports, as `zlib.error`): always a DataError naming the file."""
    text = "".join(f"Satz Nummer {n} mit einigen Wörtern.\n" for n in range(20000)).encode()
    packed = gzip.compress(text)
    path = tmp_path / "train.de.gz"
    damaged = [packed[: len(packed) // 2]]
    rng = np.random.default_rng(0)
    for _ in range(40):
        copy = bytearray(packed)
        at = int(rng.integers(20, len(packed) - 20))
        copy[at : at + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        damaged.append(bytes(copy))
    for data in damaged:
        path.write_bytes(data)
        with pytest.raises(DataError, match="train.de.gz") as err:
            for _ in line_chunks(path, chunk_lines=1000):
                pass
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Checksums


def test_loading_reuses_the_corpus_checksums_until_a_file_changes(
    multi30k_mirror, tmp_path, monkeypatch
):
    paths = _custom_corpus(multi30k_mirror, tmp_path / "corpus", pairs=300)
    cfg = _config(paths, tmp_path / "data", workers=1)
    prepared = prepare(cfg)

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr("transformer_mt.data.corpus.sha256_file", no_hashing)
    assert load_prepared(cfg).path == prepared
    monkeypatch.undo()
    train_src = Path(paths["train"][0])
    with open(train_src, "a", encoding="utf-8") as handle:
        handle.write("Ein neuer Satz.\n")
    with open(paths["train"][1], "a", encoding="utf-8") as handle:
        handle.write("A new sentence.\n")
    with pytest.raises(DataError, match="no prepared data"):
        load_prepared(cfg)  # a changed file is hashed again: another key
    assert prepare(cfg) != prepared
    assert len(load_prepared(cfg).split("train")) == 301


def test_workers_default_to_every_core_but_one_process_for_a_small_corpus():
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(None, corpus_bytes=4 << 20) == 1  # Multi30k's size
    assert resolve_workers(None, corpus_bytes=1 << 30) == cores
    assert resolve_workers(3, corpus_bytes=4 << 20) == 3
