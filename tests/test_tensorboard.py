"""TensorBoard reads what training wrote: a real `tensorboard --logdir result/` server, queried
over its HTTP data API for the run, its scalar tags and the number of points of each."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from train_support import (
    RUN_SCALAR_TAGS,
    OneThread,
    compose_config,
    overrides,
    write_reversal_corpus,
)

from transformer_mt.checkpoint import load_checkpoint
from transformer_mt.train.job import train

EPOCHS = 2
LOG_EVERY = 5
SERVER_TIMEOUT = 120  # seconds for TensorBoard to start and load the run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    corpus = write_reversal_corpus(root / "corpus", n_train=200, n_val=10)
    args = overrides(
        corpus,
        root,
        "tb-run",
        f"trainer.max_epochs={EPOCHS}",
        f"trainer.log_every={LOG_EVERY}",
        "trainer.patience=0",
        "trainer.average_last=2",
        "trainer.keep_last=2",
    )
    with OneThread():
        train(compose_config(args))
    steps = load_checkpoint(root / "saved" / "tb-run" / "last.pt")["step"]
    return root / "result", steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    logdir, _ = run
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            f"--logdir={logdir}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--load_fast=false",
            "--reload_interval=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            try:
                if "tb-run" in _get(base, "/data/runs"):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard did not serve the run: {process.stderr.read()}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def _get(base: str, path: str, **query: str):
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_scalar_tags_training_wrote(server):
    tags = _get(server, "/data/plugin/scalars/tags")["tb-run"]
    expected = {*RUN_SCALAR_TAGS, "hparam/final_val_bleu", "hparam/averaged_val_bleu"}
    assert expected <= set(tags)


def test_tensorboard_has_one_point_per_log_step_and_per_epoch(server, run):
    _, steps = run

    def points(tag: str) -> list[int]:
        return [
            step
            for _, step, _ in _get(server, "/data/plugin/scalars/scalars", run="tb-run", tag=tag)
        ]

    assert points("train/loss") == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    val_steps = points("val/bleu")
    assert len(val_steps) == EPOCHS and val_steps[-1] == steps
    assert len(points("averaged/bleu")) == 1


def test_tensorboard_sees_the_run_hyper_parameters(server, run):
    plugins = _get(server, "/data/plugins_listing")
    assert plugins["scalars"]["enabled"] and plugins["images"]["enabled"]
    assert plugins["hparams"]["enabled"]
    request = {
        "experimentName": "",
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
        "startIndex": 0,
        "sliceSize": 10,
    }
    groups = _get(server, "/data/plugin/hparams/session_groups", request=json.dumps(request))
    [group] = groups["sessionGroups"]
    hparams = group["hparams"]
    # The values the run was given (train_support.overrides and this module's fixture).
    assert hparams["optim.lr"] == pytest.approx(3e-3)
    assert hparams["optim.warmup_steps"] == 50
    assert hparams["data.max_tokens"] == 400
    assert (hparams["data.src"], hparams["data.tgt"]) == ("en", "de")
    assert hparams["world_size"] == 1
    metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    logdir, _ = run
    with open(logdir / "tb-run" / "metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    assert metrics["hparam/final_val_bleu"] == pytest.approx(float(last["val_bleu"]), abs=1e-3)
