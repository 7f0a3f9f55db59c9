"""Which sentences share a batch: length sorting, token-budget packing, and the padding it leaves.

Sentences of similar length are batched together until the padded size of the batch,
`len(batch) * max(longest source, longest target)`, would exceed `max_tokens`, as fairseq does. That
keeps the work per step even and the padding small.

Lengths passed in are those of `x` and `y`, without specials; the one special each side gets (source
`x + [EOS]`, target `[BOS] + y` / `y + [EOS]`) is counted here. numpy only: `mt-prepare` reports
padding without loading torch, and `batching.TokenBucketSampler` builds its batches with these
functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformer_mt.data.cache import SplitData


def with_specials(lengths: Sequence[int]) -> np.ndarray:
    """Token counts as the batch tensors hold them: one special added per sentence (int32: half
    the memory of int64 for a corpus of millions; sums over them are taken in int64)."""
    counts = np.asarray(lengths).astype(np.int32)  # a copy: the caller's array is left alone
    counts += 1
    return counts


def index_dtype(n: int) -> np.dtype:
    """The type of an order over `n` sentences: int32 while it fits."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def sort_by_length(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """`order` sorted by source then target length; equal lengths keep the order they came in."""
    return order[np.lexsort((tgt_lengths[order], src_lengths[order]))]  # lexsort is stable


def pack(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, order: np.ndarray, max_tokens: int
) -> np.ndarray:
    """Cut `order` into consecutive batches whose padded size fits `max_tokens`; return the bounds:
    batch i is `order[bounds[i]:bounds[i + 1]]`.

    Lengths include the specials (`with_specials`). Greedy, as a loop over sentences would be: a
    batch takes sentences while `(sentences + 1) * longest` fits, and a sentence longer than the
    budget on its own gets a batch of its own. The loop runs once per batch, on numpy arrays: the
    padded length of a batch is at least its first sentence's, so it holds at most
    `max_tokens // first` sentences and each step looks at that window only (time linear in the
    corpus).
    """
    longest = np.maximum(src_lengths, tgt_lengths)[order]
    n = len(longest)
    bounds = [0]
    start = 0
    while start < n:
        window = longest[start : start + max(max_tokens // int(longest[start]), 1)]
        padded = np.maximum.accumulate(window) * np.arange(1, len(window) + 1)
        too_big = np.flatnonzero(padded > max_tokens)
        start += max(int(too_big[0]) if len(too_big) else len(window), 1)
        bounds.append(start)
    return np.asarray(bounds, dtype=np.int64)


def split_batches(order: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """The batches `pack` describes, as index arrays (views of `order`)."""
    return [
        order[start:end]
        for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
    ]


def token_batches(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int
) -> list[np.ndarray]:
    """Length-sorted token-budget batches, unshuffled.

    A shuffle (as the sampler does each epoch) only reorders sentences of equal lengths and whole
    batches, so every epoch's batches have the same sizes and padding as these.
    """
    src, tgt = with_specials(src_lengths), with_specials(tgt_lengths)
    order = sort_by_length(src, tgt, np.arange(len(src), dtype=index_dtype(len(src))))
    return split_batches(order, pack(src, tgt, order, max_tokens))


def padding_share(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], batches: Sequence[Sequence[int]]
) -> float:
    """Share of PAD among all source and target positions of `batches` (specials count as tokens)."""
    src, tgt = with_specials(src_lengths), with_specials(tgt_lengths)
    padded = real = 0
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        if len(idx):
            padded += len(idx) * (int(src[idx].max()) + int(tgt[idx].max()))
            real += int(src[idx].sum()) + int(tgt[idx].sum())
    return (padded - real) / padded if padded else 0.0


def fixed_size_batches(num_examples: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Batches of `batch_size` randomly chosen sentences: the baseline token budgets are compared to."""
    order = np.random.default_rng(seed).permutation(num_examples)
    return [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]


@dataclass
class PaddingReport:
    """Padding of token-budget batches against fixed-size batches of the same mean sentence count."""

    bucket_share: float
    num_batches: int
    mean_sentences: float
    fixed_share: float
    fixed_batch_size: int


def padding_report(split: SplitData, max_tokens: int, seed: int = 0) -> PaddingReport:
    """The PAD share of an epoch of `split` in token-budget batches, and in fixed random batches."""
    src_lengths, tgt_lengths = split.src_lengths(), split.tgt_lengths()
    batches = token_batches(src_lengths, tgt_lengths, max_tokens)
    mean_sentences = len(split) / max(len(batches), 1)
    fixed_size = max(round(mean_sentences), 1)
    fixed = fixed_size_batches(len(split), fixed_size, seed=seed)
    return PaddingReport(
        bucket_share=padding_share(src_lengths, tgt_lengths, batches),
        num_batches=len(batches),
        mean_sentences=mean_sentences,
        fixed_share=padding_share(src_lengths, tgt_lengths, fixed),
        fixed_batch_size=fixed_size,
    )
