"""Corpus-level translation metrics, computed by sacreBLEU on detokenized text.

- BLEU, cased, sacreBLEU's own `13a` tokenization: the figure to report, with its signature
  (`nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:...`) so that anyone can reproduce it.
- BLEU lower-cased (`sacrebleu -lc -tok 13a`): the figure most Multi30k tutorials quote.
- chrF (character n-gram F-score, sacreBLEU defaults), less sensitive to tokenization.

Hypotheses and references are plain detokenized sentences, one reference per hypothesis; the
references are the raw corpus lines exactly as distributed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

BLEU_TOKENIZE = "13a"


def _bleu_metric(lowercase: bool) -> BLEU:
    return BLEU(tokenize=BLEU_TOKENIZE, lowercase=lowercase)


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses for {len(references)} references: one each is needed"
        )


def _score(metric: Any, hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    _check_lengths(hypotheses, references)
    score = metric.corpus_score(list(hypotheses), [list(references)]).score
    return float(score), str(metric.get_signature())


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False
) -> float:
    """Corpus BLEU (0-100) on detokenized text, tokenized by sacreBLEU's 13a; cased by default."""
    return _score(_bleu_metric(lowercase), hypotheses, references)[0]


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100), sacreBLEU's default settings (character 6-grams, beta 2)."""
    return _score(CHRF(), hypotheses, references)[0]


def score_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float | str]:
    """Every reported figure with its sacreBLEU signature, as a JSON-ready dict.

    Keys: bleu, bleu_signature (cased), bleu_lc, bleu_lc_signature (lower-cased), chrf,
    chrf_signature.
    """
    bleu, bleu_signature = _score(_bleu_metric(False), hypotheses, references)
    bleu_lc, bleu_lc_signature = _score(_bleu_metric(True), hypotheses, references)
    chrf, chrf_signature = _score(CHRF(), hypotheses, references)
    return {
        "bleu": bleu,
        "bleu_signature": bleu_signature,
        "bleu_lc": bleu_lc,
        "bleu_lc_signature": bleu_lc_signature,
        "chrf": chrf,
        "chrf_signature": chrf_signature,
    }
