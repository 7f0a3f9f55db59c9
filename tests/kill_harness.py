"""The `mt-train` entry point with a SIGKILL armed at one named point (see test_reliability.py).

    python tests/kill_harness.py POINT N [hydra overrides...]
    python tests/kill_harness.py --serve

`--serve` reads one request per line on stdin, a JSON object {"point", "nth", "args", "log"}, and
runs each in a process forked from this one, with its stdout and stderr in the file `log`; it
answers each with a line {"returncode": ...} (negative: killed by that signal, as subprocess
reports it). The forked runs start with torch, the entry point and the libraries they load already
imported: the seconds of start-up are paid once, not at every kill.

The process sends itself SIGKILL the N-th time it reaches POINT (counted from its start):

    step              inside a training step: forward done, before backward and the optimizer
    validation        inside validation: loss done, before the BLEU decoding
    checkpoint-write  inside a checkpoint write: half of the file's bytes written and synced
    after-rename      just after a new last.pt replaced the old one, before anything else
    epoch-copy        while last.pt is being linked to epoch_<n>.pt, before the rename

No exception, handler or `finally` block runs: what is on disk is what a power cut would leave.
POINT `none` runs the entry point unchanged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

import torch

from transformer_mt.cli import train as train_cli
from transformer_mt.train import step, validation

POINTS = ("none", "step", "validation", "checkpoint-write", "after-rename", "epoch-copy")


def arm(point: str, nth: int) -> None:
    reached = {"n": 0}

    def hit() -> bool:
        reached["n"] += 1
        return reached["n"] == nth

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "step":
        real_loss = step.token_loss_sum

        def loss(logits, target, label_smoothing=0.0):
            value = real_loss(logits, target, label_smoothing)
            if torch.is_grad_enabled() and hit():
                die()
            return value

        step.token_loss_sum = loss
    elif point == "validation":
        real_translate = validation.translate_ids

        def translate(*args, **kwargs):
            if hit():
                die()
            return real_translate(*args, **kwargs)

        validation.translate_ids = translate
    elif point == "checkpoint-write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if not hit():
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        torch.save = save
    elif point == "after-rename":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            if os.path.basename(dst) == "last.pt" and hit():
                die()

        os.replace = replace
    elif point == "epoch-copy":
        real_link = os.link

        def link(src, dst, *args, **kwargs):
            real_link(src, dst, *args, **kwargs)
            if os.path.basename(dst).startswith(".epoch_") and hit():
                die()

        os.link = link
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r} (one of {', '.join(POINTS)})")


def run_forked(point: str, nth: int, args: list[str], log: str) -> int:
    """Run the armed entry point in a child process; its exit status as subprocess gives it."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the serving loop

        def run() -> None:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            arm(point, nth)
            sys.argv = [sys.argv[0], *args]
            train_cli.main()

        exit_child(run)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def exit_child(run: Callable[[], None]) -> NoReturn:
    """In a forked child: call `run`, then leave with its exit status (0, its SystemExit code,
    or 1 after printing the exception), never returning into the parent's code."""
    code = 1
    try:
        run()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # What every run loads, loaded once before the first fork: torch.optim imports torch._dynamo
    # on the first optimizer it builds.
    import matplotlib.figure  # noqa: F401
    import sacremoses  # noqa: F401
    import spacy  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    assert threading.active_count() == 1, "a thread before fork() would be lost in the children"
    for line in sys.stdin:
        request = json.loads(line)
        code = run_forked(request["point"], request["nth"], request["args"], request["log"])
        print(json.dumps({"returncode": code}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        arm(sys.argv[1], int(sys.argv[2]))
        sys.argv[1:3] = []
        train_cli.main()
