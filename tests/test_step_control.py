"""Training controlled by optimizer steps, for corpora whose epochs last hours: validation and
saving every N steps (`trainer.validate_every`, `save_every`), the time budget checked between
steps, and patience and the plateau schedule counted in validations.

The reversal corpus of 200 pairs makes 4 steps an epoch at data.max_tokens=400, so an N that does
not divide 4 puts validations and saves in the middle of epochs. The SIGKILL between two such
saves is in test_reliability.py.
"""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace

import pytest
import torch
from train_support import (
    compose_config,
    model_weights,
    overrides,
    run_train,
    user_error_line,
    write_reversal_corpus,
)

from transformer_mt.config import TrainerConfig
from transformer_mt.errors import ConfigError
from transformer_mt.train import trainer as trainer_module
from transformer_mt.train.job import train
from transformer_mt.train.optim import PlateauSchedule
from transformer_mt.train.state import Progress
from transformer_mt.train.stopping import stop_reason

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return {**write_reversal_corpus(folder, n_train=200, n_val=10), "data_root": folder / "data"}


def args_for(corpus, root, run_name, *extra):
    """Overrides for a quick run (no sample translations); the prepared data is shared."""
    files = {key: value for key, value in corpus.items() if key != "data_root"}
    return overrides(
        files, root, run_name, "trainer.num_samples=0", *extra, data_root=corpus["data_root"]
    )


def rows(root, run_name) -> list[dict]:
    lines = (root / "result" / run_name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_state(path) -> dict:
    return torch.load(path, weights_only=True)["train_state"]


@pytest.mark.slow
def test_validate_every_writes_a_row_and_checkpoints_per_validation(corpus, tmp_path, caplog):
    """validate_every=5 over 3 epochs of 4 steps: validations at steps 5 and 10 (mid-epoch) and at
    step 12, where the run ends between two of them; epoch ends validate no more but still write
    the epoch checkpoints that averaging reads."""
    args = args_for(corpus, tmp_path, "every5", "trainer.max_epochs=3", "trainer.validate_every=5")
    with caplog.at_level(logging.INFO):
        metrics = train(compose_config(args))
    saved = tmp_path / "saved" / "every5"
    assert [torch.load(saved / f"epoch_{n}.pt", weights_only=True)["step"] for n in (1, 2, 3)] == [
        4,
        8,
        12,
    ]

    logged = rows(tmp_path, "every5")
    assert [(row["epoch"], row["step"]) for row in logged] == [(2, 5), (3, 10), (3, 12)]
    assert all(row["val_bleu"] is not None and row["train_loss"] > 0 for row in logged)
    assert metrics == {key: logged[-1][key] for key in metrics}  # the run ends validated
    last = torch.load(saved / "last.pt", weights_only=True)
    assert last["step"] == 12 and last["metrics"] == metrics
    best_row = max(logged, key=lambda row: row["val_bleu"])  # the first of equals, as best.pt
    assert torch.load(saved / "best.pt", weights_only=True)["step"] == best_row["step"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "result" / "every5"))
    events.Reload()
    assert [event.step for event in events.Scalars("val/bleu")] == [5, 10, 12]
    assert "step 5 (in epoch 2): train loss" in caplog.text
    assert "training stopped: reached trainer.max_epochs=3" in caplog.text


@pytest.mark.slow
def test_max_time_stops_in_the_middle_of_an_epoch_and_a_resume_continues(
    corpus, tmp_path, monkeypatch, caplog
):
    """With save_every set, max_time is checked between steps. The trainer's clock is moved on by
    100 s at each step and 1000 s at each validation, so a budget of 5 minutes is spent at step 3:
    the run validates and saves there, and a resume with a larger budget ends on the weights of
    a run that was never stopped. Its train_seconds counts each validation once."""
    base = ("trainer.max_epochs=2", "trainer.save_every=2", "model.dropout=0.1")
    with caplog.at_level(logging.INFO):
        train(compose_config(args_for(corpus, tmp_path, "straight", *base)))

    offset = {"seconds": 0.0}
    clock = SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset["seconds"])
    monkeypatch.setattr(trainer_module, "time", clock)
    real_step, real_validate = trainer_module.Trainer.train_step, trainer_module.Trainer.validate

    def slow_step(self, batches):
        real_step(self, batches)
        offset["seconds"] += 100.0

    def slow_validate(self, model=None):
        offset["seconds"] += 1000.0
        return real_validate(self, model)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", slow_step)
    monkeypatch.setattr(trainer_module.Trainer, "validate", slow_validate)
    args = args_for(corpus, tmp_path, "budget", *base)
    started = time.perf_counter()
    with caplog.at_level(logging.INFO):
        train(compose_config([*args, "trainer.max_time=5"]))
    wall = time.perf_counter() - started
    saved = tmp_path / "saved" / "budget"
    progress = train_state(saved / "last.pt")["progress"]
    assert (progress["step"], progress["epoch"], progress["batches_in_epoch"]) == (3, 0, 3)
    assert 1300.0 <= progress["train_seconds"] < 1300.0 + wall  # 3 steps and one validation
    assert "training stopped: reached trainer.max_time=5" in caplog.text
    assert [(row["epoch"], row["step"]) for row in rows(tmp_path, "budget")] == [(1, 3)]

    train(compose_config([*args, "trainer.max_time=500", "trainer.resume=true"]))
    progress = train_state(saved / "last.pt")["progress"]
    assert (progress["step"], progress["epoch"]) == (8, 2)
    assert [(row["epoch"], row["step"]) for row in rows(tmp_path, "budget")] == [
        (1, 3),
        (1, 4),
        (2, 8),
    ]
    straight = model_weights(tmp_path / "saved" / "straight" / "last.pt")
    resumed = model_weights(saved / "last.pt")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


