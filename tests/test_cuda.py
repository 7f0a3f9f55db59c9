"""The CUDA path: bf16 autocast, both attention kernels, decoding, resume, compile and NCCL on a GPU.

Every test here is marked `cuda` and skipped, with the reason, where no GPU is. On a GPU machine
`pytest -m cuda` runs them (scripts/gpu_check.sh does). Tolerances:

- bf16 autocast against float32, one training step's loss: within 2 % (bf16 keeps 8 bits of
  mantissa; the loss is a mean over thousands of tokens, so errors average out).
- SDPA against the explicit softmax(QKᵀ)V: 1e-3 in float32 (TF32 matmuls), 2e-2 in bf16.
- torch.compile against eager after a few steps: losses within 1 %.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from toy_support import toy_sources
from train_support import (
    TRAIN_SCRIPT,
    compose_config,
    model_weights,
    overrides,
    subprocess_env,
    write_reversal_corpus,
)

from transformer_mt.checkpoint import load_checkpoint
from transformer_mt.config import DecodeConfig, ModelConfig
from transformer_mt.data.vocab import BOS, EOS, PAD
from transformer_mt.inference.translator import Translator
from transformer_mt.model import build_model
from transformer_mt.model.attention import scaled_dot_product_attention
from transformer_mt.train.job import train
from transformer_mt.train.loss import token_loss_sum

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
SMALL = ModelConfig(
    name="t", d_model=128, n_heads=4, enc_layers=2, dec_layers=2, d_ff=256, dropout=0.0
)


def _batch(vocab: int, batch: int = 32, length: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (batch, length), generator=g)
    tgt = torch.randint(4, vocab, (batch, length + 1), generator=g)
    src[:, -1] = EOS
    src[batch // 2 :, length // 2 :] = PAD  # half the rows padded
    src[batch // 2 :, length // 2 - 1] = EOS
    tgt_in, tgt_out = tgt[:, :-1].clone(), tgt[:, 1:].clone()
    tgt_in[:, 0] = BOS
    return src.to(CUDA), tgt_in.to(CUDA), tgt_out.to(CUDA)


def test_one_bf16_training_step_agrees_with_float32():
    torch.manual_seed(0)
    model = build_model(SMALL, 1000, 1000).to(CUDA)
    src, tgt_in, tgt_out = _batch(1000)
    losses, grads = [], []
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(src, tgt_in)
        loss = token_loss_sum(logits, tgt_out) / (tgt_out != PAD).sum()
        loss.backward()
        losses.append(loss.item())
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_sdpa_and_explicit_attention_agree_on_cuda(dtype, atol):
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(4, 8, 33, 64, device=CUDA, dtype=dtype, generator=g) for _ in range(3))
    pad = torch.zeros(4, 33, dtype=torch.bool, device=CUDA)
    pad[2:, 20:] = True
    for causal in (False, True):
        fast = scaled_dot_product_attention(q, k, v, pad, causal=causal, fast=True)
        slow = scaled_dot_product_attention(q, k, v, pad, causal=causal, fast=False)
        torch.testing.assert_close(fast.float(), slow.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("beam_size", [1, 5])
def test_decoding_on_cuda_gives_the_cpu_tokens(toy, beam_size):
    cfg = DecodeConfig(beam_size=beam_size)
    sources, _ = toy_sources(toy, 40)
    on_cpu = Translator.from_checkpoint(toy.checkpoint, device="cpu", decode_cfg=cfg)
    on_gpu = Translator.from_checkpoint(toy.checkpoint, device="cuda", decode_cfg=cfg)
    assert on_gpu.translate_ids(sources) == on_cpu.translate_ids(sources)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_reversal_corpus(tmp_path_factory.mktemp("cuda-corpus"), n_train=400, n_val=30)


CUDA_RUN = ("trainer.device=cuda", "model.dropout=0.1", "trainer.keep_last=1")


def test_a_run_stopped_and_resumed_on_cuda_is_bit_identical(corpus, tmp_path):
    train(
        compose_config(overrides(corpus, tmp_path, "straight", *CUDA_RUN, "trainer.max_epochs=2"))
    )
    args = overrides(corpus, tmp_path, "parts", *CUDA_RUN)
    train(compose_config([*args, "trainer.max_epochs=1"]))
    train(compose_config([*args, "trainer.max_epochs=2", "trainer.resume=true"]))
    a = model_weights(tmp_path / "saved" / "straight" / "last.pt")
    b = model_weights(tmp_path / "saved" / "parts" / "last.pt")
    for name in a:  # dropout masks come from the restored CUDA generator: the same bits
        assert torch.equal(a[name], b[name]), name


def test_a_cuda_checkpoint_loads_in_a_cpu_only_process(corpus, tmp_path):
    train(
        compose_config(overrides(corpus, tmp_path, "gpu-made", *CUDA_RUN, "trainer.max_epochs=1"))
    )
    script = (
        "import sys, torch\n"
        "from transformer_mt.inference.translator import Translator\n"
        "assert not torch.cuda.is_available()\n"
        "t = Translator.from_checkpoint(sys.argv[1], device='auto')\n"
        "print(t.device, t.translate(['ant bee cat']))\n"
    )
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "saved" / "gpu-made" / "last.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("cpu ")


def test_compile_trains_like_eager_without_a_recompile_per_batch(corpus, tmp_path):
    import torch._dynamo

    steps = "trainer.max_steps=40"
    train(compose_config(overrides(corpus, tmp_path, "eager", *CUDA_RUN, steps)))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    train(
        compose_config(
            overrides(corpus, tmp_path, "compiled", *CUDA_RUN, steps, "trainer.compile=true")
        )
    )
    compiles = counters["stats"]["unique_graphs"]
    print(f"\ntorch.compile: {compiles} graphs for 40 steps of varying batch shapes")
    assert compiles <= 8  # shapes vary every batch: dynamic=True must not compile each one

    def last_loss(run: str) -> float:
        with open(tmp_path / "result" / run / "metrics.csv") as f:
            return float(list(csv.DictReader(f))[-1]["train_loss"])

    assert last_loss("compiled") == pytest.approx(last_loss("eager"), rel=1e-2)


def _torchrun_one_epoch(corpus, tmp_path, run: str, processes: int) -> subprocess.CompletedProcess:
    args = overrides(corpus, tmp_path, run, "trainer.device=cuda", "trainer.max_epochs=1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            str(TRAIN_SCRIPT),
            *args,
        ],
        env={**subprocess_env(), "TORCH_DISTRIBUTED_DEBUG": "OFF"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_torchrun_on_one_gpu_trains_an_epoch(corpus, tmp_path):
    """One process: NCCL is set up, but no collective has a peer (the next test needs two GPUs)."""
    result = _torchrun_one_epoch(corpus, tmp_path, "nccl", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "result" / "nccl" / "train.log").read_text()
    assert "x 1 processes" in log and "epoch 1" in log
    assert os.path.exists(tmp_path / "saved" / "nccl" / "last.pt")


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL collectives need two processes on two GPUs"
)
def test_nccl_collectives_between_two_gpus_train_an_epoch(corpus, tmp_path):
    result = _torchrun_one_epoch(corpus, tmp_path, "nccl2", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "result" / "nccl2" / "train.log").read_text()
    assert "x 2 processes" in log and "epoch 1" in log
    # Rank 1's state reached rank 0 (a gather) and both saved the same resumable epoch.
    state = load_checkpoint(tmp_path / "saved" / "nccl2" / "last.pt")["train_state"]
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
