"""Training throughput of our Transformer against torch.nn.Transformer, or under four settings.

One training step = forward, cross-entropy ignoring padding, backward, Adam step. Every model gets
the same token embeddings, positional encoding and (tied) output projection around its layer
stacks, the same initial seed and the same synthetic batches: Multi30k-like sentence lengths
(about 12-16 tokens, right-padded, bucketed so that a batch holds sentences of similar length)
and a token budget per batch, as the real batcher builds them. Throughput is target tokens (not
padding) per second.

`--compare` picks what is timed against what:

- `torch` (the default): ours against torch.nn.Transformer of the same size, both under bf16
  autocast or both in float32 (`--amp` / `--no-amp`; by default as the trainer's `trainer.amp`:
  bf16 on CUDA and on a CPU that computes bf16 natively, AVX512-BF16 or AMX).
- `precision`: ours under four settings, fp32 + SDPA (`fast_attention=true`, no autocast: the
  default before `fast_attention` could pick per device), fp32 + explicit softmax(QKᵀ)V,
  bf16 autocast + SDPA and bf16 autocast + explicit; ratios are against fp32 + SDPA.
- `step` (CPU): the trainer's own step (train/step.py: label smoothing, clipping, Adam) under
  the settings of STEP_VARIANTS (glibc malloc tuning, `trainer.loss_chunk_tokens`, dropout's
  mask drawn by F.dropout or by model/dropout.py, tcmalloc preloaded where installed), each
  variant in a process of its own so that its malloc settings and peak RSS are its
  own; `--rounds` rounds of one process per variant, the order rotated by one per round. Per
  variant: tokens/s and tokens per CPU second, minor page faults and the system-time share per
  step (resource.getrusage over the timed steps), peak RSS (ru_maxrss); medians over rounds and
  the median of per-round ratios to `today` (no tuning, no chunks, F.dropout). With `--profile`
  each process also prints a torch.profiler table of three steps on stderr.

The machine may be shared, so timing is paired: the timed steps are cut into windows of
`--window` steps (default 1 on CPU, 10 on CUDA, where each window ends with a device sync), and
each window runs on every model in turn with the same batches, the order rotated by one from one
window to the next (A B, B A, A B, ... or A B C D, B C D A, ...). Reported per model are the
median step time and tokens/s over its windows and the median of the per-window ratios to the
baseline; on CPU also tokens per CPU second (process time), which time-slicing by other jobs
does not dilute.

    python scripts/bench_train.py --models small,base --device cpu --max-tokens 4096 --steps 12
    python scripts/bench_train.py --compare precision --models small \\
        --model-overrides d_ff=1024,share_embeddings=true --vocab-size 8000 --threads 2
    python scripts/bench_train.py --compare step --models small --model-overrides \\
        d_ff=1024,share_embeddings=true,dropout=0.2,activation_dropout=0.0 --vocab-size 8000 \\
        --max-tokens 2048 --threads 2 --steps 6 --warmup 2 --rounds 3

`--models` takes presets of configs/model/; `--model-overrides key=value,...` changes ModelConfig
fields of each (checked as Hydra checks them); `--vocab-size N` gives both sides one vocabulary of
N entries (needed for `share_embeddings=true`) instead of Multi30k-like 8,000 source and 6,000
target words.

On CUDA the script also prints achieved TFLOP/s and model FLOPs utilisation (MFU) against the
H100 SXM bf16 dense peak (989 TFLOP/s). Model FLOPs of a batch:

    6 · (N_src · source tokens + N_tgt · target tokens)                  matrix multiplications
    + 12 · D · Σ_sentences (enc_layers · S² + dec_layers · (T² + T · S))  attention scores and sums

where N_src are the parameters applied to each source token (encoder layers, the decoder's
cross-attention key/value projections), N_tgt those applied to each target token (the rest of
the decoder and the output projection), and S, T real (unpadded) lengths; the factor 6 (and 12 =
3 · 2 · 2) counts forward and backward. Causal masking is not discounted.
`--profile` prints a torch.profiler table of a few steps of each model.
"""

from __future__ import annotations

import argparse
import ctypes.util
import dataclasses
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn

