"""Adam, its parameter groups, and the learning-rate schedule: linear warmup, then a decay.

During the first `warmup_steps` optimizer steps the rate climbs linearly to its peak (`warmup_lr`).
After that, `optim.decay` decides:

- `plateau` (default): the rate only changes after a validation (once per epoch, or every
  `trainer.validate_every` steps), when the monitored metric has not improved for
  `plateau_patience` validations (`PlateauSchedule.record`).
- `linear`: the rate falls linearly from the peak to `min_lr` over the rest of the run's budget —
  whichever of `trainer.max_time`, `trainer.max_steps` and `trainer.max_epochs` ends first. With a
  time budget the clock is wall time, so the run anneals whatever the machine's speed. A fixed
  budget is best spent this way (Li et al., "Budgeted Training", ICLR 2020).

The schedule's state is plain numbers, so it fits a `weights_only` checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from transformer_mt.config import OptimConfig

# Metrics where a larger value is better; every other monitored metric is a loss.
HIGHER_IS_BETTER = ("val_bleu",)


def is_improvement(value: float, best: float | None, monitor: str) -> bool:
    """Whether `value` of metric `monitor` beats `best` (None = nothing seen yet)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best if monitor in HIGHER_IS_BETTER else value < best


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices get weight decay; biases, norms and other vectors do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return [{"params": params, "weight_decay": 0.0}]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Adam:
    """Adam(β1, β2, ε) as configured; the fused kernel on CUDA, the foreach one elsewhere.

    The initial learning rate is the one for step 1 of the warmup.
    """
    fused = device.type == "cuda"
    return torch.optim.Adam(
        param_groups(model, cfg.weight_decay),
        lr=warmup_lr(1, cfg.lr, cfg.warmup_steps),
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def warmup_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): `peak_lr * step / warmup_steps`, then flat."""
    if warmup_steps <= 0:
        return peak_lr
    return peak_lr * min(1.0, step / warmup_steps)


@dataclass
class PlateauSchedule:
    """Linear warmup to `peak_lr`, then `lr *= factor` after `patience` validations without
    improvement.

    `lr(step)` is the rate for optimizer step `step`; `record(metric)` is called after each
    validation with the monitored metric and lowers the plateau level when it stalls. The level
    never goes below `min_lr`. Same rule as torch's ReduceLROnPlateau (no threshold, no cooldown),
    except that the drop comes on the `patience`-th bad validation rather than the one after it.
    """

    peak_lr: float
    warmup_steps: int
    factor: float
    patience: int
    min_lr: float
    monitor: str = "val_bleu"
    decay: str = "plateau"  # plateau | linear
    level: float = 0.0  # the post-warmup rate; starts at peak_lr
    best: float | None = None
    bad_validations: int = 0
    decay_from: float | None = None  # linear: the budget fraction used when warmup ended

    def __post_init__(self) -> None:
        if self.level == 0.0:
            self.level = self.peak_lr

    @classmethod
    def from_config(cls, cfg: OptimConfig, monitor: str) -> PlateauSchedule:
        return cls(
            peak_lr=cfg.lr,
            warmup_steps=cfg.warmup_steps,
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            min_lr=cfg.min_lr,
            monitor=monitor,
            decay=cfg.decay,
        )

    def lr(self, step: int, used: float = 0.0) -> float:
        """Rate for optimizer step `step` (1-based); `used` is the fraction of the budget spent.

        `used` matters only to the linear decay, which starts from the fraction spent when warmup
        ended, so the rate is continuous there and reaches `min_lr` when the budget is spent.
        """
        if self.decay != "linear" or step <= self.warmup_steps:
            return warmup_lr(step, self.level, self.warmup_steps)
        if self.decay_from is None:
            self.decay_from = min(used, 0.99)
        left = (1.0 - used) / (1.0 - self.decay_from)
        return max(self.min_lr, self.level * min(1.0, left))

    def record(self, metric: float) -> bool:
        """Record one validation's monitored metric; return True when the rate was lowered."""
        if is_improvement(metric, self.best, self.monitor):
            self.best = metric
            self.bad_validations = 0
            return False
        self.bad_validations += 1
        if self.decay != "plateau":
            return False
        if self.bad_validations < self.patience or self.level <= self.min_lr:
            return False
        self.level = max(self.level * self.factor, self.min_lr)
        self.bad_validations = 0
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore the running state; the settings stay those of the current config.

        A `peak_lr` other than the saved one (a resume with a new optim.lr) scales the saved
        level by new / old: warmup climbs to the new peak, and a plateau decrease already made
        is kept in proportion.
        """
        self.level = state["level"] * self.peak_lr / state.get("peak_lr", self.peak_lr)
        self.best = state["best"]
        # "bad_epochs": checkpoints written before validations could come mid-epoch
        key = "bad_validations" if "bad_validations" in state else "bad_epochs"
        self.bad_validations = state[key]
        self.decay_from = state.get("decay_from")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
