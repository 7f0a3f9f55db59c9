"""scripts/page_screenshot.py's errors: one line on stderr, exit status 2, no picture written."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "page_screenshot.py"


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_without_chromium_it_says_how_to_install_it(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MT_CHROMIUM"} | {"PATH": str(tmp_path)}
    result = run(["http://127.0.0.1:9", str(tmp_path / "page.png")], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "page_screenshot: no Chromium found (`make browser` installs it, or set MT_CHROMIUM)"
    ]
    assert not (tmp_path / "page.png").exists()


def test_a_server_that_does_not_answer_is_one_line(tmp_path) -> None:
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    chromium = os.environ.get("MT_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        pytest.skip("no Chromium to drive (`make browser` installs Debian's package)")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = run([url, str(tmp_path / "page.png")], dict(os.environ))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"page_screenshot: {url}: ") and "ERR_CONNECTION_REFUSED" in line
    assert not (tmp_path / "page.png").exists()
