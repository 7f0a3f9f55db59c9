"""Training throughput of our Transformer against torch.nn.Transformer of the same size.

One training step = forward, cross-entropy ignoring padding, backward, Adam step. Both models get
the same token embeddings, positional encoding and (tied) output projection around their layer
stacks, the same initial seed and the same synthetic batches: Multi30k-like sentence lengths
(about 12-16 tokens, right-padded, bucketed so that a batch holds sentences of similar length)
and a token budget per batch, as the real batcher builds them. Throughput is target tokens (not
padding) per second.

The machine may be shared, so timing is paired: the timed steps are cut into windows of
`--window` steps (default 1 on CPU, 10 on CUDA, where each window ends with a device sync), and
each window runs on ours, then on torch (A, B, A, B, ...) with the same batches. Reported are the
median tokens/s of each model over its windows and the median of the per-window ratios
ours/torch; on CPU also tokens per CPU second (process time), which time-slicing by other jobs
does not dilute.

    python scripts/bench_train.py --models small,base --device cpu --max-tokens 4096 --steps 12

On CUDA the steps run under bf16 autocast and the script also prints achieved TFLOP/s and model
FLOPs utilisation (MFU) against the H100 SXM bf16 dense peak (989 TFLOP/s). Model FLOPs of a batch:

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
import contextlib
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn

from transformer_mt.cli.common import report_user_errors
from transformer_mt.config import ModelConfig, to_dataclass
from transformer_mt.data.vocab import BOS, EOS, PAD
from transformer_mt.errors import ConfigError
from transformer_mt.model import Transformer, build_model
from transformer_mt.model.base import output_projection, token_embeddings
from transformer_mt.model.embedding import Embeddings, SinusoidalPositionalEncoding

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

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.src.to(device),
            self.tgt_in.to(device),
            self.tgt_out.to(device),
            self.src_lengths,
            self.tgt_lengths,
        )


def synthetic_batches(n_batches: int, max_tokens: int, seed: int) -> list[Batch]:
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
            src[row, : s_len - 1] = torch.randint(4, SRC_VOCAB, (s_len - 1,), generator=gen)
            src[row, s_len - 1] = EOS
            tgt[row, 0] = BOS
            tgt[row, 1:t_len] = torch.randint(4, TGT_VOCAB, (t_len - 1,), generator=gen)
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
    """A model with its optimizer, and one training step on a batch."""

    def __init__(self, name: str, model: nn.Module, device: torch.device) -> None:
        self.name = name
        self.model = model.to(device).train()
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-9
        )
        self.device = device

    def step(self, batch: Batch) -> Tensor:
        with _autocast(self.device):
            logits = self.model(batch.src, batch.tgt_in)
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


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_preset(name: str) -> ModelConfig:
    path = ROOT / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"no model preset {name!r} in configs/model/ (choose from {choices})")
    cfg = to_dataclass(ModelConfig, OmegaConf.load(path))
    if cfg.arch != "transformer":
        raise ConfigError(f"preset {name!r} is not a Transformer (arch={cfg.arch}): pick another")
    return cfg


def bench_preset(
    name: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    batches = [b.to(device) for b in synthetic_batches(args.steps, args.max_tokens, args.seed)]
    windows = [batches[i : i + args.window] for i in range(0, len(batches), args.window)]
    torch.manual_seed(args.seed)
    ours = Trainee("ours", build_model(cfg, SRC_VOCAB, TGT_VOCAB), device)
    torch.manual_seed(args.seed)
    reference = Trainee("torch", TorchTransformer(cfg, SRC_VOCAB, TGT_VOCAB), device)
    n_params = sum(p.numel() for p in ours.model.parameters())
    n_params_ref = sum(p.numel() for p in reference.model.parameters())
    print(
        f"\n[{name}] D={cfg.d_model} layers={cfg.enc_layers}+{cfg.dec_layers} heads={cfg.n_heads} "
        f"d_ff={cfg.d_ff}; parameters ours {n_params:,}, torch {n_params_ref:,}; "
        f"{len(batches)} timed steps in {len(windows)} windows, "
        f"{sum(b.src.size(0) for b in batches) / len(batches):.0f} sentences and "
        f"{sum(b.tgt_tokens for b in batches) / len(batches):.0f} target tokens per batch"
    )

    for trainee in (ours, reference):
        for i in range(args.warmup):
            trainee.step(batches[i % len(batches)])
    if args.profile:
        for trainee in (ours, reference):
            profile(trainee, batches[: min(3, len(batches))])

    rate: dict[str, list[float]] = {"ours": [], "torch": []}  # tokens per wall-clock second
    cpu_rate: dict[str, list[float]] = {"ours": [], "torch": []}  # tokens per CPU second
    flop_rate: dict[str, list[float]] = {"ours": [], "torch": []}
    for i, window in enumerate(windows):
        tokens = sum(b.tgt_tokens for b in window)
        flops = sum(model_flops(ours.model, b) for b in window)
        for trainee in (ours, reference):
            wall_s, cpu_s = trainee.timed_window(window)
            rate[trainee.name].append(tokens / wall_s)
            cpu_rate[trainee.name].append(tokens / cpu_s)
            flop_rate[trainee.name].append(flops / wall_s)
        print(
            f"  window {i + 1:2d}  ours {rate['ours'][-1]:9.0f}  torch {rate['torch'][-1]:9.0f} "
            f"tokens/s  ratio {rate['ours'][-1] / rate['torch'][-1]:.3f}"
        )

    result = {label: statistics.median(rate[label]) for label in rate}
    for label in ("ours", "torch"):
        line = f"  median {label:5s} {result[label]:10.0f} tokens/s"
        if device.type == "cuda":
            achieved = statistics.median(flop_rate[label])
            line += f"  {achieved / 1e12:7.1f} TFLOP/s  MFU {achieved / H100_BF16_PEAK_FLOPS:6.1%}"
        else:
            line += f"  ({statistics.median(cpu_rate[label]):.0f} per CPU second)"
        print(line)
    result["ratio"] = statistics.median(
        o / t for o, t in zip(rate["ours"], rate["torch"], strict=True)
    )
    result["ratio_cpu"] = statistics.median(
        o / t for o, t in zip(cpu_rate["ours"], cpu_rate["torch"], strict=True)
    )
    print(
        f"  ours/torch: median ratio {result['ratio']:.3f} "
        f"(per CPU second {result['ratio_cpu']:.3f})"
    )
    return result


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
        "--models", default="small,base", help="comma-separated presets of configs/model/"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per model")
    parser.add_argument(
        "--window", type=int, default=0, help="steps per timed window (0: 1 on CPU, 10 on CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    args = parser.parse_args(argv)
    for key in ("max_tokens", "steps"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0")
    if args.warmup < 0 or args.threads < 0 or args.window < 0:
        parser.error("--warmup, --window and --threads must be >= 0")
    if args.window == 0:
        args.window = 10 if args.device == "cuda" else 1
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


@report_user_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    presets = {name: load_preset(name) for name in args.models.split(",")}
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"bench_train: torch {torch.__version__}, {where}, commit {_commit()}, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
        f"max_tokens={args.max_tokens} steps={args.steps} window={args.window} warmup={args.warmup}"
    )
    results = {name: bench_preset(name, cfg, args, device) for name, cfg in presets.items()}
    print(
        "\nmodel   ours tok/s   torch tok/s   ours/torch (median of window ratios; per CPU second)"
    )
    for name, r in results.items():
        print(
            f"{name:6s} {r['ours']:11.0f} {r['torch']:13.0f} {r['ratio']:12.3f}   ({r['ratio_cpu']:.3f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
