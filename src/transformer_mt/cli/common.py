"""Shared plumbing of the entry points: Hydra registration, one-line user errors (Hydra's own
included) and SIGTERM / SIGHUP turned into an exception, so that cleanups run on the way out."""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
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


def run_hydra(task: Callable[[], Any]) -> Any:
    """Call a `@hydra.main` task; Hydra's own errors (an unknown key, a value of the wrong type, a
    preset that does not exist, an override it cannot parse) become `error: <one line>` on stderr
    and exit status 2, as every other user error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing a report
    try:
        return task()
    except (HydraException, OmegaConfBaseException) as err:
        logging.shutdown()
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_error_line(err: BaseException) -> str:
    """The line of a Hydra or OmegaConf error that says what is wrong (without the advice to
    append a key with `+`, which a checked config refuses anyway)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    line = _first_line(err)
    if isinstance(err, OverrideParseException):
        line = f"cannot parse the override {err.override!r}: {line}"
    if isinstance(err.__cause__, OmegaConfBaseException):
        line = f"{line.rstrip('.')}: {_first_line(err.__cause__)}"
    if isinstance(err, MissingConfigException) and err.options:
        line += f" (choose from {', '.join(err.options)})"
    return line


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. A BaseException, as KeyboardInterrupt: no `except Exception`
    on the way out swallows it, and every `finally` runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise `Terminated` in the main thread, so temporary
    files and folders are removed on the way out; then one line and exit status 128 + signal."""

    def raise_terminated(signum: int, frame: object) -> None:
        raise Terminated(signum)

    previous = {
        signum: signal.signal(signum, raise_terminated)
        for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    except Terminated as stop:
        logging.shutdown()
        print(f"stopped by {stop}: nothing half-written was left behind", file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
