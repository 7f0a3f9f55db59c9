"""Resuming reproduces the uninterrupted run: same weights, optimizer state and metrics.

Dropout is on, so the random-number states really have to be restored; resuming in the middle of
an epoch also needs the data position inside it.
"""

from __future__ import annotations

import csv
import signal

import pytest
import torch
from train_support import OneThread, compose_config, model_weights, overrides, write_reversal_corpus

from transformer_mt.train import trainer as trainer_module
from transformer_mt.train.job import train
from transformer_mt.train.stopping import TrainingInterrupted

pytestmark = pytest.mark.slow

RESUMABLE = ("model.dropout=0.1", "data.limit_train=400", "trainer.keep_last=1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_reversal_corpus(root / "corpus", n_train=400, n_val=30)


@pytest.fixture(scope="module")
def reference_run(root):
    """Two epochs without interruption."""
    folder, corpus = root
    with OneThread():
        train(
            compose_config(
                overrides(corpus, folder, "straight", "trainer.max_epochs=2", *RESUMABLE)
            )
        )
    return folder / "saved" / "straight"


def _metric_rows(folder, run):
    with open(folder / "result" / run / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    timing = ("tokens_per_s", "epoch_seconds")
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def _tensorboard_val_steps(folder, run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "result" / run))
    events.Reload()
    return [event.step for event in events.Scalars("val/bleu")]


def _assert_same_weights(path_a, path_b):
    a, b = model_weights(path_a), model_weights(path_b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def _assert_same_optimizer_state(path_a, path_b):
    """Adam's step and both moments of every parameter, and every group's settings and rate."""
    a = torch.load(path_a, weights_only=True)["train_state"]["optimizer"]
    b = torch.load(path_b, weights_only=True)["train_state"]["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    n_params = sum(len(group["params"]) for group in a["param_groups"])
    assert len(a["state"]) == len(b["state"]) == n_params
    for index, state in a["state"].items():
        assert state.keys() == b["state"][index].keys()
        for key, value in state.items():
            torch.testing.assert_close(
                value, b["state"][index][key], atol=1e-6, rtol=0, msg=f"parameter {index}: {key}"
            )


def test_resume_after_an_epoch_gives_the_same_weights(root, reference_run):
    folder, corpus = root
    args = overrides(corpus, folder, "in-two-parts", *RESUMABLE)
    with OneThread():
        train(compose_config([*args, "trainer.max_epochs=1"]))
        train(compose_config([*args, "trainer.max_epochs=2", "trainer.resume=true"]))
    resumed = folder / "saved" / "in-two-parts"
    _assert_same_optimizer_state(reference_run / "last.pt", resumed / "last.pt")
    _assert_same_weights(reference_run / "last.pt", resumed / "last.pt")
    state_a = torch.load(reference_run / "last.pt", weights_only=True)["train_state"]
    state_b = torch.load(resumed / "last.pt", weights_only=True)["train_state"]
    assert state_a["progress"]["step"] == state_b["progress"]["step"]
    assert _metric_rows(folder, "straight") == _metric_rows(folder, "in-two-parts")
    assert _tensorboard_val_steps(folder, "in-two-parts") == _tensorboard_val_steps(
        folder, "straight"
    )


def test_resume_in_the_middle_of_an_epoch_gives_the_same_weights(root, reference_run, monkeypatch):
    folder, corpus = root
    args = overrides(corpus, folder, "interrupted", *RESUMABLE, "trainer.max_epochs=2")
    steps_per_epoch = torch.load(reference_run / "epoch_2.pt", weights_only=True)["step"] // 2
    stop_at = steps_per_epoch + steps_per_epoch // 2  # half-way through epoch 2
    original_step = trainer_module.Trainer.train_step

    def train_step_then_ctrl_c(self, batches):
        original_step(self, batches)
        if self.progress.step == stop_at:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", train_step_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, default otherwise
    with OneThread(), pytest.raises(TrainingInterrupted) as stopped:
        train(compose_config(args))
    assert stopped.value.exit_code == 130
    assert "trainer.resume=true" in str(stopped.value)
    saved = folder / "saved" / "interrupted"
    progress = torch.load(saved / "last.pt", weights_only=True)["train_state"]["progress"]
    assert (progress["epoch"], progress["step"]) == (1, stop_at)
    assert 0 < progress["batches_in_epoch"] < steps_per_epoch
    assert not (saved / "train.lock").exists()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    monkeypatch.setattr(trainer_module.Trainer, "train_step", original_step)
    with OneThread():
        train(compose_config([*args, "trainer.resume=true"]))
    _assert_same_optimizer_state(reference_run / "last.pt", saved / "last.pt")
    _assert_same_weights(reference_run / "last.pt", saved / "last.pt")
    assert _metric_rows(folder, "straight") == _metric_rows(folder, "interrupted")
