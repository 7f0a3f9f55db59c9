"""Greedy and batched beam search over the decoder's key/value cache.

Both searches work with any model that has the `Seq2Seq` interface (docs/design.md): the Transformer
and the RNN baseline alike.

    enc = model.encode(src)                    # src (B,S), right-padded, each row ends with EOS
    cache = model.init_cache(enc)
    logits = model.decode(tokens, enc, cache)  # tokens (N,1): one new step; the cache grows
    cache.reorder(rows); enc = enc.index_select(rows)

Conventions shared by both searches:

- The output of a sentence is a list of token ids without BOS and without EOS.
- `max_len = floor(max_len_a + max_len_b * source_length)` per sentence, where source_length counts the
  source tokens as fed to the encoder (its final EOS included). An output holds at most `max_len`
  tokens: a hypothesis that reaches it without choosing EOS is ended there, with the log-probability of
  EOS after its last token added to its score (as if the model had been made to say EOS).
- PAD and BOS are never generated. With a word vocabulary UNK is *not* banned: a model that predicts
  it gets `<unk>` in its output, which shows the user where its vocabulary fell short instead of
  hiding it behind a worse word. With subwords (`ban_unk=True`) UNK is never a training target, so
  it is never generated either: any word can be spelled in pieces.
- `use_cache=False` feeds the whole prefix to the decoder at every step instead of one token (O(t^2)
  work instead of O(t)); it exists to check and to measure the cache, and gives the same result.

Beam search keeps, per sentence, `beam_size` live hypotheses ranked by their summed log-probability.
Every step each live hypothesis is extended by every token; of the best 2*K candidates, those that end
in EOS and rank among the best K are finished: they leave the beam for good (they are never extended
again) with the score `log_prob / lp`, where lp is the GNMT length penalty
`((5 + length) / 6) ** length_penalty` and length counts the tokens with the final EOS. The best K
candidates that do not end in EOS form the next beam. A sentence is done once it has K finished
hypotheses (or reaches its max_len); its rows then leave the batch, and the search stops as soon as every
sentence is done. The n-best list is the finished hypotheses sorted by score, best first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from transformer_mt.data.vocab import BOS, EOS, PAD, UNK

NEG_INF = float("-inf")


@dataclass
class Hypothesis:
    """One finished translation: token ids (no BOS/EOS) and its length-normalised log-probability."""

    tokens: list[int]
    score: float


def gnmt_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; a hypothesis scores log_prob / penalty."""
    return ((5.0 + length) / 6.0) ** alpha


def max_output_lengths(
    src: Tensor, max_len_a: float, max_len_b: float, limit: int | None = None
) -> list[int]:
    """Longest output of each sentence: floor(a + b * source length), at most `limit` if given.

    Shape: src (B,S) right-padded with PAD → B ints.
    """
    source_lengths = (src != PAD).sum(dim=1).tolist()
    lengths = [int(max_len_a + max_len_b * n) for n in source_lengths]
    if limit is not None:
        lengths = [min(n, limit) for n in lengths]
    return lengths


