"""Translation speed and BLEU: our `Translator` (what `mt-translate` runs) against the CTranslate2
export of the same checkpoint, in float32 and int8, on Multi30k test2016, in one run.

    python scripts/bench_export.py saved/<run>/averaged.pt             # beam 5, CPU, all threads
    python scripts/bench_export.py saved/<run>/averaged.pt --beam 1 --rounds 3

Each engine translates the whole split from raw text (tokenization and detokenization included,
as a user's call would) in `--rounds` alternating rounds; the median round gives sentences/s,
and every engine's output is scored with cased detokenized sacreBLEU. Ratios are against ours
from the same run, so a shared, noisy machine slows every engine alike. The export is written
to a temporary folder (or `--export-dir`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from transformer_mt.config import DataConfig
from transformer_mt.data.corpus import read_lines, split_paths
from transformer_mt.inference.export import ExportedTranslator, export_checkpoint
from transformer_mt.inference.translator import Translator
from transformer_mt.metrics import corpus_bleu

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="test2016")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--export-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ours = Translator.from_checkpoint(args.checkpoint, device="cpu")
    data = DataConfig(
        **{
            k: v
            for k, v in ours.train_config.get("data", {}).items()
            if k in ("name", "src", "tgt", "root", "mirror")
        }
    )
    src_path, ref_path = split_paths(data, args.split)
    sources, references = read_lines(src_path), read_lines(ref_path)
    folder = args.export_dir or Path(tempfile.mkdtemp()) / "ct2"
    if not folder.exists():
        export_checkpoint(args.checkpoint, folder)
    decode = {"beam_size": args.beam}
    engines = {
        "ours (torch, float32)": lambda: ours.translate(sources, **decode),
    }
    for compute_type in ("float32", "int8"):
        exported = ExportedTranslator(folder, compute_type=compute_type, intra_threads=args.threads)
        engines[f"CTranslate2 {compute_type}"] = lambda exported=exported: exported.translate(
            sources, **decode
        )
    times: dict[str, list[float]] = {name: [] for name in engines}
    outputs: dict[str, list[str]] = {}
    for name, run in engines.items():  # warm-up: spaCy, allocators, CTranslate2's first call
        outputs[name] = run()
    for _ in range(args.rounds):
        for name, run in engines.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    base = statistics.median(times["ours (torch, float32)"])
    print(
        f"{args.checkpoint} on {args.split} ({len(sources)} sentences), beam {args.beam}, "
        f"{args.threads} threads, median of {args.rounds} rounds, commit {commit}"
    )
    print(f"{'engine':<24} {'sentences/s':>12} {'× ours':>8} {'BLEU':>7} {'same as ours':>13}")
    rows = []
    for name in engines:
        seconds = statistics.median(times[name])
        same = sum(
            a == b for a, b in zip(outputs[name], outputs["ours (torch, float32)"], strict=True)
        )
        row = {
            "engine": name,
            "sentences_per_s": len(sources) / seconds,
            "ratio": base / seconds,
            "bleu": corpus_bleu(outputs[name], references),
            "same_as_ours": same / len(sources),
        }
        rows.append(row)
        print(
            f"{name:<24} {row['sentences_per_s']:>12.1f} {row['ratio']:>7.2f}× "
            f"{row['bleu']:>7.2f} {100 * row['same_as_ours']:>12.1f}%"
        )
    if args.json:
        args.json.write_text(json.dumps({"commit": commit, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
