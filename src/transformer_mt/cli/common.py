"""Shared plumbing of the entry points: Hydra registration and one-line user errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformer_mt.errors import UserError

# configs/ sits at the top of the checkout (the package is installed in editable mode).
CONFIG_DIR = str(Path(__file__).resolve().parents[3] / "configs")


def register_configs() -> None:
    """Register the typed config dataclasses so Hydra validates every key and type."""
    from hydra.core.config_store import ConfigStore

    from transformer_mt.config import EvaluateConfig, PrepareConfig, TrainConfig

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(name="prepare_schema", node=PrepareConfig)


def report_user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into `error: <message>` on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            logging.shutdown()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
