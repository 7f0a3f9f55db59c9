import torch

from transformer_mt.data.batching import (
    Batch,
    PairDataset,
    TokenBucketSampler,
    collate,
)
from transformer_mt.data.buckets import (
    fixed_size_batches,
    padding_report,
    padding_share,
    token_batches,
)
from transformer_mt.data.cache import SplitData
from transformer_mt.data.dataset import load_prepared
from transformer_mt.data.vocab import BOS, EOS, PAD

MAX_PADDING_SHARE = 0.10


def _lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 60, (n,), generator=generator)
    tgt = (src.float() * 1.2 + torch.randint(-3, 4, (n,), generator=generator)).clamp(min=0).long()
    return src.tolist(), tgt.tolist()


def _padded_size(batch, src_lengths, tgt_lengths) -> int:
    return len(batch) * max(max(src_lengths[i], tgt_lengths[i]) + 1 for i in batch)


# ---------------------------------------------------------------------------------------------
# collate / Batch


def test_collate_adds_specials_and_pads_to_the_longest_sequence():
    batch = collate([(7, [10, 11, 12], [20]), (2, [13], [21, 22, 23, 24])])
    assert batch.src.tolist() == [[10, 11, 12, EOS], [13, EOS, PAD, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 20, PAD, PAD, PAD], [BOS, 21, 22, 23, 24]]
    assert batch.tgt_out.tolist() == [[20, EOS, PAD, PAD, PAD], [21, 22, 23, 24, EOS]]
    assert batch.src_lengths.tolist() == [4, 2]
    assert batch.tgt_lengths.tolist() == [2, 5]
    assert batch.indices.tolist() == [7, 2]
    assert batch.num_tgt_tokens == 7 == int((batch.tgt_out != PAD).sum())
    assert batch.src_pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert batch.src.dtype == batch.tgt_in.dtype == torch.long
    assert len(batch) == 2


def test_collate_handles_empty_sentences():
    batch = collate([(0, [], [])])
    assert batch.src.tolist() == [[EOS]] and batch.tgt_in.tolist() == [[BOS]]
    assert batch.tgt_out.tolist() == [[EOS]]


def test_batch_to_moves_every_tensor_and_keeps_the_count():
    batch = collate([(0, [4, 5], [6])]).to("cpu")
    assert isinstance(batch, Batch) and batch.num_tgt_tokens == 2
    if torch.cuda.is_available():
        moved = batch.to("cuda")
        assert moved.src.is_cuda and moved.indices.is_cuda


# ---------------------------------------------------------------------------------------------
# TokenBucketSampler


def test_every_example_once_and_every_batch_within_the_budget():
    src, tgt = _lengths(3000)
    src[5], tgt[9] = 500, 700  # longer than the budget on their own
    sampler = TokenBucketSampler(src, tgt, max_tokens=400)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    assert len(batches) == len(sampler) == sampler.num_global_batches
    for batch in batches:
        assert _padded_size(batch, src, tgt) <= 400 or len(batch) == 1
    assert [5] in batches and [9] in batches


