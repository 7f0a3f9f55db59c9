"""Token <-> id mapping with fixed special ids, built from the training split only."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


class Vocab:
    """A list of token strings; a token's id is its position. The first four are the specials.

    `Vocab(vocab.to_list())` rebuilds an equal vocabulary (the list is what checkpoints and the
    prepared cache store, as JSON).
    """

    def __init__(self, itos: Sequence[str]) -> None:
        itos = list(itos)
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {', '.join(SPECIALS)}")
        stoi = {token: i for i, token in enumerate(itos)}
        if len(stoi) != len(itos):
            raise ValueError("a vocabulary must not list a token twice")
        self.itos = itos
        self.stoi = stoi

    @classmethod
    def build(
        cls, token_lists: Iterable[Sequence[str]], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """Keep tokens seen at least `min_freq` times, most frequent first (ties alphabetically).

        `max_size` caps the whole vocabulary, the four specials included.
        """
        return cls.from_counts(Counter(token for tokens in token_lists for token in tokens),
                               min_freq, max_size)  # fmt: skip

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, int], min_freq: int = 1, max_size: int | None = None
    ) -> Vocab:
        """`build` from token counts already made (a corpus counted chunk by chunk)."""
        kept = sorted(
            (t for t, count in counts.items() if count >= min_freq and t not in SPECIALS),
            key=lambda token: (-counts[token], token),
        )
        if max_size is not None:
            kept = kept[: max(max_size - len(SPECIALS), 0)]
        return cls([*SPECIALS, *kept])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token ids, UNK for a token the vocabulary lacks (no BOS/EOS added)."""
        stoi = self.stoi
        return [stoi.get(token, UNK) for token in tokens]

    def decode(self, ids: Iterable[int], strip: bool = False) -> list[str]:
        """Token strings. `strip=True` cuts at the first EOS and drops PAD and BOS."""
        if strip:
            ids = strip_specials(ids)
        itos = self.itos
        return [itos[i] for i in ids]

    def to_list(self) -> list[str]:
        return list(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"


def strip_specials(ids: Iterable[int]) -> list[int]:
    """The ids of a generated sequence up to its first EOS, without PAD and BOS."""
    kept = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i not in (PAD, BOS):
            kept.append(i)
    return kept