from transformer_mt.cli.common import report_user_errors
from transformer_mt.config import ModelConfig, TrainConfig, to_dataclass
from transformer_mt.data.vocab import BOS, EOS, PAD
from transformer_mt.errors import ConfigError
from transformer_mt.model import Transformer, build_model
from transformer_mt.model.dropout import Dropout
from transformer_mt.model.embedding import (
    Embeddings,
    SinusoidalPositionalEncoding,
    output_projection,
    token_embeddings,
)
from transformer_mt.train.allocator import keep_freed_memory, malloc_library
from transformer_mt.train.distributed import DistInfo
from transformer_mt.train.optim import build_optimizer
from transformer_mt.train.step import Step, cpu_supports_bf16, use_amp

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_PEAK_FLOPS = 989e12  # H100 SXM, dense bf16 (datasheet)
SRC_VOCAB, TGT_VOCAB = 8000, 6000  # Multi30k de/en vocabularies at min_freq=2 are about this size


@dataclass
class Batch:
    src: Tensor  # (B, S) x + [EOS], right-padded
    tgt_in: Tensor  # (B, T) [BOS] + y
    tgt_out: Tensor  # (B, T) y + [EOS]
    src_lengths: list[int]
    tgt_lengths: list[int]

    @property
    def tgt_tokens(self) -> int:
        return sum(self.tgt_lengths)

    @property
    def num_tgt_tokens(self) -> int:  # as data.batching.Batch, for the trainer's Step
        return self.tgt_tokens

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device),
            self.tgt_in.to(device),
            self.tgt_out.to(device),
            self.src_lengths,
            self.tgt_lengths,
        )


