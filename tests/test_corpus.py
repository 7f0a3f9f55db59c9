import gzip
import http.server
import shutil
import socket
import threading
from functools import partial
from pathlib import Path

import pytest

from transformer_mt.config import DataConfig
from transformer_mt.data.corpus import (
    SHA256,
    SPLITS,
    available_splits,
    corpus_files,
    line_chunks,
    read_lines,
    read_parallel,
    split_paths,
    text_chunks,
)
from transformer_mt.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Reading


def test_gzip_and_plain_files_read_the_same(tmp_path):
    text = "Ein Hund.\nZwei Katzen.\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "a.gz").write_bytes(gzip.compress(text.encode()))
    assert (
        read_lines(tmp_path / "a.txt")
        == read_lines(tmp_path / "a.gz")
        == ["Ein Hund.", "Zwei Katzen."]
    )


def test_bom_crlf_and_a_last_line_without_newline(tmp_path):
    (tmp_path / "src").write_bytes("\ufeffEin Hund.\r\nZwei  Katzen.\r\nDrei".encode())
    (tmp_path / "tgt").write_bytes(b"A dog.\nTwo cats.\nThree\n")
    src, tgt = read_parallel(tmp_path / "src", tmp_path / "tgt")
    assert src == ["Ein Hund.", "Zwei  Katzen.", "Drei"]
    assert tgt == ["A dog.", "Two cats.", "Three"]


def test_empty_lines_inside_a_file_are_kept(tmp_path):
    (tmp_path / "f").write_text("a\n\n \nb\n", encoding="utf-8")
    assert read_lines(tmp_path / "f") == ["a", "", " ", "b"]


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    (tmp_path / "train.de").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "train.en").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_parallel(tmp_path / "train.de", tmp_path / "train.en")
    message = str(err.value)
    assert "train.de has 3 lines" in message and "train.en has 2" in message


def test_text_that_is_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "latin1.de").write_bytes("gut\nschön\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.de, line 2: not UTF-8"):
        read_lines(tmp_path / "latin1.de")


def test_a_bad_line_in_a_later_chunk_is_named_by_its_number_in_the_file(tmp_path):
    lines = [f"Satz {i}".encode() for i in range(1, 11)]
    lines[7] = "schön".encode("latin-1")  # line 8: in the third chunk of three lines
    (tmp_path / "big.de").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"big\.de, line 8: not UTF-8 text \(byte 0xf6\)"):
        list(line_chunks(tmp_path / "big.de", chunk_lines=3))