def test_same_seed_and_epoch_give_the_same_batches_and_a_new_epoch_reshuffles():
    src, tgt = _lengths(2000)
    a = TokenBucketSampler(src, tgt, max_tokens=500, seed=3)
    b = TokenBucketSampler(src, tgt, max_tokens=500, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    assert sorted(map(sorted, second)) != sorted(
        map(sorted, first)
    )  # ties regrouped, not only reordered
    assert len(second) == len(first)
    assert list(TokenBucketSampler(src, tgt, max_tokens=500, seed=4)) != first


def test_without_shuffle_batches_come_in_length_order_every_epoch():
    src, tgt = _lengths(500)
    sampler = TokenBucketSampler(src, tgt, max_tokens=300, shuffle=False)
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first
    firsts = [src[b[0]] for b in first]
    assert firsts == sorted(firsts)


def test_ddp_ranks_get_equal_shares_of_one_global_batch_list():
    src, tgt = _lengths(1000)
    single = TokenBucketSampler(src, tgt, max_tokens=600, seed=1)
    ranks = [
        TokenBucketSampler(src, tgt, max_tokens=600, seed=1, num_replicas=3, rank=r)
        for r in range(3)
    ]
    for sampler in ranks:
        sampler.set_epoch(2)
    single.set_epoch(2)
    shards = [list(s) for s in ranks]
    assert len({len(shard) for shard in shards}) == 1 == len({len(s) for s in ranks})
    global_batches = [batch.tolist() for batch in single.batches()]
    interleaved = [shards[step % 3][step // 3] for step in range(3 * len(shards[0]))]
    assert interleaved[: len(global_batches)] == global_batches
    assert set(map(tuple, interleaved[len(global_batches) :])) <= set(map(tuple, global_batches))


def test_a_resumed_epoch_sees_exactly_the_remaining_batches():
    src, tgt = _lengths(1500)
    sampler = TokenBucketSampler(src, tgt, max_tokens=500, seed=7)
    sampler.set_epoch(4)
    full = list(sampler)
    resumed = TokenBucketSampler(src, tgt, max_tokens=500, seed=7)  # a new process, same seed
    resumed.set_epoch(4)
    assert list(resumed.iter_from(10)) == full[10:]
    assert len(resumed) == len(full)
    resumed.set_epoch(5)
    sampler.set_epoch(5)
    assert list(resumed) == list(sampler)


def test_collated_batches_cover_the_split_within_the_budget():
    split = SplitData(
        "toy", [[4] * (i % 7) for i in range(50)], [[5] * (i % 5 + 1) for i in range(50)]
    )
    assert PairDataset(split)[3] == (3, [4, 4, 4], [5, 5, 5, 5])
    sampler = TokenBucketSampler(split.src_lengths(), split.tgt_lengths(), max_tokens=40)
    seen = []
    dataset = PairDataset(split)
    for batch in (collate([dataset[i] for i in ids]) for ids in sampler):
        assert batch.src.shape[0] * max(batch.src.shape[1], batch.tgt_in.shape[1]) <= 40
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(50))


def test_every_epoch_has_the_padding_of_the_unshuffled_batches():
    src, tgt = _lengths(2000)
    sampler = TokenBucketSampler(src, tgt, max_tokens=500, seed=2)
    unshuffled = [batch.tolist() for batch in token_batches(src, tgt, max_tokens=500)]
    assert list(TokenBucketSampler(src, tgt, max_tokens=500, shuffle=False)) == unshuffled
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = sampler.batches()
        assert padding_share(src, tgt, batches) == padding_share(src, tgt, unshuffled)
        assert sorted(map(len, batches)) == sorted(map(len, unshuffled))


def test_padding_share_counts_pad_positions():
    # Source lengths 1 and 3 (+EOS: 2, 4), target 2 and 2 (+1: 3, 3): 2 of 14 positions are PAD.
    assert padding_share([1, 3], [2, 2], [[0, 1]]) == 2 / 14
    assert padding_share([1, 3], [2, 2], [[0], [1]]) == 0.0
    assert sorted(i for b in fixed_size_batches(10, 4, seed=1) for i in b) == list(range(10))


def test_multi30k_padding_share_is_small_with_token_buckets(multi30k_de_en):
    train = load_prepared(multi30k_de_en).splits["train"]
    report = padding_report(train, max_tokens=4096)
    message = (
        f"Multi30k de-en train, max_tokens=4096: {report.bucket_share:.1%} padding in {report.num_batches} "
        f"token-budget batches ({report.mean_sentences:.1f} sentences each) vs {report.fixed_share:.1%} "
        f"in fixed batches of {report.fixed_batch_size} random sentences"
    )
    print(message)
    assert report.bucket_share < MAX_PADDING_SHARE, message
    assert report.fixed_share > 3 * report.bucket_share, message
