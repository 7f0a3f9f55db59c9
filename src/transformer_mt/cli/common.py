"""Shared plumbing of the entry points: Hydra registration and one-line user errors."""

from __future__ import annotations

import functools
import importlib.resources
import logging
import sys
from collections.abc import Callable
from importlib.resources.abc import Traversable
from typing import Any

from transformer_mt.config import EvaluateConfig, PrepareConfig, TrainConfig
from transformer_mt.errors import UserError

# The configs travel inside the package, so an installed wheel works from any folder; Hydra finds
# them on its package search path.
CONFIG_PACKAGE = "transformer_mt.configs"
CONFIG_PATH = f"pkg://{CONFIG_PACKAGE}"


def config_file(*parts: str) -> Traversable:
    """One file of the shipped configs, e.g. `config_file("decode", "beam.yaml")`."""
    return importlib.resources.files(CONFIG_PACKAGE).joinpath(*parts)


def register_configs() -> None:
    """Register the typed config dataclasses so Hydra validates every key and type."""
    from hydra.core.config_store import ConfigStore

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
