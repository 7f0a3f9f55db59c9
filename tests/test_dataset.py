import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from transformer_mt.config import DataConfig
from transformer_mt.data.cache import cache_key
from transformer_mt.data.corpus import SHA256, read_lines
from transformer_mt.data.dataset import load_or_prepare, load_prepared, prepare
from transformer_mt.data.tokenize import Tokenizer
from transformer_mt.data.vocab import UNK
from transformer_mt.errors import DataError

# ---------------------------------------------------------------------------------------------
# Multi30k


def test_multi30k_de_en_is_prepared_with_every_split_the_mirror_has(
    multi30k_de_en, multi30k_mirror
):
    data = load_prepared(multi30k_de_en)
    counts = {name: len(split) for name, split in data.splits.items()}
    assert counts == {
        "train": 29000,
        "val": 1014,
        "test2016": 1000,
        "test2017": 1000,
        "mscoco2017": 461,
    }
    manifest = data.manifest
    assert manifest["counts"]["train"] == {
        "lines": 29000,
        "dropped_empty": 0,
        "filtered_long": 0,
        "pairs": 29000,
    }
    assert manifest["files"]["val"]["src"]["sha256"] == SHA256["val.de.gz"]
    assert manifest["vocab_sizes"] == {"src": len(data.src_vocab), "tgt": len(data.tgt_vocab)}
    assert 5000 < len(data.tgt_vocab) < len(data.src_vocab) < 12000  # German has more word forms
    val = data.split("val")
    assert val.src_text == read_lines(multi30k_mirror / "val.de.gz")
    assert val.ref_text == read_lines(multi30k_mirror / "val.en.gz")
    assert data.splits["train"].src_text is None
    with pytest.raises(DataError, match="'test2018' is not in the prepared data"):
        data.split("test2018")


def test_ids_are_the_vocabulary_ids_of_the_tokens(multi30k_de_en):
    data = load_prepared(multi30k_de_en)
    val = data.split("val")
    tokenizer = Tokenizer("de")
    for ids, line in zip(val.src[:100], val.src_text[:100], strict=True):
        tokens = tokenizer.tokenize(line)
        assert data.src_vocab.decode(ids) == [t if t in data.src_vocab else "<unk>" for t in tokens]
    assert any(UNK in ids for ids in val.src)  # rare validation words are not in the vocabulary


