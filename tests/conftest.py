"""Shared fixtures: torch on one thread, the toy run, the local Multi30k copy and one prepared
de→en cache per test session.

A module opts into one thread with `pytestmark = pytest.mark.usefixtures("one_thread")` (or
`"one_thread_per_module"`); the toy run is the session fixture `toy` (see toy_support.py).

`make test` runs the modules in parallel worker processes (pytest-xdist, `--dist loadfile`: a module's
tests stay in one process, so module fixtures are built once). The session fixtures that cost
seconds are built once for all the workers, under a file lock, in the session's shared temp folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from toy_support import ToyRun, build_toy_run, open_toy_run
from train_support import OneThread

from transformer_mt.config import DataConfig
from transformer_mt.data.dataset import prepare

COMPLETE = ".complete"

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
    with shared_folder(tmp_path_factory, "multi30k-de-en") as (folder, built):
        cfg = DataConfig(root=str(folder), mirror=str(multi30k_mirror))
        if not built:
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
    with shared_folder(tmp_path_factory, "toy") as (folder, built):
        return open_toy_run(folder) if built else build_toy_run(folder)


@contextlib.contextmanager
def shared_folder(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[tuple[Path, bool]]:
    """(folder, built): a folder shared by all the session's worker processes, and whether an
    earlier one already filled it. The first to come fills it while the others wait on a lock;
    a fill that fails leaves nothing behind, so the next one tries again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-<n>/popen-gw<k>: the parent is the session's, shared
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = (folder / COMPLETE).exists()
        if not built:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        try:
            yield folder, built
        except BaseException:
            if not built:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / COMPLETE).touch()
