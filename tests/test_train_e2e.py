"""End to end through the real entry point: `scripts/train.py` learns a toy task on the CPU and
leaves every promised file behind, readable by the tools a user would point at it."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_support import (
    REPO,
    RUN_SCALAR_TAGS,
    TRAIN_SCRIPT,
    overrides,
    run_cli,
    run_train,
    subprocess_env,
    write_reversal_corpus,
)

from transformer_mt.train.logging import METRIC_COLUMNS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 60-second-capped training run of the reversal task, shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    corpus = write_reversal_corpus(root / "corpus")
    args = overrides(
        corpus,
        root,
        "reverse",
        "trainer.max_epochs=16",
        "trainer.max_time=1",  # minutes: the whole budget of training
        "trainer.patience=0",
        "trainer.keep_last=2",
        "trainer.average_last=2",
    )
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "saved" / "reverse", root / "result" / "reverse", result


def _rows(result_dir):
    with open(result_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_learns_the_task_within_a_minute(finished_run):
    _, result_dir, _ = finished_run
    rows = _rows(result_dir)
    assert sum(float(row["epoch_seconds"]) for row in rows) <= 75  # max_time=1 min, +1 epoch
    assert max(float(row["val_bleu"]) for row in rows) >= 90
    train_losses = [float(row["train_loss"]) for row in rows]
    assert train_losses[-1] < 0.2 * train_losses[0]


def test_metrics_files_agree_and_have_every_column(finished_run):
    _, result_dir, _ = finished_run
    rows = _rows(result_dir)
    assert tuple(rows[0].keys()) == METRIC_COLUMNS
    assert [int(row["epoch"]) for row in rows] == list(range(1, len(rows) + 1))
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps) and steps[0] > 0
    lines = (result_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    for row, line in zip(rows, lines, strict=True):
        record = json.loads(line)
        assert set(record) == set(METRIC_COLUMNS)
        assert record["val_bleu"] == pytest.approx(float(row["val_bleu"]))
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]), rel=1e-6)


def test_tensorboard_events_hold_scalars_text_image_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, result_dir, _ = finished_run
    events = EventAccumulator(str(result_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in RUN_SCALAR_TAGS:
        assert tag in tags["scalars"], tag
    assert "val/attention" in tags["images"]
    assert any(tag.startswith("val/samples") for tag in tags["tensors"])
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    assert any(tag.startswith("hparam/") for tag in tags["scalars"])
    # The learning rate climbs during the warmup (50 steps, a point every 10 steps).
    lrs = [event.value for event in events.Scalars("train/lr")][:5]
    assert lrs == sorted(lrs) and lrs[0] < lrs[-1]
    assert len(events.Scalars("val/bleu")) == len(_rows(result_dir))


def test_plots_are_png(finished_run):
    _, result_dir, _ = finished_run
    for name in ("curves.png", "attention.png"):
        assert (result_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_checkpoints_are_self_contained_and_safe_to_load(finished_run):
    saved_dir, _, _ = finished_run
    names = sorted(path.name for path in saved_dir.iterdir())
    epochs = sorted(int(n[len("epoch_") : -3]) for n in names if n.startswith("epoch_"))
    assert len(epochs) == 2 and epochs[1] == epochs[0] + 1  # keep_last=2
    assert {"last.pt", "best.pt", "averaged.pt"} <= set(names)
    assert "train.lock" not in names  # released on exit
    for name in ("last.pt", "best.pt", "averaged.pt", f"epoch_{epochs[-1]}.pt"):
        payload = torch.load(saved_dir / name, map_location="cpu", weights_only=True)
        for key in ("model", "model_config", "config", "src_vocab", "tgt_vocab", "tokenizer"):
            assert key in payload, (name, key)
        assert payload["tokenizer"] == {
            "src_lang": "en",
            "tgt_lang": "de",
            "lowercase": False,
            "subword": None,  # word level
        }
        assert payload["config"]["run_name"] == "reverse"
        assert not any(key.startswith(("module.", "_orig_mod.")) for key in payload["model"])
    last = torch.load(saved_dir / "last.pt", map_location="cpu", weights_only=True)
    assert last["train_state"]["progress"]["epoch"] == epochs[-1]
    averaged = torch.load(saved_dir / "averaged.pt", map_location="cpu", weights_only=True)
    assert averaged["averaged_from"] == [f"epoch_{e}.pt" for e in epochs]


def test_the_averaged_model_carries_its_own_validation_metrics(finished_run):
    from transformer_mt.inference.translator import Translator
    from transformer_mt.metrics import corpus_bleu

    saved_dir, _, _ = finished_run
    averaged = torch.load(saved_dir / "averaged.pt", map_location="cpu", weights_only=True)
    last_epoch = torch.load(
        saved_dir / averaged["averaged_from"][-1], map_location="cpu", weights_only=True
    )
    # Not the last epoch's figures, which belong to other weights ...
    assert averaged["metrics"]["val_loss"] != last_epoch["metrics"]["val_loss"]
    # ... but the BLEU that decoding the validation split with the averaged weights gives.
    corpus = saved_dir.parent.parent / "corpus"
    sources = (corpus / "val.src").read_text().splitlines()
    references = (corpus / "val.tgt").read_text().splitlines()
    translator = Translator.from_checkpoint(saved_dir / "averaged.pt", device="cpu")
    bleu = corpus_bleu(translator.translate(sources), references)
    assert averaged["metrics"]["val_bleu"] == pytest.approx(bleu, abs=0.01)


def test_best_checkpoint_translates_with_the_shared_decoding_code(finished_run):
    from transformer_mt.inference.translator import Translator

    saved_dir, _, _ = finished_run
    translator = Translator.from_checkpoint(saved_dir / "best.pt", device="cpu")
    assert translator.translate(["ant bee cat dog"]) == ["dog cat bee ant"]


def test_log_shows_samples_and_the_averaged_model(finished_run):
    _, result_dir, _ = finished_run
    text = (result_dir / "train.log").read_text()
    assert "source:" in text and "reference:" in text and "hypothesis:" in text
    assert "averaged epoch_" in text
    assert "training stopped:" in text


def test_ctrl_c_saves_last_checkpoint_and_resume_continues(tmp_path, monkeypatch, capsys):
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=1000, n_val=20)
    args = overrides(corpus, tmp_path, "stopped", "trainer.max_epochs=2", "data.max_tokens=150")
    saved = tmp_path / "saved" / "stopped"
    process = subprocess.Popen(
        [sys.executable, str(TRAIN_SCRIPT), *args],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (saved / "epoch_1.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 2
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    log = (tmp_path / "result" / "stopped" / "train.log").read_text()
    assert "interrupted by SIGINT" in log and "trainer.resume=true" in log
    state = torch.load(saved / "last.pt", weights_only=True)["train_state"]
    assert state["progress"]["epoch"] == 1
    assert not (saved / "train.lock").exists()

    code, stderr = run_train([*args, "trainer.resume=true"], monkeypatch, capsys)  # in-process
    assert code == 0, stderr[-3000:]
    last = torch.load(saved / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    epochs = [row["epoch"] for row in _rows(tmp_path / "result" / "stopped")]
    assert epochs == ["1", "2"]


def test_multirun_gives_each_job_its_own_run(tmp_path, monkeypatch, capsys):
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=100, n_val=10)
    args = overrides(corpus, tmp_path, "sweep", "trainer.max_epochs=1", "optim.lr=1e-3,2e-3")
    code, stderr = run_train(["-m", *args], monkeypatch, capsys)  # the entry point, in-process
    assert code == 0, stderr[-3000:]
    for job in (0, 1):
        assert (tmp_path / "saved" / f"sweep-{job}" / "last.pt").is_file()
        assert (tmp_path / "result" / f"sweep-{job}" / "metrics.csv").is_file()
        assert (tmp_path / "result" / f"sweep-{job}" / "train.log").is_file()
    lrs = {
        torch.load(tmp_path / "saved" / f"sweep-{job}" / "last.pt", weights_only=True)["config"][
            "optim"
        ]["lr"]
        for job in (0, 1)
    }
    assert lrs == {1e-3, 2e-3}
