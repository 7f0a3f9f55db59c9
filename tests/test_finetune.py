"""Fine-tuning (`trainer.init_from`): a new run from a trained checkpoint's weights and vocabularies.

A first run learns the reversal task on one corpus; fine-tuning runs start from its checkpoint on
another corpus of the same task that holds a word the first never saw.
"""

from __future__ import annotations

import copy
import csv
import json
import re

import pytest
import torch
from train_support import (
    OneThread,
    compose_config,
    overrides,
    run_train,
    user_error_line,
    write_reversal_corpus,
)

from transformer_mt.checkpoint import load_checkpoint
from transformer_mt.train import finetune
from transformer_mt.train.job import train


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A trained first run: its folders and corpus."""
    root = tmp_path_factory.mktemp("parent")
    corpus = write_reversal_corpus(root / "corpus", n_train=300, n_val=20)
    args = overrides(corpus, root, "parent", "trainer.max_epochs=3", "trainer.patience=0")
    with OneThread():
        train(compose_config(args))
    return {"root": root, "corpus": corpus, "best": root / "saved" / "parent" / "best.pt"}


def new_corpus(tmp_path, parent):
    """A second corpus: new training pairs, one with a word the parent never saw; the parent's
    validation files, so the fine-tuned run's first validation is the parent's own."""
    corpus = write_reversal_corpus(tmp_path / "corpus2", n_train=150, n_val=5)
    with open(corpus["train_src"], "a") as f:
        f.write("ant yak bee\n")
    with open(corpus["train_tgt"], "a") as f:
        f.write("bee yak ant\n")
    corpus["val_src"], corpus["val_tgt"] = parent["corpus"]["val_src"], parent["corpus"]["val_tgt"]
    return corpus


def finetune_args(tmp_path, parent, run_name, *extra, init_from=None, epochs=1):
    corpus_dir = tmp_path / "corpus2"
    if corpus_dir.exists():  # a resume: the same files
        files = ("train_src", "train_tgt", "val_src", "val_tgt")
        corpus = dict(
            zip(files, (corpus_dir / "train.src", corpus_dir / "train.tgt"), strict=False)
        )
        corpus["val_src"], corpus["val_tgt"] = (
            parent["corpus"]["val_src"],
            parent["corpus"]["val_tgt"],
        )
    else:
        corpus = new_corpus(tmp_path, parent)
    return overrides(
        corpus,
        tmp_path,
        run_name,
        f"trainer.init_from={init_from or parent['best']}",
        f"trainer.max_epochs={epochs}",
        *extra,
    )


def test_fine_tuning_starts_from_the_checkpoint_in_a_run_of_its_own(
    parent, tmp_path, monkeypatch, capsys
):
    before = {p: p.read_bytes() for p in (parent["root"] / "saved" / "parent").iterdir()}
    code, err = run_train(
        finetune_args(tmp_path, parent, "tuned", "optim.lr=1e-4"), monkeypatch, capsys
    )
    assert code == 0, err
    log = (tmp_path / "result" / "tuned" / "train.log").read_text()
    start = re.search(r"fine-tuning from .*parent.* before training .* BLEU ([\d.]+)", log)
    assert start, log
    parent_bleu = load_checkpoint(parent["best"])["metrics"]["val_bleu"]
    assert float(start.group(1)) == pytest.approx(parent_bleu, abs=0.1)
    # Its own logs and checkpoints; a fresh step count; the parent's files untouched.
    with open(tmp_path / "result" / "tuned" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    parent_steps = load_checkpoint(parent["root"] / "saved" / "parent" / "last.pt")["step"]
    tuned = load_checkpoint(tmp_path / "saved" / "tuned" / "last.pt")
    assert [row["epoch"] for row in rows] == ["1"]
    assert int(rows[0]["step"]) == tuned["step"] < parent_steps  # counted from 0 again
    assert tuned["config"]["run_name"] == "tuned"
    assert {p: p.read_bytes() for p in (parent["root"] / "saved" / "parent").iterdir()} == before
    # Resuming the fine-tuned run continues it (same vocabularies), without starting over.
    resume = finetune_args(
        tmp_path, parent, "tuned", "optim.lr=1e-4", "trainer.resume=true", epochs=2
    )
    code, err = run_train(resume, monkeypatch, capsys)
    assert code == 0, err
    log = (tmp_path / "result" / "tuned" / "train.log").read_text()
    assert log.count("fine-tuning from") == 1 and "continuing from epoch 1" in log
    assert load_checkpoint(tmp_path / "saved" / "tuned" / "last.pt")["epoch"] == 2


def test_fine_tuning_keeps_the_checkpoints_vocabulary(parent, tmp_path, monkeypatch, capsys):
    code, err = run_train(finetune_args(tmp_path, parent, "vocab"), monkeypatch, capsys)
    assert code == 0, err
    tuned = load_checkpoint(tmp_path / "saved" / "vocab" / "best.pt")
    first = load_checkpoint(parent["best"])
    assert tuned["src_vocab"] == first["src_vocab"] and tuned["tgt_vocab"] == first["tgt_vocab"]
    assert "yak" not in tuned["src_vocab"]  # the new word is <unk>: the ids keep their meaning
    (cache,) = (p for p in (tmp_path / "data" / "cache").iterdir() if p.is_dir())
    assert json.loads((cache / "manifest.json").read_text())["vocabularies"] == "given"


@pytest.fixture
def at_start(monkeypatch):
    """What a fine-tuning run's model and optimizer hold once the checkpoint is loaded into them,
    before the first step: its dropout probabilities, weights and Adam state."""
    seen = {}
    original = finetune.InitCheckpoint.load_into

    def load_into(self, model, optimizer, with_optimizer):
        original(self, model, optimizer, with_optimizer)
        seen["dropout"] = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
        seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["optimizer"] = copy.deepcopy(optimizer.state_dict())

    monkeypatch.setattr(finetune.InitCheckpoint, "load_into", load_into)
    return seen


def test_fine_tuning_can_keep_the_optimizer_state(parent, tmp_path, monkeypatch, capsys, at_start):
    last = parent["root"] / "saved" / "parent" / "last.pt"
    args = finetune_args(tmp_path, parent, "adam", "trainer.init_optimizer=true", init_from=last)
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 0, err
    assert "with its optimizer state" in (tmp_path / "result" / "adam" / "train.log").read_text()
    stored = load_checkpoint(last)["train_state"]["optimizer"]["state"]
    loaded = at_start["optimizer"]["state"]
    assert loaded.keys() == stored.keys() and len(stored) > 0
    for index, state in stored.items():
        for key, value in state.items():
            assert torch.equal(loaded[index][key], value), (index, key)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["model.d_model=64"],
            "was trained with other model settings: model.d_model=32 (this run: 64)",
        ),
        (["data.src=de", "data.tgt=en"], "translates en→de, this run asks for data.src=de"),
        (["trainer.init_optimizer=true"], "holds no optimizer state (best.pt and averaged.pt"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_is_written(
    parent, tmp_path, monkeypatch, capsys, extra, expected
):
    code, err = run_train(finetune_args(tmp_path, parent, "refused", *extra), monkeypatch, capsys)
    assert code == 2
    assert expected in user_error_line(err)
    assert not (tmp_path / "saved").exists()
    result = tmp_path / "result"
    assert not result.exists() or not any(p.is_file() for p in result.rglob("*"))


def test_a_missing_checkpoint_is_a_one_line_error(parent, tmp_path, monkeypatch, capsys):
    args = finetune_args(tmp_path, parent, "missing", init_from="nowhere/best.pt")
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 2
    assert "nowhere/best.pt" in user_error_line(err)
    assert not (tmp_path / "saved").exists()


def test_dropout_may_change_when_fine_tuning(parent, tmp_path, monkeypatch, capsys, at_start):
    assert load_checkpoint(parent["best"])["model_config"]["dropout"] == 0.0
    code, err = run_train(
        finetune_args(tmp_path, parent, "dropout", "model.dropout=0.3"), monkeypatch, capsys
    )
    assert code == 0, err
    assert 0.3 in at_start["dropout"]  # the new run's setting, on the checkpoint's weights
    weights = load_checkpoint(parent["best"])["model"]
    assert all(torch.equal(at_start["weights"][k], v) for k, v in weights.items())
    assert at_start["optimizer"]["state"] == {}  # a fresh Adam without trainer.init_optimizer
    tuned = load_checkpoint(tmp_path / "saved" / "dropout" / "last.pt")
    assert tuned["model_config"]["dropout"] == 0.3
