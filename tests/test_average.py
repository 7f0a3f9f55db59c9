"""`mt-average` / scripts/average.py: the last K epoch checkpoints of a run, averaged into one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from train_support import REPO, checkpoint_payload, subprocess_env

from transformer_mt.checkpoint import load_checkpoint, save_checkpoint
from transformer_mt.cli.average import main


@pytest.fixture
def run_dir(tmp_path):
    folder = tmp_path / "saved" / "run"
    for epoch in (2, 3, 9, 10):  # sorted by number, not by name: epoch_10 is the newest
        save_checkpoint(
            checkpoint_payload(float(epoch), train_state={}), folder / f"epoch_{epoch}.pt"
        )
    save_checkpoint(checkpoint_payload(100.0), folder / "best.pt")  # never averaged
    return folder


def test_averages_the_last_k_epochs_into_averaged_pt(run_dir, capsys):
    main([str(run_dir), "--last", "2"])
    averaged = load_checkpoint(run_dir / "averaged.pt")
    assert averaged["averaged_from"] == ["epoch_9.pt", "epoch_10.pt"]
    torch.testing.assert_close(averaged["model"]["weight"], torch.full((2, 3), 9.5))
    assert "epoch_9.pt, epoch_10.pt" in capsys.readouterr().out
    # The last file's validation metrics belong to other weights: the average carries none.
    assert averaged["metrics"] == {}


def test_output_path_and_default_k(run_dir, tmp_path):
    main([str(run_dir), "--output", str(tmp_path / "avg.pt")])
    averaged = load_checkpoint(tmp_path / "avg.pt")
    assert len(averaged["averaged_from"]) == 4  # fewer than the default 5 exist: all of them
    assert not (run_dir / "averaged.pt").exists()


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d: [str(d / "nope")], "is not a folder"),
        (lambda d: [str(d), "--last", "0"], "--last must be at least 1"),
    ],
)
def test_user_errors_are_one_line(run_dir, capsys, make_args, message):
    with pytest.raises(SystemExit) as exit_:
        main(make_args(run_dir))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_script_reports_a_run_without_epoch_checkpoints(tmp_path):
    empty = tmp_path / "saved" / "empty"
    empty.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "average.py"), str(empty)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {empty} holds no epoch_<n>.pt checkpoints (trainer.keep_last=0 keeps none)"
    )
    assert list(empty.iterdir()) == []