@pytest.mark.slow
def test_patience_and_the_plateau_schedule_count_validations(corpus, tmp_path, caplog):
    """The weights cannot move (lr 1e-30), so val_loss never improves after the validation at
    step 3: with plateau_patience=1 each later validation halves the rate, and patience=2 stops
    the run after the validation at step 9, one step into epoch 3."""
    args = args_for(
        corpus,
        tmp_path,
        "stalls",
        "optim.lr=1e-30",
        "optim.warmup_steps=0",
        "optim.min_lr=1e-40",
        "optim.plateau_patience=1",
        "trainer.monitor=val_loss",
        "trainer.patience=2",
        "trainer.max_epochs=10",
        "trainer.validate_every=3",
    )
    with caplog.at_level(logging.INFO):
        train(compose_config(args))
    logged = rows(tmp_path, "stalls")
    assert [(row["epoch"], row["step"]) for row in logged] == [(1, 3), (2, 6), (3, 9)]
    assert [row["lr"] for row in logged] == pytest.approx([1e-30, 5e-31, 2.5e-31], rel=1e-6, abs=0)
    state = train_state(tmp_path / "saved" / "stalls" / "last.pt")
    progress = state["progress"]
    assert (progress["step"], progress["epoch"], progress["batches_in_epoch"]) == (9, 2, 1)
    assert (progress["bad_validations"], progress["best_step"], progress["best_epoch"]) == (2, 3, 1)
    assert "early stopping: val_loss has not improved for 2 validations" in caplog.text
    assert "at step 3, epoch 1)" in caplog.text


@pytest.mark.parametrize("override", ["trainer.validate_every=0", "trainer.save_every=-2"])
def test_a_step_count_below_one_is_a_one_line_error(
    corpus, tmp_path, monkeypatch, capsys, override
):
    code, err = run_train(args_for(corpus, tmp_path, "bad", override), monkeypatch, capsys)
    assert code == 2
    key, value = override.split("=")
    assert user_error_line(err) == f"error: {key} must be > 0 (got {value})"
    assert not (tmp_path / "saved").exists()


def test_step_counts_are_whole_numbers_or_none():
    assert TrainerConfig(validate_every=None, save_every=None).by_steps is False
    assert TrainerConfig(save_every=1000).by_steps is True
    with pytest.raises(ConfigError, match="trainer.validate_every must be > 0"):
        TrainerConfig(validate_every=-1)


def test_max_time_has_no_look_ahead_when_steps_control_the_run():
    """Between epochs, with validate_every or save_every, an epoch starts whatever its length:
    the budget stops it between steps instead."""

    def reason(train_seconds: float, **every) -> str | None:
        progress = Progress(train_seconds=train_seconds)
        budget = TrainerConfig(max_time=10, max_epochs=100, patience=0, **every)
        return stop_reason(progress, budget, last_epoch_seconds=90)

    assert "would end after trainer.max_time=10" in reason(520)
    assert reason(520, validate_every=50) is None
    assert reason(520, save_every=50) is None
    assert "reached trainer.max_time=10" in reason(600, save_every=50)


def test_checkpoints_that_counted_bad_epochs_still_resume():
    """Before validations could come mid-epoch, the counts were named bad_epochs."""
    progress = Progress.from_state_dict(
        {"epoch": 3, "step": 30, "best_metric": 9.0, "best_epoch": 1, "bad_epochs": 2}
    )
    assert (progress.bad_validations, progress.best_epoch, progress.best_step) == (2, 1, 0)
    schedule = PlateauSchedule(peak_lr=1e-3, warmup_steps=0, factor=0.5, patience=3, min_lr=0.0)
    schedule.load_state_dict({"level": 5e-4, "best": 9.0, "bad_epochs": 2, "decay_from": None})
    assert schedule.bad_validations == 2
    assert schedule.record(8.0) is True  # val_bleu 8 < 9: the third bad validation in a row
    assert schedule.level == pytest.approx(2.5e-4)
