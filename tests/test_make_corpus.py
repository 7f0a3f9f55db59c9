"""scripts/make_corpus.py: synthetic corpora stay aligned, are reproducible, and copy val and test."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

from train_support import REPO

SPEC = importlib.util.spec_from_file_location("make_corpus", REPO / "scripts" / "make_corpus.py")
make_corpus = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(make_corpus)
FILES = {"train": "train", "val": "val", "test": "test_2016_flickr"}


def fake_multi30k(folder: Path, pairs: int = 7) -> None:
    """Multi30k-named gzip files whose line i reads `<lang>-<split>-i.` on both sides."""
    folder.mkdir()
    for split, stem in FILES.items():
        for lang in ("de", "en"):
            text = "".join(f"{lang}-{split}-{i}.\n" for i in range(pairs))
            (folder / f"{stem}.{lang}.gz").write_bytes(gzip.compress(text.encode()))


def make(tmp_path: Path, monkeypatch, out: str, *args: str) -> Path:
    argv = ["make_corpus.py", "--multi30k", str(tmp_path / "m30k"), "--out", str(tmp_path / out)]
    monkeypatch.setattr(sys, "argv", [*argv, *args])
    make_corpus.main()
    return tmp_path / out


def test_lines_pair_one_or_two_aligned_training_pairs(tmp_path, monkeypatch):
    fake_multi30k(tmp_path / "m30k")
    out = make(tmp_path, monkeypatch, "a", "--pairs", "250", "--seed", "3")
    de = (out / "train.de").read_text().splitlines()
    en = (out / "train.en").read_text().splitlines()
    assert len(de) == len(en) == 250
    counts = set()
    for src, tgt in zip(de, en, strict=True):
        src_ids = [word.split("-")[2] for word in src.split()]
        assert src_ids == [word.split("-")[2] for word in tgt.split()]
        assert all(word.startswith("de-train-") for word in src.split())
        counts.add(len(src_ids))
    assert counts == {1, 2}
    for split in ("val", "test"):
        assert (out / f"{split}.en").read_text().splitlines()[0] == f"en-{split}-0."


def test_same_seed_same_bytes_other_seed_other_text(tmp_path, monkeypatch):
    fake_multi30k(tmp_path / "m30k")
    first = make(tmp_path, monkeypatch, "a", "--pairs", "100", "--seed", "1")
    again = make(tmp_path, monkeypatch, "b", "--pairs", "100", "--seed", "1")
    other = make(tmp_path, monkeypatch, "c", "--pairs", "100", "--seed", "2")
    assert (first / "train.de").read_bytes() == (again / "train.de").read_bytes()
    assert (first / "train.de").read_bytes() != (other / "train.de").read_bytes()
