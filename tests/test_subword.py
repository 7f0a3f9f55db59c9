"""Subword vocabularies: SentencePiece on top of spaCy's tokens, in the cache and in checkpoints."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import pytest

from transformer_mt.config import DataConfig
from transformer_mt.data.cache import cache_key
from transformer_mt.data.dataset import load_prepared, prepare
from transformer_mt.data.subword import Subword, subword_state, subwords_from_state
from transformer_mt.data.tokenize import Detokenizer, Tokenizer
from transformer_mt.data.vocab import BOS, EOS, SPECIALS, UNK
from transformer_mt.errors import ConfigError

SENTENCES = [
    "Ein Mann fährt Fahrrad .",
    "Zwei Hunde spielen im Schnee .",
    "Eine Frau liest ein Buch im Park .",
    "Ein kleiner Hund rennt über die Wiese .",
    "Mehrere Radfahrer fahren durch die Stadt .",
] * 20


@pytest.fixture(scope="module")
def small_model() -> Subword:
    return Subword.train([s.split() for s in SENTENCES], "bpe", vocab_size=60)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_pieces_join_back_into_the_tokens(kind):
    model = Subword.train([s.split() for s in SENTENCES], kind, vocab_size=60)
    for sentence in SENTENCES[:5]:
        tokens = sentence.split()
        pieces = model.segment(tokens)
        assert len(pieces) >= len(tokens)
        assert model.join(pieces) == tokens
    # Words never seen in training are spelled out in pieces of seen characters, never <unk>.
    unseen = ["Radhund", "Schneefrau", "Buchpark"]
    pieces = model.segment(unseen)
    assert SPECIALS[UNK] not in pieces
    assert model.join(pieces) == unseen


def test_the_vocabulary_is_the_models_pieces_with_the_specials_first(small_model):
    vocab = small_model.vocab()
    assert tuple(vocab.itos[:4]) == SPECIALS
    assert len(vocab) == len(small_model) <= 60
    ids = vocab.encode(small_model.segment(["Ein", "Hund", "liest", "."]))
    assert UNK not in ids
    # A character never seen in training is the one thing that maps to <unk>.
    assert UNK in vocab.encode(small_model.segment(["Ωmega"]))


def test_segment_many_equals_segment_one_by_one(small_model):
    token_lists = [s.split() for s in SENTENCES[:5]] + [[]]
    assert small_model.segment_many(token_lists) == [small_model.segment(t) for t in token_lists]


def test_model_bytes_rebuild_an_equal_model(small_model):
    again = Subword(small_model.to_bytes(), "bpe")
    assert again == small_model
    tokens = SENTENCES[1].split()
    assert again.segment(tokens) == small_model.segment(tokens)
    src, tgt = subwords_from_state(subword_state(small_model, small_model))
    assert src == tgt == small_model
    assert subwords_from_state(None) == (None, None)


def test_damaged_model_bytes_are_a_value_error():
    with pytest.raises(ValueError, match="subword model is damaged"):
        subwords_from_state({"kind": "bpe", "src": b"not a model", "tgt": b"x"})


def test_tokenizer_and_detokenizer_go_through_the_pieces(small_model):
    tokenizer = Tokenizer("de", subword=small_model)
    pieces = tokenizer.tokenize("Ein Radhund fährt.")
    assert pieces == small_model.segment(["Ein", "Radhund", "fährt", "."])
    assert list(tokenizer.pipe(["Ein Radhund fährt."])) == [pieces]
    assert Detokenizer("de", small_model).detokenize(pieces) == "Ein Radhund fährt."


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"vocab": "chars"}, "data.vocab must be one of word, bpe, unigram"),
        ({"vocab_size": 3}, ">="),
    ],
)
def test_bad_subword_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**override)


# ---------------------------------------------------------------------------------------------
# On Multi30k


@pytest.fixture(scope="module")
def multi30k_bpe(multi30k_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    cfg = DataConfig(
        root=str(tmp_path_factory.mktemp("data")),
        mirror=str(multi30k_mirror),
        vocab="bpe",
        vocab_size=8000,
        shared_vocab=True,
    )
    prepare(cfg)
    return cfg


def test_prepared_cache_holds_one_joint_model_and_its_vocabulary(multi30k_bpe):
    data = load_prepared(multi30k_bpe)
    assert data.src_subword is not None and data.src_subword == data.tgt_subword
    assert data.src_vocab == data.tgt_vocab == data.src_subword.vocab()
    assert len(data.src_vocab) == 8000
    assert (data.path / "src_subword.model").is_file()
    for split in ("train", "val", "test2016"):
        ids = data.split(split)
        assert not any(UNK in s for s in ids.src), split
        assert not any(UNK in s for s in ids.tgt), split


def test_subword_settings_have_their_own_cache_and_word_settings_ignore_vocab_size(multi30k_bpe):
    other_size = replace(multi30k_bpe, vocab_size=4000)
    assert cache_key(other_size) != cache_key(multi30k_bpe)
    word = replace(multi30k_bpe, vocab="word")
    assert cache_key(word) != cache_key(multi30k_bpe)
    assert cache_key(replace(word, vocab_size=4000)) == cache_key(word)
    assert cache_key(replace(multi30k_bpe, min_freq=5)) == cache_key(multi30k_bpe)


@pytest.mark.parametrize("lang", ["de", "en"])
def test_text_to_pieces_to_tokens_is_exact_on_the_whole_training_set(multi30k_bpe, lang):
    """Every one of the 29,000 training sentences of each side: pieces join back to its tokens."""
    model = load_prepared(multi30k_bpe).src_subword
    with gzip.open(Path(multi30k_bpe.mirror) / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    token_lists = list(Tokenizer(lang).pipe(lines))
    pieces = model.segment_many(token_lists)
    exceptions = [
        (i, tokens)
        for i, (tokens, p) in enumerate(zip(token_lists, pieces, strict=True))
        if model.join(p) != tokens
    ]
    assert len(lines) == 29000
    assert exceptions == []


# ---------------------------------------------------------------------------------------------
# End to end: a subword model trains, its checkpoint carries the pieces, no <unk> comes out


@pytest.fixture(scope="module")
def subword_run(tmp_path_factory):
    from train_support import OneThread, compose_config, overrides, write_reversal_corpus

    from transformer_mt.train.job import train

    root = tmp_path_factory.mktemp("subword-run")
    # The tests below look at pieces and <unk>, not at translation quality: one short epoch will do.
    corpus = write_reversal_corpus(root / "corpus", n_train=200, n_val=10)
    args = overrides(
        corpus,
        root,
        "bpe-run",
        "data.vocab=bpe",
        "data.vocab_size=40",
        "data.shared_vocab=true",
        "model.share_embeddings=true",
        "trainer.max_epochs=1",
    )
    with OneThread():  # in this process: the tests read its checkpoint, not the entry point
        train(compose_config(args))
    return root


def test_subword_checkpoint_translates_unseen_words_without_unk(subword_run):
    from transformer_mt.inference.translator import Translator

    checkpoint = subword_run / "saved" / "bpe-run" / "best.pt"
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    assert translator.src_subword is not None and translator.src_subword == translator.tgt_subword
    # Words never seen in training, made of characters that were: all in pieces, no <unk>.
    lines = ["antbee dogcat", "kolark jaybee ibis", "fox gnu hen eel", "tac god eeb"]
    assert not any(UNK in ids for ids in translator.encode(lines))
    translations = translator.translate(lines)
    assert len(translations) == len(lines)
    assert not any("<unk>" in t for t in translations)


def test_a_subword_model_never_emits_unk_even_when_unk_scores_highest(subword_run, monkeypatch):
    """Beam and greedy search alike, over batches of beams with the cache: UNK is never generated."""
    import torch

    from transformer_mt.inference.translator import Translator, decode_ids

    checkpoint = subword_run / "saved" / "bpe-run" / "best.pt"
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    model = translator.model
    decode = model.decode

    def decode_preferring_unk(*args, **kwargs):
        logits = decode(*args, **kwargs).clone()
        logits[..., UNK] = logits.max() + 10.0
        return logits

    monkeypatch.setattr(model, "decode", decode_preferring_unk)
    lines = ["antbee dogcat", "kolark jaybee ibis", "fox gnu hen eel", "tac god eeb"]
    sources = translator.encode(lines)
    with torch.no_grad():  # the forced logits show: without the ban, UNK wins every step
        src = torch.tensor([[*sources[0], EOS]])
        first = decode_preferring_unk(torch.tensor([[BOS]]), model.encode(src))
        assert first.argmax(-1).item() == UNK
    # Short outputs keep the test quick: the forced logits make the model babble up to the limit.
    short = {"max_len_a": 2, "max_len_b": 1.0, "batch_size": 3}  # two batches of beams
    translations = translator.translate(lines, beam_size=4, **short)
    assert len(translations) == len(lines) and not any("<unk>" in t for t in translations)
    for beam_size in (1, 4):
        cfg = replace(translator.decode_cfg, beam_size=beam_size, nbest=beam_size, **short)
        for hyps in decode_ids(model, sources, cfg, "cpu", ban_unk=translator.ban_unk):
            assert len(hyps) == beam_size
            assert all(UNK not in h.tokens for h in hyps)


def test_fine_tuning_from_a_subword_checkpoint_keeps_its_pieces(subword_run, tmp_path):
    """A word-level command line (no data.vocab given): the checkpoint's BPE model and vocabulary
    segment the new corpus, so every id means what it meant."""
    from train_support import OneThread, compose_config, overrides, write_reversal_corpus

    from transformer_mt.checkpoint import load_checkpoint
    from transformer_mt.inference.translator import Translator
    from transformer_mt.train.job import train

    parent = subword_run / "saved" / "bpe-run" / "best.pt"
    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=100, n_val=10)
    args = overrides(
        corpus,
        tmp_path,
        "bpe-tuned",
        f"trainer.init_from={parent}",
        "trainer.max_epochs=1",
        "model.share_embeddings=true",
    )
    with OneThread():
        train(compose_config(args))
    tuned = load_checkpoint(tmp_path / "saved" / "bpe-tuned" / "last.pt")
    first = load_checkpoint(parent)
    assert tuned["tokenizer"]["subword"] == first["tokenizer"]["subword"]  # the same model bytes
    assert (tuned["src_vocab"], tuned["tgt_vocab"]) == (first["src_vocab"], first["tgt_vocab"])
    assert tuned["config"]["data"]["vocab"] == "bpe"
    translator = Translator.from_checkpoint(tmp_path / "saved" / "bpe-tuned" / "last.pt", "cpu")
    assert translator.ban_unk
    assert not any(UNK in ids for ids in translator.encode(["antbee dogcat", "fox gnu"]))


def test_unigram_models_per_side_and_lowercase_end_to_end(tmp_path):
    """data.vocab=unigram, one model per side (the sides' words differ) and data.lowercase=true,
    through training, the checkpoint and the Translator."""
    from train_support import OneThread, compose_config, overrides, write_reversal_corpus

    from transformer_mt.checkpoint import load_checkpoint
    from transformer_mt.inference.translator import Translator
    from transformer_mt.train.job import train

    corpus = write_reversal_corpus(tmp_path / "corpus", n_train=200, n_val=10)
    for split in ("train", "val"):
        src, tgt = corpus[f"{split}_src"], corpus[f"{split}_tgt"]
        src.write_text("".join(f"{line.capitalize()}\n" for line in src.read_text().splitlines()))
        tgt.write_text(
            "".join(
                " ".join(word[::-1] for word in line.split()) + "\n"
                for line in tgt.read_text().splitlines()
            )
        )
    args = overrides(
        corpus,
        tmp_path,
        "unigram",
        "data.vocab=unigram",
        "data.vocab_size=40",
        "data.shared_vocab=false",
        "data.lowercase=true",
        "trainer.max_epochs=1",
    )
    with OneThread():
        train(compose_config(args))
    checkpoint = tmp_path / "saved" / "unigram" / "last.pt"
    payload = load_checkpoint(checkpoint)
    subword = payload["tokenizer"]["subword"]
    assert subword["kind"] == "unigram" and subword["src"] != subword["tgt"]
    assert payload["tokenizer"]["lowercase"] is True
    assert payload["src_vocab"] != payload["tgt_vocab"]
    assert not any(piece != piece.lower() for piece in payload["src_vocab"][len(SPECIALS) :])
    translator = Translator.from_checkpoint(checkpoint, "cpu")
    assert translator.src_subword.kind == translator.tgt_subword.kind == "unigram"
    assert translator.encode(["Ant BEE cat"]) == translator.encode(["ant bee cat"])
    assert not any(UNK in ids for ids in translator.encode(["Antbee dogcat"]))
    [translation] = translator.translate(["Ant bee cat"])
    assert "<unk>" not in translation
