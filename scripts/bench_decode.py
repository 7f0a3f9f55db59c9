"""Beam-search speed with the decoder's key/value cache against recomputing the whole prefix.

Decodes the German sources of Multi30k test2016 (de→en) with beam search, once with the cache and
once with `use_cache=False` (each step feeds the whole prefix to the decoder again), and reports
sentences per second of each. Timed rounds alternate (cache, recompute, cache, ...) and the
median of each side is reported, because the machine may be shared.

    python scripts/bench_decode.py --sentences 300        # model=small, random weights, CPU
    python scripts/bench_decode.py --checkpoint saved/<run>/best.pt --device cuda

Without a checkpoint the `small` preset (or --model) is built with random weights. Such a model
would stop at arbitrary lengths, so EOS is all but banned (its logit is set to -10^4) and every
hypothesis runs to its maximum length,
`max_len_a + max_len_b * source length` (default: exactly the source length, EOS included, a
realistic Multi30k output length): both runs then do exactly the same work. With a checkpoint the
model decodes normally (both runs produce the same translations; the script checks it).

The sources are the German lines of test2016 (from data/multi30k, copied there from
$MT_DATA_MIRROR when missing), tokenized with spaCy: with a checkpoint into its own
vocabulary; with random weights into a vocabulary of the test set's own tokens, while the model's
vocabularies have 8,000 (source) and 6,000 (target) entries, about those of Multi30k de→en at
min_freq=2, so that the output projection costs what it costs in a trained model.
`--sentences N` keeps the first N lines (to keep a CPU run within minutes).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from transformer_mt.cli.common import config_file, report_user_errors
from transformer_mt.config import DataConfig, DecodeConfig, ModelConfig, to_dataclass
from transformer_mt.data.vocab import EOS
from transformer_mt.devices import resolve_device
from transformer_mt.inference.search import search
from transformer_mt.inference.translator import Translator, fit_source, pad_batch
from transformer_mt.model import build_model

ROOT = Path(__file__).resolve().parents[1]
EOS_LOGIT = -1e4
SRC_VOCAB, TGT_VOCAB = 8000, 6000  # about the Multi30k de / en vocabularies at min_freq=2


class NoEos(torch.nn.Module):
    """A model whose decoder all but never predicts EOS: hypotheses all reach their maximum length.

    EOS gets a very low but finite logit, so that the search can still end a hypothesis with it
    at the maximum length (a banned, -inf EOS would leave it without a finite score).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def encode(self, src: Tensor):
        return self.model.encode(src)

    def init_cache(self, enc):
        return self.model.init_cache(enc)

    def decode(self, tgt: Tensor, enc, cache=None) -> Tensor:
        logits = self.model.decode(tgt, enc, cache)
        logits[..., EOS] = EOS_LOGIT
        return logits


def test2016_sources(translator: Translator | None, data_cfg: DataConfig) -> list[list[int]]:
    """Source ids (no specials) of the German side of test2016, tokenized with spaCy.

    With a checkpoint, its own tokenizer and vocabulary; else a vocabulary of the test set's own
    tokens (random weights make the choice of ids irrelevant; only the sizes count).
    """
    from transformer_mt.data.corpus import read_lines, split_paths
    from transformer_mt.data.tokenize import Tokenizer
    from transformer_mt.data.vocab import Vocab

    lines = read_lines(split_paths(data_cfg, "test2016")[0])
    if translator is not None:
        return translator.encode(lines)
    tokens = list(Tokenizer(data_cfg.src).pipe(lines))
    vocab = Vocab.build(tokens)
    return [vocab.encode(t) for t in tokens]


def decode_all(model, sources: list[list[int]], cfg: DecodeConfig, device, use_cache: bool):
    """Every sentence, longest first in batches of cfg.batch_size; token ids in that order."""
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    outputs = []
    for start in range(0, len(order), cfg.batch_size):
        rows = order[start : start + cfg.batch_size]
        src = pad_batch([fit_source(sources[i], None) for i in rows], device)
        outputs += [[h.tokens for h in hyps] for hyps in search(model, src, cfg, use_cache)]
    return outputs


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a trained model (default: random weights)")
    parser.add_argument("--model", default="small", help="model preset without a checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--sentences", type=int, default=None, help="first N of test2016 only")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=DecodeConfig.batch_size)
    parser.add_argument("--max-len-a", type=float, default=None)
    parser.add_argument("--max-len-b", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side")
    return parser.parse_args()


def build(args: argparse.Namespace, device: torch.device):
    """(model, decode settings, translator or None, what was benchmarked, in words)."""
    if args.checkpoint:
        translator = Translator.from_checkpoint(args.checkpoint, str(device))
        cfg = DecodeConfig(
            beam_size=args.beam,
            batch_size=args.batch_size,
            max_len_a=translator.decode_cfg.max_len_a if args.max_len_a is None else args.max_len_a,
            max_len_b=translator.decode_cfg.max_len_b if args.max_len_b is None else args.max_len_b,
        )
        return translator.model, cfg, translator, f"checkpoint {args.checkpoint}"
    cfg = DecodeConfig(
        beam_size=args.beam,
        batch_size=args.batch_size,
        max_len_a=0 if args.max_len_a is None else args.max_len_a,
        max_len_b=1.0 if args.max_len_b is None else args.max_len_b,
    )
    return None, cfg, None, f"model={args.model}, random weights, EOS logit {EOS_LOGIT:g}"


@report_user_errors
def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, cfg, translator, what = build(args, device)
    sources = test2016_sources(translator, DataConfig())
    sources = sources[: args.sentences] if args.sentences else sources
    if model is None:
        preset = OmegaConf.create(config_file("model", f"{args.model}.yaml").read_text())
        torch.manual_seed(0)
        model_cfg = to_dataclass(ModelConfig, preset)
        model = NoEos(build_model(model_cfg, SRC_VOCAB, TGT_VOCAB).to(device).eval())
    print(
        f"{what}; test2016: {len(sources)} sentences; beam {cfg.beam_size}, batch "
        f"{cfg.batch_size}, max_len {cfg.max_len_a:g} + {cfg.max_len_b:g}·S; device {device}, "
        f"{torch.get_num_threads()} threads; commit {git_commit()}"
    )
    decode_all(model, sources[: cfg.batch_size], cfg, device, True)  # warm-up
    speeds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list] = {}
    for round_ in range(args.rounds):
        for use_cache in (True, False):
            start = time.perf_counter()
            outputs[use_cache] = decode_all(model, sources, cfg, device, use_cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            speeds[use_cache].append(len(sources) / seconds)
            label = "cache    " if use_cache else "recompute"
            print(
                f"round {round_ + 1} {label} {seconds:7.1f} s  {speeds[use_cache][-1]:7.2f} sent/s"
            )
    cached, recomputed = (statistics.median(speeds[flag]) for flag in (True, False))
    same = outputs[True] == outputs[False]
    tokens = sum(len(hyps[0]) for hyps in outputs[True])
    print(f"output tokens (best hypotheses): {tokens}; cache and recompute agree: {same}")
    print(
        f"median sentences/s: cache {cached:.2f}, recompute {recomputed:.2f}, "
        f"speed-up {cached / recomputed:.2f}x"
    )


if __name__ == "__main__":
    main()
