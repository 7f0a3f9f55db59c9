"""`scripts/translate.py` end to end on the toy checkpoint (see toy_support.py)."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from toy_support import run_translate

from transformer_mt.cli import translate as translate_cli
from transformer_mt.cli.translate import READ_BYTES, line_chunks
from transformer_mt.config import DecodeConfig
from transformer_mt.inference.translator import Translator
from transformer_mt.plots import plot_attention

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def translate_command(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "translate.py"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kwargs,
    )


def test_sentences_as_arguments(toy, capsys) -> None:
    code, out, err = run_translate(capsys, str(toy.checkpoint), "Zwei drei vier.", "", "Zehn neun.")
    assert code == 0, err
    assert out == "Two three four.\n\nTen nine.\n"


def test_stdin_keeps_order_empty_lines_and_survives_bad_bytes(toy) -> None:
    stdin = (
        b"Eins zwei.\n"
        b"\n"
        b"Drei \xff\xfe vier.\r\n"  # not UTF-8: replaced, the stream goes on
        b"Sieben acht neun zehn eins.\n"
        + b" ".join([b"zwei"] * 60)  # longer than the model reads: truncated, with a warning
        + b".\nF\xc3\xbcnf."  # "Fünf." with no final newline
    )
    proc = translate_command(str(toy.checkpoint), "--beam", "1", "--batch-size", "2")
    out, err = proc.communicate(stdin, timeout=120)
    assert proc.returncode == 0, err.decode()
    lines = out.decode("utf-8").split("\n")
    assert lines[-1] == ""  # every output line ends with a newline
    lines = lines[:-1]
    assert len(lines) == 6
    assert lines[0] == "One two."
    assert lines[1] == ""
    assert lines[3] == "Seven eight nine ten one."
    assert lines[4].startswith("two two")
    assert lines[5] == "Five."
    assert "WARNING: a source sentence of 61 tokens is longer than the model reads" in err.decode()


def test_stdin_is_translated_as_it_arrives(toy) -> None:
    proc = translate_command(str(toy.checkpoint))
    try:
        for line, expected in (("Zwei drei.", "Two three."), ("Neun.", "Nine.")):
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            # The answer comes while stdin is still open: nothing waits for the end of input.
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no output for a line that has arrived"
            assert proc.stdout.readline().decode().rstrip("\n") == expected
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_file_in_file_out_in_input_order(toy, tmp_path, capsys) -> None:
    lines = toy.test_src.read_text(encoding="utf-8").splitlines()[:40]
    source = tmp_path / "in.de"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "out.en"
    code, out, err = run_translate(
        capsys, str(toy.checkpoint), "--input", str(source), "--output", str(output),
        "--beam", "1", "--batch-size", "6",
    )  # fmt: skip
    assert code == 0, err
    assert out == ""
    translator = Translator.from_checkpoint(toy.checkpoint, "cpu", DecodeConfig(beam_size=1))
    one_by_one = [translator.translate([line])[0] for line in lines]
    assert output.read_text(encoding="utf-8").splitlines() == one_by_one
    assert len(set(one_by_one)) > 30  # distinct sentences: a reordering would show


def test_nbest_prints_k_scored_lines_per_input(toy, capsys) -> None:
    code, out, err = run_translate(
        capsys, str(toy.checkpoint), "--beam", "4", "--nbest", "3", "Zwei drei vier.", "", "Acht."
    )
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[0] for r in rows] == ["1", "1", "1", "2", "3", "3", "3"]
    assert rows[0][2] == "Two three four." and rows[3] == ["2", "0.0000", ""]
    for number in ("1", "3"):
        scores = [float(r[1]) for r in rows if r[0] == number]
        assert scores == sorted(scores, reverse=True)


def test_an_over_long_sentence_is_truncated_not_fatal(toy, capsys, caplog) -> None:
    long_line = " ".join(["drei"] * 60) + "."
    code, out, err = run_translate(capsys, str(toy.checkpoint), "--beam", "2", long_line, "Zwei.")
    assert code == 0, err
    assert "longer than the model reads" in caplog.text  # stderr outside pytest: see above
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("three three") and lines[1] == "Two."


def test_attention_heat_map_is_a_png_of_the_first_sentence(toy, tmp_path, capsys) -> None:
    image = tmp_path / "plots" / "attention.png"
    code, out, err = run_translate(
        capsys, str(toy.checkpoint), "--attention", str(image), "Zwei drei vier.", "Acht."
    )
    assert code == 0, err
    assert out.splitlines() == ["Two three four.", "Eight."]
    assert image.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_attention_draws_outputs_by_sources(tmp_path) -> None:
    weights = np.random.default_rng(0).dirichlet(np.ones(5), size=3)  # 3 outputs over 5 sources
    path = tmp_path / "a.png"
    drawn = plot_attention(weights, ["a", "b", "c", ".", "<eos>"], ["x", "y", "<eos>"], path)
    assert drawn.shape == (3, 5)
    np.testing.assert_allclose(drawn, weights, rtol=1e-6)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="labels for"):
        plot_attention(weights, ["a", "b"], ["x", "y", "<eos>"], tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("problem", ["missing", "corrupt", "not a checkpoint"])
def test_bad_checkpoints_are_one_line_errors(toy, tmp_path, capsys, problem) -> None:
    checkpoint = tmp_path / "model.pt"
    if problem == "corrupt":
        checkpoint.write_bytes(toy.checkpoint.read_bytes()[:3000])
    elif problem == "not a checkpoint":
        checkpoint.write_text("hello\n")
    output = tmp_path / "out.txt"
    code, out, err = run_translate(capsys, str(checkpoint), "--output", str(output), "Zwei.")
    assert code == 2
    assert err.startswith(f"error: {checkpoint}") or err.startswith("error: checkpoint not found")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not output.exists() and out == ""


@pytest.mark.parametrize(
    "options,message",
    [
        (["--nbest", "3", "--beam", "2"], "--nbest 3 needs --beam 3 or more"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--input", "/no/such/file.de"], "cannot read --input /no/such/file.de"),
        # Finding 10 of the reliability review: these were tracebacks.
        (["--device", "meta"], "device 'meta' is not supported"),
        (["--device", "mps"], "device 'mps' is not supported"),
    ],
)
def test_bad_options_are_one_line_errors(toy, tmp_path, capsys, options, message) -> None:
    output = tmp_path / "out.txt"
    code, _, err = run_translate(capsys, str(toy.checkpoint), *options, "--output", str(output))
    assert code == 2
    assert err == f"error: {err[7:].strip()}\n" and message in err
    assert not output.exists()


def test_a_bad_checkpoint_from_the_command_line_exits_2(tmp_path) -> None:
    proc = translate_command(str(tmp_path / "absent.pt"), "Zwei.")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.decode() == f"error: checkpoint not found: {tmp_path / 'absent.pt'}\n"
    assert out == b""


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        translate_cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--input", "--output", "--beam", "--nbest", "--device", "--batch-size"):
        assert option in text
    assert "--attention" in text and "examples:" in text and "U+FFFD" in text
    assert "LINE<TAB>SCORE<TAB>TRANSLATION" in text


class CountingStream(io.RawIOBase):
    """100,000 lines produced on demand; counts the bytes handed out."""

    def __init__(self, lines: int) -> None:
        self.data = iter(f"Zwei drei {i}.\n".encode() for i in range(lines))
        self.given = 0
        self.buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while len(self.buffer) < len(target):
            chunk = next(self.data, None)
            if chunk is None:
                break
            self.buffer += chunk
        n = min(len(target), len(self.buffer))
        target[:n], self.buffer = self.buffer[:n], self.buffer[n:]
        self.given += n
        return n


def test_streams_are_read_a_chunk_at_a_time() -> None:
    raw = CountingStream(100_000)
    stream = io.BufferedReader(raw, buffer_size=READ_BYTES)
    chunks = line_chunks(stream, max_lines=64)
    first = next(chunks)
    assert len(first) == 64 and first[0] == "Zwei drei 0."
    assert raw.given <= 2 * READ_BYTES  # memory stays bounded: the rest is not read yet
    total = len(first) + sum(len(chunk) for chunk in chunks)
    assert total == 100_000


def test_line_chunks_split_lines_and_replace_bad_bytes() -> None:
    stream = io.BufferedReader(io.BytesIO(b"a\r\n\n\xffb\nlast"))
    assert [line for chunk in line_chunks(stream, 2) for line in chunk] == [
        "a",
        "",
        "\ufffdb",
        "last",
    ]


def test_output_to_a_folder_is_a_one_line_error(toy, tmp_path, capsys) -> None:
    """Finding 10 of the reliability review: `--output <a directory>` was a traceback."""
    folder = tmp_path / "out"
    (folder / "kept.txt").parent.mkdir()
    (folder / "kept.txt").write_text("precious")
    code, out, err = run_translate(
        capsys, str(toy.checkpoint), "--output", str(folder), "Zwei drei."
    )
    assert code == 2 and out == ""
    assert err.startswith(f"error: cannot write {folder}: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in folder.iterdir()) == ["kept.txt"]
    assert (folder / "kept.txt").read_text() == "precious"
    assert not list(tmp_path.glob(".out.*.tmp"))


def test_line_chunks_cut_a_line_over_the_byte_limit_as_it_streams() -> None:
    """Finding 8: the line is cut while it arrives, never read whole."""
    stream = io.BytesIO(b"abcdefghij" * 10 + b"\nshort\n" + "é".encode() * 20)
    chunks = list(translate_cli.line_chunks(stream, max_lines=10, max_line_bytes=15))
    lines = [line for chunk in chunks for line in chunk]
    assert lines == ["abcdefghijabcde", "short", "ééééééé"]  # a cut character is dropped


def test_an_output_folder_is_refused_before_translating(toy, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("translated before --output was checked")

    monkeypatch.setattr(translate_cli, "translate_stream", never)
    code, out, err = run_translate(capsys, str(toy.checkpoint), "--output", str(tmp_path), "Zwei.")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"cannot write {tmp_path}: it is a folder" in err
    assert out == ""


@contextlib.contextmanager
def sigint_at_default() -> Iterator[None]:
    """Processes started within begin with SIGINT at its default, as a terminal's foreground
    command does, even when pytest itself runs with SIGINT ignored (as a background job of a
    script does, `make test &`): exec keeps an ignored signal ignored, but resets a handled one."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_exits_130_without_a_traceback(toy) -> None:
    with sigint_at_default():
        process = translate_command(str(toy.checkpoint), "--beam", "1")
    try:
        process.stdin.write(b"Zwei drei.\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 120)
        assert ready and process.stdout.readline() == b"Two three.\n"  # the model is loaded
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)  # stdin stays open: only the signal can end it
        err = process.stderr.read()
    finally:
        process.kill()  # nothing left running if it hangs
        for stream in (process.stdin, process.stdout, process.stderr):
            stream.close()
    assert process.returncode == 130, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err


