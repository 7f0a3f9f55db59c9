"""Shared fixtures: torch on one thread, the toy run, the local Multi30k copy and one prepared
de→en cache per test session.

A module opts into one thread with `pytestmark = pytest.mark.usefixtures("one_thread")` (or
`"one_thread_per_module"`); the toy run is the session fixture `toy` (see toy_support.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from toy_support import ToyRun, build_toy_run
from train_support import OneThread

from transformer_mt.config import DataConfig
from transformer_mt.data.dataset import prepare

# The offline copy of the Multi30k raw files sits beside the checkout (CI sets MT_DATA_MIRROR to it).
DEFAULT_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


@pytest.fixture(scope="session")
def multi30k_mirror() -> Path:
    """Folder holding the Multi30k Task 1 raw files (`train.de.gz`, ...); skips without one."""
    mirror = Path(os.environ.get("MT_DATA_MIRROR") or DEFAULT_MIRROR)
    if not (mirror / "train.en.gz").is_file():
        pytest.skip(f"no Multi30k copy at {mirror} (set MT_DATA_MIRROR)")
    return mirror


@pytest.fixture(scope="session")
def multi30k_de_en(multi30k_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """A DataConfig (default settings, de→en) whose prepared cache exists: `load_prepared(cfg)` works."""
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("data")), mirror=str(multi30k_mirror))
    prepare(cfg)
    return cfg


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for each test, restored after it: tiny matrices run faster on one
    thread, and far faster on a machine busy with other work."""
    with OneThread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module() -> Iterator[None]:
    """As `one_thread`, but set once for the whole module and restored at its end, so that the
    module's own module-scoped fixtures (set up before any per-test fixture) run on one thread too.

    Session fixtures such as `toy` are set up before it, and take care of their own threads.
    """
    with OneThread():
        yield


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyRun:
    """The toy de→en run (toy_support.py): trained once per session, shared by every module."""
    return build_toy_run(tmp_path_factory.mktemp("toy"))
