"""Keep the memory a training step frees for the next step (glibc malloc on Linux).

glibc serves every request above its mmap threshold (dynamic, at most 32 MB) with a fresh `mmap`
and returns it with `munmap` when freed. A training step's largest tensors (logits, their
gradient, the log-softmax: tokens × vocabulary) are that large, so every step maps them anew and
the kernel faults each of their pages in again: on a 2-core CPU that was 14 % of the step's time.
`keep_freed_memory` tells malloc, from inside the process, to serve large requests from its heap
too (M_MMAP_MAX = 0) and to return the heap's free top to the system only above a bound
(M_TRIM_THRESHOLD), so a step reuses the pages of the one before.

The same as starting the process with
`GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<bytes>`; other C libraries
(musl, macOS, Windows) are left alone.

That fixes the page faults but not the memory: with every tensor in one heap, batches of varying
shapes leave holes that later sizes do not fit, and a whole `experiment=cpu` run's RSS grew to
4.9 GB with about 1.1 GB in use (docs/benchmarks.md, "Presets"). tcmalloc, an allocator with
size classes started with the process (`LD_PRELOAD`, as `make train` does where Debian's
libtcmalloc-minimal4 is installed), keeps freed memory for reuse without that growth: the same run
peaked at 2.1 GB. `malloc_library` tells which allocator the process has, and the trainer tunes
glibc only when it is glibc's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # free heap top above 1 GiB goes back to the system
# Allocators that replace malloc when preloaded, by the name their shared library starts with.
PRELOADED = {"libtcmalloc": "tcmalloc", "libjemalloc": "jemalloc", "libmimalloc": "mimalloc"}


def malloc_library() -> str:
    """The allocator serving malloc in this process. On glibc: "glibc" when `malloc` resolves to
    the C library's own, else the library whose code it resolves to ("tcmalloc", "jemalloc",
    "mimalloc", or that file's name), as a preload makes it. Elsewhere the C library's name
    ("musl", ... or "" where Python cannot tell)."""
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return libc_name
    address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value  # what callers get
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if address == ctypes.cast(libc.malloc, ctypes.c_void_p).value:
        return "glibc"
    name = _mapped_file(address)
    return next((a for prefix, a in PRELOADED.items() if name.startswith(prefix)), name)


def _mapped_file(address: int | None) -> str:
    """The file name of the mapping that holds `address` (/proc/self/maps), or ""."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ""
    if address is None:
        return ""
    for line in maps.splitlines():
        span, *rest = line.split()
        low, high = (int(part, 16) for part in span.split("-"))
        if low <= address < high and len(rest) >= 5:
            return rest[4].rpartition("/")[2]
    return ""


def keep_freed_memory(trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Serve large allocations from the heap and keep up to `trim_threshold_bytes` of its free
    top; return whether malloc is glibc's own (no other allocator preloaded) and took both
    settings."""
    if malloc_library() != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = libc.mallopt(M_MMAP_MAX, 0) == 1
    done &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold_bytes, 2**31 - 1))) == 1
    if not done:
        log.warning("glibc refused mallopt: large tensors stay mmapped (slower on CPU)")
    return done
