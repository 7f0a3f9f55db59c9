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
    """Token counts as the batch tensors hold them: one special added per sentence."""
    return np.asarray(lengths, dtype=np.int64) + 1


def sort_by_length(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, order: np.ndarray
) -> np.ndarray:
    """`order` sorted by source then target length; equal lengths keep the order they came in."""
    return order[np.lexsort((tgt_lengths[order], src_lengths[order]))]  # lexsort is stable


def pack(
    src_lengths: np.ndarray, tgt_lengths: np.ndarray, order: np.ndarray, max_tokens: int
) -> list[list[int]]:
    """Cut `order` into consecutive batches whose padded size fits `max_tokens`.

    Lengths include the specials (`with_specials`). A sentence longer than the budget on its own gets
    a batch of its own.
    """
    longest_side = np.maximum(src_lengths, tgt_lengths)
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index, length in zip(order.tolist(), longest_side[order].tolist(), strict=True):
        if batch and max(longest, length) * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, length)
    if batch:
        batches.append(batch)
    return batches


def token_batches(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Length-sorted token-budget batches, unshuffled.

    A shuffle (as the sampler does each epoch) only reorders sentences of equal lengths and whole
    batches, so every epoch's batches have the same sizes and padding as these.
    """
    src, tgt = with_specials(src_lengths), with_specials(tgt_lengths)
    return pack(src, tgt, sort_by_length(src, tgt, np.arange(len(src))), max_tokens)


def padding_share(
    src_lengths: Sequence[int], tgt_lengths: Sequence[int], batches: Sequence[Sequence[int]]
) -> float:
    """Share of PAD among all source and target positions of `batches` (specials count as tokens)."""
    src, tgt = with_specials(src_lengths), with_specials(tgt_lengths)
    padded = real = 0
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        padded += len(idx) * (int(src[idx].max()) + int(tgt[idx].max()))
        real += int(src[idx].sum()) + int(tgt[idx].sum())
    return (padded - real) / padded if padded else 0.0


def fixed_size_batches(num_examples: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    """Batches of `batch_size` randomly chosen sentences: the baseline token budgets are compared to."""
    order = np.random.default_rng(seed).permutation(num_examples).tolist()
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
