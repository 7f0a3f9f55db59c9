"""`mt-prepare` / `python scripts/prepare_data.py [data.* overrides]`: fetch, tokenize and cache a corpus.

Prints where the cache is, pairs per split, vocabulary sizes, what was dropped or filtered, and the
share of padding that token-budget batches leave at `data.max_tokens` (against fixed-size batches of
random sentences).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from transformer_mt.cli.common import (
    CONFIG_PATH,
    register_configs,
    report_user_errors,
    run_hydra,
    stop_on_signals,
)
from transformer_mt.config import DataConfig, PrepareConfig, to_dataclass
from transformer_mt.data.buckets import padding_report
from transformer_mt.data.cache import PreparedData
from transformer_mt.data.dataset import load_or_prepare


@hydra.main(config_path=CONFIG_PATH, config_name="prepare", version_base="1.3")
@report_user_errors
def _prepare(node: DictConfig) -> None:
    cfg = to_dataclass(PrepareConfig, node).data
    data = load_or_prepare(cfg)
    print(summary(data, cfg))


def summary(data: PreparedData, cfg: DataConfig) -> str:
    """What a user wants to know about a prepared corpus, as a few lines of text."""
    counts = data.manifest["counts"]
    lines = [f"prepared data: {data.path}", f"  {'split':<12}{'pairs':>8}"]
    for name in data.splits:
        line = f"  {name:<12}{counts[name]['pairs']:>8}"
        if name == "train":
            line += (
                f"  (of {counts[name]['lines']} lines: dropped {counts[name]['dropped_empty']} "
                f"with an empty side, filtered {counts[name]['filtered_long']} longer than "
                f"data.max_len={cfg.max_len} tokens)"
            )
        lines.append(line)
    unit = "tokens" if cfg.vocab == "word" else f"{cfg.vocab} pieces"
    if cfg.shared_vocab:
        lines.append(f"vocabulary (shared): {len(data.src_vocab)} {unit}")
    else:
        lines.append(
            f"vocabulary: {cfg.src} {len(data.src_vocab)} {unit}, "
            f"{cfg.tgt} {len(data.tgt_vocab)} {unit}"
        )
    if cfg.limit_train is not None:
        lines.append(
            f"data.limit_train={cfg.limit_train}: training on {len(data.splits['train'])} pairs"
        )
    report = padding_report(data.splits["train"], cfg.max_tokens)
    lines.append(
        f"padding at data.max_tokens={cfg.max_tokens}: {report.bucket_share:.1%} of source + target "
        f"positions ({report.num_batches} batches, {report.mean_sentences:.1f} sentences each); "
        f"fixed batches of {report.fixed_batch_size} random sentences: {report.fixed_share:.1%}"
    )
    return "\n".join(lines)


def main() -> None:
    register_configs()
    with stop_on_signals():
        run_hydra(_prepare)


if __name__ == "__main__":
    main()
