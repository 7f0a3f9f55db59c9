"""scripts/bench_serve.py's own errors, before any server starts: exit status 2, said in a line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"


def run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_an_unreadable_input_is_one_line_with_status_2(tmp_path) -> None:
    result = run("--url", "http://127.0.0.1:9", "--input", str(tmp_path / "missing.de"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "missing.de" in line


def test_requests_of_no_sentences_are_refused(tmp_path) -> None:
    (tmp_path / "in.de").write_text("Ein Hund.\n")
    url, text = ("--url", "http://127.0.0.1:9"), ("--input", str(tmp_path / "in.de"))
    result = run(*url, *text, "--sentences-per-request", "0")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("--sentences-per-request and --requests must be at least 1")
    )
