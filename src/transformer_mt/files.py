"""Writing files and folders so that a crash at any moment leaves the old version or the new one.

Every file the package writes goes through here: checkpoints, metrics, plots, configs, downloads,
translations, the prepared cache and exported models. The recipe is the same each time:

    1. a temp file (or folder) beside the target, named `.<target name>.<random>.tmp` and created
       exclusively, so it is never a symlink someone left there
    2. write it; flush and fsync a file
    3. rename it over the target in one step (os.replace)
    4. fsync the folder, so that the rename itself survives a power cut

If the writing fails, the temp file is removed and the target keeps its old content (or stays
absent). If the process dies, a hidden temp file may stay behind, but the target is never half
written. The functions raise OSError; `atomic_writer` turns it into a UserError naming the file,
other callers into their own one-line errors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from transformer_mt.errors import UserError


def file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (mkstemp's are private)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)  # the umask can only be read by setting it
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in `folder` durable; a folder that cannot be opened or synced is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """Open `path` for writing through a temp file beside it, renamed into place when the block ends.

    Creates the folder if needed. Text is UTF-8 with "\\n" line ends. Any failure (an OSError,
    or whatever the block raises) removes the temp file and propagates unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    mode, encoding, newline = ("wb", None, None) if binary else ("w", "utf-8", "\n")
    try:
        with open(fd, mode, encoding=encoding, newline=newline) as handle:
            os.fchmod(fd, file_mode())  # an ordinary file, not mkstemp's private one
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """`atomic_file` for files a user asked for: a failed write or rename (a full disk, `path`
    being a folder) is a one-line UserError naming `path`."""
    path = Path(path)
    try:
        with atomic_file(path, binary) as handle:
            yield handle
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make `path` a hard link to `source` (a copy where the disk has no hard links) in one step.

    Later replacing either file leaves the other intact. The temp name is unguessable, and
    os.link and shutil.copyfile refuse or replace a name, never follow a planted symlink.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.link")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Build a folder under a temp name beside `path` (the block fills the folder it is given),
    then rename it to `path` in one step: `path` is complete or absent.

    `replace` deletes an existing `path` just before the rename; without it, an existing `path`
    makes the rename fail. The temp folder is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield building
        building.chmod(0o777 & ~_umask())  # an ordinary folder, not mkdtemp's private one
        if replace and path.exists():
            shutil.rmtree(path)
        building.rename(path)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    fsync_dir(path.parent)
