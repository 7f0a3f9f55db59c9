"""Translator and decoding on a real (tiny, quickly trained) Transformer.

The fixture `toy` (conftest.py) trains the model once per test session: a toy "German" of number
words translated word by word into "English" (`zwei drei .` → `two three .`), prepared from text
files like any custom corpus, trained for a few seconds with a plain Adam loop and saved with
`save_checkpoint` (toy_support.py). The translate and evaluate CLI tests use the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest
import torch
from toy_support import ToyRun, pad, toy_sources

from transformer_mt.config import DecodeConfig, ModelConfig
from transformer_mt.data.vocab import EOS
from transformer_mt.errors import CheckpointError, ConfigError
from transformer_mt.files import atomic_writer
from transformer_mt.inference.search import beam_search, greedy_search
from transformer_mt.inference.translator import (
    Translator,
    decode_ids,
    fit_source,
    translate_ids,
)
from transformer_mt.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="session")
def translator(toy: ToyRun) -> Translator:
    return Translator.from_checkpoint(toy.checkpoint, device="cpu")


# ---------------------------------------------------------------------------------------------
# Search on the trained model


def test_toy_model_translates(toy: ToyRun, translator: Translator) -> None:
    assert translator.translate(["Zwei drei vier.", "Zehn."]) == ["Two three four.", "Ten."]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_cached_and_uncached_decoding_agree_on_a_trained_model(toy: ToyRun, beam_size) -> None:
    ids, _ = toy_sources(toy, 40)
    src = pad([s + [EOS] for s in ids])
    if beam_size == 1:
        assert greedy_search(toy.model, src, 10, 1.5) == greedy_search(
            toy.model, src, 10, 1.5, use_cache=False
        )
        return
    cached = beam_search(toy.model, src, beam_size, 0.6, 10, 1.5, nbest=beam_size)
    uncached = beam_search(toy.model, src, beam_size, 0.6, 10, 1.5, beam_size, use_cache=False)
    for a, b in zip(cached, uncached, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_beam_of_one_equals_greedy_on_a_trained_model(toy: ToyRun) -> None:
    ids, _ = toy_sources(toy, 40, seed=6)
    src = pad([s + [EOS] for s in ids])
    beam = beam_search(toy.model, src, 1, 0.0, 10, 1.5)
    assert [hyps[0].tokens for hyps in beam] == greedy_search(toy.model, src, 10, 1.5)


def test_translate_ids_restores_input_order(toy: ToyRun, translator: Translator) -> None:
    ids, english = toy_sources(toy, 50)
    cfg = DecodeConfig(beam_size=1, batch_size=7)  # several length-sorted batches
    hyps = translate_ids(toy.model, ids, toy.tgt_vocab, translator.detokenizer, cfg, "cpu")
    assert len(hyps) == 50
    # The toy model is good but not perfect: most lines, and only in their own place.
    right = sum(h == e for h, e in zip(hyps, english, strict=True))
    assert right >= 40
    one_by_one = [
        translate_ids(toy.model, [s], toy.tgt_vocab, translator.detokenizer, cfg, "cpu")[0]
        for s in ids[:10]
    ]
    assert hyps[:10] == one_by_one


def test_translate_ids_keeps_the_model_mode(toy: ToyRun, translator: Translator) -> None:
    ids, _ = toy_sources(toy, 3)
    toy.model.train()
    try:
        translate_ids(toy.model, ids, toy.tgt_vocab, translator.detokenizer, DecodeConfig(), "cpu")
        assert toy.model.training
    finally:
        toy.model.eval()


def test_empty_lines_give_empty_translations(translator: Translator) -> None:
    assert translator.translate(["", "Zwei.", "   ", ""]) == ["", "Two.", "", ""]


def test_nbest_lists_are_sorted_and_led_by_the_best(translator: Translator) -> None:
    beam = Translator(
        translator.model,
        translator.src_vocab,
        translator.tgt_vocab,
        "de",
        "en",
        False,
        DecodeConfig(beam_size=4, nbest=3),
        translator.device,
    )
    lines = ["Eins zwei drei.", "Acht neun."]
    nbest = beam.translate_nbest(lines)
    assert [len(hyps) for hyps in nbest] == [3, 3]
    for hyps in nbest:
        scores = [score for _, score in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({text for text, _ in hyps}) == 3
    assert [hyps[0][0] for hyps in nbest] == beam.translate(lines)


def test_an_over_long_sentence_is_truncated_with_a_warning(
    translator: Translator, caplog: pytest.LogCaptureFixture
) -> None:
    long_line = " ".join(["zwei"] * 40) + "."  # 41 tokens + EOS > 24 positions
    with caplog.at_level(logging.WARNING):
        [translation] = translator.translate([long_line])
    assert "longer than the model reads (24 with EOS)" in caplog.text
    assert translation.lower().startswith("two two")
    assert len(translation.split()) <= 23  # the output cap: max_positions - 1 tokens
    assert fit_source(list(range(30)), 24) == [*range(23), EOS]


def test_long_outputs_are_capped_at_the_positional_table(toy: ToyRun) -> None:
    # max_len_a = 100 asks for far more tokens than the table holds: the search stops in time.
    cfg = DecodeConfig(beam_size=2, max_len_a=100, max_len_b=0.0)
    [[hyp]] = decode_ids(toy.model, [[toy.src_vocab.encode(["zwei"])[0]] * 22], cfg, "cpu")
    assert len(hyp.tokens) <= 23


def test_attention_map_has_one_row_per_output_token(translator: Translator) -> None:
    attention = translator.attention("Zwei drei vier.")
    assert attention.source_tokens == ["Zwei", "drei", "vier", ".", "<eos>"]
    assert attention.output_tokens == ["Two", "three", "four", ".", "<eos>"]
    assert attention.weights.shape == (5, 5)
    assert attention.weights.sum(axis=1) == pytest.approx([1.0] * 5, abs=1e-4)


def test_rnn_baseline_decodes_through_the_same_interface() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="rnn", arch="rnn", d_model=16, enc_layers=1, dec_layers=1, dropout=0.0)
    model = build_model(cfg, 20, 15).eval()
    src = pad([[5, 6, 7, EOS], [8, 9, EOS], [10, EOS]])
    greedy = greedy_search(model, src, 3, 1.0)
    assert greedy == greedy_search(model, src, 3, 1.0, use_cache=False)
    beam = beam_search(model, src, 3, 0.6, 3, 1.0, nbest=2)
    uncached = beam_search(model, src, 3, 0.6, 3, 1.0, nbest=2, use_cache=False)
    assert [[h.tokens for h in hyps] for hyps in beam] == [
        [h.tokens for h in hyps] for hyps in uncached
    ]
    assert [h[0].tokens for h in beam_search(model, src, 1, 0.0, 3, 1.0)] == greedy


# ---------------------------------------------------------------------------------------------
# The Python API's promises (README, "Python API")


def test_beam_search_through_the_api_needs_no_ctranslate2(
    translator: Translator, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # as if the [export] extra were absent
    assert translator.translate("Zwei drei vier.", beam_size=5) == "Two three four."
    [nbest] = translator.translate_nbest(["Zehn."])
    assert nbest[0][0] == "Ten."


def test_an_unknown_decoding_option_is_a_config_error_naming_it(translator: Translator) -> None:
    with pytest.raises(ConfigError, match="unknown decoding setting 'beam_sise': use one of"):
        translator.translate("Zehn.", beam_sise=5)
    with pytest.raises(ConfigError, match="decode.beam_size"):
        translator.translate("Zehn.", beam_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_config_error(toy: ToyRun) -> None:
    with pytest.raises(ConfigError, match="'cuda' asked for, but no CUDA device is available"):
        Translator.from_checkpoint(toy.checkpoint, device="cuda")


# ---------------------------------------------------------------------------------------------
# Checkpoints and files


def test_from_checkpoint_rebuilds_model_vocabularies_and_settings(
    toy: ToyRun, translator: Translator
) -> None:
    assert translator.src_vocab == toy.src_vocab
    assert translator.tgt_vocab == toy.tgt_vocab
    assert (translator.src_lang, translator.tgt_lang, translator.lowercase) == ("de", "en", False)
    assert translator.decode_cfg == DecodeConfig()  # the run's own decoding settings
    assert translator.train_config["run_name"] == "toy-run"
    for name, tensor in toy.model.state_dict().items():
        assert torch.equal(translator.model.state_dict()[name], tensor)


def test_missing_and_corrupt_checkpoints_are_checkpoint_errors(tmp_path: Path, toy: ToyRun):
    with pytest.raises(CheckpointError, match="not found"):
        Translator.from_checkpoint(tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(toy.checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        Translator.from_checkpoint(corrupt)


def test_a_checkpoint_that_does_not_fit_its_config_is_a_checkpoint_error(
    tmp_path: Path, toy: ToyRun
) -> None:
    from transformer_mt.checkpoint import load_checkpoint, save_checkpoint

    payload = load_checkpoint(toy.checkpoint)
    payload["model_config"]["d_model"] = 64
    save_checkpoint(payload, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not hold a usable model"):
        Translator.from_checkpoint(tmp_path / "wrong.pt")


def test_atomic_writer_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_writer(target) as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n"


def test_decoding_batches_keep_source_tokens_times_beam_within_max_tokens(
    toy: ToyRun, translator: Translator, monkeypatch
) -> None:
    """Memory of a search grows with sentences x beam x source length: a batch of long lines is
    cut by `decode.max_tokens`, whatever `decode.batch_size` allows; one line alone always goes."""
    import transformer_mt.inference.translator as translator_module
    from transformer_mt.inference.search import Hypothesis

    shapes = []

    def record(model, src, cfg, **kwargs):
        shapes.append(tuple(src.shape))
        return [[Hypothesis([], 0.0)] for _ in range(src.shape[0])]

    monkeypatch.setattr(translator_module, "search", record)
    word = toy.src_vocab.encode(["zwei"])[0]
    sources = [[word] * 30] * 20 + [[word] * 3] * 40  # 30 words: cut to the 23 the toy reads
    cfg = DecodeConfig(beam_size=5, batch_size=128, max_tokens=500)
    decode_ids(translator.model, sources, cfg, "cpu")
    assert sum(rows for rows, _ in shapes) == len(sources)
    assert all(rows * length * cfg.beam_size <= cfg.max_tokens for rows, length in shapes)
    shapes.clear()
    decode_ids(translator.model, sources[:3], dataclasses.replace(cfg, max_tokens=50), "cpu")
    assert shapes == [(1, 24)] * 3