def test_loading_takes_well_under_5_seconds_and_imports_no_spacy(multi30k_de_en):
    code = (
        "import sys, time\n"
        "from transformer_mt.config import DataConfig\n"
        "from transformer_mt.data.dataset import load_prepared\n"
        f"cfg = DataConfig(root={multi30k_de_en.root!r}, mirror={multi30k_de_en.mirror!r})\n"
        "start = time.perf_counter()\n"
        "data = load_prepared(cfg)\n"
        "print(f'{time.perf_counter() - start:.3f}')\n"
        "assert len(data.splits['train']) == 29000\n"
        "assert 'spacy' not in sys.modules and 'torch' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    seconds = float(result.stdout.split()[-1])
    print(f"load_prepared(Multi30k de-en): {seconds:.2f} s")
    assert seconds < 5.0


def test_an_unchanged_setting_loads_and_load_time_settings_share_the_cache(multi30k_de_en):
    path = prepare(multi30k_de_en)
    manifest_mtime = (path / "manifest.json").stat().st_mtime_ns
    assert prepare(multi30k_de_en) == path
    assert (path / "manifest.json").stat().st_mtime_ns == manifest_mtime
    quick = replace(multi30k_de_en, max_tokens=1000, limit_train=100)
    assert cache_key(quick) == cache_key(multi30k_de_en)
    full, limited = load_prepared(multi30k_de_en), load_prepared(quick)
    assert len(limited.splits["train"]) == 100
    assert limited.splits["train"].src[:] == full.splits["train"].src[:100]
    assert len(limited.splits["val"]) == len(full.splits["val"])
    for changed in ({"min_freq": 3}, {"lowercase": True}, {"max_len": 50}, {"shared_vocab": True}):
        assert cache_key(replace(multi30k_de_en, **changed)) != cache_key(multi30k_de_en)


# ---------------------------------------------------------------------------------------------
# A custom corpus


def _custom(
    tmp_path: Path, train: tuple[str, str], valid: tuple[str, str], **settings
) -> DataConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    paths = {}
    for name, (src, tgt) in {"train": train, "valid": valid}.items():
        for lang, text in (("de", src), ("en", tgt)):
            path = corpus / f"{name}.{lang}"
            path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
            paths.setdefault(name, []).append(str(path))
    return DataConfig(name="custom", root=str(tmp_path / "data"), **paths, **settings)


TRAIN_DE = "\ufeffein Hund läuft\r\n   \r\nein Hund läuft\r\nzwei Hunde laufen\r\neins zwei drei vier fünf sechs\r\n\r\nein Hund"
TRAIN_EN = "a dog runs\nsomething\na dog runs\ntwo dogs run\none two three four five six\n\na dog\n"
VALID = ("ein Hund\n\neins zwei drei vier fünf sechs\n", "a dog\n\none two three four five six\n")


def test_custom_training_pairs_are_cleaned_and_counted(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID, min_freq=1, max_len=5)
    data = load_or_prepare(cfg)
    assert data.manifest["counts"]["train"] == {
        "lines": 7,
        "dropped_empty": 2,
        "filtered_long": 1,
        "pairs": 4,
    }
    train = data.splits["train"]
    decoded = [" ".join(data.src_vocab.decode(ids)) for ids in train.src]
    assert decoded == [
        "ein Hund läuft",
        "ein Hund läuft",
        "zwei Hunde laufen",
        "ein Hund",
    ]  # duplicates kept
    assert not any(token.startswith("\ufeff") for token in data.src_vocab.itos)
    # Every validation line stays, empty and long ones included, so hypotheses align with references.
    val = data.split("val")
    assert val.src_text == ["ein Hund", "", "eins zwei drei vier fünf sechs"]
    assert [len(ids) for ids in val.src] == [2, 0, 6]
    assert set(data.splits) == {"train", "val"}


def test_shared_vocabulary_covers_both_sides(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID, min_freq=1, shared_vocab=True)
    data = load_or_prepare(cfg)
    assert data.src_vocab == data.tgt_vocab
    assert "Hund" in data.src_vocab and "dogs" in data.src_vocab
    assert json.loads((data.path / "src_vocab.json").read_text()) == data.tgt_vocab.to_list()


def test_a_changed_setting_or_file_prepares_anew(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID, min_freq=1)
    first = prepare(cfg)
    second = prepare(replace(cfg, min_freq=2))
    assert first != second and first.is_dir() and second.is_dir()
    assert len(load_prepared(replace(cfg, min_freq=2)).src_vocab) < len(
        load_prepared(cfg).src_vocab
    )
    Path(cfg.valid[1]).write_text("a cat\n\none two three four five six\n", encoding="utf-8")
    third = prepare(cfg)
    assert third not in (first, second)
    assert load_prepared(cfg).split("val").ref_text[0] == "a cat"


def test_load_prepared_without_a_cache_says_to_prepare(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID)
    with pytest.raises(DataError, match="run `python scripts/prepare_data.py`"):
        load_prepared(cfg)


@pytest.mark.parametrize(
    ("train", "valid", "match"),
    [
        (("a\nb\n", "a\n"), VALID, r"train\.de has 2 lines but .*train\.en has 1"),
        (("", ""), VALID, r"train\.de is empty"),
        (
            ("ein Hund\n", "a dog\n"),
            (b"gut\n", "schön\n".encode("latin-1")),
            r"valid\.en, line 1: not UTF-8",
        ),
        (("   \n", "x\n"), VALID, "no training pairs left"),
    ],
    ids=["line-counts", "empty-train", "not-utf8", "nothing-left"],
)
def test_bad_input_is_one_error_and_leaves_nothing_behind(tmp_path, train, valid, match):
    cfg = _custom(tmp_path, train, valid)
    with pytest.raises(DataError, match=match) as err:
        prepare(cfg)
    assert "\n" not in str(err.value)
    cache = tmp_path / "data" / "cache"
    assert not cache.exists() or not any(cache.iterdir())


def test_an_existing_cache_is_used_without_the_mirror(multi30k_de_en, monkeypatch):
    monkeypatch.delenv("MT_DATA_MIRROR", raising=False)
    monkeypatch.setattr("transformer_mt.data.corpus.BASE_URL", "http://127.0.0.1:9/unreachable")
    offline = replace(multi30k_de_en, mirror=None)
    assert load_or_prepare(offline).path == load_prepared(multi30k_de_en).path


def test_a_damaged_cache_is_a_one_line_error(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID)
    path = prepare(cfg)
    for name in ("val.src.ids.npy", "val.tgt.offsets.npy"):
        intact = (path / name).read_bytes()
        for damaged in (b"garbage", intact[: len(intact) // 2]):
            (path / name).write_bytes(damaged)
            data = load_prepared(cfg)
            assert len(data.split("train")) > 0  # the other splits still load
            with pytest.raises(
                DataError, match="is damaged .*delete that folder and prepare again"
            ):
                data.split("val")
        (path / name).write_bytes(intact)


def test_a_cache_of_the_old_format_is_refused_in_one_line(tmp_path):
    cfg = _custom(tmp_path, (TRAIN_DE, TRAIN_EN), VALID)
    path = prepare(cfg)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="has cache format 1, this version reads format 2") as err:
        load_prepared(cfg)
    assert "\n" not in str(err.value)
