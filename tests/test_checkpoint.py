"""Checkpoint files: atomic writes, safe reads, averaging, and plain-data training state."""

from __future__ import annotations

import errno
import os
import random

import numpy as np
import pytest
import torch
from train_support import checkpoint_payload

from transformer_mt.checkpoint import (
    average_checkpoints,
    copy_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from transformer_mt.errors import CheckpointError
from transformer_mt.train.state import Progress, rng_state, set_rng_state


class NotPlainData:
    pass


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(
        checkpoint_payload(train_state={"progress": Progress(3, 30).state_dict()}),
        tmp_path / "a.pt",
    )
    loaded = load_checkpoint(path)
    assert loaded["train_state"]["progress"]["step"] == 30
    torch.testing.assert_close(loaded["model"]["weight"], torch.ones(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left


def test_load_refuses_pickled_objects_and_broken_files(tmp_path):
    torch.save(checkpoint_payload(extra=NotPlainData()), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tmp_path / "evil.pt")
    good = save_checkpoint(checkpoint_payload(), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_any_garbage_file_is_a_checkpoint_error(tmp_path, recwarn):
    """Random bytes reach the unpickler as arbitrary opcodes: some raise IndexError or KeyError
    from inside torch.load (about 1 file in 16), and each must still be a one-line CheckpointError."""
    path = tmp_path / "garbage.pt"
    for seed in range(400):
        path.write_bytes(random.Random(seed).randbytes(2_000))
        with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
            load_checkpoint(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
    ],
)
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, failure):
    path = save_checkpoint(checkpoint_payload(1.0), tmp_path / "last.pt")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {path}"):
        save_checkpoint(checkpoint_payload(2.0), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_copy_is_independent_of_its_source(tmp_path):
    first = save_checkpoint(checkpoint_payload(1.0), tmp_path / "last.pt")
    copy = copy_checkpoint(first, tmp_path / "epoch_1.pt")
    save_checkpoint(checkpoint_payload(2.0), first)  # replacing the source leaves the copy alone
    assert load_checkpoint(copy)["epoch"] == 1
    assert load_checkpoint(first)["epoch"] == 2


def test_average_is_the_element_wise_mean(tmp_path):
    paths = [
        save_checkpoint(checkpoint_payload(s, train_state={"x": 1}), tmp_path / f"epoch_{i}.pt")
        for i, s in enumerate((1.0, 2.0, 6.0), start=1)
    ]
    averaged = average_checkpoints(paths)
    torch.testing.assert_close(averaged["model"]["weight"], torch.full((2, 3), 3.0))
    torch.testing.assert_close(averaged["model"]["bias"], torch.arange(3.0) * 3.0)
    assert averaged["model"]["steps"].item() == 6  # integer buffers: from the last file
    assert averaged["averaged_from"] == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt"]
    assert "train_state" not in averaged
    assert averaged["src_vocab"] == checkpoint_payload()["src_vocab"]


def test_average_refuses_different_architectures(tmp_path):
    a = save_checkpoint(checkpoint_payload(1.0), tmp_path / "a.pt")
    other = checkpoint_payload(1.0)
    other["model_config"] = {"d_model": 4}
    b = save_checkpoint(other, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="different model architectures"):
        average_checkpoints([a, b])


def test_unwrap_model_removes_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(Wrapper(inner))) is inner


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    device = torch.device("cpu")
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    state = rng_state(device)
    torch.save(state, tmp_path / "rng.pt")
    draws = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), device)
    again = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(draws[0], again[0])
    assert draws[1:] == again[1:]
