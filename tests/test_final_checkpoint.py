"""The end of a run with `trainer.average_last`: averaged.pt is validated, and best.pt becomes the
better of the average and the best validated checkpoint (the validation score is set by hand)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from train_support import checkpoint_payload

from transformer_mt.checkpoint import load_checkpoint, save_checkpoint
from transformer_mt.train.rundir import RunPaths
from transformer_mt.train.snapshot import average_epochs


class Toy(torch.nn.Module):
    """The parameters of `checkpoint_payload`'s weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 3))
        self.bias = torch.nn.Parameter(torch.zeros(3))
        self.register_buffer("steps", torch.tensor(0))


@pytest.fixture
def paths(tmp_path) -> RunPaths:
    paths = RunPaths.create("run", tmp_path / "saved", tmp_path / "result")
    for epoch in (9, 10):  # averaged: weights 9.5
        save_checkpoint(checkpoint_payload(float(epoch), train_state={}), paths.epoch(epoch))
    best = checkpoint_payload(4.0, metrics={"val_bleu": 30.0, "val_loss": 2.0})
    save_checkpoint(best, paths.best)  # best validated: weights 4
    return paths


def validated_as(**scores: float):
    metrics = {"val_loss": 2.0, "val_ppl": 7.4, "val_bleu": 30.0, **scores}
    return lambda model: SimpleNamespace(metrics=metrics)


def weight_of(path) -> float:
    return load_checkpoint(path)["model"]["weight"][0, 0].item()


@pytest.mark.parametrize(
    ("monitor", "scores", "averaged_wins"),
    [
        ("val_bleu", {"val_bleu": 31.5}, True),
        ("val_bleu", {"val_bleu": 29.0}, False),
        ("val_bleu", {"val_bleu": 30.0}, False),  # a tie keeps the validated checkpoint
        ("val_loss", {"val_loss": 1.9}, True),
        ("val_loss", {"val_loss": 2.1}, False),
    ],
)
def test_best_pt_ends_as_the_better_of_average_and_best(
    paths, caplog, monitor, scores, averaged_wins
):
    with caplog.at_level(logging.INFO, logger="transformer_mt.train.snapshot"):
        metrics = average_epochs(paths, 2, Toy(), validated_as(**scores), monitor)
    assert metrics[monitor] == scores[monitor]
    assert weight_of(paths.averaged) == 9.5  # averaged.pt is kept either way
    assert load_checkpoint(paths.averaged)["metrics"] == metrics
    assert weight_of(paths.best) == (9.5 if averaged_wins else 4.0)
    if averaged_wins:
        assert load_checkpoint(paths.best)["averaged_from"] == ["epoch_9.pt", "epoch_10.pt"]
    chosen = "averaged" if averaged_wins else "best validated"
    line = next(r.getMessage() for r in caplog.records if "final checkpoint" in r.getMessage())
    assert f"holds the {chosen} weights" in line
    best_score = {"val_bleu": 30.0, "val_loss": 2.0}[monitor]
    assert f"{scores[monitor]:.4g} averaged, {best_score:.4g} best validated" in line


def test_without_best_pt_the_average_becomes_it(paths):
    paths.best.unlink()
    average_epochs(paths, 2, Toy(), validated_as(val_bleu=1.0), "val_bleu")
    assert weight_of(paths.best) == 9.5