class EndlessLine:
    """`size` bytes of one line without a newline, then "\\nZwei.\\n", READ_BYTES at a time. The
    block it hands out is made once, so that a reader's allocations are all that tracemalloc sees."""

    def __init__(self, size: int) -> None:
        self.block = b"vier " * (READ_BYTES // 5)
        self.blocks = size // len(self.block)
        self.ended = False

    def read1(self, n: int = -1) -> bytes:
        if self.blocks:
            self.blocks -= 1
            return self.block
        if not self.ended:
            self.ended = True
            return b"\nZwei.\n"
        return b""


def test_a_32_mib_line_is_read_in_memory_bounded_by_the_line_limit() -> None:
    """The line is cut as it streams by: the reader never holds more than a few reads' worth of
    it. (Holding the line whole, or copying a growing buffer on each read, the quadratic-time
    way, both need tens of MiB here.)"""
    stream = EndlessLine(32 << 20)
    tracemalloc.start()
    try:
        lines = [line for chunk in line_chunks(stream, max_lines=10) for line in chunk]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(lines) == 2 and lines[1] == "Zwei."
    assert lines[0].startswith("vier vier") and len(lines[0]) <= translate_cli.MAX_LINE_BYTES
    assert peak < 4 * (READ_BYTES + translate_cli.MAX_LINE_BYTES)
