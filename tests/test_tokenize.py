import pytest
from train_support import assert_imports_leave_out

from transformer_mt.data.corpus import read_lines
from transformer_mt.data.tokenize import JOINED_HYPHEN, Detokenizer, Tokenizer
from transformer_mt.errors import ConfigError

ROUND_TRIP_THRESHOLD = 0.98


def test_tokenize_splits_punctuation_and_keeps_case():
    tokens = Tokenizer("en").tokenize("A man, in a red hat, doesn't smile.")
    assert tokens == ["A", "man", ",", "in", "a", "red", "hat", ",", "does", "n't", "smile", "."]


def test_lowercase_is_an_option():
    assert Tokenizer("de", lowercase=True).tokenize("Ein Mann fährt Fahrrad.") == [
        "ein",
        "mann",
        "fährt",
        "fahrrad",
        ".",
    ]


def test_hyphen_inside_a_word_is_marked_but_a_spaced_dash_is_not():
    tok = Tokenizer("en")
    assert tok.tokenize("a T-shirt") == ["a", "T", JOINED_HYPHEN, "shirt"]
    assert tok.tokenize("wait - go") == ["wait", "-", "go"]


def test_whitespace_is_never_a_token():
    assert Tokenizer("en").tokenize("  two   dogs \t run ") == ["two", "dogs", "run"]
    assert Tokenizer("en").tokenize("   ") == []


def test_pipe_gives_the_same_tokens_as_tokenize():
    tok = Tokenizer("fr")
    texts = ["Un homme en T-shirt.", "", "Deux chiens jouent dans l'herbe."]
    assert list(tok.pipe(texts)) == [tok.tokenize(t) for t in texts]


def test_unknown_language_code_is_a_config_error():
    with pytest.raises(ConfigError, match="no spaCy tokenizer for language code 'qq'"):
        Tokenizer("qq")


def test_detokenizer_rules():
    assert Detokenizer("en").detokenize(["A", "T", JOINED_HYPHEN, "shirt", "."]) == "A T-shirt."
    assert Detokenizer("en").detokenize(["He", "does", "n't", "&", "she", "'s", "here"]) == (
        "He doesn't & she's here"
    )
    assert Detokenizer("de").detokenize(["„", "Hallo", "“", ",", "sagt", "er", "."]) == (
        "„Hallo“, sagt er."
    )


@pytest.mark.parametrize("lang", ["en", "de", "fr", "cs"])
def test_detokenize_tokenize_reproduces_the_multi30k_val_references(lang, multi30k_mirror):
    references = read_lines(multi30k_mirror / f"val.{lang}.gz")
    detok = Detokenizer(lang)
    outputs = [detok.detokenize(tokens) for tokens in Tokenizer(lang).pipe(references)]
    exact = sum(out == ref for out, ref in zip(outputs, references, strict=True)) / len(references)
    message = f"detokenize(tokenize(ref)) == ref for {exact:.2%} of the {lang} val references"
    print(message)
    assert exact >= ROUND_TRIP_THRESHOLD, message


def test_importing_the_pipeline_does_not_import_spacy():
    pipeline = [
        "transformer_mt.data.tokenize",
        "transformer_mt.data.dataset",
        "transformer_mt.data.batching",
    ]
    assert_imports_leave_out(pipeline, ["spacy", "sacremoses"])
