"""`trainer.malloc_tuning`: with glibc told to keep freed memory, a large tensor allocated again
after it was freed reuses the pages already faulted in (each case runs in its own process, whose
malloc settings it changes). With tcmalloc preloaded, as `make train` does where it is installed,
glibc is left alone."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
from train_support import REPO, subprocess_env

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

PROGRAM = """
import json, resource, sys
import torch
from transformer_mt.train.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
for _ in range(6):  # the heap grows to hold it
    torch.ones(64 * 2**20 // 4)  # 64 MB, above glibc's largest mmap threshold; freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # the steady state, as from one training step to the next
    torch.ones(64 * 2**20 // 4)
print(json.dumps({"tuned": tuned, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        check=True,
        env=subprocess_env(),
    ).stdout
    return json.loads(out)


def test_kept_memory_is_faulted_in_once_not_on_every_allocation():
    pages = 64 * 2**20 // 4096
    default, tuned = faults("default"), faults("tuned")
    assert tuned["tuned"] is True
    assert default["faults"] > 19 * pages  # mmapped afresh and faulted in each time
    # Reused: faulted in again now and then (seen: at most 3 times of 20), not every time.
    assert tuned["faults"] < 8 * pages


TCMALLOC = ctypes.util.find_library("tcmalloc_minimal")
needs_tcmalloc = pytest.mark.skipif(not TCMALLOC, reason="libtcmalloc-minimal4 (make tcmalloc)")
WHICH = """
from transformer_mt.train.allocator import keep_freed_memory, malloc_library
print(malloc_library(), keep_freed_memory())
"""


def allocator(preload: str = "", first: str = "") -> list[str]:
    env = {**subprocess_env(), "LD_PRELOAD": preload}
    program = first + WHICH
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@needs_tcmalloc
def test_a_preloaded_tcmalloc_is_named_and_glibc_is_not_tuned_under_it():
    assert allocator(TCMALLOC) == ["tcmalloc", "False"]
    assert allocator() == ["glibc", "True"]


@needs_tcmalloc
def test_tcmalloc_loaded_but_not_serving_malloc_leaves_glibc_in_charge():
    # A library that some package loads for itself does not replace malloc: glibc is still tuned.
    loaded = f"import ctypes; ctypes.CDLL({TCMALLOC!r})\n"
    assert allocator(first=loaded) == ["glibc", "True"]


@needs_tcmalloc
@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_train_preloads_tcmalloc_unless_told_not_to():
    def train_command(*args: str, **environ: str) -> str:
        env = {**os.environ, "MAKEFLAGS": "", **environ}
        done = subprocess.run(
            ["make", "-n", "train", "EXPERIMENT=cpu", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return next(line for line in done.stdout.splitlines() if "scripts/train.py" in line)

    preloaded = train_command()
    assert preloaded.startswith("LD_PRELOAD=/") and "libtcmalloc_minimal.so.4 " in preloaded
    assert train_command("TCMALLOC=").startswith(".venv/bin/python scripts/train.py")
    # A preload of the user's own is kept, after tcmalloc (libm: harmless to preload).
    theirs = train_command(LD_PRELOAD="libm.so.6")
    assert theirs.startswith("LD_PRELOAD=/") and "libtcmalloc_minimal.so.4:libm.so.6 " in theirs
