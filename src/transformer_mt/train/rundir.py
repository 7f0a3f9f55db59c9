"""The folders of one run and the rules that keep a user's work safe.

- `saved/<run>/` holds checkpoints; `result/<run>/` holds logs, metrics and plots.
- A new run never writes into a folder that already holds checkpoints, nor into a result folder that
  holds another run's logs (resume it or pick another name); a refused start writes nothing.
- Only one process trains a run at a time: `saved/<run>/train.lock` holds the owner's PID, host and
  process start time; a lock whose process is gone (a crash, a kill -9), or whose PID now belongs to
  another process, is recognised as stale and taken over.
- A folder that cannot be written stops the run before training, with an error naming the path.
- Each run has an identity, a random id kept in its checkpoints' training state and in
  `result/<run>/run.json`: a resume refuses a result folder whose logs another run wrote (two runs
  of the same name in different `saved_dir`s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from transformer_mt.errors import CheckpointError, UserError
from transformer_mt.files import atomic_writer

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
IDENTITY_NAME = "run.json"  # in result/<run>/: {"run_id": ...}


@dataclass(frozen=True)
class RunPaths:
    """Where run `name` keeps its files."""

    name: str
    saved: Path  # saved/<run>/
    result: Path  # result/<run>/

    @classmethod
    def create(cls, name: str, saved_dir: str | Path, result_dir: str | Path) -> RunPaths:
        if not name or "/" in name or name in (".", ".."):
            raise UserError(f"run_name={name!r} is not a valid folder name: pick a plain name")
        return cls(name, Path(saved_dir) / name, Path(result_dir) / name)

    @property
    def last(self) -> Path:
        return self.saved / "last.pt"

    @property
    def best(self) -> Path:
        return self.saved / "best.pt"

    @property
    def averaged(self) -> Path:
        return self.saved / "averaged.pt"

    def epoch(self, epoch: int) -> Path:
        return self.saved / f"epoch_{epoch}.pt"

    def epoch_checkpoints(self) -> list[Path]:
        """The `epoch_<n>.pt` files of this run, oldest first."""
        return epoch_checkpoints(self.saved)

    def checkpoints(self) -> list[Path]:
        return sorted(self.saved.glob("*.pt")) if self.saved.is_dir() else []

    def logs(self) -> list[Path]:
        """The files of result/<run>/ that a new run would append to or replace."""
        if not self.result.is_dir():
            return []
        names = (
            "metrics.csv",
            "metrics.jsonl",
            "train.log",
            "curves.png",
            "events.out.tfevents*",
            IDENTITY_NAME,
        )
        return sorted(path for name in names for path in self.result.glob(name))


def epoch_checkpoints(folder: Path) -> list[Path]:
    """The `epoch_<n>.pt` files in `folder`, sorted by n."""
    found = []
    for path in folder.glob("epoch_*.pt"):
        number = path.stem.removeprefix("epoch_")
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there; else a one-line error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(
            f"cannot write to {folder}: {err.strerror or err}; "
            "free some space or point saved_dir / result_dir at a writable folder"
        ) from err


def check_start(paths: RunPaths, resume: bool) -> None:
    """Refuse a new run over existing checkpoints, and a resume with nothing to resume."""
    if resume and not paths.last.is_file():
        raise CheckpointError(
            f"trainer.resume=true but {paths.last} does not exist: check run_name={paths.name}, "
            "or drop trainer.resume to start a new run"
        )
    if not resume and paths.checkpoints():
        raise UserError(
            f"{paths.saved} already holds checkpoints of run {paths.name!r}: "
            "add trainer.resume=true to continue it, or pick another run_name"
        )
    if not resume and paths.logs():
        raise UserError(
            f"{paths.result} already holds the logs of a run {paths.name!r} "
            f"({', '.join(p.name for p in paths.logs()[:3])}): pick another run_name, or "
            "continue that run with trainer.resume=true and its saved_dir"
        )


def new_run_id() -> str:
    """A fresh run identity."""
    return uuid.uuid4().hex


def logged_run_id(paths: RunPaths) -> str | None:
    """The identity recorded in result/<run>/run.json; None if there is none (or it is unreadable)."""
    try:
        run_id = json.loads((paths.result / IDENTITY_NAME).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run_id if isinstance(run_id, str) else None


def check_logs_belong(paths: RunPaths, run_id: str | None) -> str | None:
    """On a resume: refuse logs in result/<run>/ that another run than the checkpoint's (identity
    `run_id`, None for a checkpoint written before identities were kept) wrote. Returns the
    identity the resumed run keeps."""
    logged = logged_run_id(paths)
    if logged == run_id or not paths.logs():
        return run_id
    if run_id is None:
        return logged  # a checkpoint without an identity: the logs' run may be this one
    raise UserError(
        f"{paths.result} holds the logs of another run {paths.name!r} than the one {paths.last} "
        f"continues: point result_dir at the folder where that run logged, or at a folder "
        f"without a {paths.name}/ in it"
    )


def write_run_id(paths: RunPaths, run_id: str) -> None:
    """Record `run_id` in result/<run>/run.json (unchanged if it holds it already)."""
    if logged_run_id(paths) != run_id:
        with atomic_writer(paths.result / IDENTITY_NAME) as handle:
            handle.write(json.dumps({"run_id": run_id}) + "\n")


def open_run(paths: RunPaths, resume: bool, resumed: tuple | None = None) -> RunLock:
    """Check that the run may start, prove its folders writable and lock it; return the lock.

    `resumed`: the `file_version` of the last.pt a resume has read; it must still be that file.
    On any failure nothing is left behind: the folders created here are removed again.
    """
    check_start(paths, resume)
    created = [folder for folder in (paths.saved, paths.result) if not folder.exists()]
    lock = RunLock(paths.saved)
    try:
        ensure_writable(paths.saved)
        ensure_writable(paths.result)
        lock.acquire()
        check_start(paths, resume)  # again, now that no other process can start it
        if resumed is not None and file_version(paths.last) != resumed:
            raise UserError(f"{paths.last} changed while this resume started: start it again")
    except BaseException:
        lock.release()
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return lock


def file_version(path: Path) -> tuple[int, int, int]:
    """What tells one version of `path` from the next (each save replaces the file)."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class RunLock:
    """An exclusive lock on one run folder, held by this process until `release()`."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; UserError when a live process holds it.

        The lock appears complete or not at all: its content is written to a temp file first and
        then hard-linked to the lock name, which fails if another process got there first.
        """
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": process_start()}
        tmp = None
        try:
            # A unique temp file created exclusively (never a symlink someone planted there).
            fd, name = tempfile.mkstemp(prefix=f".{LOCK_NAME}.", dir=self.path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(owner))
            for _ in range(2):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    holder = _read_owner(self.path)
                    if holder is not None and _is_alive(holder):
                        raise _held_by(self.path, holder) from None
                    log.warning("taking over stale lock %s (owner %s is gone)", self.path, holder)
                    self.path.unlink(missing_ok=True)
                    continue
                self.held = True
                return
        except OSError as err:
            raise UserError(
                f"cannot write to {self.path.parent}: {err.strerror or err}; "
                "free some space or point saved_dir at a writable folder"
            ) from err
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        raise UserError(f"could not take the lock {self.path}: remove it if no run is using it")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_unlocked(paths: RunPaths) -> None:
    """Refuse early, before any work, when a live process holds the run's lock (`open_run`
    takes the lock itself later, and checks again)."""
    path = paths.saved / LOCK_NAME
    holder = _read_owner(path) if path.exists() else None
    if holder is not None and _is_alive(holder):
        raise _held_by(path, holder)


def _held_by(path: Path, holder: dict) -> UserError:
    elsewhere = holder["host"] != socket.gethostname()
    return UserError(
        f"run {path.parent.name!r} is already being trained by process "
        f"{holder['pid']} on {holder['host']} (lock {path}): "
        "wait for it to finish, or pick another run_name"
        + (f"; if no run on {holder['host']} uses it, delete {path}" if elsewhere else "")
    )


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
        started = owner.get("started")
        return {
            "pid": int(owner["pid"]),
            "host": str(owner["host"]),
            "started": None if started is None else str(started),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: treated as stale


def process_start(pid: int | None = None) -> str | None:
    """When process `pid` (default: this one) started, as `<boot id>:<clock ticks since boot>`;
    None where /proc does not say. A PID reused by a later process, or after a reboot, differs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (command) "
    return f"{boot}:{fields[19]}"  # field 22 of stat(5): starttime


def _is_alive(owner: dict) -> bool:
    """Whether the lock's owner may still be running (a lock from another host is assumed live:
    its processes cannot be seen from here)."""
    if owner["host"] != socket.gethostname():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if owner["started"] is not None:
        now = process_start(owner["pid"])
        if now is not None and now != owner["started"]:
            return False  # the PID now belongs to another process
    return True
