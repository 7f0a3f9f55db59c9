"""The trainer never loses work: refusals before training, a lock per run, stops on bad states.

Errors go through the real entry point (`transformer_mt.cli.train.main`, in this process) and are
checked for their one-line message, a non-zero exit status and nothing half-written left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure
from train_support import (
    OneThread,
    compose_config,
    overrides,
    run_train,
    user_error_line,
    write_reversal_corpus,
)

from transformer_mt.errors import CheckpointError, UserError
from transformer_mt.train import job as job_module
from transformer_mt.train import step as step_module
from transformer_mt.train import trainer as trainer_module
from transformer_mt.train.job import train
from transformer_mt.train.rundir import LOCK_NAME, RunLock, RunPaths, open_run
from transformer_mt.train.stopping import TrainingDiverged, stop_reason


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return {**write_reversal_corpus(folder, n_train=200, n_val=20), "data_root": folder / "data"}


def args_for(corpus, root, run_name, *extra):
    """Overrides for a quick run; the prepared data is shared by the runs of this module."""
    files = {key: value for key, value in corpus.items() if key != "data_root"}
    return overrides(files, root, run_name, *extra, data_root=corpus["data_root"])


# ------------------------------------------------------------------------------------------
# Refusals before any work


def test_invalid_config_value_fails_before_any_work(corpus, tmp_path, monkeypatch, capsys):
    code, err = run_train(
        args_for(corpus, tmp_path, "bad", "trainer.monitor=bleu"), monkeypatch, capsys
    )
    assert code == 2
    assert "trainer.monitor" in user_error_line(err)
    assert not (tmp_path / "saved").exists()


def test_misspelt_key_fails_naming_it(corpus, tmp_path, monkeypatch, capsys):
    code, err = run_train(
        args_for(corpus, tmp_path, "bad", "trainer.max_epoch=3"), monkeypatch, capsys
    )
    assert code == 2  # Hydra's refusal, before our code runs, as one line
    assert "max_epoch" in user_error_line(err)
    assert not (tmp_path / "saved").exists()


def test_existing_run_is_never_overwritten(corpus, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved" / "taken"
    saved.mkdir(parents=True)
    (saved / "last.pt").write_bytes(b"precious")
    code, err = run_train(args_for(corpus, tmp_path, "taken"), monkeypatch, capsys)
    assert code == 2
    line = user_error_line(err)
    assert "already holds checkpoints" in line and "trainer.resume=true" in line
    assert sorted(p.name for p in saved.iterdir()) == ["last.pt"]
    assert (saved / "last.pt").read_bytes() == b"precious"


def test_a_new_run_never_truncates_the_logs_of_a_run_of_the_same_name(
    corpus, tmp_path, monkeypatch, capsys
):
    """Finding 1 of the reliability review: the same run_name with another saved_dir truncated
    result/<run>/metrics.csv, and a refused start still rewrote result/<run>/.hydra/config.yaml."""
    result = tmp_path / "result" / "logged"
    result.mkdir(parents=True)
    (result / "metrics.csv").write_text("epoch,step\n1,10\n")
    (result / "train.log").write_text("the first run's log\n")
    before = {p.name: p.read_bytes() for p in result.iterdir()}
    args = args_for(corpus, tmp_path, "logged", f"saved_dir={tmp_path / 'other-saved'}")
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 2
    line = user_error_line(err)
    assert f"{result} already holds the logs" in line and "another run_name" in line
    assert {p.name: p.read_bytes() for p in result.iterdir()} == before  # nothing new, nothing lost
    assert not (tmp_path / "other-saved" / "logged").exists()


def test_a_refused_start_writes_nothing_into_the_run_folders(corpus, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "saved" / "taken"
    saved.mkdir(parents=True)
    (saved / "last.pt").write_bytes(b"precious")
    code, _ = run_train(args_for(corpus, tmp_path, "taken"), monkeypatch, capsys)
    assert code == 2
    result = tmp_path / "result" / "taken"
    assert not result.exists() or not any(result.rglob("*"))


def test_a_started_run_records_its_config(corpus, tmp_path, monkeypatch, capsys):
    code, _ = run_train(
        args_for(corpus, tmp_path, "recorded", "trainer.max_steps=1"), monkeypatch, capsys
    )
    assert code == 0
    import yaml

    config = yaml.safe_load((tmp_path / "result" / "recorded" / "config.yaml").read_text())
    assert config["run_name"] == "recorded" and config["trainer"]["max_steps"] == 1
    assert "train.log" in {p.name for p in (tmp_path / "result" / "recorded").iterdir()}


def test_resume_without_last_checkpoint_is_an_error(corpus, tmp_path, monkeypatch, capsys):
    code, err = run_train(
        args_for(corpus, tmp_path, "ghost", "trainer.resume=true"), monkeypatch, capsys
    )
    assert code == 2
    line = user_error_line(err)
    assert "last.pt does not exist" in line and "ghost" in line
    assert not (tmp_path / "saved" / "ghost").exists()


def test_unwritable_saved_dir_stops_before_training(corpus, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "saved-is-a-file"
    blocker.write_text("not a folder")
    args = args_for(corpus, tmp_path, "nowhere", f"saved_dir={blocker}")
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 2
    assert f"cannot write to {blocker / 'nowhere'}" in user_error_line(err)
    assert blocker.read_text() == "not a folder"
    assert not (tmp_path / "result" / "nowhere" / "metrics.csv").exists()  # stopped before training


def test_second_run_on_the_same_name_refuses_while_the_first_is_alive(
    corpus, tmp_path, monkeypatch, capsys
):
    saved = tmp_path / "saved" / "busy"
    saved.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname()}
        (saved / LOCK_NAME).write_text(json.dumps(lock))
        fresh = tmp_path / "fresh-data"
        args = args_for(corpus, tmp_path, "busy", f"data.root={fresh}")
        code, err = run_train(args, monkeypatch, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert f"already being trained by process {holder.pid}" in user_error_line(err)
    assert json.loads((saved / LOCK_NAME).read_text()) == lock  # the other run's lock stays
    assert not fresh.exists()  # refused before any work: no data prepared


def test_a_lock_whose_pid_was_reused_is_taken_over_and_a_foreign_one_names_its_file(tmp_path):
    """Finding 4 of the reliability review: a lock left by a PID now reused by another process, or
    by another host, was never taken over, and the message did not say which file to delete."""
    from transformer_mt.train.rundir import process_start

    lock_path = tmp_path / LOCK_NAME
    reused = {"pid": os.getpid(), "host": socket.gethostname(), "started": "other-boot:12345"}
    assert process_start() not in (None, reused["started"])
    lock_path.write_text(json.dumps(reused))  # "our" PID, but a process that started elsewhen
    lock = RunLock(tmp_path)
    lock.acquire()
    owner = json.loads(lock_path.read_text())
    assert owner["pid"] == os.getpid() and owner["started"] == process_start()
    lock.release()

    foreign = {"pid": 1, "host": "another-host.example", "started": None}
    lock_path.write_text(json.dumps(foreign))
    with pytest.raises(UserError) as refused:
        RunLock(tmp_path).acquire()
    message = str(refused.value)
    assert "another-host.example" in message and f"delete {lock_path}" in message
    assert json.loads(lock_path.read_text()) == foreign


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match="already being trained"):
        RunLock(tmp_path).acquire()  # this very process is alive
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    second = RunLock(tmp_path)
    second.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    second.release()


def test_open_run_leaves_nothing_behind_when_it_refuses(tmp_path):
    paths = RunPaths.create("fresh", tmp_path / "saved", tmp_path / "result")
    with pytest.raises(CheckpointError):
        open_run(paths, resume=True)
    assert not paths.saved.exists()
    lock = open_run(paths, resume=False)
    assert (paths.saved / LOCK_NAME).exists()
    lock.release()
    assert list(paths.saved.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Stops during training


def _poison_loss_from(monkeypatch, first_bad_call: int, last_bad_call: int | None = None):
    """Make the training loss NaN on training calls first_bad_call..last_bad_call (1-based)."""
    real = step_module.token_loss_sum
    calls = {"n": 0}

    def loss(logits, target, label_smoothing=0.0):
        value = real(logits, target, label_smoothing)
        if not torch.is_grad_enabled():
            return value  # validation
        calls["n"] += 1
        last = last_bad_call if last_bad_call is not None else float("inf")
        return value * float("nan") if first_bad_call <= calls["n"] <= last else value

    monkeypatch.setattr(step_module, "token_loss_sum", loss)


def _steps_per_epoch(corpus, tmp_path) -> int:
    with OneThread():
        cfg = compose_config(args_for(corpus, tmp_path, "count", "trainer.max_epochs=1"))
        train(cfg)
    return torch.load(tmp_path / "saved" / "count" / "last.pt", weights_only=True)["step"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    corpus, tmp_path, monkeypatch
):
    per_epoch = _steps_per_epoch(corpus, tmp_path)
    bad_step = per_epoch + 2
    _poison_loss_from(monkeypatch, bad_step)
    cfg = compose_config(args_for(corpus, tmp_path, "diverges", "trainer.max_epochs=3"))
    with OneThread(), pytest.raises(TrainingDiverged) as stopped:
        train(cfg)
    message = str(stopped.value)
    saved = tmp_path / "saved" / "diverges"
    assert f"at step {bad_step}" in message
    assert f"{saved / 'last.pt'} (step {per_epoch})" in message
    last = torch.load(saved / "last.pt", weights_only=True)
    assert last["step"] == per_epoch and last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (saved / LOCK_NAME).exists()


def test_skip_nonfinite_skips_the_batch_and_trains_on(corpus, tmp_path, monkeypatch, caplog):
    _poison_loss_from(monkeypatch, 3, 3)
    cfg = compose_config(
        args_for(corpus, tmp_path, "skips", "trainer.max_epochs=1", "trainer.skip_nonfinite=true")
    )
    with OneThread(), caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert "step 3: non-finite loss or gradient, batch skipped" in caplog.text
    assert all(map(lambda v: v == v, metrics.values()))  # no NaN
    last = torch.load(tmp_path / "saved" / "skips" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in last["model"].values())


def test_full_disk_stops_the_run_naming_the_file(corpus, tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    cfg = compose_config(args_for(corpus, tmp_path, "full", "trainer.max_epochs=3"))
    with OneThread(), pytest.raises(CheckpointError) as stopped:
        train(cfg)
    saved = tmp_path / "saved" / "full"
    assert f"cannot write checkpoint {saved / 'last.pt'}" in str(stopped.value)
    assert "No space left on device" in str(stopped.value)
    assert sorted(p.name for p in saved.iterdir()) == []  # no temp files, lock released
    rows = (tmp_path / "result" / "full" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1  # header only: it did not train on without a checkpoint


@pytest.mark.parametrize("victim", ["curves", "metrics"])
def test_full_disk_while_writing_the_logs_is_a_one_line_error(
    corpus, tmp_path, monkeypatch, capsys, victim
):
    """Finding 6 of the reliability review: ENOSPC while writing curves.png or metrics.csv was a
    traceback, though the same fault in a checkpoint write was a clean one-line error."""
    from transformer_mt.train import logging as run_logging

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if victim == "curves":
        monkeypatch.setattr(Figure, "savefig", no_space)  # the class plots.py draws on
    else:
        real_fsync = os.fsync
        calls = {"n": 0}

        def fsync_fails_on_the_metrics_row(fd):
            calls["n"] += 1
            if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.csv"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(run_logging.os, "fsync", fsync_fails_on_the_metrics_row)
    args = args_for(corpus, tmp_path, f"full-{victim}", "trainer.max_epochs=2")
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 2
    result = tmp_path / "result" / f"full-{victim}"
    name = "curves.png" if victim == "curves" else "metrics.csv"
    line = user_error_line(err)
    assert f"cannot write {result / name}: No space left on device" in line
    assert "trainer.resume=true" in line
    assert (tmp_path / "saved" / f"full-{victim}" / "last.pt").is_file()  # saved before the logs
    rows = (result / "metrics.csv").read_text().splitlines()
    assert all(row.count(",") == rows[0].count(",") for row in rows)  # no half-written row
    assert not list(result.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------
# Stopping rules and messages


def test_max_steps_stops_mid_epoch_and_saves(corpus, tmp_path):
    cfg = compose_config(args_for(corpus, tmp_path, "short", "trainer.max_steps=3"))
    with OneThread():
        train(cfg)
    last = torch.load(tmp_path / "saved" / "short" / "last.pt", weights_only=True)
    assert last["step"] == 3 and last["epoch"] == 0
    assert last["train_state"]["progress"]["batches_in_epoch"] == 3


def test_early_stopping_after_patience_epochs_without_improvement(corpus, tmp_path, caplog):
    cfg = compose_config(
        args_for(
            corpus,
            tmp_path,
            "stalls",
            "optim.lr=1e-30",  # the weights cannot move: val_loss never improves after epoch 1
            "optim.warmup_steps=0",
            "trainer.monitor=val_loss",
            "trainer.patience=2",
            "trainer.max_epochs=10",
        )
    )
    with OneThread(), caplog.at_level(logging.INFO):
        train(cfg)
    last = torch.load(tmp_path / "saved" / "stalls" / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    assert "early stopping: val_loss has not improved for 2 validations" in caplog.text


def test_cpu_with_the_base_model_warns_and_names_the_small_preset(caplog):
    cfg = compose_config(["model=base", "run_name=x"])
    with caplog.at_level(logging.WARNING):
        job_module._warn_if_slow(cfg, torch.device("cpu"))
    assert "experiment=cpu" in caplog.text and "slow" in caplog.text


def test_a_validation_pair_longer_than_the_model_reads_is_left_out_not_fatal(
    tmp_path, monkeypatch, capsys
):
    """Finding 3 of the reliability review: one validation pair longer than model.max_positions
    crashed validation after a full epoch of training, every epoch, before its checkpoint."""
    files = write_reversal_corpus(tmp_path / "corpus", n_train=200, n_val=20)
    long_line = " ".join(["ant", "bee"] * 10)  # 20 tokens
    with open(files["val_src"], "a") as src, open(files["val_tgt"], "a") as tgt:
        src.write(long_line + "\n")
        tgt.write(" ".join(reversed(long_line.split())) + "\n")
    args = overrides(files, tmp_path, "long", "model.max_positions=12", "trainer.max_epochs=1")
    code, err = run_train(args, monkeypatch, capsys)
    assert code == 0, err
    log_text = (tmp_path / "result" / "long" / "train.log").read_text()
    assert "val: left out 1 of 21 pairs longer than model.max_positions=12" in log_text
    assert (tmp_path / "saved" / "long" / "epoch_1.pt").is_file()


def test_sighup_asks_to_stop_like_sigterm_and_a_second_signal_aborts_cleanly():
    """Finding 10: closing the terminal (SIGHUP) was not handled like SIGTERM, and a second
    SIGTERM during the shutdown save printed a traceback."""
    import signal as signals

    from transformer_mt.train.stopping import Aborted, StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signals.SIGHUP)
        assert stop.requested and stop.signum == signals.SIGHUP
        with pytest.raises(Aborted) as aborted:
            os.kill(os.getpid(), signals.SIGTERM)
    assert aborted.value.signum == signals.SIGTERM


def test_a_second_signal_while_saving_exits_without_a_traceback(
    corpus, tmp_path, monkeypatch, capsys
):
    from transformer_mt.train.stopping import Aborted

    def aborted_save(*args, **kwargs):
        raise Aborted(15)

    monkeypatch.setattr(trainer_module.Trainer, "save", aborted_save)
    code, err = run_train(
        args_for(corpus, tmp_path, "aborted", "trainer.max_epochs=1"), monkeypatch, capsys
    )
    assert code == 128 + 15
    assert "Traceback" not in err


def test_temp_files_never_follow_a_planted_symlink(tmp_path):
    """Finding 10: temporary files had predictable names and followed symlinks, so anyone able to
    write the run folder could make the trainer overwrite another file."""
    from transformer_mt.checkpoint import copy_checkpoint
    from transformer_mt.train.logging import RunLogger

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    run = tmp_path / "run"
    run.mkdir()
    planted = [
        run / f".{LOCK_NAME}.{os.getpid()}",  # the lock's old temp name
        run / f".epoch_1.pt.{os.getpid()}.link",  # copy_checkpoint's
        run / ".metrics.csv.tmp",  # the metrics rewrite's
        run / ".curves.png.tmp",
    ]
    for link in planted:
        link.symlink_to(victim)
    lock = RunLock(run)
    lock.acquire()
    lock.release()
    (run / "last.pt").write_bytes(b"checkpoint")
    copy_checkpoint(run / "last.pt", run / "epoch_1.pt")
    logger = RunLogger(run)
    logger.metrics_row({"epoch": 1, "step": 1, "val_loss": 1.0, "val_ppl": 2.7, "val_bleu": 5.0})
    logger.close()
    assert victim.read_text() == "untouched"
    assert (run / "epoch_1.pt").read_bytes() == b"checkpoint"


def test_max_time_does_not_start_an_epoch_that_would_end_after_it():
    """The time budget holds wall time: an epoch that would end after trainer.max_time (at the
    last epoch's pace) is not started; without a timed epoch, the epoch that crosses it is last."""
    from transformer_mt.config import TrainerConfig
    from transformer_mt.train.state import Progress

    def reason(train_seconds: float, last_epoch_seconds: float) -> str | None:
        progress = Progress()
        progress.train_seconds = train_seconds
        budget = TrainerConfig(max_time=10, max_epochs=100, patience=0)
        return stop_reason(progress, budget, last_epoch_seconds)

    assert reason(500, 90) is None  # 500 + 90 s < 600 s
    assert "would end after trainer.max_time=10" in reason(520, 90)
    assert reason(590, 0.0) is None  # no epoch timed yet (a resume): go on
    assert "reached trainer.max_time=10" in reason(600, 0.0)
