"""Learning rate as a pure function of the (fractional) epoch, so a resumed run needs no scheduler state."""
from __future__ import annotations

import math

from ..config import ScheduleConfig


def learning_rate(schedule: ScheduleConfig, base_lr: float, epoch: float, total_epochs: int) -> float:
    """LR at fractional epoch ``epoch`` (0-based; 2.5 = half-way through the third epoch)."""
    if schedule.warmup_epochs and epoch < schedule.warmup_epochs:
        return base_lr * (epoch + 1e-3) / schedule.warmup_epochs
    if schedule.name == "constant":
        return base_lr
    if schedule.name == "step":  # milestones are 1-based epoch counts, as in the CIFAR protocol (150/180/210)
        passed = sum(int(epoch) >= m for m in schedule.milestones)
        return base_lr * schedule.gamma ** passed
    span = max(total_epochs - schedule.warmup_epochs, 1e-9)
    progress = min(max((epoch - schedule.warmup_epochs) / span, 0.0), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
