"""Validation during training: teacher-forced loss and perplexity, then BLEU of real decoding.

`val_loss` is the plain cross-entropy per target token (no label smoothing), so
`val_ppl = exp(val_loss)`. BLEU decodes every validation sentence with the run's `decode` settings
(greedy by default) through the same code as `evaluate`. The loss runs under the training
autocast; decoding is bf16 on CUDA only: on the CPU it runs in float32, as `evaluate` does, so
validation BLEU is the figure evaluate reports (docs/benchmarks.md, "Presets").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from transformer_mt.config import TrainConfig
from transformer_mt.data.batching import TokenBucketSampler, collate
from transformer_mt.data.cache import PreparedData, SplitData
from transformer_mt.data.tokenize import Detokenizer
from transformer_mt.inference.search import Hypothesis
from transformer_mt.inference.translator import decode_ids, translate_ids
from transformer_mt.metrics import corpus_bleu
from transformer_mt.train.loss import token_loss_sum

log = logging.getLogger(__name__)


@dataclass
class Validation:
    """What a validation measured: metrics, and the hypotheses in split order."""

    metrics: dict[str, float]
    hypotheses: list[str]


class Validator:
    """The validation split of a run, batched once, and how to score a model on it."""

    def __init__(
        self,
        val: SplitData,
        data: PreparedData,
        cfg: TrainConfig,
        device: torch.device,
        amp: bool,
    ):
        self.val, self.device, self.amp = val, device, amp
        self.batches = TokenBucketSampler(
            val.src_lengths(), val.tgt_lengths(), cfg.data.max_tokens, shuffle=False
        ).batches()
        self.decode_cfg = dataclasses.replace(cfg.decode, batch_size=cfg.trainer.val_batch_size)
        self.tgt_vocab = data.tgt_vocab
        self.detokenizer = Detokenizer(cfg.data.tgt, data.tgt_subword)
        self.ban_unk = data.tgt_subword is not None  # subword vocabularies never train on UNK

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> Validation:
        """Score `model` on the whole split; it is left in the mode it was in."""
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for ids in self.batches:
            batch = collate([(i, self.val.src[i], self.val.tgt[i]) for i in ids]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(batch.src, batch.tgt_in)
            loss_sum += token_loss_sum(logits, batch.tgt_out)
            tokens += batch.num_tgt_tokens
        with self._decode_autocast():
            hypotheses = translate_ids(
                model, self.val.src, self.tgt_vocab, self.detokenizer, self.decode_cfg, self.device
            )
        model.train(was_training)
        val_loss = float(loss_sum) / max(tokens, 1)
        metrics = {
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_bleu": corpus_bleu(hypotheses, self.val.ref_text),
        }
        return Validation(metrics, hypotheses)

    def best_hypothesis(self, model: torch.nn.Module, index: int) -> Hypothesis:
        """The decoded translation of validation sentence `index` (token ids, no specials)."""
        sources = [self.val.src[index]]
        return decode_ids(model, sources, self.decode_cfg, self.device, self.ban_unk)[0][0]

    def _decode_autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.amp and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


def within_positions(split: SplitData, limit: int | None) -> SplitData:
    """`split` without the pairs a Transformer of `limit` positions cannot read or predict (a
    source with its EOS, a target with its BOS longer than `limit`), with a warning that counts
    them. Found when the data is loaded, so one long validation sentence never fails an epoch."""
    if limit is None:
        return split
    keep = np.flatnonzero((split.src_lengths() < limit) & (split.tgt_lengths() < limit))
    if len(keep) == len(split):
        return split
    log.warning(
        "%s: left out %d of %d pairs longer than model.max_positions=%d tokens "
        "(with BOS/EOS); raise model.max_positions to keep them",
        split.name,
        len(split) - len(keep),
        len(split),
        limit,
    )

    return split.select(keep)