def synthetic_batches(
    n_batches: int, max_tokens: int, seed: int, src_vocab: int, tgt_vocab: int
) -> list[Batch]:
    """Batches of random sentences with Multi30k-like lengths, filling a padded token budget.

    Each batch takes one bucket width L (12..16 tokens); its sentences are L-3..L tokens long on
    each side (EOS / BOS included), and it holds max_tokens // L of them.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        width = rng.randint(12, 16)
        size = max(1, max_tokens // width)
        src_lengths = [rng.randint(width - 3, width) for _ in range(size)]
        tgt_lengths = [rng.randint(width - 3, width) for _ in range(size)]
        src = torch.full((size, max(src_lengths)), PAD)
        tgt = torch.full((size, max(tgt_lengths) + 1), PAD)  # [BOS] y [EOS]
        for row, (s_len, t_len) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
            src[row, : s_len - 1] = torch.randint(4, src_vocab, (s_len - 1,), generator=gen)
            src[row, s_len - 1] = EOS
            tgt[row, 0] = BOS
            tgt[row, 1:t_len] = torch.randint(4, tgt_vocab, (t_len - 1,), generator=gen)
            tgt[row, t_len] = EOS
        batches.append(Batch(src, tgt[:, :-1], tgt[:, 1:], src_lengths, tgt_lengths))
    return batches


class TorchTransformer(nn.Module):
    """torch.nn.Transformer inside the same embeddings and output projection as ours, used the
    usual way (a float causal mask plus the `tgt_is_causal` hint, bool key-padding masks).

    nn.Transformer always ends each stack with a LayerNorm, also in post-norm: two LayerNorms
    more than ours, a negligible amount of work.
    """

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> None:
        super().__init__()
        src_tokens, tgt_tokens = token_embeddings(cfg, src_vocab_size, tgt_vocab_size)
        positions = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_positions)
        self.src_embed = Embeddings(src_tokens, positions, cfg.dropout)
        self.tgt_embed = Embeddings(tgt_tokens, positions, cfg.dropout)
        self.transformer = nn.Transformer(
            cfg.d_model,
            cfg.n_heads,
            cfg.enc_layers,
            cfg.dec_layers,
            cfg.d_ff,
            cfg.dropout,
            batch_first=True,
            norm_first=cfg.pre_norm,
        )
        # nn.Transformer drops attention weights with its `dropout`; ours uses attention_dropout.
        for module in self.transformer.modules():
            if isinstance(module, nn.MultiheadAttention):
                module.dropout = cfg.attention_dropout
        self.output_proj = output_projection(cfg, tgt_tokens)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        src_pad_mask = src.eq(PAD)
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)
        hidden = self.transformer(
            self.src_embed(src),
            self.tgt_embed(tgt_in),
            tgt_mask=causal,
            src_key_padding_mask=src_pad_mask,
            memory_key_padding_mask=src_pad_mask,
            tgt_is_causal=True,
        )
        return self.output_proj(hidden)


def model_flops(model: Transformer, batch: Batch) -> float:
    """Training FLOPs (forward + backward) of `batch`: see the module docstring."""
    cfg = model.config
    encoder = sum(p.numel() for p in model.encoder.layers.parameters())
    cross_kv = sum(
        p.numel() for layer in model.decoder.layers for p in layer.cross_attn.kv_proj.parameters()
    )
    decoder = sum(p.numel() for p in model.decoder.layers.parameters())
    per_src_token = encoder + cross_kv
    per_tgt_token = decoder - cross_kv + model.output_proj.weight.numel()
    src_tokens, tgt_tokens = sum(batch.src_lengths), sum(batch.tgt_lengths)
    matmuls = 6 * (per_src_token * src_tokens + per_tgt_token * tgt_tokens)
    attention = (
        12
        * cfg.d_model
        * sum(
            cfg.enc_layers * s * s + cfg.dec_layers * (t * t + t * s)
            for s, t in zip(batch.src_lengths, batch.tgt_lengths, strict=True)
        )
    )
    return float(matmuls + attention)


class Trainee:
    """A model with its optimizer, and one training step on a batch (under bf16 autocast if `amp`)."""

    def __init__(
        self, name: str, model: nn.Module, device: torch.device, amp: bool, compile: bool = False
    ) -> None:
        self.name = name
        self.model = model.to(device).train()
        # torch.compile with dynamic shapes, as trainer.compile=true: batch shapes vary every step.
        self.forward = torch.compile(self.model, dynamic=True) if compile else self.model
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-9
        )
        self.device = device
        self.amp = amp

    def step(self, batch: Batch) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(batch.src, batch.tgt_in)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch.tgt_out.flatten(), ignore_index=PAD
        )
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no .item(): the host never waits for the device inside a window

    def timed_window(self, batches: list[Batch]) -> tuple[float, float]:
        """Wall-clock and process CPU seconds for one step on each batch, device work done."""
        _synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            self.step(batch)
        _synchronize(self.device)
        return time.perf_counter() - wall, time.process_time() - cpu


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Setting:
    """One way to run our model under `--compare precision`: attention path and autocast."""

    name: str
    fast_attention: bool
    amp: bool


# The first is the baseline: the default before fast_attention and amp could pick per device.
PRECISION_SETTINGS = (
    Setting("fp32+SDPA", fast_attention=True, amp=False),
    Setting("fp32+explicit", fast_attention=False, amp=False),
    Setting("bf16+SDPA", fast_attention=True, amp=True),
    Setting("bf16+explicit", fast_attention=False, amp=True),
)


@dataclass
class Vocab:
    """Vocabulary sizes of the synthetic data and the models."""

    src: int
    tgt: int


def against_torch(
    cfg: ModelConfig, vocab: Vocab, device: torch.device, amp: bool, seed: int, compile: bool
) -> list[Trainee]:
    """torch.nn.Transformer (the baseline, first), then ours, from the same seed."""
    torch.manual_seed(seed)
    ours = Trainee("ours", build_model(cfg, vocab.src, vocab.tgt), device, amp, compile)
    torch.manual_seed(seed)
    reference = Trainee("torch", TorchTransformer(cfg, vocab.src, vocab.tgt), device, amp, compile)
    return [reference, ours]


def precision_settings(
    cfg: ModelConfig, vocab: Vocab, device: torch.device, seed: int, compile: bool
) -> list[Trainee]:
    """Ours under each of PRECISION_SETTINGS (the baseline first), from the same seed."""
    trainees = []
    for setting in PRECISION_SETTINGS:
        torch.manual_seed(seed)
        model_cfg = dataclasses.replace(cfg, fast_attention=setting.fast_attention)
        model = build_model(model_cfg, vocab.src, vocab.tgt)
        trainees.append(Trainee(setting.name, model, device, setting.amp, compile))
    return trainees


@dataclass
class Timings:
    """Per-window measurements of one trainee."""

    step_ms: list[float] = dataclasses.field(default_factory=list)
    tokens_per_s: list[float] = dataclasses.field(default_factory=list)
    tokens_per_cpu_s: list[float] = dataclasses.field(default_factory=list)
    flops_per_s: list[float] = dataclasses.field(default_factory=list)


@dataclass
class Summary:
    """Medians over the windows of one trainee; ratios are per-window ratios to the baseline."""

    step_ms: float
    tokens_per_s: float
    tokens_per_cpu_s: float
    flops_per_s: float
    ratio: float
    ratio_cpu: float
    peak_memory_gib: float = 0.0  # CUDA: the preset's peak allocated memory (all its trainees)


def time_paired(
    trainees: list[Trainee], windows: list[list[Batch]], flops_model: Transformer
) -> dict[str, Timings]:
    """Run every window on each trainee in turn, the order rotated by one per window."""
    timings = {t.name: Timings() for t in trainees}
    for i, window in enumerate(windows):
        tokens = sum(b.tgt_tokens for b in window)
        flops = sum(model_flops(flops_model, b) for b in window)
        shift = i % len(trainees)
        for trainee in trainees[shift:] + trainees[:shift]:
            wall_s, cpu_s = trainee.timed_window(window)
            t = timings[trainee.name]
            t.step_ms.append(1000 * wall_s / len(window))
            t.tokens_per_s.append(tokens / wall_s)
            t.tokens_per_cpu_s.append(tokens / cpu_s)
            t.flops_per_s.append(flops / wall_s)
        rates = "  ".join(f"{name} {t.tokens_per_s[-1]:6.0f}" for name, t in timings.items())
        print(f"  window {i + 1:2d}  {rates} tokens/s")
    return timings


def summarize(timings: dict[str, Timings], baseline: str) -> dict[str, Summary]:
    base = timings[baseline]

    def median_ratio(ours: list[float], theirs: list[float]) -> float:
        return statistics.median(o / t for o, t in zip(ours, theirs, strict=True))

    return {
        name: Summary(
            step_ms=statistics.median(t.step_ms),
            tokens_per_s=statistics.median(t.tokens_per_s),
            tokens_per_cpu_s=statistics.median(t.tokens_per_cpu_s),
            flops_per_s=statistics.median(t.flops_per_s),
            ratio=median_ratio(t.tokens_per_s, base.tokens_per_s),
            ratio_cpu=median_ratio(t.tokens_per_cpu_s, base.tokens_per_cpu_s),
        )
        for name, t in timings.items()
    }


def print_summary(summaries: dict[str, Summary], baseline: str, device: torch.device) -> None:
    width = max(len(name) for name in summaries)
    extra = "  TFLOP/s     MFU" if device.type == "cuda" else "  tokens/CPU s"
    print(f"  {'':{width}s}  step ms   tokens/s{extra}   ÷ {baseline} (per CPU second)")
    for name, s in summaries.items():
        if device.type == "cuda":
            extra = f"  {s.flops_per_s / 1e12:7.1f}  {s.flops_per_s / H100_BF16_PEAK_FLOPS:6.1%}"
        else:
            extra = f"  {s.tokens_per_cpu_s:12.0f}"
        print(
            f"  {name:{width}s}  {s.step_ms:7.0f}  {s.tokens_per_s:9.0f}{extra}   "
            f"{s.ratio:6.3f} ({s.ratio_cpu:.3f})"
        )
    fastest = max(summaries, key=lambda name: summaries[name].ratio)
    print(f"  fastest: {fastest}, {summaries[fastest].ratio:.3f}× {baseline} (median window ratio)")


def bench_preset(
    name: str, cfg: ModelConfig, args: argparse.Namespace, vocab: Vocab, device: torch.device
) -> dict[str, Summary]:
    batches = synthetic_batches(args.steps, args.max_tokens, args.seed, vocab.src, vocab.tgt)
    batches = [b.to(device) for b in batches]
    windows = [batches[i : i + args.window] for i in range(0, len(batches), args.window)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.compare == "torch":
        trainees = against_torch(cfg, vocab, device, args.amp, args.seed, args.compile)
    else:
        trainees = precision_settings(cfg, vocab, device, args.seed, args.compile)
    params = ", ".join(
        f"{t.name} {sum(p.numel() for p in t.model.parameters()):,}" for t in trainees
    )
    print(
        f"\n[{name}] D={cfg.d_model} layers={cfg.enc_layers}+{cfg.dec_layers} heads={cfg.n_heads} "
        f"d_ff={cfg.d_ff} share_embeddings={cfg.share_embeddings} "
        f"fast_attention={cfg.fast_attention}; vocabularies {vocab.src:,}/{vocab.tgt:,}; "
        f"parameters {params}; {len(batches)} timed steps in {len(windows)} windows, "
        f"{sum(b.src.size(0) for b in batches) / len(batches):.0f} sentences and "
        f"{sum(b.tgt_tokens for b in batches) / len(batches):.0f} target tokens per batch"
    )

    for trainee in trainees:
        for i in range(args.warmup):
            trainee.step(batches[i % len(batches)])
    if args.profile:
        for trainee in trainees:
            profile(trainee, batches[: min(3, len(batches))])

    flops_model = next(t.model for t in trainees if isinstance(t.model, Transformer))
    baseline = trainees[0].name
    summaries = summarize(time_paired(trainees, windows, flops_model), baseline)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        for summary in summaries.values():
            summary.peak_memory_gib = peak
        print(f"  peak memory: {peak:.1f} GiB")
    print_summary(summaries, baseline, device)
    return summaries


def profile(trainee: Trainee, batches: list[Batch]) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainee.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches:
            trainee.step(batch)
        _synchronize(trainee.device)
    sort = "cuda_time_total" if trainee.device.type == "cuda" else "self_cpu_time_total"
    print(f"\n  profile of {trainee.name} ({len(batches)} steps)")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


# ------------------------------------------------------------------------------------------------
# --compare step: the trainer's own step (train/step.py) under memory settings, one process each


@dataclass
class StepVariant:
    """One way to run the trainer's step: malloc tuning, loss chunks, whether dropout draws its
    mask with F.dropout (`torch_dropout`) or as model/dropout.py does, and a preloaded malloc."""

    name: str
    malloc_tuning: bool = False
    loss_chunk_tokens: int = 0
    torch_dropout: bool = False
    preload: str = ""  # a malloc library started with the process (LD_PRELOAD), e.g. tcmalloc


# The first is the baseline: the step as it was before these settings existed.
STEP_VARIANTS = (
    StepVariant("today", torch_dropout=True),
    StepVariant("malloc", malloc_tuning=True, torch_dropout=True),
    StepVariant("chunk512+malloc", True, 512, torch_dropout=True),
    StepVariant("dropout"),
    StepVariant("chunk512+malloc+dropout", True, 512),
    StepVariant("chunk512+dropout+tcmalloc", loss_chunk_tokens=512, preload="tcmalloc_minimal"),
)


def run_step_variant(
    variant: StepVariant, cfg: ModelConfig, args: argparse.Namespace, vocab: Vocab
) -> dict[str, float]:
    """Time `args.steps` steps of the trainer's Step (after `args.warmup`) in this process;
    return tokens/s and, from getrusage, minor faults and system time per step and peak RSS."""
    if variant.malloc_tuning and not keep_freed_memory():
        raise ConfigError("malloc tuning needs glibc")
    if variant.preload and not variant.preload.startswith(malloc_library()):
        raise ConfigError(f"{variant.name}: LD_PRELOAD did not give this process {variant.preload}")
    device = torch.device("cpu")
    amp = use_amp(None, device)
    train_cfg = TrainConfig(model=cfg)
    train_cfg.trainer.loss_chunk_tokens = variant.loss_chunk_tokens
    torch.manual_seed(args.seed)
    model = build_model(cfg, vocab.src, vocab.tgt).train()
    if variant.torch_dropout:  # back to nn.Dropout's forward (F.dropout, a bernoulli_ mask)
        for module in model.modules():
            if isinstance(module, Dropout):
                module.__class__ = nn.Dropout
    optimizer = build_optimizer(model, train_cfg.optim, device)
    step = Step(model, optimizer, train_cfg, DistInfo(), device, amp)
    batches = synthetic_batches(
        args.warmup + args.steps, args.max_tokens, args.seed, vocab.src, vocab.tgt
    )
    for i, batch in enumerate(batches[: args.warmup]):
        step([batch], i + 1, 5e-4)
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in batches[args.warmup : args.warmup + 3]:
                step([batch], 1, 5e-4)
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr
        )
    timed = batches[args.warmup :]
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i, batch in enumerate(timed):
        step([batch], i + 1, 5e-4)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "tokens_per_s": sum(b.tgt_tokens for b in timed) / wall,
        # CPU time (user + system) is what time-slicing by other jobs on a shared machine dilutes
        # least: the fairer figure there.
        "tokens_per_cpu_s": sum(b.tgt_tokens for b in timed) / (user + system),
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / len(timed),
        "sys_share": system / (user + system),
        "peak_rss_gb": after.ru_maxrss * 1024 / 1e9,  # ru_maxrss is in KiB on Linux
    }


def compare_steps(model_name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each of STEP_VARIANTS in its own process (so peak RSS and malloc settings are its own),
    `args.rounds` rounds, the order rotated by one per round; medians over rounds, and the
    median of per-round ratios to the first variant."""
    variants = []
    for variant in STEP_VARIANTS:
        if variant.preload and not ctypes.util.find_library(variant.preload):
            print(f"  {variant.name}: skipped, lib{variant.preload} is not installed")
        else:
            variants.append(variant)
    per_round: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        shift = r % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            command = [sys.executable, __file__, "--step-variant", variant.name]
            command += ["--models", model_name, "--model-overrides", args.model_overrides]
            command += ["--vocab-size", str(args.vocab_size), "--max-tokens", str(args.max_tokens)]
            command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
            command += ["--threads", str(args.threads), "--seed", str(args.seed)]
            command += ["--profile"] if args.profile and r == 0 else []
            env = dict(os.environ)
            if variant.preload:
                env["LD_PRELOAD"] = ctypes.util.find_library(variant.preload) or ""
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            if args.profile and r == 0:
                print(f"\n  profile of {variant.name} (3 steps)\n{done.stderr}")
            per_round[variant.name].append(json.loads(done.stdout.splitlines()[-1]))
        line = "  ".join(f"{n} {rows[-1]['tokens_per_s']:5.0f}" for n, rows in per_round.items())
        print(f"  round {r + 1}: {line} tokens/s", flush=True)
    base = per_round[STEP_VARIANTS[0].name]
    summary = {}
    for name, rows in per_round.items():
        summary[name] = {
            key: statistics.median(row[key] for row in rows)
            for key in rows[0]
            if key != "peak_rss_gb"
        }
        summary[name]["peak_rss_gb"] = max(row["peak_rss_gb"] for row in rows)
        for key, rate in (("ratio", "tokens_per_s"), ("ratio_cpu", "tokens_per_cpu_s")):
            summary[name][key] = statistics.median(
                row[rate] / b[rate] for row, b in zip(rows, base, strict=True)
            )
    print(
        f"\n  {'variant':22s} tokens/s  ÷ today  tokens/CPU s  ÷ today  faults/step  sys share"
        "  peak RSS GB"
    )
    for name, s in summary.items():
        print(
            f"  {name:22s} {s['tokens_per_s']:8.0f} {s['ratio']:8.3f} {s['tokens_per_cpu_s']:13.0f}"
            f" {s['ratio_cpu']:8.3f} {s['faults_per_step']:12.0f} {s['sys_share']:9.1%}"
            f" {s['peak_rss_gb']:12.2f}"
        )
    return summary


