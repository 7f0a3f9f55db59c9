"""Greedy and beam search against fake decoders whose next-token probabilities are set by hand."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from transformer_mt.config import DecodeConfig
from transformer_mt.data.vocab import BOS, EOS, PAD, UNK
from transformer_mt.inference.search import (
    Hypothesis,
    beam_search,
    gnmt_penalty,
    greedy_search,
    max_output_lengths,
    search,
)

A, B, C = 4, 5, 6  # the fake target words
VOCAB_SIZE = 7

Table = Callable[[tuple[int, ...], tuple[int, ...]], dict[int, float]]


class FakeEncoderOutput:
    def __init__(self, src: torch.Tensor) -> None:
        self.src = src

    def index_select(self, rows: torch.Tensor) -> FakeEncoderOutput:
        return FakeEncoderOutput(self.src[rows])


class FakeCache:
    def __init__(self, batch_size: int) -> None:
        self.prefix = torch.empty(batch_size, 0, dtype=torch.long)

    def reorder(self, rows: torch.Tensor) -> None:
        self.prefix = self.prefix[rows]


class FakeModel:
    """A decoder whose next-token distribution is `table(source, prefix)`, prefix without BOS.

    Tokens the table does not name share the remaining probability; PAD and BOS get none. Every
    prefix the search asks about is recorded in `queries` as (source, prefix).
    """

    def __init__(self, table: Table) -> None:
        self.table = table
        self.queries: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def encode(self, src: torch.Tensor) -> FakeEncoderOutput:
        return FakeEncoderOutput(src)

    def init_cache(self, enc: FakeEncoderOutput) -> FakeCache:
        return FakeCache(enc.src.size(0))

    def decode(self, tokens, enc, cache=None):
        if cache is not None:
            assert tokens.size(1) == 1, "a cached step feeds one token"
            cache.prefix = torch.cat([cache.prefix, tokens], dim=1)
            prefixes = cache.prefix
        else:
            prefixes = tokens
        assert prefixes.size(0) == enc.src.size(0), "encoder rows follow the decoder rows"
        assert (prefixes[:, 0] == BOS).all()
        last = [self._logits(src, prefix) for src, prefix in zip(enc.src, prefixes, strict=True)]
        logits = torch.stack(last)[:, None, :]
        # The uncached path returns every position, as a real decoder does; only the last matters.
        return logits.expand(-1, tokens.size(1), -1)

    def _logits(self, src: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        source = tuple(t for t in src.tolist() if t != PAD)
        seen = tuple(prefix[1:].tolist())
        assert PAD not in seen and BOS not in seen
        self.queries.append((source, seen))
        probs = dict(self.table(source, seen))
        rest = [t for t in range(VOCAB_SIZE) if t not in probs and t not in (PAD, BOS)]
        left = 1.0 - sum(probs.values())
        for t in rest:
            probs[t] = left / len(rest)
        row = torch.full((VOCAB_SIZE,), float("-inf"))
        for t, p in probs.items():
            row[t] = math.log(p)
        return row


def sources(*lengths: int) -> torch.Tensor:
    """A right-padded batch of sources of these lengths (EOS included)."""
    src = torch.full((len(lengths), max(lengths)), PAD)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.arange(n - 1) + 10 + i
        src[i, n - 1] = EOS
    return src


# Greedy takes "a" (0.5) and then EOS: 0.5 * 0.34 = 0.17.
# The best sentence is "b c": 0.4 * 0.9 * 0.95 = 0.342, and a beam of 2 finds it.
def greedy_trap(source, prefix):
    return {
        (): {A: 0.5, B: 0.4, EOS: 0.05},
        (A,): {EOS: 0.34, A: 0.3, B: 0.26},
        (B,): {C: 0.9, EOS: 0.05},
        (B, C): {EOS: 0.95},
    }.get(prefix, {EOS: 0.9})


# "a" has the higher probability (0.5 * 0.6 = 0.3) but "b c" (0.4 * 0.8 * 0.875 = 0.28) is one token
# longer: with length penalty alpha = 1 it wins, log(0.28) / (8/6) > log(0.3) / (7/6).
def penalty_flip(source, prefix):
    return {
        (): {A: 0.5, B: 0.4, EOS: 0.01},
        (A,): {EOS: 0.6, A: 0.2, B: 0.1, C: 0.05},
        (B,): {C: 0.8},
        (B, C): {EOS: 0.875},
    }.get(prefix, {EOS: 0.9})


def never_ends(source, prefix):
    return {EOS: 1e-6, A: 0.6, B: 0.3}


def random_table(seed: int) -> Table:
    """A different, fixed random distribution for every (source, prefix)."""

    def table(source, prefix):
        rng = random.Random(hash((seed, source, prefix)))
        weights = [rng.random() ** 3 for _ in range(VOCAB_SIZE)]
        weights[EOS] *= 0.3 + 0.2 * len(prefix)  # longer prefixes tend to end
        weights[PAD] = weights[BOS] = 0.0
        total = sum(weights)
        return {t: w / total for t, w in enumerate(weights) if w > 0}

    return table


def test_greedy_takes_the_locally_best_token() -> None:
    assert greedy_search(FakeModel(greedy_trap), sources(3), 10, 1.0) == [[A]]


def test_beam_search_finds_the_best_sentence_and_its_score() -> None:
    [hyps] = beam_search(FakeModel(greedy_trap), sources(3), 2, 0.0, 10, 1.0, nbest=2)
    assert hyps[0].tokens == [B, C]
    assert hyps[0].score == pytest.approx(math.log(0.4 * 0.9 * 0.95), abs=1e-5)
    assert hyps[1].tokens == [A]
    assert hyps[1].score == pytest.approx(math.log(0.5 * 0.34), abs=1e-5)


def test_length_penalty_changes_the_winner() -> None:
    model = FakeModel(penalty_flip)
    [raw] = beam_search(model, sources(3), 2, 0.0, 10, 1.0)
    assert raw[0].tokens == [A]
    assert raw[0].score == pytest.approx(math.log(0.3), abs=1e-5)

    [normalised] = beam_search(model, sources(3), 2, 1.0, 10, 1.0)
    assert normalised[0].tokens == [B, C]
    assert normalised[0].score == pytest.approx(math.log(0.28) / (8 / 6), abs=1e-5)
    assert math.log(0.3) / gnmt_penalty(2, 1.0) < normalised[0].score


def test_gnmt_penalty() -> None:
    assert gnmt_penalty(1, 0.6) == pytest.approx(1.0)
    assert gnmt_penalty(7, 1.0) == pytest.approx(2.0)
    assert gnmt_penalty(30, 0.0) == 1.0


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_beam_of_one_equals_greedy(seed: int, use_cache: bool) -> None:
    model = FakeModel(random_table(seed))
    src = sources(2, 5, 3, 4)
    greedy = greedy_search(model, src, 3, 1.0, use_cache=use_cache)
    beam = beam_search(model, src, 1, 0.0, 3, 1.0, use_cache=use_cache)
    assert [hyps[0].tokens for hyps in beam] == greedy


@pytest.mark.parametrize("seed", range(4))
def test_cache_and_batching_do_not_change_the_result(seed: int) -> None:
    model = FakeModel(random_table(seed))
    src = sources(4, 2, 6)
    cached = beam_search(model, src, 3, 0.6, 4, 1.0, nbest=3)
    uncached = beam_search(model, src, 3, 0.6, 4, 1.0, nbest=3, use_cache=False)
    alone = [beam_search(model, src[i : i + 1], 3, 0.6, 4, 1.0, nbest=3)[0] for i in range(3)]
    assert cached == uncached == alone


@pytest.mark.parametrize("seed", range(4))
def test_nbest_is_sorted_and_distinct(seed: int) -> None:
    model = FakeModel(random_table(seed))
    for hyps in beam_search(model, sources(3, 5), 4, 0.6, 3, 1.0, nbest=4):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4


def test_nbest_scores_are_the_hypotheses_own_probabilities() -> None:
    model = FakeModel(random_table(7))
    src = sources(4)
    for hyp in beam_search(model, src, 4, 0.6, 3, 1.0, nbest=4)[0]:
        source = tuple(src[0].tolist())
        log_prob = 0.0
        for t, token in enumerate([*hyp.tokens, EOS]):
            log_prob += math.log(random_table(7)(source, tuple(hyp.tokens[:t]))[token])
        assert hyp.score == pytest.approx(log_prob / gnmt_penalty(len(hyp.tokens) + 1, 0.6))


def test_max_length_is_honoured() -> None:
    model = FakeModel(never_ends)
    src = sources(3, 5)  # max_len = 2 + 1 * source length = 5 and 7
    assert max_output_lengths(src, 2, 1.0) == [5, 7]
    assert [len(out) for out in greedy_search(model, src, 2, 1.0)] == [5, 7]
    for hyps, n in zip(beam_search(model, src, 3, 0.6, 2, 1.0, nbest=3), [5, 7], strict=True):
        assert [len(h.tokens) for h in hyps] == [n, n, n]
    assert max(len(prefix) for _, prefix in model.queries) == 7
    assert [len(out) for out in greedy_search(model, src, 2, 1.0, max_len_limit=4)] == [4, 4]
    assert greedy_search(model, src, 0, 0.0) == [[], []]
    assert [h.tokens for [h] in beam_search(model, src, 2, 0.6, 0, 0.0)] == [[], []]


def test_max_length_uses_a_plus_b_times_source_length() -> None:
    src = sources(4, 10)
    assert max_output_lengths(src, 10, 1.5) == [16, 25]
    assert max_output_lengths(src, 10, 1.5, limit=20) == [16, 20]


@pytest.mark.parametrize("seed", range(4))
def test_finished_hypotheses_are_never_extended(seed: int) -> None:
    model = FakeModel(random_table(seed))
    results = beam_search(model, sources(3, 4), 3, 0.6, 4, 1.0, nbest=3)
    assert all(len(hyps) == 3 for hyps in results)
    # An extended finished hypothesis would reach the decoder as a prefix holding EOS.
    assert model.queries
    assert all(EOS not in prefix for _, prefix in model.queries)


def test_done_sentences_leave_the_batch() -> None:
    def short_first(source, prefix):
        if len(source) == 2:  # sentence 0 ends at once
            return {EOS: 0.99}
        return {EOS: 1e-6, A: 0.6, B: 0.3}

    model = FakeModel(short_first)
    beam_search(model, sources(2, 3), 2, 0.6, 6, 0.0)
    # Sentence 0 has its two finished hypotheses after two steps, sentence 1 runs to max_len 6.
    lengths = {n: [len(p) for s, p in model.queries if len(s) == n] for n in (2, 3)}
    assert len(lengths[2]) == 4 and max(lengths[2]) == 1
    assert max(lengths[3]) == 6
    model.queries.clear()
    greedy_search(model, sources(2, 3), 6, 0.0)
    assert [p for s, p in model.queries if len(s) == 2] == [()]


def test_unknown_token_is_not_banned() -> None:
    def likes_unk(source, prefix):
        return {UNK: 0.9} if not prefix else {EOS: 0.9}

    assert greedy_search(FakeModel(likes_unk), sources(3), 10, 1.0) == [[UNK]]
    [[best]] = beam_search(FakeModel(likes_unk), sources(3), 2, 0.6, 10, 1.0)
    assert best == Hypothesis([UNK], pytest.approx(math.log(0.81) / gnmt_penalty(2, 0.6)))


def test_ban_unk_takes_the_best_other_token() -> None:
    """Subword vocabularies never train on UNK: with `ban_unk` the search passes over it."""

    def likes_unk(source, prefix):
        return {UNK: 0.9, B: 0.06} if not prefix else {EOS: 0.9}

    model = FakeModel(likes_unk)
    assert greedy_search(model, sources(3), 10, 1.0, ban_unk=True) == [[B]]
    hyps = beam_search(model, sources(3), 2, 0.6, 10, 1.0, nbest=2, ban_unk=True)
    assert all(UNK not in h.tokens for h in hyps[0])
    assert hyps[0][0].tokens == [B]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_search_passes_ban_unk_to_either_search(beam_size: int, use_cache: bool) -> None:
    """UNK is the most probable token at every step; `search` must keep it out under both."""

    def always_unk(source, prefix):
        # The source's EOS counts in its length: a source of n tokens is best answered by n - 1 A's.
        return {UNK: 0.5, EOS: 0.45} if len(prefix) + 1 >= len(source) else {UNK: 0.5, A: 0.45}

    model = FakeModel(always_unk)
    cfg = DecodeConfig(beam_size=beam_size, nbest=beam_size, length_penalty=0.6)
    nbest = search(model, sources(2, 5, 3), cfg, use_cache=use_cache, ban_unk=True)
    assert [len(hyps) for hyps in nbest] == [beam_size] * 3
    assert all(UNK not in h.tokens for hyps in nbest for h in hyps)
    assert [hyps[0].tokens for hyps in nbest] == [[A], [A] * 4, [A] * 2]
