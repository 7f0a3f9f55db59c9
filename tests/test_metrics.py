"""Our corpus metrics equal sacreBLEU's own command line on the same files."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from transformer_mt.metrics import corpus_bleu, corpus_chrf, score_corpus

SACREBLEU = Path(sys.executable).parent / "sacrebleu"
MIRROR = Path(
    os.environ.get("MT_DATA_MIRROR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
)

HANDMADE_REFS = [
    "A man in an orange hat starring at something.",
    "Two young, White males are outside near many bushes.",
    "A girl in a pink dress is climbing into a wooden playhouse.",
    "People are fixing the roof of a house.",
    "A boston terrier is running on lush green grass in front of a white fence.",
    "Le chat n'est pas là, et \"l'autre\" aussi - peut-être?",
]


def perturb(line: str, rng: random.Random) -> str:
    """A plausible imperfect translation: words dropped, swapped, re-cased, punctuation lost."""
    words = line.split()
    if len(words) > 3 and rng.random() < 0.5:
        del words[rng.randrange(len(words))]
    if len(words) > 3 and rng.random() < 0.5:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    if words and rng.random() < 0.4:
        words[0] = words[0].lower()
    text = " ".join(words)
    return text.rstrip(".") if rng.random() < 0.3 else text


def corpora() -> list[tuple[str, list[str]]]:
    found = [("handmade", HANDMADE_REFS)]
    test2016 = MIRROR / "test_2016_flickr.en.gz"
    if test2016.is_file():
        found.append(("test2016", gzip.decompress(test2016.read_bytes()).decode().splitlines()))
    return found


def sacrebleu_cli(refs: Path, hyps: Path, *options: str) -> list[dict]:
    result = subprocess.run(
        [str(SACREBLEU), str(refs), "-i", str(hyps), "-m", "bleu", "chrf", "-w", "6", *options],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "name,references", corpora(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_scores_equal_the_sacrebleu_command_line(tmp_path: Path, name, references) -> None:
    rng = random.Random(3)
    hypotheses = [perturb(line, rng) for line in references]
    refs, hyps = tmp_path / "refs.txt", tmp_path / "hyps.txt"
    refs.write_text("\n".join(references) + "\n", encoding="utf-8")
    hyps.write_text("\n".join(hypotheses) + "\n", encoding="utf-8")

    ours = score_corpus(hypotheses, references)
    cased_bleu, chrf = sacrebleu_cli(refs, hyps, "-tok", "13a")
    lc_bleu, _ = sacrebleu_cli(refs, hyps, "-lc", "-tok", "13a")

    assert 5 < ours["bleu"] < 95  # a case where the metrics have something to measure
    assert ours["bleu"] == pytest.approx(cased_bleu["score"], abs=1e-4)
    assert ours["bleu_signature"] == cased_bleu["signature"]
    assert ours["bleu_lc"] == pytest.approx(lc_bleu["score"], abs=1e-4)
    assert ours["bleu_lc_signature"] == lc_bleu["signature"]
    assert ours["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
    assert ours["chrf_signature"] == chrf["signature"]
    assert ours["bleu_lc"] > ours["bleu"]  # the re-cased first words count only when lower-cased


def test_small_functions_agree_with_the_report() -> None:
    hyps = ["the cat sat on the mat .", "A dog runs"]
    refs = ["The cat sat on the mat.", "A dog runs."]
    report = score_corpus(hyps, refs)
    assert corpus_bleu(hyps, refs) == report["bleu"]
    assert corpus_bleu(hyps, refs, lowercase=True) == report["bleu_lc"]
    assert corpus_chrf(hyps, refs) == report["chrf"]
    assert "case:mixed" in report["bleu_signature"] and "tok:13a" in report["bleu_signature"]
    assert "case:lc" in report["bleu_lc_signature"]
    assert corpus_bleu(refs, refs) == pytest.approx(100.0)


def test_hypotheses_and_references_must_pair_up() -> None:
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_bleu(["a", "b"], ["a"])
