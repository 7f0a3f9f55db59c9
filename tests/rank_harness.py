"""The ranks of a multi-process `mt-train` job forked from one process (see test_ddp.py).

    python tests/rank_harness.py NPROC [hydra overrides...]

`torchrun --standalone --nproc_per_node=NPROC` starts a launcher and NPROC fresh interpreters,
each importing torch and the entry point: three or more start-ups of 3-4 s on a 2-core CPU. Here
one interpreter imports them once, then forks NPROC children, each with the environment torchrun
gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and
each runs the entry point. As under torchrun, when one child fails the others are stopped, and the
exit status is the first failing child's (negative: killed by that signal), else 0.

test_ddp.py launches one run under torchrun itself, so the launcher's path stays tested; the other
run uses this harness.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import NoReturn

import torch
import torch.distributed  # noqa: F401  (loaded before the fork, as the rest below)
from kill_harness import exit_child

from transformer_mt.cli import train as train_cli


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_rank(rank: int, nproc: int, port: int, args: list[str]) -> NoReturn:
    """The child: the entry point as rank `rank` of `nproc`."""

    def run() -> None:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        sys.argv = [sys.argv[0], *args]
        train_cli.main()

    exit_child(run)


def main(nproc: int, args: list[str]) -> int:
    # What every rank loads, loaded once before the fork: torch.optim imports torch._dynamo on
    # the first optimizer it builds.
    import matplotlib.figure  # noqa: F401
    import sacremoses  # noqa: F401
    import spacy  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    assert threading.active_count() == 1, "a thread before fork() would be lost in the children"
    port = _free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    children = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _run_rank(rank, nproc, port, args)
        children[pid] = rank
    first_failure = 0
    while children:
        pid, status = os.wait()
        children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first_failure == 0:
            first_failure = code
            for other in children:  # the rest would wait for it in a collective
                os.kill(other, signal.SIGTERM)
    return first_failure


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2:]))
