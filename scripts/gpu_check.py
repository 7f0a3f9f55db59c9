"""Helpers of scripts/gpu_check.sh: input checks, the matmul ceiling, the dry run's corpus, the report.

python scripts/gpu_check.py inputs OUTDIR [--dry-run]   # exit 2 within seconds if one is missing
python scripts/gpu_check.py matmul OUTDIR [--dry-run]   # bf16 8192³ matmul TFLOP/s (CPU: 512³)
python scripts/gpu_check.py corpus OUTDIR               # dry run: a tiny parallel corpus
python scripts/gpu_check.py report OUTDIR               # every figure into OUTDIR/gpu_check.json
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import platform
import random
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ("torch", "hydra", "omegaconf", "sacrebleu", "sentencepiece", "spacy", "transformer_mt")
WORDS = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay", "koi", "lark"]
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet); H200: the same


def inputs(out: Path, dry_run: bool) -> int:
    missing = []
    for name in NEEDED:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    if missing:
        print(f"error: cannot import {', '.join(missing)}", file=sys.stderr)
        return 2
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "dry_run": dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    if dry_run:
        print(json.dumps(env))
        return 0
    if not torch.cuda.is_available():
        print("error: no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    from hydra import compose, initialize_config_module

    from transformer_mt.cli.common import CONFIG_PACKAGE, register_configs
    from transformer_mt.config import TrainConfig, to_dataclass
    from transformer_mt.data.cache import cache_root, existing_cache

    register_configs()
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        cfg = to_dataclass(TrainConfig, compose(config_name="train", overrides=["experiment=gpu"]))
    if existing_cache(cfg.data) is None:
        print(
            f"error: no prepared data for experiment=gpu under {cache_root(cfg.data)}: prepare it on "
            "the CPU machine (python scripts/prepare_data.py data.vocab=bpe data.vocab_size=8000 "
            "data.shared_vocab=true) and carry data/ with the checkout",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(env))
    return 0


def matmul(out: Path, dry_run: bool) -> int:
    import torch

    if dry_run:
        device, n, dtype = torch.device("cpu"), 512, torch.float32
    else:
        device, n, dtype = torch.device("cuda"), 8192, torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    rounds = 5 if dry_run else 50
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(rounds):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    flops = 2 * n**3 * rounds / (time.perf_counter() - started)
    result = {
        "n": n,
        "dtype": str(dtype),
        "tflops": flops / 1e12,
        "of_peak": flops / H100_BF16_PEAK,
    }
    (out / "matmul.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def corpus(out: Path) -> int:
    """The reversal task of the tests, as train / valid / test files (the dry run's data=custom)."""
    rng = random.Random(0)
    folder = out / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    # Small: an untrained model decodes to the length limit, so a test sentence costs ~0.25 s.
    for split, n in (("train", 300), ("valid", 12), ("test", 12)):
        pairs = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            pairs.append((" ".join(words), " ".join(reversed(words))))
        for side, index in (("src", 0), ("tgt", 1)):
            text = "".join(pair[index] + "\n" for pair in pairs)
            (folder / f"{split}.{side}").write_text(text)
    print(folder)
    return 0


def report(out: Path) -> int:
    """Merge what every step left in OUTDIR into gpu_check.json.

    Each step has a status: passed, failed, or skipped (with its reason) where it did not run.
    """

    def load(name: str):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    figures = {"env": load("env.json"), "matmul": load("matmul.json")}
    steps_file = out / "steps.jsonl"
    steps = (
        [json.loads(line) for line in steps_file.read_text().splitlines()]
        if steps_file.is_file()
        else []
    )
    figures["steps"] = steps
    junit = out / "cuda_tests.xml"
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        figures["cuda_tests"] = {
            key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")
        }
        figures["cuda_tests"]["failed"] = [
            case.get("name")
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        tests = figures["cuda_tests"]
        all_skipped = tests["skipped"] == tests["tests"]  # pytest exits 0: no CUDA path ran
        for step in steps:
            if step["step"] == "cuda" and step["status"] == "passed" and all_skipped:
                step["status"] = "skipped"
                step["reason"] = f"all {tests['tests']} cuda tests skipped (no CUDA device)"
    for name in ("bench_eager", "bench_compile"):
        figures[name] = load(f"{name}.json")
    metrics = out / "train" / "metrics.csv"
    if metrics.is_file():
        with open(metrics) as f:
            rows = list(csv.DictReader(f))
        figures["train"] = {
            "epochs": len(rows),
            "minutes": sum(float(r["epoch_seconds"]) for r in rows) / 60,
            "val_bleu": [round(float(r["val_bleu"]), 2) for r in rows],
        }
    evaluations = sorted(out.glob("eval/*.json"))
    figures["evaluate"] = [json.loads(p.read_text()) for p in evaluations]
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    failed = [s["step"] for s in steps if s["status"] == "failed"]
    skipped = [s["step"] for s in steps if s["status"] == "skipped"]
    print(
        f"gpu_check.json written; steps failed: {', '.join(failed) or 'none'}; "
        f"skipped: {', '.join(skipped) or 'none'}"
    )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["inputs", "matmul", "corpus", "report"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "inputs":
        return inputs(args.out, args.dry_run)
    if args.what == "matmul":
        return matmul(args.out, args.dry_run)
    if args.what == "corpus":
        return corpus(args.out)
    return report(args.out)


if __name__ == "__main__":
    sys.exit(main())
