"""Dropout drawn four units to a 64-bit random word (model/dropout.py) behaves as F.dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformer_mt.config import ModelConfig
from transformer_mt.model import build_model
from transformer_mt.model.dropout import Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_unit_is_kept_with_probability_one_minus_p_and_scaled(p, dtype):
    torch.manual_seed(0)
    x = torch.rand(50_000, 4, dtype=dtype) + 1.0  # never 0, so a 0 out means dropped
    y = dropout(x, p)
    kept = y != 0
    # Each of the four units that share a 64-bit draw (the columns) on its own: 4.5 standard
    # deviations of a binomial count of 50,000.
    bound = 4.5 * (p * (1 - p) / 50_000) ** 0.5
    for lane in range(4):
        assert abs(kept[:, lane].float().mean().item() - (1 - p)) < bound
    expected = (x.float() / (1 - p)).to(dtype)
    torch.testing.assert_close(y[kept], expected[kept], rtol=1e-2, atol=0)
    assert y.dtype == dtype and y.shape == x.shape


def test_units_are_dropped_independently_of_their_neighbours():
    torch.manual_seed(1)
    kept = (dropout(torch.ones(200_000), 0.5) != 0).float()
    both = (kept[:-1] * kept[1:]).mean().item()  # two neighbours kept: 1/4 if independent
    assert abs(both - 0.25) < 0.006


def test_the_gradient_goes_through_the_kept_units_only_scaled_alike():
    torch.manual_seed(2)
    x = torch.randn(64, 37, requires_grad=True)
    upstream = torch.randn(64, 37)
    y = dropout(x, 0.3)
    y.backward(upstream)
    mask = (y != 0).float() / 0.7
    torch.testing.assert_close(x.grad, upstream * mask)


def test_outside_training_or_at_p_0_the_input_comes_back_untouched():
    x = torch.randn(8, 5)
    assert dropout(x, 0.4, training=False) is x
    assert dropout(x, 0.0) is x
    module = Dropout(0.4).eval()
    assert module(x) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0


def test_masks_follow_the_global_seed_and_differ_from_call_to_call():
    torch.manual_seed(3)
    first, second = dropout(torch.ones(1000), 0.5), dropout(torch.ones(1000), 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(torch.ones(1000), 0.5), first)
    assert not torch.equal(first, second)


def test_the_model_drops_with_it_and_keeps_nn_dropout_s_interface():
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, enc_layers=1, dec_layers=1, dropout=0.25)
    model = build_model(cfg, 50, 50)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) and m.p == 0.25 for m in drops)
    src, tgt = torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 6))
    model.train()
    assert not torch.equal(model(src, tgt), model(src, tgt))
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


def test_on_the_same_units_it_matches_f_dropout_in_expectation():
    """The mean and variance of the output are F.dropout's: E[y] = x, Var[y] = x² p / (1 - p)."""
    torch.manual_seed(4)
    x = torch.full((400_000,), 2.0)
    ours, theirs = dropout(x, 0.2), F.dropout(x, 0.2)
    for y in (ours, theirs):
        assert abs(y.mean().item() - 2.0) < 0.01
        assert abs(y.var().item() - 4.0 * 0.2 / 0.8) < 0.02
