"""Shared fixtures: the local Multi30k copy and one prepared de→en cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transformer_mt.config import DataConfig

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
    from transformer_mt.data.dataset import prepare

    cfg = DataConfig(root=str(tmp_path_factory.mktemp("data")), mirror=str(multi30k_mirror))
    prepare(cfg)
    return cfg
