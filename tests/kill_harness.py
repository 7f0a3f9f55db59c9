"""The `mt-train` entry point with a SIGKILL armed at one named point (see test_reliability.py).

    python tests/kill_harness.py POINT N [hydra overrides...]

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
import os
import signal
import sys

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


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    sys.argv[1:3] = []
    train_cli.main()
