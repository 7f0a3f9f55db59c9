"""`mt-evaluate` / `python scripts/evaluate.py`: score a checkpoint on a test split or on two files.

    python scripts/evaluate.py checkpoint=saved/<run>/best.pt                       # test2016, beam 5
    python scripts/evaluate.py checkpoint=saved/<run>/best.pt split=val decode=greedy
    python scripts/evaluate.py checkpoint=saved/<run>/best.pt src_file=my.de ref_file=my.en

Decodes the source sentences (longest first, in batches, restored to input order), detokenizes
them and prints corpus sacreBLEU against the raw reference lines exactly as distributed (cased,
detokenized, with the full signature), chrF, and the lower-cased 13a BLEU most tutorials quote.
Writes `<result_dir>/<run_name>/eval/<split>.<checkpoint>.<greedy|beamK>.hyp` (one line per source
line, in order; `<checkpoint>` is the file's stem: best, averaged, epoch_12, ...) and a `.json`
beside it with the scores, signatures, decoding settings and speed. The `.json` records the input
(the checkpoint's and the files' full paths, or the split): when a name is already taken by the
results of another input (a `test.de` in another folder, a `best.pt` of another run of the same
name), `.<8 hex digits>` of the input is added to the stem, so no result replaces another's; the
same input scored again replaces its own.

A split's source ids come from the prepared cache of the checkpoint's data settings when it is
there (no spaCy needed); otherwise the raw source lines are tokenized. Files given by
src_file/ref_file are always tokenized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from transformer_mt.cli.common import CONFIG_PATH, register_configs, report_user_errors, run_hydra
from transformer_mt.config import DataConfig, DecodeConfig, EvaluateConfig, to_dataclass
from transformer_mt.data.corpus import check_split, read_parallel, split_paths
from transformer_mt.data.dataset import load_prepared
from transformer_mt.errors import ConfigError, DataError
from transformer_mt.files import atomic_writer
from transformer_mt.inference.translator import Translator
from transformer_mt.metrics import score_corpus

log = logging.getLogger(__name__)


@dataclass
class TestSet:
    """What to translate and score: a name for the output files, sources, references."""

    name: str
    references: list[str]
    source_lines: list[str] | None = None  # raw text, tokenized on use ...
    source_ids: list[list[int]] | None = None  # ... or ids from the prepared cache


def decode_name(cfg: DecodeConfig) -> str:
    """`greedy` or `beam<K>`: the decoding part of the output file names."""
    return "greedy" if cfg.beam_size == 1 else f"beam{cfg.beam_size}"


def run_name(translator: Translator, checkpoint: str) -> str:
    """The training run's name, else the folder the checkpoint sits in, as one safe path component.

    The name comes from inside the checkpoint, which may come from anyone: `../x` or `/etc` must
    not choose where results are written.
    """
    name = translator.train_config.get("run_name") or Path(checkpoint).resolve().parent.name
    safe = re.sub(r"[^\w.-]+", "_", str(name)).strip("._")
    return safe or "run"


def output_stem(cfg: EvaluateConfig, split: str, decode_cfg: DecodeConfig) -> str:
    """`<split>.<checkpoint>.<greedy|beamK>`: scoring another checkpoint of the run (best,
    averaged, epoch_12, ...) never overwrites this one's hypotheses."""
    checkpoint = re.sub(r"[^\w.-]+", "_", Path(cfg.checkpoint).stem).strip("._") or "checkpoint"
    return f"{split}.{checkpoint}.{decode_name(decode_cfg)}"


