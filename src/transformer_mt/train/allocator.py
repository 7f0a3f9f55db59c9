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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # free heap top above 1 GiB goes back to the system


def keep_freed_memory(trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Serve large allocations from the heap and keep up to `trim_threshold_bytes` of its free
    top; return whether the C library is glibc and took both settings."""
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = libc.mallopt(M_MMAP_MAX, 0) == 1
    done &= libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold_bytes, 2**31 - 1))) == 1
    if not done:
        log.warning("glibc refused mallopt: large tensors stay mmapped (slower on CPU)")
    return done