def test_chunk_texts_end_every_line_and_keep_a_lone_carriage_return(tmp_path):
    (tmp_path / "f").write_bytes(b"a\r\nb\rc\nd\r\ne\r")
    assert list(text_chunks(tmp_path / "f", chunk_lines=2)) == [("a\nb\rc\n", 2), ("d\ne\r\n", 2)]
    assert read_lines(tmp_path / "f") == ["a", "b\rc", "d", "e\r"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nothere.de does not exist"):
        read_lines(tmp_path / "nothere.de")
    (tmp_path / "empty.de").write_text("")
    (tmp_path / "empty.en").write_text("")
    assert read_parallel(tmp_path / "empty.de", tmp_path / "empty.en") == ([], [])
    with pytest.raises(DataError, match="empty.de is empty"):
        read_parallel(tmp_path / "empty.de", tmp_path / "empty.en", allow_empty=False)


# ---------------------------------------------------------------------------------------------
# Splits


def test_split_names_per_language_pair():
    assert available_splits(DataConfig(src="de", tgt="en")) == tuple(SPLITS)
    assert available_splits(DataConfig(src="cs", tgt="en")) == (
        "train",
        "val",
        "test2016",
        "test2018",
    )
    with pytest.raises(DataError, match="no test2017 split for cs-en"):
        corpus_files(DataConfig(src="cs", tgt="en"), ["test2017"])
    with pytest.raises(DataError, match="unknown split 'test2019'"):
        corpus_files(DataConfig(), ["test2019"])


def test_the_sum_table_covers_every_file():
    for split in SPLITS:
        for lang in ("en", "de", "fr", "cs"):
            if split in ("test2017", "mscoco2017") and lang == "cs":
                continue
            assert len(SHA256[f"{SPLITS[split]}.{lang}.gz"]) == 64


def test_custom_corpus_split_names_and_files(tmp_path):
    for name in ("train.de", "train.en", "val.de", "val.en", "test.de", "test.en"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    cfg = DataConfig(
        name="custom",
        train=[str(tmp_path / "train.de"), str(tmp_path / "train.en")],
        valid=[str(tmp_path / "val.de"), str(tmp_path / "val.en")],
        test=[str(tmp_path / "test.de"), str(tmp_path / "test.en")],
    )
    files = corpus_files(cfg)
    assert list(files) == ["train", "val", "test"]
    assert files["test"].src == tmp_path / "test.de"
    cfg.test = None
    assert list(corpus_files(cfg)) == ["train", "val"]
    cfg.valid = [str(tmp_path / "val.de"), str(tmp_path / "missing.en")]
    with pytest.raises(DataError, match="missing.en does not exist"):
        corpus_files(cfg)
    cfg.valid = None
    with pytest.raises(DataError, match=r"set data\.valid="):
        corpus_files(cfg)
    cfg.train = [str(tmp_path / "train.de")]
    with pytest.raises(ConfigError, match="must list two files"):
        corpus_files(cfg)


# ---------------------------------------------------------------------------------------------
# Fetching from a mirror folder


def _partial_mirror(multi30k_mirror: Path, folder: Path, stems: list[str]) -> Path:
    folder.mkdir()
    for stem in stems:
        for lang in ("de", "en"):
            shutil.copy(multi30k_mirror / f"{stem}.{lang}.gz", folder)
    return folder


def test_folder_mirror_is_copied_verified_and_never_fetched_twice(tmp_path, multi30k_mirror):
    mirror = _partial_mirror(multi30k_mirror, tmp_path / "mirror", ["val", "test_2016_flickr"])
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=str(mirror))
    files = corpus_files(cfg, ["val", "test2016"])
    assert files["val"].src == tmp_path / "data" / "multi30k" / "val.de.gz"
    assert files["val"].src.read_bytes() == (mirror / "val.de.gz").read_bytes()
    assert files["test2016"].tgt_sha256 == SHA256["test_2016_flickr.en.gz"]
    shutil.rmtree(mirror)  # the files are here now: nothing is fetched again
    assert split_paths(cfg, "val") == (files["val"].src, files["val"].tgt)
    offline = corpus_files(DataConfig(root=cfg.root, mirror=str(mirror)), ["val"], fetch=False)
    assert offline["val"].src == files["val"].src


def test_a_damaged_local_copy_is_fetched_again(tmp_path, multi30k_mirror):
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=str(multi30k_mirror))
    src, _ = split_paths(cfg, "val")
    src.write_bytes(b"damaged")
    assert split_paths(cfg, "val")[0].read_bytes() == (multi30k_mirror / "val.de.gz").read_bytes()


def test_config_mirror_wins_over_the_environment(tmp_path, multi30k_mirror, monkeypatch):
    monkeypatch.setenv("MT_DATA_MIRROR", str(tmp_path / "nowhere"))
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=str(multi30k_mirror))
    assert split_paths(cfg, "test2016")[0].is_file()
    cfg = DataConfig(root=str(tmp_path / "data2"))
    with pytest.raises(DataError, match="mirror folder .*nowhere does not exist"):
        split_paths(cfg, "test2016")
    monkeypatch.setenv("MT_DATA_MIRROR", str(multi30k_mirror))
    assert split_paths(cfg, "test2016")[1].is_file()