def input_identity(cfg: EvaluateConfig, split: str) -> dict[str, str | None]:
    """What was scored: the checkpoint and the test files by full path, or the split."""

    def full(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    return {
        "checkpoint": full(cfg.checkpoint),
        "split": None if cfg.src_file is not None else split,
        "src_file": full(cfg.src_file),
        "ref_file": full(cfg.ref_file),
    }


def unique_stem(folder: Path, stem: str, identity: dict[str, str | None]) -> str:
    """`stem`, unless its results there belong to another input: then `stem.<digest of input>`."""
    try:
        owner = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8")).get("input")
    except FileNotFoundError:
        return stem
    except (OSError, ValueError, AttributeError):
        owner = None  # unreadable: not known to be this input's
    if owner == identity:
        return stem
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{stem}.{digest}"


def checkpoint_data_config(translator: Translator, cfg: EvaluateConfig) -> DataConfig:
    """The data settings the checkpoint was trained with, with evaluate's data_root/mirror applied."""
    stored = dict(translator.train_config.get("data") or {})
    if not stored:
        raise DataError(
            f"{cfg.checkpoint} holds no data settings: score files with src_file=... ref_file=..."
        )
    if cfg.data_root is not None:
        stored["root"] = cfg.data_root
    if cfg.mirror is not None:
        stored["mirror"] = cfg.mirror
    return to_dataclass(DataConfig, stored)


def files_test_set(src_file: str, ref_file: str) -> TestSet:
    sources, references = read_parallel(src_file, ref_file, allow_empty=False)
    return TestSet(Path(src_file).name, references, source_lines=sources)


def split_test_set(data_cfg: DataConfig, split: str, translator: Translator) -> TestSet:
    """A corpus split: ids from the prepared cache when it matches the checkpoint, else raw text."""
    check_split(data_cfg, split)
    try:
        prepared = load_prepared(data_cfg)
    except DataError as err:
        log.info("no prepared data (%s): tokenizing the raw %s files", err, split)
    else:
        data = prepared.splits.get(split)
        same_vocab = (prepared.src_vocab, prepared.tgt_vocab, prepared.src_subword) == (
            translator.src_vocab,
            translator.tgt_vocab,
            translator.src_subword,
        )
        if data is not None and data.ref_text is not None and same_vocab:
            return TestSet(split, data.ref_text, source_ids=data.src)
        log.info(
            "prepared data at %s does not fit: tokenizing the raw %s files", prepared.path, split
        )
    sources, references = read_parallel(*split_paths(data_cfg, split), allow_empty=False)
    return TestSet(split, references, source_lines=sources)


def load_test_set(cfg: EvaluateConfig, translator: Translator) -> TestSet:
    if (cfg.src_file is None) != (cfg.ref_file is None):
        raise ConfigError("src_file and ref_file go together: give both, or neither to use split=")
    if cfg.src_file is not None:
        return files_test_set(cfg.src_file, cfg.ref_file)
    return split_test_set(checkpoint_data_config(translator, cfg), cfg.split, translator)


def write_results(folder: Path, stem: str, hypotheses: list[str], report: dict[str, Any]) -> Path:
    """Write `<stem>.hyp` and `<stem>.json` atomically; return the .hyp path."""
    hyp_path = folder / f"{stem}.hyp"
    with atomic_writer(hyp_path) as handle:
        handle.writelines(f"{line}\n" for line in hypotheses)
    with atomic_writer(folder / f"{stem}.json") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return hyp_path


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Translate and score one test set; print and write the results; return the report."""
    translator = Translator.from_checkpoint(cfg.checkpoint, cfg.device, cfg.decode)
    test = load_test_set(cfg, translator)
    sources = (
        test.source_ids if test.source_ids is not None else translator.encode(test.source_lines)
    )
    start = time.perf_counter()  # decoding only: tokenization is not the model's speed
    hypotheses = translator.translate_ids(sources)
    seconds = time.perf_counter() - start
    scores = score_corpus(hypotheses, test.references)
    identity = input_identity(cfg, test.name)
    report = {
        "checkpoint": str(cfg.checkpoint),
        "input": identity,
        "split": test.name,
        "src_file": cfg.src_file,
        "ref_file": cfg.ref_file,
        "sentences": len(hypotheses),
        **scores,
        "decode": dataclasses.asdict(translator.decode_cfg),
        "device": str(translator.device),
        "seconds": round(seconds, 3),
        "sentences_per_s": round(len(hypotheses) / seconds, 2) if seconds > 0 else None,
    }
    folder = Path(cfg.result_dir) / run_name(translator, cfg.checkpoint) / "eval"
    stem = unique_stem(folder, output_stem(cfg, test.name, translator.decode_cfg), identity)
    hyp_path = write_results(folder, stem, hypotheses, report)
    print_report(report, hyp_path)
    return report


def print_report(report: dict[str, Any], hyp_path: Path) -> None:
    print(
        f"{report['split']}: {report['sentences']} sentences, {report['seconds']:.1f} s "
        f"({report['sentences_per_s']} sentences/s on {report['device']})"
    )
    print(f"BLEU     {report['bleu']:6.2f}  {report['bleu_signature']}")
    print(f"chrF     {report['chrf']:6.2f}  {report['chrf_signature']}")
    print(
        f"BLEU-lc  {report['bleu_lc']:6.2f}  {report['bleu_lc_signature']}  (sacrebleu -lc -tok 13a)"
    )
    print(f"hypotheses: {hyp_path}")


@hydra.main(config_path=CONFIG_PATH, config_name="evaluate", version_base="1.3")
@report_user_errors
def _run(node: DictConfig) -> None:
    if OmegaConf.is_missing(node, "checkpoint"):
        raise ConfigError(
            "no checkpoint given: python scripts/evaluate.py checkpoint=saved/<run>/best.pt"
        )
    evaluate(to_dataclass(EvaluateConfig, node))


def main() -> None:
    register_configs()
    run_hydra(_run)


if __name__ == "__main__":
    main()