class _Decoder:
    """The model's decoder seen one step at a time, with or without its key/value cache.

    Holds the encoder output and cache of the rows still being decoded; `keep(rows)` selects (and
    reorders) rows, so finished rows leave the batch and beams follow their parents.
    """

    def __init__(self, model: Any, enc: Any, use_cache: bool, ban_unk: bool = False) -> None:
        self.model = model
        self.enc = enc
        self.cache = model.init_cache(enc) if use_cache else None
        self.banned = [PAD, BOS, UNK] if ban_unk else [PAD, BOS]

    def log_probs(self, prefix: Tensor) -> Tensor:
        """Log-probabilities of the next token. Shape: prefix (N,t) starting with BOS → (N,V)."""
        if self.cache is None:
            logits = self.model.decode(prefix, self.enc)[:, -1]
        else:
            logits = self.model.decode(prefix[:, -1:], self.enc, self.cache)[:, -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        log_probs[:, self.banned] = NEG_INF
        return log_probs

    def keep(self, rows: Tensor, batch_changed: bool = True) -> None:
        """Continue with these rows of the current batch (a subset, repeats allowed, any order).

        The encoder output only needs selecting when sentences leave or join the batch
        (`batch_changed`); beams of one sentence share it.
        """
        if self.cache is not None:
            self.cache.reorder(rows)
        if batch_changed:
            self.enc = self.enc.index_select(rows)


def _force_eos(log_probs: Tensor, must_end: Tensor) -> None:
    """Leave EOS as the only possible next token of the rows where `must_end` (N,) is True."""
    eos = log_probs[:, EOS].clone()
    log_probs[must_end] = NEG_INF
    log_probs[:, EOS] = eos


@torch.inference_mode()
def greedy_search(
    model: Any,
    src: Tensor,
    max_len_a: float,
    max_len_b: float,
    use_cache: bool = True,
    max_len_limit: int | None = None,
    ban_unk: bool = False,
) -> list[list[int]]:
    """The most probable next token at every step, for a batch of sentences.

    Args:
        model: an encoder-decoder with the `Seq2Seq` interface, in eval mode.
        src: (B,S) source ids, right-padded with PAD, each row ending with EOS.
        max_len_a, max_len_b: output length limit `max_len_a + max_len_b * source_length`.
        use_cache: False recomputes the whole prefix each step (same output, slower).
        max_len_limit: a hard cap on the output length (the model's positional table, for example).
        ban_unk: never generate UNK (subword vocabularies).

    Returns:
        B lists of token ids, without BOS and EOS, in the order of `src`.
    """
    max_lens = max_output_lengths(src, max_len_a, max_len_b, max_len_limit)
    outputs: list[list[int]] = [[] for _ in max_lens]
    rows = [i for i, n in enumerate(max_lens) if n > 0]  # sentence of each row still decoding
    if not rows:
        return outputs
    enc = model.encode(src)
    if len(rows) < len(max_lens):
        enc = enc.index_select(_index(rows, src))
    decoder = _Decoder(model, enc, use_cache, ban_unk)
    prefix = torch.full((len(rows), 1), BOS, dtype=torch.long, device=src.device)
    while rows:
        next_tokens = decoder.log_probs(prefix).argmax(dim=-1)
        still = []
        for row, (sentence, token) in enumerate(zip(rows, next_tokens.tolist(), strict=True)):
            if token == EOS:
                continue
            outputs[sentence].append(token)
            if len(outputs[sentence]) < max_lens[sentence]:
                still.append(row)
        if len(still) < len(rows):
            if not still:
                break
            keep = _index(still, src)
            decoder.keep(keep)
            prefix, next_tokens = prefix[keep], next_tokens[keep]
            rows = [rows[r] for r in still]
        prefix = torch.cat([prefix, next_tokens[:, None]], dim=1)
    return outputs


def _index(values: list[int], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)


@dataclass
class _Beams:
    """The live hypotheses of the sentences still being searched, K rows per sentence.

    Shapes: N = len(sentences) * K rows; prefix (N,t) starts with BOS; scores (N,) summed log-probs.
    """

    sentences: list[int]  # index in the input batch of each sentence still searched
    prefix: Tensor
    scores: Tensor


def _start_beams(batch_size: int, beam_size: int, device: torch.device) -> _Beams:
    """K copies of the empty prefix per sentence; all but the first score -inf, so the first step
    expands a single hypothesis instead of K identical ones."""
    scores = torch.full((batch_size, beam_size), NEG_INF, device=device)
    scores[:, 0] = 0.0
    prefix = torch.full((batch_size * beam_size, 1), BOS, dtype=torch.long, device=device)
    return _Beams(list(range(batch_size)), prefix, scores.view(-1))


def _top_candidates(
    beams: _Beams, log_probs: Tensor, beam_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The best 2K extensions of each sentence's beam, best first.

    Returns (scores, parent beam, token), each (n, 2K). Two K guarantee K candidates that do not end
    in EOS, since at most one extension per parent is EOS.
    """
    n = len(beams.sentences)
    vocab_size = log_probs.size(-1)
    candidates = (beams.scores[:, None] + log_probs).view(n, beam_size * vocab_size)
    scores, flat = candidates.topk(min(2 * beam_size, beam_size * vocab_size), dim=1)
    return scores, flat // vocab_size, flat % vocab_size


def _finish(
    beams: _Beams,
    scores: Tensor,
    parents: Tensor,
    tokens: Tensor,
    beam_size: int,
    alpha: float,
    finished: list[list[Hypothesis]],
) -> None:
    """Move the EOS candidates that rank among the best K into their sentence's finished list."""
    rank = torch.arange(scores.size(1), device=scores.device)
    ends = (tokens == EOS) & (rank < beam_size) & torch.isfinite(scores)
    for i, k in ends.nonzero().tolist():
        row = i * beam_size + parents[i, k].item()
        output = beams.prefix[row, 1:].tolist()
        score = scores[i, k].item() / gnmt_penalty(len(output) + 1, alpha)
        finished[beams.sentences[i]].append(Hypothesis(output, score))


def _advance(
    beams: _Beams, scores: Tensor, parents: Tensor, tokens: Tensor, beam_size: int
) -> tuple[_Beams, Tensor]:
    """The next beam: per sentence the best K candidates that do not end in EOS.

    Returns the new beams and, for each of their rows, the row of its parent in the old beams.
    """
    # A stable sort on "is EOS" keeps the rank order among the other candidates.
    keep = torch.argsort((tokens == EOS).int(), dim=1, stable=True)[:, :beam_size]
    offsets = torch.arange(len(beams.sentences), device=scores.device)[:, None] * beam_size
    parent_rows = (parents.gather(1, keep) + offsets).view(-1)
    prefix = torch.cat([beams.prefix[parent_rows], tokens.gather(1, keep).view(-1, 1)], dim=1)
    return _Beams(beams.sentences, prefix, scores.gather(1, keep).view(-1)), parent_rows


def _drop_done(
    beams: _Beams, parent_rows: Tensor, done: list[bool], beam_size: int
) -> tuple[_Beams, Tensor]:
    """Remove the rows of sentences that are done. Returns the beams and the parent rows kept."""
    alive = [i for i, is_done in enumerate(done) if not is_done]
    rows = torch.tensor(
        [i * beam_size + k for i in alive for k in range(beam_size)],
        dtype=torch.long,
        device=beams.prefix.device,
    )
    sentences = [beams.sentences[i] for i in alive]
    return _Beams(sentences, beams.prefix[rows], beams.scores[rows]), parent_rows[rows]


@torch.inference_mode()
def beam_search(
    model: Any,
    src: Tensor,
    beam_size: int,
    length_penalty: float,
    max_len_a: float,
    max_len_b: float,
    nbest: int = 1,
    use_cache: bool = True,
    max_len_limit: int | None = None,
    ban_unk: bool = False,
) -> list[list[Hypothesis]]:
    """Batched beam search (see the module docstring for the exact rules).

    Args:
        model: an encoder-decoder with the `Seq2Seq` interface, in eval mode.
        src: (B,S) source ids, right-padded with PAD, each row ending with EOS.
        beam_size: K, live hypotheses per sentence.
        length_penalty: GNMT alpha; 0 ranks finished hypotheses by their raw log-probability.
        max_len_a, max_len_b: output length limit `max_len_a + max_len_b * source_length`.
        nbest: hypotheses returned per sentence (at most `beam_size`).
        use_cache: False recomputes the whole prefix each step (same output, slower).
        max_len_limit: a hard cap on the output length (the model's positional table, for example).
        ban_unk: never generate UNK (subword vocabularies).

    Returns:
        For each sentence, in the order of `src`, up to `nbest` hypotheses sorted by score, best
        first. Fewer only when the vocabulary is too small to finish `nbest` different ones.
    """
    batch_size = src.size(0)
    max_lens = max_output_lengths(src, max_len_a, max_len_b, max_len_limit)
    finished: list[list[Hypothesis]] = [[] for _ in range(batch_size)]
    beams = _start_beams(batch_size, beam_size, src.device)
    expand = torch.arange(batch_size, device=src.device).repeat_interleave(beam_size)
    decoder = _Decoder(model, model.encode(src).index_select(expand), use_cache, ban_unk)
    step = 0  # tokens in every live prefix, BOS not counted
    while beams.sentences:
        log_probs = decoder.log_probs(beams.prefix)
        at_limit = [max_lens[s] <= step for s in beams.sentences]
        if any(at_limit):
            must_end = torch.tensor(at_limit, device=src.device).repeat_interleave(beam_size)
            _force_eos(log_probs, must_end)
        candidates = _top_candidates(beams, log_probs, beam_size)
        _finish(beams, *candidates, beam_size, length_penalty, finished)
        beams, parent_rows = _advance(beams, *candidates, beam_size)
        done = [
            end or len(finished[s]) >= beam_size
            for s, end in zip(beams.sentences, at_limit, strict=True)
        ]
        if any(done):
            if all(done):
                break
            beams, parent_rows = _drop_done(beams, parent_rows, done, beam_size)
        decoder.keep(parent_rows, batch_changed=any(done))
        step += 1
    return [sorted(hyps, key=lambda h: -h.score)[:nbest] for hyps in finished]


def search(
    model: Any,
    src: Tensor,
    cfg: Any,
    use_cache: bool = True,
    max_len_limit: int | None = None,
    ban_unk: bool = False,
) -> list[list[Hypothesis]]:
    """Decode with a `DecodeConfig`: greedy when beam_size is 1, beam search otherwise.

    Greedy hypotheses carry the score 0.0 (greedy search does not rank alternatives).
    """
    if cfg.beam_size == 1:
        outputs = greedy_search(
            model, src, cfg.max_len_a, cfg.max_len_b, use_cache, max_len_limit, ban_unk
        )
        return [[Hypothesis(tokens, 0.0)] for tokens in outputs]
    return beam_search(
        model,
        src,
        cfg.beam_size,
        cfg.length_penalty,
        cfg.max_len_a,
        cfg.max_len_b,
        cfg.nbest,
        use_cache,
        max_len_limit,
        ban_unk,
    )
