import gzip
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_support import assert_imports_leave_out

from transformer_mt.cli.prepare import main

REPO = Path(__file__).resolve().parents[1]


def run_prepare(monkeypatch, capsys, *overrides: str) -> tuple[int, str, str]:
    """Run `mt-prepare` in this process; return (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *overrides])
    status = 0
    try:
        main()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_prepared(root: Path) -> None:
    cache = root / "cache"
    assert not cache.exists() or not any(cache.iterdir())
    downloads = root / "multi30k"
    assert not downloads.exists() or not [p for p in downloads.iterdir() if p.name.startswith(".")]


def test_the_script_prepares_en_fr_and_a_second_run_loads_the_cache(tmp_path, multi30k_mirror):
    command = [
        sys.executable,
        str(REPO / "scripts" / "prepare_data.py"),
        "data.src=en",
        "data.tgt=fr",
    ]
    command.append(f"data.root={tmp_path}")
    env = {**os.environ, "MT_DATA_MIRROR": str(multi30k_mirror)}
    timings, outputs = [], []
    for _ in range(2):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
        timings.append(time.perf_counter() - start)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    print(f"prepare_data.py en-fr: first run {timings[0]:.1f} s, second run {timings[1]:.1f} s")
    assert "skipping split test2018" in outputs[0]  # the offline copy has no test2018 files
    assert "copying" not in outputs[1]  # the second run only loads
    for out in outputs:
        assert f"prepared data: {tmp_path}/cache/multi30k-en-fr-" in out
        assert re.search(r"train\s+29000", out) and re.search(r"mscoco2017\s+461", out)
        assert re.search(r"vocabulary: en \d+ tokens, fr \d+ tokens", out)
        assert re.search(r"padding at data.max_tokens=4096: \d+\.\d% ", out)
    assert outputs[0].splitlines()[-8:] == outputs[1].splitlines()[-8:]
    assert timings[1] < timings[0]
    assert sorted(os.listdir(tmp_path)) == [
        "cache",
        "multi30k",
    ]  # no log file in the working folder


def test_the_entry_point_loads_neither_torch_nor_spacy_until_it_prepares():
    # ... and the other entry points leave plotting, TensorBoard and spaCy until they are used:
    # each of those costs start-up time (matplotlib alone about 0.35 s) that a short command,
    # or a test starting one, pays for nothing.
    commands = [
        "transformer_mt.cli.train",
        "transformer_mt.cli.translate",
        "transformer_mt.cli.evaluate",
    ]
    assert_imports_leave_out(
        ["transformer_mt.cli.prepare"],
        ["torch", "spacy"],
        (commands, ["matplotlib", "tensorboard", "spacy"]),
    )


def test_the_summary_reports_counts_vocabulary_and_padding(monkeypatch, capsys, multi30k_de_en):
    status, out, _ = run_prepare(monkeypatch, capsys, f"data.root={multi30k_de_en.root}")
    assert status == 0
    assert re.search(
        r"train\s+29000\s+\(of 29000 lines: dropped 0 with an empty side, filtered 0", out
    )
    share = float(re.search(r"data.max_tokens=4096: (\d+\.\d)%", out).group(1))
    assert share < 10.0
    status, out, _ = run_prepare(
        monkeypatch, capsys, f"data.root={multi30k_de_en.root}", "data.limit_train=1000"
    )
    assert status == 0
    assert "data.limit_train=1000: training on 1000 pairs" in out


def test_a_misspelt_key_fails_with_hydras_message(monkeypatch, capsys, tmp_path):
    status, out, err = run_prepare(monkeypatch, capsys, "data.srcc=en", f"data.root={tmp_path}")
    assert status == 2  # Hydra's refusal, before our code runs, as one line
    assert "Key 'srcc' not in 'DataConfig'" in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data.src=xx"], ["data.src='xx' is not a Multi30k language"]),
        (["data.src=en", "data.tgt=en"], ["data.src and data.tgt are both 'en'"]),
    ],
    ids=["unknown-language", "same-language"],
)
def test_config_errors_are_one_line(monkeypatch, capsys, tmp_path, overrides, fragments):
    status, _, err = run_prepare(monkeypatch, capsys, *overrides, f"data.root={tmp_path}")
    assert_one_line_error(status, err, *fragments)
    assert not any(tmp_path.iterdir())


def test_a_checksum_mismatch_names_the_file_and_deletes_the_bad_copy(
    monkeypatch, capsys, tmp_path, multi30k_mirror
):
    mirror = tmp_path / "mirror"
    shutil.copytree(multi30k_mirror, mirror)
    (mirror / "val.en.gz").chmod(0o644)
    (mirror / "val.en.gz").write_bytes(gzip.compress(b"A dog.\n"))
    root = tmp_path / "data"
    status, _, err = run_prepare(monkeypatch, capsys, f"data.root={root}", f"data.mirror={mirror}")
    assert_one_line_error(status, err, "val.en.gz", "SHA-256", "deleted")
    assert not (root / "multi30k" / "val.en.gz").exists()
    assert_nothing_prepared(root)


# ---------------------------------------------------------------------------------------------
# A custom corpus


def write(path: Path, data: str | bytes) -> str:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def custom_overrides(tmp_path: Path, train_src, train_tgt, src="de", tgt="en") -> list[str]:
    valid = [write(tmp_path / "val.de", "ein Hund\n"), write(tmp_path / "val.en", "a dog\n")]
    train = [str(tmp_path / "train.de"), str(tmp_path / "train.en")]
    if train_src is not None:
        write(tmp_path / "train.de", train_src)
    if train_tgt is not None:
        write(tmp_path / "train.en", train_tgt)
    return [
        "data=custom",
        f"data.src={src}",
        f"data.tgt={tgt}",
        f"data.train=[{train[0]},{train[1]}]",
        f"data.valid=[{valid[0]},{valid[1]}]",
        f"data.root={tmp_path / 'data'}",
    ]


@pytest.mark.parametrize(
    ("train_src", "train_tgt", "fragments"),
    [
        ("a\nb\nc\n", "a\nb\n", ["train.de has 3 lines but", "train.en has 2"]),
        ("gut\n", "schön\n".encode("latin-1"), ["train.en, line 1: not UTF-8"]),
        ("", "", ["train.de is empty"]),
        (None, "a dog\n", ["train.de does not exist"]),
    ],
    ids=["line-counts", "not-utf8", "empty-train", "missing-file"],
)
def test_bad_corpus_files_are_one_line_errors(
    monkeypatch, capsys, tmp_path, train_src, train_tgt, fragments
):
    overrides = custom_overrides(tmp_path, train_src, train_tgt)
    status, _, err = run_prepare(monkeypatch, capsys, *overrides)
    assert_one_line_error(status, err, *fragments)
    assert_nothing_prepared(tmp_path / "data")


def test_an_unknown_language_code_of_a_custom_corpus(monkeypatch, capsys, tmp_path):
    overrides = custom_overrides(tmp_path, "x\n", "y\n", src="qq")
    status, _, err = run_prepare(monkeypatch, capsys, *overrides)
    assert_one_line_error(status, err, "no spaCy tokenizer for language code 'qq'")
    assert_nothing_prepared(tmp_path / "data")


def test_whitespace_lines_are_dropped_and_long_pairs_filtered_and_counted(
    monkeypatch, capsys, tmp_path
):
    overrides = custom_overrides(
        tmp_path,
        "ein Hund\n \t \neins zwei drei vier\nein Hund\n",
        "a dog\nsomething\none two three four\na dog\n",
    )
    status, out, err = run_prepare(
        monkeypatch, capsys, *overrides, "data.max_len=3", "data.min_freq=1"
    )
    assert status == 0, err
    assert re.search(
        r"train\s+2\s+\(of 4 lines: dropped 1 with an empty side, filtered 1 longer", out
    )
    assert re.search(r"val\s+1\n", out)


@pytest.mark.parametrize(
    ("make_train_file", "fragment"),
    [
        (lambda path: path.mkdir() or str(path), "train.de is a folder, not a file"),
        (lambda path: os.devnull, f"{os.devnull} is not a regular file (a character device)"),
    ],
    ids=["folder", "dev-null"],
)
def test_a_train_file_that_is_not_a_file_says_what_it_is(
    monkeypatch, capsys, tmp_path, make_train_file, fragment
):
    overrides = custom_overrides(tmp_path, None, "a dog\n")
    train_src = make_train_file(tmp_path / "train.de")
    overrides = [o for o in overrides if not o.startswith("data.train=")]
    overrides.append(f"data.train=[{train_src},{tmp_path / 'train.en'}]")
    status, _, err = run_prepare(monkeypatch, capsys, *overrides)
    assert_one_line_error(status, err, fragment)
    assert "does not exist" not in err
    assert_nothing_prepared(tmp_path / "data")


SIGTERM_WHILE_WRITING_THE_CACHE = """
import os, signal, sys
import transformer_mt.data.dataset as dataset
from transformer_mt.cli.prepare import main

write_json = dataset.write_json

def terminated_while_writing(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return write_json(*args, **kwargs)

dataset.write_json = terminated_while_writing
sys.argv = ["prepare_data.py", *sys.argv[1:]]
main()
"""


def test_sigterm_while_writing_the_cache_leaves_no_temporary_folder(tmp_path):
    overrides = custom_overrides(tmp_path, "ein Hund\n", "a dog\n")
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_WRITING_THE_CACHE, *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 128 + 15, done.stderr
    assert "Traceback" not in done.stderr
    assert "SIGTERM" in done.stderr
    assert_nothing_prepared(tmp_path / "data")
