import json

import pytest

from transformer_mt.data.vocab import BOS, EOS, PAD, SPECIALS, UNK, Vocab, strip_specials

CORPUS = [
    ["a", "man", "rides", "a", "bike"],
    ["a", "dog", "runs"],
    ["two", "men", "ride", "a", "bike"],
    ["the", "dog", "sleeps"],
]


def test_specials_have_fixed_ids():
    vocab = Vocab.build(CORPUS)
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    assert vocab.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"] == list(SPECIALS)


def test_build_orders_by_frequency_then_alphabetically_whatever_the_input_order():
    vocab = Vocab.build(CORPUS)
    # a: 4, bike: 2, dog: 2, then the singletons alphabetically.
    assert vocab.itos[4:] == [
        "a",
        "bike",
        "dog",
        "man",
        "men",
        "ride",
        "rides",
        "runs",
        "sleeps",
        "the",
        "two",
    ]
    assert Vocab.build(reversed(CORPUS)) == vocab
    assert Vocab.build([list(reversed(s)) for s in CORPUS]) == vocab


def test_min_freq_and_max_size_counting_the_specials():
    assert Vocab.build(CORPUS, min_freq=2).itos[4:] == ["a", "bike", "dog"]
    capped = Vocab.build(CORPUS, max_size=6)
    assert len(capped) == 6
    assert capped.itos[4:] == ["a", "bike"]
    assert len(Vocab.build(CORPUS, max_size=2)) == 4  # the specials always stay


def test_special_strings_in_the_text_are_not_counted_twice():
    vocab = Vocab.build([["<unk>", "<eos>", "word"]])
    assert vocab.itos == [*SPECIALS, "word"]


def test_encode_maps_unknown_tokens_to_unk_and_adds_no_specials():
    vocab = Vocab.build(CORPUS, min_freq=2)
    assert vocab.encode(["a", "dog", "flies"]) == [vocab.stoi["a"], vocab.stoi["dog"], UNK]
    assert vocab.encode([]) == []


def test_decode_and_strip_specials():
    vocab = Vocab.build(CORPUS)
    ids = [BOS, *vocab.encode(["a", "dog", "runs"]), EOS, vocab.stoi["the"], PAD, PAD]
    assert vocab.decode(ids) == ["<bos>", "a", "dog", "runs", "<eos>", "the", "<pad>", "<pad>"]
    assert vocab.decode(ids, strip=True) == ["a", "dog", "runs"]
    assert strip_specials([BOS, 7, PAD, 8, EOS, 9]) == [7, 8]
    assert strip_specials([5, 6]) == [5, 6]  # no EOS: everything but PAD/BOS


def test_json_round_trip():
    vocab = Vocab.build([["straße", "café", "naïve", "ü"]])
    again = Vocab(json.loads(json.dumps(vocab.to_list())))
    assert again == vocab
    assert len(again) == len(vocab) == 8
    assert again.encode(["café"]) == vocab.encode(["café"])


def test_a_list_without_the_specials_or_with_duplicates_is_rejected():
    with pytest.raises(ValueError, match="must start with"):
        Vocab(["a", "b"])
    with pytest.raises(ValueError, match="twice"):
        Vocab([*SPECIALS, "a", "a"])
