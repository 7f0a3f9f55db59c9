"""Batches for training and validation: the token-budget sampler, padding, the `Batch` type.

`TokenBucketSampler` groups sentences of similar length under a token budget (see buckets.py),
reshuffles them every epoch with a seeded torch.Generator and shards them across DDP ranks, all on
numpy arrays of lengths and indices (an epoch of millions of pairs takes seconds); `collate` pads
the sentences of one batch, read from the split's arrays only then, into a `Batch`. A source is fed as `x + [EOS]`; a target as
`tgt_in = [BOS] + y`, predicted as `tgt_out = y + [EOS]`. Lengths given to the sampler are those of
`x` and `y`, without specials.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from transformer_mt.data.buckets import (
    index_dtype,
    pack,
    sort_by_length,
    split_batches,
    with_specials,
)
from transformer_mt.data.vocab import BOS, EOS, PAD

if TYPE_CHECKING:
    from transformer_mt.data.cache import SplitData

Example = tuple[int, Sequence[int], Sequence[int]]  # (index in the split, source ids, target ids)


@dataclass
class Batch:
    """A right-padded batch. Shapes: B sentences, S source length, T target length."""

    src: torch.Tensor  # (B, S) x + EOS, then PAD
    tgt_in: torch.Tensor  # (B, T) BOS + y, then PAD
    tgt_out: torch.Tensor  # (B, T) y + EOS, then PAD
    src_lengths: torch.Tensor  # (B,) non-pad source tokens (EOS included)
    tgt_lengths: torch.Tensor  # (B,) non-pad target tokens (BOS / EOS included)
    indices: torch.Tensor  # (B,) positions of the examples in their split
    num_tgt_tokens: int  # non-pad tokens of tgt_out: the loss normaliser (no device sync needed)

    @property
    def src_pad_mask(self) -> torch.Tensor:
        """(B, S) bool, True = padding."""
        return self.src == PAD

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device))

    def __len__(self) -> int:
        return self.src.shape[0]

    def _map(self, fn) -> Batch:
        moved = {
            f.name: fn(value) if isinstance(value := getattr(self, f.name), torch.Tensor) else value
            for f in fields(self)
        }
        return Batch(**moved)


def collate(examples: Sequence[Example]) -> Batch:
    """Pad `(index, src_ids, tgt_ids)` examples to the longest sequence of the batch."""
    src_lengths = np.fromiter((len(x) + 1 for _, x, _ in examples), np.int64, len(examples))
    tgt_lengths = np.fromiter((len(y) + 1 for _, _, y in examples), np.int64, len(examples))
    src = np.full((len(examples), src_lengths.max(initial=0)), PAD, dtype=np.int64)
    tgt_in = np.full((len(examples), tgt_lengths.max(initial=0)), PAD, dtype=np.int64)
    tgt_out = tgt_in.copy()
    for row, (_, x, y) in enumerate(examples):
        src[row, : len(x)] = x
        src[row, len(x)] = EOS
        tgt_in[row, 0] = BOS
        tgt_in[row, 1 : len(y) + 1] = y
        tgt_out[row, : len(y)] = y
        tgt_out[row, len(y)] = EOS
    return Batch(
        src=torch.from_numpy(src),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        src_lengths=torch.from_numpy(src_lengths),
        tgt_lengths=torch.from_numpy(tgt_lengths),
        indices=torch.tensor([int(index) for index, _, _ in examples], dtype=torch.long),
        num_tgt_tokens=int(tgt_lengths.sum()),
    )


class PairDataset(Dataset):
    """The examples of a prepared split as `(index, src_ids, tgt_ids)` tuples, read from its
    (memory-mapped) arrays when asked for."""

    def __init__(self, split: SplitData) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Example:
        return index, self.split.src[index], self.split.tgt[index]


class TokenBucketSampler(Sampler[list[int]]):
    """Yields lists of example indices whose padded size stays within `max_tokens`.

    Each epoch (`set_epoch`): examples are sorted by source then target length, ties in a fresh
    random order; consecutive examples fill a batch while `len(batch) * longest` fits the budget
    (one sentence longer than the budget gets a batch of its own; see buckets.py); the batch order
    is shuffled. `batches()` gives an epoch's batches as arrays of indices (views of the epoch's
    order: memory follows the number of batches, with no Python object per sentence); iterating
    gives one batch at a time as a list.
    With `num_replicas > 1` the global batch list is padded by repeating its first batches so that
    every rank gets the same number, and rank r takes batches r, r + R, r + 2R, ... All randomness
    comes from a torch.Generator seeded with (seed, epoch): the same seed and epoch give the same
    batches on every rank and every run. `iter_from(k)` starts part-way through an epoch, so a
    resumed run sees exactly the batches the interrupted one had left.
    """

    def __init__(
        self,
        src_lengths: Sequence[int],
        tgt_lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if len(src_lengths) != len(tgt_lengths):
            raise ValueError(
                f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths"
            )
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0 (got {max_tokens})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, num_replicas={num_replicas})")
        self.src_lengths = with_specials(src_lengths)
        self.tgt_lengths = with_specials(tgt_lengths)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # Shuffling only reorders equal lengths and whole batches: every epoch has as many batches.
        n = len(self.src_lengths)
        order = sort_by_length(
            self.src_lengths, self.tgt_lengths, np.arange(n, dtype=index_dtype(n))
        )
        self.num_global_batches = (
            len(pack(self.src_lengths, self.tgt_lengths, order, max_tokens)) - 1
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.src_lengths)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        dtype = index_dtype(n)
        if self.shuffle:
            order = torch.randperm(n, generator=generator).numpy().astype(dtype)
        else:
            order = np.arange(n, dtype=dtype)
        order = sort_by_length(self.src_lengths, self.tgt_lengths, order)
        bounds = pack(self.src_lengths, self.tgt_lengths, order, self.max_tokens)
        picked = np.arange(len(bounds) - 1)
        if self.shuffle:
            picked = torch.randperm(len(picked), generator=generator).numpy()
        if self.num_replicas > 1 and len(picked):
            total = math.ceil(len(picked) / self.num_replicas) * self.num_replicas
            picked = np.resize(picked, total)[self.rank :: self.num_replicas]
        batches = split_batches(order, bounds)
        return [batches[i] for i in picked.tolist()]

    def iter_from(self, batch_index: int) -> Iterator[list[int]]:
        """This rank's batches of the current epoch, skipping the first `batch_index`."""
        for batch in self.batches()[batch_index:]:
            yield batch.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    def __len__(self) -> int:
        """This rank's batches per epoch."""
        return math.ceil(self.num_global_batches / self.num_replicas)
