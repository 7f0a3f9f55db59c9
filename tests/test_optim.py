"""Optimizer, learning-rate schedule and loss: small pure functions, checked on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from transformer_mt.config import OptimConfig, TrainerConfig
from transformer_mt.data.vocab import PAD
from transformer_mt.errors import ConfigError
from transformer_mt.train.loss import token_loss_sum
from transformer_mt.train.optim import (
    PlateauSchedule,
    build_optimizer,
    is_improvement,
    param_groups,
    set_lr,
    warmup_lr,
)
from transformer_mt.train.state import Progress
from transformer_mt.train.stopping import budget_used


def test_warmup_is_linear_then_flat():
    peak, warmup = 1e-3, 100
    rates = [warmup_lr(step, peak, warmup) for step in range(1, 301)]
    for step, rate in enumerate(rates[:warmup], start=1):
        assert rate == pytest.approx(peak * step / warmup)
    assert rates[warmup - 1] == pytest.approx(peak)
    assert all(rate == pytest.approx(peak) for rate in rates[warmup:])
    assert warmup_lr(1, peak, 0) == peak  # no warmup: peak from the first step


def _schedule(**overrides) -> PlateauSchedule:
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, plateau_factor=0.5, plateau_patience=2, min_lr=1e-4)
    schedule = PlateauSchedule.from_config(cfg, monitor="val_bleu")
    for key, value in overrides.items():
        setattr(schedule, key, value)
    return schedule


def test_plateau_drops_by_factor_after_patience_epochs_without_improvement():
    schedule = _schedule()
    assert schedule.lr(5) == pytest.approx(5e-4)  # still warming up
    # Epoch BLEU: improves, improves, stalls, stalls (→ drop), improves, stalls, stalls (→ drop).
    bleu = [10.0, 12.0, 11.0, 12.0, 13.0, 13.0, 12.5]
    levels = []
    for value in bleu:
        schedule.record(value)
        levels.append(schedule.lr(1000))
    assert levels == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4])


def test_plateau_respects_min_lr_and_loss_direction():
    schedule = _schedule(patience=0)
    schedule.monitor = "val_loss"
    schedule.record(3.0)
    assert schedule.lr(1000) == pytest.approx(1e-3)
    schedule.record(2.5)  # lower loss: an improvement
    assert schedule.lr(1000) == pytest.approx(1e-3)
    for _ in range(10):
        schedule.record(2.6)
    assert schedule.lr(1000) == pytest.approx(1e-4)  # floored at min_lr


def test_warmup_after_a_drop_scales_from_the_lowered_level():
    schedule = _schedule(patience=0)
    schedule.record(5.0)
    schedule.record(4.0)  # drop to 5e-4 while still inside the warmup
    assert schedule.lr(5) == pytest.approx(5e-4 * 5 / 10)


def test_schedule_state_round_trips():
    schedule = _schedule()
    for value in (10.0, 9.0, 8.0):
        schedule.record(value)
    restored = _schedule()
    restored.load_state_dict(schedule.state_dict())
    assert (restored.level, restored.best, restored.bad_validations) == (5e-4, 10.0, 0)
    for value in (7.0, 6.0):
        assert restored.record(value) == schedule.record(value)
    assert restored.lr(100) == schedule.lr(100)


def test_linear_decay_falls_from_the_peak_to_min_lr_over_the_budget_left_after_warmup():
    schedule = _schedule(decay="linear")
    assert schedule.lr(5, used=0.05) == pytest.approx(5e-4)  # warmup as with plateau
    assert schedule.lr(10, used=0.1) == pytest.approx(1e-3)  # the peak at the end of warmup
    # Warmup ended at 10 % of the budget: half the rest spent leaves half the peak.
    assert schedule.lr(11, used=0.1) == pytest.approx(1e-3)
    assert schedule.lr(500, used=0.55) == pytest.approx(5e-4)
    assert schedule.lr(900, used=0.95) == pytest.approx(1e-4)  # floored at min_lr
    assert schedule.lr(1000, used=1.0) == pytest.approx(1e-4)
    for value in (10.0, 9.0, 8.0, 7.0):  # a stalled metric never lowers it further
        assert not schedule.record(value)
    assert schedule.lr(500, used=0.55) == pytest.approx(5e-4)
    restored = _schedule(decay="linear")
    restored.load_state_dict(schedule.state_dict())  # the decay start survives a resume
    assert restored.lr(700, used=0.7) == schedule.lr(700, used=0.7) == pytest.approx(1e-3 / 3)


def test_linear_decay_over_a_time_budget_follows_the_training_clock():
    """The presets' path: `trainer.max_time` with `max_epochs` far off. The rate falls with the
    training seconds spent, as the trainer computes it (`lr(step, budget_used(...))`); a resume
    restores the schedule and the seconds its checkpoint recorded, so the time between the stop
    and the resume does not count."""
    tc = TrainerConfig(max_time=10.0, max_epochs=1000)  # minutes
    schedule = _schedule(decay="linear")

    def lr(step: int, seconds: float, sched: PlateauSchedule = schedule) -> float:
        return sched.lr(step, budget_used(step, seconds, tc, steps_per_epoch=100))

    assert budget_used(10, 60.0, tc, steps_per_epoch=100) == pytest.approx(0.1)
    assert lr(10, 60.0) == pytest.approx(1e-3)  # warmup ends after 1 of the 10 minutes
    assert lr(11, 60.0) == pytest.approx(1e-3)
    # Half of the 9 minutes left after warmup: half the peak, whatever the step count.
    assert lr(50, 330.0) == pytest.approx(5e-4)
    assert lr(5000, 330.0) == pytest.approx(5e-4)
    assert lr(60, 570.0) == pytest.approx(1e-4)  # floored at min_lr near the end
    # Stopped at 5.5 minutes and resumed: the progress carries the seconds, the schedule its start.
    progress = Progress.from_state_dict(Progress(step=50, train_seconds=330.0).state_dict())
    resumed = _schedule(decay="linear")
    resumed.load_state_dict(schedule.state_dict())
    assert lr(51, progress.train_seconds, resumed) == pytest.approx(5e-4)
    assert lr(52, progress.train_seconds + 90.0, resumed) == pytest.approx(1e-3 / 3)  # 7 of 10


def test_unknown_decay_is_refused_by_name():
    with pytest.raises(ConfigError, match="optim.decay must be one of plateau, linear"):
        OptimConfig(decay="cosine")


def test_is_improvement_ignores_non_finite():
    assert is_improvement(1.0, None, "val_bleu")
    assert is_improvement(2.0, 1.0, "val_bleu") and not is_improvement(1.0, 2.0, "val_bleu")
    assert is_improvement(1.0, 2.0, "val_loss") and not is_improvement(2.0, 1.0, "val_loss")
    assert not is_improvement(math.nan, None, "val_loss")


def test_optimizer_uses_adam_settings_and_no_decay_on_vectors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    cfg = OptimConfig(lr=2e-3, warmup_steps=4, weight_decay=0.01)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-9
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4])
    decayed, plain = param_groups(model, 0.01)
    assert [p.shape for p in decayed["params"]] == [torch.Size([3, 4])]
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert len(plain["params"]) == 3  # linear bias, norm weight, norm bias
    set_lr(optimizer, 1e-4)
    assert all(group["lr"] == 1e-4 for group in optimizer.param_groups)


def test_loss_ignores_padding_and_sums_per_token():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    target = torch.tensor([[4, 5, 6, PAD], [4, PAD, PAD, PAD]])
    total = token_loss_sum(logits, target)
    by_hand = sum(
        -torch.log_softmax(logits[b, t], -1)[target[b, t]]
        for b in range(2)
        for t in range(4)
        if target[b, t] != PAD
    )
    assert total.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Changing the logits at padded positions changes nothing.
    logits2 = logits.clone()
    logits2[0, 3] += 100.0
    logits2[1, 1:] -= 50.0
    assert token_loss_sum(logits2, target).item() == pytest.approx(total.item(), rel=1e-6)


def test_label_smoothing_matches_its_definition():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 5)
    target = torch.tensor([[4, 2, PAD]])
    eps = 0.1
    log_probs = torch.log_softmax(logits[0, :2], -1)
    nll = -log_probs[torch.arange(2), target[0, :2]]
    uniform = -log_probs.mean(-1)
    expected = ((1 - eps) * nll + eps * uniform).sum()
    assert token_loss_sum(logits, target, eps).item() == pytest.approx(expected.item(), rel=1e-5)
