"""Subword segmentation on top of spaCy's tokens (SentencePiece BPE or unigram).

spaCy stays the tokenizer: a sentence is first split into word tokens, then each token is split
further into pieces by a SentencePiece model trained on the training split's tokens only. Tokens
are given to SentencePiece joined by single spaces, with its `identity` normalisation, so every
piece keeps its characters unchanged and a piece starting with `▁` starts a new token:

    ["Ein", "Radfahrer", "."]  ->  ["▁Ein", "▁Rad", "fahrer", "▁."]  ->  ["Ein", "Radfahrer", "."]

`join(segment(tokens)) == tokens` for any tokens without spaces; the output side therefore goes
pieces -> tokens -> the same detokenizer as word-level output, and BLEU stays cased, detokenized
sacreBLEU. Every character of the training split is in the model (`character_coverage=1.0`), so
input made of characters seen in training never maps to `<unk>`.

The vocabulary *is* the SentencePiece model's: `vocab()` lists its pieces by id, with our four
specials at their fixed ids. A model is a few hundred kilobytes of bytes (`to_bytes()`), stored in
the prepared cache and in every checkpoint, so evaluate and translate need nothing else.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

from transformer_mt.data.vocab import SPECIALS, Vocab

KINDS = ("bpe", "unigram")
WORD_START = "\u2581"  # "▁", SentencePiece's mark for "a space before this piece"


class Subword:
    """A trained SentencePiece model that splits word tokens into pieces and joins them back."""

    def __init__(self, model_bytes: bytes, kind: str) -> None:
        import sentencepiece as spm

        self._bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        self.kind = kind

    @classmethod
    def train(
        cls, token_lists: Iterable[Sequence[str]], kind: str, vocab_size: int, threads: int = 2
    ) -> Subword:
        """Learn a `kind` ("bpe" or "unigram") model of at most `vocab_size` pieces, specials
        included. A corpus too small for that many pieces gives a smaller vocabulary."""
        return cls.train_lines(
            (" ".join(tokens) for tokens in token_lists), kind, vocab_size, threads
        )

    @classmethod
    def train_lines(
        cls, lines: Iterable[str], kind: str, vocab_size: int, threads: int = 2
    ) -> Subword:
        """`train` on token lines (a sentence's tokens joined by single spaces); empty lines are
        skipped. Every line given is used: a caller with a large corpus passes a sample."""
        import sentencepiece as spm

        if kind not in KINDS:
            raise ValueError(f"subword kind must be one of {KINDS} (got {kind!r})")
        model = io.BytesIO()
        spm.set_random_generator_seed(1234)  # unigram's sampling: the same corpus, the same model
        spm.SentencePieceTrainer.train(
            sentence_iterator=(line for line in lines if line),
            model_writer=model,
            model_type=kind,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=False,
            max_sentence_length=1 << 16,
            input_sentence_size=0,  # every sentence given
            num_threads=threads,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIALS[0],
            unk_piece=SPECIALS[1],
            bos_piece=SPECIALS[2],
            eos_piece=SPECIALS[3],
            unk_surface=SPECIALS[1],
            minloglevel=2,
        )
        return cls(model.getvalue(), kind)

    def to_bytes(self) -> bytes:
        return self._bytes

    def vocab(self) -> Vocab:
        """The model's pieces as a `Vocab` (id = SentencePiece id; the specials first)."""
        return Vocab([self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())])

    def segment(self, tokens: Sequence[str]) -> list[str]:
        """Pieces of one sentence's word tokens."""
        if not tokens:
            return []
        return self._sp.encode(" ".join(tokens), out_type=str)

    def segment_many(self, token_lists: Sequence[Sequence[str]]) -> list[list[str]]:
        """`segment` of many sentences at once (SentencePiece's batch call)."""
        pieces = self._sp.encode([" ".join(tokens) for tokens in token_lists], out_type=str)
        return [p if tokens else [] for p, tokens in zip(pieces, token_lists, strict=True)]

    def encode_lines(self, lines: Sequence[str], as_ids: bool = False) -> list[list]:
        """Pieces (or, with `as_ids`, piece ids) of many token lines at once."""
        encoded = self._sp.encode(list(lines), out_type=int if as_ids else str)
        return [p if line else [] for p, line in zip(encoded, lines, strict=True)]

    def join(self, pieces: Sequence[str]) -> list[str]:
        """Word tokens of a sentence's pieces (the inverse of `segment`)."""
        text = "".join(pieces).replace(WORD_START, " ")
        return text.split()

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Subword) and self._bytes == other._bytes

    def __repr__(self) -> str:
        return f"Subword({self.kind}, {len(self)} pieces)"


def subword_state(src: Subword | None, tgt: Subword | None) -> dict | None:
    """The checkpoint entry of a model pair (plain data: kind and model bytes); None for words."""
    if src is None or tgt is None:
        return None
    return {"kind": src.kind, "src": src.to_bytes(), "tgt": tgt.to_bytes()}


def subwords_from_state(state: dict | None) -> tuple[Subword | None, Subword | None]:
    """The pair `subword_state` stored; (None, None) for a word-level checkpoint."""
    if state is None:
        return None, None
    try:
        return Subword(state["src"], state["kind"]), Subword(state["tgt"], state["kind"])
    except (RuntimeError, OSError) as err:  # SentencePiece refuses bytes that are not a model
        raise ValueError(f"its subword model is damaged ({err})") from None
