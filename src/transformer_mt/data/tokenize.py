"""Word tokenization (spaCy blank pipelines) and its inverse for model output (sacremoses).

With a subword model (data/subword.py), `Tokenizer` splits spaCy's tokens further into pieces and
`Detokenizer` joins pieces back into tokens before detokenizing: the rest of the package sees
"tokens" either way.

spaCy's rule-based tokenizers need no model download. One convention is added on top: a hyphen
written between two words without spaces ("T-shirt") becomes the token `@-@` (as Moses' aggressive
hyphen splitting does), so that the detokenizer can glue it back and cased, detokenized BLEU compares
like with like. spaCy and sacremoses are imported inside this module's functions only: training and
evaluation read the prepared cache and never load them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator

from transformer_mt.data.subword import Subword
from transformer_mt.errors import ConfigError

JOINED_HYPHEN = "@-@"
PIPE_BATCH_SIZE = 1000
# English clitics spaCy splits off ("doesn't" -> "does n't") that Moses' detokenizer keeps apart.
_EN_CLITIC = re.compile(r"^n['’]t$", re.IGNORECASE)


class Tokenizer:
    """Split text into word tokens with `spacy.blank(lang)`, optionally lower-cased, then into
    subword pieces if a `subword` model is given."""

    def __init__(self, lang: str, lowercase: bool = False, subword: Subword | None = None) -> None:
        self.lang = lang
        self.lowercase = lowercase
        self.subword = subword
        self._spacy_tokenizer = _blank_pipeline(lang).tokenizer

    def tokenize(self, text: str) -> list[str]:
        tokens = self._tokens(self._spacy_tokenizer(text))
        return tokens if self.subword is None else self.subword.segment(tokens)

    def pipe(self, texts: Iterable[str], batch_size: int = PIPE_BATCH_SIZE) -> Iterator[list[str]]:
        """Tokenize many texts (faster than calling `tokenize` in a loop)."""
        for doc in self._spacy_tokenizer.pipe(texts, batch_size=batch_size):
            tokens = self._tokens(doc)
            yield tokens if self.subword is None else self.subword.segment(tokens)

    def _tokens(self, doc) -> list[str]:
        tokens = []
        last = len(doc) - 1
        for i, token in enumerate(doc):
            if token.is_space:
                continue
            text = token.lower_ if self.lowercase else token.text
            if (
                text == "-"
                and 0 < i < last
                and not token.whitespace_
                and not doc[i - 1].whitespace_
                and not doc[i + 1].is_space
            ):
                text = JOINED_HYPHEN
            tokens.append(text)
        return tokens


class Detokenizer:
    """Turn output tokens back into text: Moses detokenization plus the `@-@` and clitic rules.

    With a `subword` model the input is pieces, joined back into tokens first.
    """

    def __init__(self, lang: str, subword: Subword | None = None) -> None:
        from sacremoses import MosesDetokenizer

        self.lang = lang
        self.subword = subword
        self._moses = MosesDetokenizer(lang=lang)

    def detokenize(self, tokens: list[str]) -> str:
        if self.subword is not None:
            tokens = self.subword.join(tokens)
        words: list[str] = []
        glue_next = False
        for token in tokens:
            if token == JOINED_HYPHEN:
                if words:
                    words[-1] += "-"
                else:
                    words.append("-")
                glue_next = True
            elif glue_next or (self.lang == "en" and words and _EN_CLITIC.match(token)):
                words[-1] += token
                glue_next = False
            else:
                words.append(token)
        return self._moses.detokenize(words, unescape=False)


def check_language(lang: str) -> None:
    """A ConfigError unless spaCy has a tokenizer for `lang`; cheaper than building one."""
    from spacy.util import get_lang_class

    try:
        get_lang_class(lang)
    except ImportError:
        raise _unknown_language(lang) from None


@functools.cache
def _blank_pipeline(lang: str):
    """One blank pipeline per language per process (building one takes seconds for some)."""
    import spacy

    try:
        return spacy.blank(lang)
    except ImportError:
        raise _unknown_language(lang) from None


def _unknown_language(lang: str) -> ConfigError:
    return ConfigError(
        f"no spaCy tokenizer for language code {lang!r}: use a code spaCy knows "
        "(en, de, fr, cs, ...; see https://spacy.io/usage/models#languages)"
    )
