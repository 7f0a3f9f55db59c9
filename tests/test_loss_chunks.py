"""The training step's output projection and loss in chunks of target tokens
(`trainer.loss_chunk_tokens`): the same loss and the same gradients as the whole batch at once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_support import padded_batch, seeded_model

from transformer_mt.config import ModelConfig, TrainConfig
from transformer_mt.train import step as step_module
from transformer_mt.train.distributed import DistInfo
from transformer_mt.train.loss import backward_in_chunks, token_loss_sum
from transformer_mt.train.optim import build_optimizer
from transformer_mt.train.step import Step

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TRANSFORMER = ModelConfig(
    name="tiny", d_model=16, n_heads=2, enc_layers=2, dec_layers=2, d_ff=32, dropout=0.0
)
RNN = ModelConfig(name="rnn", arch="rnn", d_model=16, enc_layers=1, dec_layers=1, dropout=0.0)
SCALE = 0.25


def loss_and_gradients(model: torch.nn.Module, chunk_tokens: int) -> tuple[torch.Tensor, dict]:
    src, tgt = padded_batch()
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    model.zero_grad(set_to_none=True)
    if chunk_tokens:
        states = model.features(src, tgt_in)
        loss = backward_in_chunks(states, model.output_proj, tgt_out, 0.1, SCALE, chunk_tokens)
    else:
        loss = token_loss_sum(model(src, tgt_in), tgt_out, 0.1)
        (loss * SCALE).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", [TRANSFORMER, RNN], ids=["transformer", "rnn"])
@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 100])
def test_chunked_loss_and_gradients_equal_the_whole_batch(cfg, chunk_tokens):
    model = seeded_model(cfg)
    whole_loss, whole_grads = loss_and_gradients(model, 0)
    loss, grads = loss_and_gradients(model, chunk_tokens)
    torch.testing.assert_close(loss, whole_loss)
    assert grads.keys() == whole_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], msg=name)


def test_a_step_in_chunks_leaves_the_weights_of_a_whole_batch_step(monkeypatch):
    chunked_calls = []

    def spy(*args):
        chunked_calls.append(args[-1])
        return backward_in_chunks(*args)

    monkeypatch.setattr(step_module, "backward_in_chunks", spy)

    class OneBatch:
        src, tgt = padded_batch()
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
        num_tgt_tokens = int(tgt_out.ne(0).sum())

        def to(self, device):
            return self

    weights, losses = [], []
    for chunk_tokens in (0, 4):
        cfg = TrainConfig(model=TRANSFORMER)
        cfg.trainer = dataclasses.replace(cfg.trainer, loss_chunk_tokens=chunk_tokens)
        model = seeded_model(TRANSFORMER).train()
        device = torch.device("cpu")
        step = Step(
            model, build_optimizer(model, cfg.optim, device), cfg, DistInfo(), device, False
        )
        losses.append(step([OneBatch()], 1, 1e-3))
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    assert chunked_calls == [4]  # the second step only, in chunks of 4 tokens
    torch.testing.assert_close(losses[1], losses[0])
    for name, weight in weights[1].items():
        torch.testing.assert_close(weight, weights[0][name], msg=name)
    assert any(
        not torch.equal(w, seeded_model(TRANSFORMER).state_dict()[n]) for n, w in weights[0].items()
    )