def load_model_config(name: str, overrides: list[str]) -> ModelConfig:
    """Preset `name` of configs/model/ with `key=value` overrides, typed as Hydra types them."""
    path = ROOT / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no model preset {name!r} in configs/model/ (choose from {choices})")
    try:
        node = OmegaConf.merge(
            OmegaConf.structured(ModelConfig),
            OmegaConf.load(path),
            OmegaConf.from_dotlist(overrides),
        )
    except OmegaConfBaseException as err:
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"--model-overrides: {first_line} (the keys are ModelConfig's)") from None
    cfg = to_dataclass(ModelConfig, node)
    if cfg.arch != "transformer":
        raise ConfigError(f"preset {name!r} is not a Transformer (arch={cfg.arch}): pick another")
    return cfg


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        default="torch",
        choices=["torch", "precision", "step"],
        help="torch: ours against torch.nn.Transformer; precision: ours in fp32 / bf16 autocast, "
        "each with SDPA / explicit attention, against fp32 + SDPA; step: the trainer's step "
        "under malloc tuning and loss chunks (CPU), each in its own process",
    )
    parser.add_argument(
        "--models", default="small,base", help="comma-separated presets of configs/model/"
    )
    parser.add_argument(
        "--model-overrides",
        default="",
        help="comma-separated ModelConfig key=value pairs applied to every preset, "
        "e.g. d_ff=1024,enc_layers=4,dec_layers=4,share_embeddings=true",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=0,
        help=f"one vocabulary of this size for both sides (0: {SRC_VOCAB} source, "
        f"{TGT_VOCAB} target)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--compare torch: bf16 autocast (default: as trainer.amp, on wherever the device "
        "computes bf16 natively)",
    )
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per model")
    parser.add_argument(
        "--window", type=int, default=0, help="steps per timed window (0: 1 on CPU, 10 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="--compare step: rounds of one process per variant"
    )
    parser.add_argument("--step-variant", default=None, help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (dynamic shapes)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    for key in ("max_tokens", "steps"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.threads < 0 or args.window < 0 or args.vocab_size < 0:
        parser.error("--warmup, --window, --threads and --vocab-size must be >= 0")
    if 0 < args.vocab_size < 5:
        parser.error("--vocab-size must leave room for the 4 specials and a word (>= 5)")
    if args.window == 0:
        args.window = 10 if args.device == "cuda" else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    if args.rounds <= 0:
        parser.error("--rounds must be > 0")
    if args.compare == "precision" and args.amp is not None:
        parser.error("--amp is for --compare torch; --compare precision times fp32 and bf16")
    needs_bf16 = args.amp or args.compare == "precision"
    if args.device == "cpu" and needs_bf16 and not cpu_supports_bf16():
        parser.error(
            "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 timings would measure "
            "emulation: use --compare torch without --amp"
        )
    if args.compare == "torch":
        args.amp = use_amp(args.amp, torch.device(args.device))
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    overrides = [pair for pair in args.model_overrides.split(",") if pair]
    presets = {name: load_model_config(name, overrides) for name in args.models.split(",")}
    vocab = (
        Vocab(args.vocab_size, args.vocab_size) if args.vocab_size else Vocab(SRC_VOCAB, TGT_VOCAB)
    )
    if vocab.src != vocab.tgt and any(cfg.share_embeddings for cfg in presets.values()):
        raise ConfigError("share_embeddings=true needs one vocabulary: pass --vocab-size N")
    device = torch.device(args.device)
    if args.step_variant is not None:
        (cfg,) = presets.values()
        variant = next(v for v in STEP_VARIANTS if v.name == args.step_variant)
        print(json.dumps(run_step_variant(variant, cfg, args, vocab)))
        return
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    if args.compare == "precision":
        precision = "fp32 and bf16 autocast, SDPA and explicit attention"
    elif args.compare == "step":
        precision = "bf16 autocast" if use_amp(None, device) else "float32"
    else:
        precision = "bf16 autocast" if args.amp else "float32"
    print(
        f"bench_train --compare {args.compare}: torch {torch.__version__}, {where}, "
        f"commit {_commit()}, {precision}; max_tokens={args.max_tokens} steps={args.steps} "
        f"window={args.window} warmup={args.warmup}"
    )
    if args.compare == "step":
        if device.type != "cpu":
            raise ConfigError("--compare step times the CPU step: use --device cpu")
        steps = {name: compare_steps(name, args) for name in presets}
        if args.json:
            args.json.write_text(json.dumps({"commit": _commit(), "results": steps}, indent=2))
        return
    results = {name: bench_preset(name, cfg, args, vocab, device) for name, cfg in presets.items()}
    baseline = "fp32+SDPA" if args.compare == "precision" else "torch"
    print(
        f"\nmodel   setting          tokens/s   ÷ {baseline} (median of window ratios; per CPU s)"
    )
    for name, summaries in results.items():
        for setting, s in summaries.items():
            print(
                f"{name:7s} {setting:14s} {s.tokens_per_s:10.0f} {s.ratio:9.3f}   "
                f"({s.ratio_cpu:.3f})"
            )
    if args.json:
        figures = {
            "device": where,
            "torch": torch.__version__,
            "commit": _commit(),
            "compare": args.compare,
            "precision": precision,
            "compile": args.compile,
            "max_tokens": args.max_tokens,
            "peak_flops": H100_BF16_PEAK_FLOPS,
            "results": {
                name: {
                    setting: {
                        **dataclasses.asdict(s),
                        "mfu": s.flops_per_s / H100_BF16_PEAK_FLOPS
                        if device.type == "cuda"
                        else None,
                    }
                    for setting, s in summaries.items()
                }
                for name, summaries in results.items()
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
