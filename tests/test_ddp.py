"""`torchrun --nproc_per_node=2` (gloo on CPU) trains like one process on the same global batches.

Rank r of R trains on batches r, r + R, r + 2R, ... of each epoch, and every step's loss is
normalised by the target tokens of all ranks; one process with `trainer.accumulate=2` sees the same
pairs of batches in the same order and normalises the same way. The two runs differ only in the
order of floating-point sums (DDP's all-reduce against accumulation in place), so their metrics
agree to rounding: validation loss to 1e-4 relative, BLEU to 0.5 points.

That run goes through torchrun itself. The odd-batch-count run starts its two ranks with
tests/rank_harness.py instead: forked from one process that has imported everything, with the
environment torchrun gives its workers (one start-up of the interpreter instead of three).
"""

from __future__ import annotations

import csv
import gc
import subprocess
import sys

import pytest
import torch.distributed
from torch.nn.parallel import DistributedDataParallel
from train_support import (
    REPO,
    TRAIN_SCRIPT,
    OneThread,
    compose_config,
    overrides,
    subprocess_env,
    write_reversal_corpus,
)

from transformer_mt.data.batching import TokenBucketSampler
from transformer_mt.train import distributed, job, step
from transformer_mt.train.job import train

pytestmark = pytest.mark.slow

MAX_TOKENS = 400
RANK_HARNESS = REPO / "tests" / "rank_harness.py"


def _even_batch_count_limit(corpus) -> int:
    """A data.limit_train giving an even number of batches (no padding of the DDP shards)."""
    src = [len(line.split()) for line in corpus["train_src"].read_text().splitlines()]
    tgt = [len(line.split()) for line in corpus["train_tgt"].read_text().splitlines()]
    for limit in range(1000, 1100, 10):
        sampler = TokenBucketSampler(src[:limit], tgt[:limit], MAX_TOKENS)
        if sampler.num_global_batches % 2 == 0:
            return limit
    raise AssertionError("no limit_train in 1000..1090 gives an even batch count")


def _launch(command: list[str]) -> None:
    """Run a two-process job's command from the checkout; it must succeed."""
    result = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _rows(result_dir):
    with open(result_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path):
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=1100, n_val=40)
    limit = _even_batch_count_limit(corpus)
    common = ("trainer.max_epochs=4", f"data.limit_train={limit}", f"data.max_tokens={MAX_TOKENS}")

    _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(TRAIN_SCRIPT),
            *overrides(corpus, tmp_path, "ddp", *common),
        ],
    )
    with OneThread():
        train(
            compose_config(overrides(corpus, tmp_path, "single", *common, "trainer.accumulate=2"))
        )

    ddp, single = _rows(tmp_path / "result" / "ddp"), _rows(tmp_path / "result" / "single")
    assert len(ddp) == len(single) == 4
    assert float(ddp[-1]["val_loss"]) < 0.8 * float(ddp[0]["val_loss"])  # it does learn
    for a, b in zip(ddp, single, strict=True):
        assert a["step"] == b["step"]
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)
        assert float(a["val_bleu"]) == pytest.approx(float(b["val_bleu"]), abs=0.5)
    # Only rank 0 wrote: one run folder each, and no stray Hydra output from rank 1.
    assert sorted(p.name for p in (tmp_path / "result").iterdir()) == ["ddp", "single"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["ddp", "single"]
    assert "x 2 processes" in (tmp_path / "result" / "ddp" / "train.log").read_text()
    assert not (REPO / "train.log").exists()


def _odd_batch_count_limit(corpus) -> tuple[int, int]:
    """A data.limit_train giving an odd number of batches (rank 1 repeats the first one), and
    that number."""
    src = [len(line.split()) for line in corpus["train_src"].read_text().splitlines()]
    tgt = [len(line.split()) for line in corpus["train_tgt"].read_text().splitlines()]
    for limit in range(300, 400, 5):
        batches = TokenBucketSampler(src[:limit], tgt[:limit], MAX_TOKENS).num_global_batches
        if batches % 2:
            return limit, batches
    raise AssertionError("no limit_train in 300..395 gives an odd batch count")


def test_an_odd_batch_count_trains_and_resumes_with_another_process_count(tmp_path):
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=400, n_val=20)
    limit, batches = _odd_batch_count_limit(corpus)
    common = (f"data.limit_train={limit}", f"data.max_tokens={MAX_TOKENS}")
    _launch(
        [
            sys.executable,
            str(RANK_HARNESS),
            "2",
            *overrides(corpus, tmp_path, "odd", *common, "trainer.max_epochs=2"),
        ],
    )
    rows = _rows(tmp_path / "result" / "odd")
    # Each rank takes ceil(batches / 2) steps an epoch: the odd batch out is padded, not dropped.
    per_rank = (batches + 1) // 2
    assert [(row["epoch"], int(row["step"])) for row in rows] == [
        ("1", per_rank),
        ("2", 2 * per_rank),
    ]
    # One process continues the two-process run: its third epoch is every batch, on one rank.
    with OneThread():
        resumed = ("trainer.max_epochs=3", "trainer.resume=true")
        train(compose_config(overrides(corpus, tmp_path, "odd", *common, *resumed)))
    rows = _rows(tmp_path / "result" / "odd")
    assert [(row["epoch"], int(row["step"])) for row in rows][2] == ("3", 2 * per_rank + batches)
    assert float(rows[2]["val_loss"]) < float(rows[0]["val_loss"])


def test_the_ddp_wrapper_is_gone_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    """Destroyed last, DDP's reducer destroys a gloo group with the GIL held while the group's
    worker thread may wait for the GIL: a two-process job then hung at exit, about 3 runs in 8.
    In process: a one-process gloo group, which the job treats as one rank of two."""

    def init(device_preference):
        store = f"file://{tmp_path / 'store'}"
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        return distributed.DistInfo(0, 2, 0, torch.distributed.group.WORLD), torch.device("cpu")

    alive_at_shutdown = []

    def shutdown():
        gc.collect()
        alive = [o for o in gc.get_objects() if issubclass(type(o), DistributedDataParallel)]
        alive_at_shutdown.append(len(alive))
        torch.distributed.destroy_process_group()

    built = []

    class Counted(DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(type(self).__name__)  # not the object: that would keep it alive

    monkeypatch.setattr(step, "DistributedDataParallel", Counted)
    monkeypatch.setattr(job.dist, "init_distributed", init)
    monkeypatch.setattr(job.dist, "shutdown_distributed", shutdown)
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=200, n_val=10)
    with OneThread():
        train(compose_config(overrides(corpus, tmp_path, "one", "trainer.max_epochs=1")))
    assert built == ["Counted"]  # it did train under DDP
    assert alive_at_shutdown == [0]