def test_a_test_split_missing_from_the_mirror_is_skipped_unless_asked_for(
    tmp_path, multi30k_mirror
):
    mirror = _partial_mirror(
        multi30k_mirror, tmp_path / "mirror", ["train", "val", "test_2016_flickr"]
    )
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=str(mirror))
    assert list(corpus_files(cfg)) == ["train", "val", "test2016"]
    with pytest.raises(DataError, match="test_2018_flickr.de.gz is not in the mirror folder"):
        split_paths(cfg, "test2018")
    (mirror / "val.en.gz").unlink()
    (tmp_path / "data" / "multi30k" / "val.en.gz").unlink()
    with pytest.raises(DataError, match="val.en.gz is not in the mirror folder"):
        corpus_files(cfg)  # train and val are never optional


def test_without_fetching_only_local_files_count(tmp_path, multi30k_mirror):
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=str(multi30k_mirror))
    with pytest.raises(DataError, match="is missing"):
        corpus_files(cfg, ["val"], fetch=False)
    assert not (tmp_path / "data" / "multi30k" / "val.de.gz").exists()


# ---------------------------------------------------------------------------------------------
# Downloading over HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_mirror(tmp_path, multi30k_mirror):
    """A throw-away HTTP server on 127.0.0.1 serving a few mirror files and one corrupted file."""
    served = _partial_mirror(multi30k_mirror, tmp_path / "served", ["train", "val"])
    corrupted = bytearray((multi30k_mirror / "test_2016_flickr.de.gz").read_bytes())
    corrupted[100] ^= 0xFF
    (served / "test_2016_flickr.de.gz").write_bytes(bytes(corrupted))
    shutil.copy(multi30k_mirror / "test_2016_flickr.en.gz", served)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_QuietHandler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_download_verifies_and_rejects_a_corrupted_file(tmp_path, http_mirror):
    url, served = http_mirror
    cfg = DataConfig(root=str(tmp_path / "data"), mirror=url)
    folder = tmp_path / "data" / "multi30k"
    files = corpus_files(cfg, ["train", "val"])
    assert files["train"].src.read_bytes() == (served / "train.de.gz").read_bytes()
    assert read_lines(files["val"].tgt)[0] == "A group of men are loading cotton onto a truck"

    with pytest.raises(DataError) as err:
        split_paths(cfg, "test2016")
    message = str(err.value)
    assert "test_2016_flickr.de.gz" in message and "SHA-256" in message and "deleted" in message
    assert sorted(p.name for p in folder.iterdir()) == [
        "train.de.gz",
        "train.en.gz",
        "val.de.gz",
        "val.en.gz",
    ]

    # The default set of splits: the corrupted file is an error, not a skipped split ...
    with pytest.raises(DataError, match="test_2016_flickr.de.gz"):
        corpus_files(cfg)
    # ... while test splits the server does not have (HTTP 404) are skipped.
    (served / "test_2016_flickr.de.gz").unlink()
    assert list(corpus_files(cfg)) == ["train", "val"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_a_failed_download_names_the_url_the_reason_and_the_mirror_option(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port on which nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr("transformer_mt.data.corpus.BASE_URL", f"http://127.0.0.1:{port}/raw")
    monkeypatch.delenv("MT_DATA_MIRROR", raising=False)
    with pytest.raises(DataError) as err:
        split_paths(DataConfig(root=str(tmp_path)), "val")
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/raw/val.de.gz" in message
    assert "refused" in message.lower() and "data.mirror" in message and "\n" not in message
    assert not any((tmp_path / "multi30k").iterdir())


def test_test_splits_that_fail_to_download_are_skipped_with_a_warning(
    tmp_path, multi30k_mirror, monkeypatch, caplog
):
    cfg = DataConfig(root=str(tmp_path), mirror=str(multi30k_mirror))
    corpus_files(cfg, ["train", "val"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr("transformer_mt.data.corpus.BASE_URL", f"http://127.0.0.1:{port}/raw")
    monkeypatch.delenv("MT_DATA_MIRROR", raising=False)
    cfg.mirror = None
    with caplog.at_level("WARNING", logger="transformer_mt.data.corpus"):
        assert list(corpus_files(cfg)) == ["train", "val"]
    assert f"cannot download http://127.0.0.1:{port}/raw/test_2016_flickr.de.gz" in caplog.text
