"""Where training stands; strategies that depend on it (schedules, DTS, CTKD, DKD warm-up) read it."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ThermoKDError


@dataclass(frozen=True)
class Progress:
    """Training progress. ``step`` and ``epoch`` count from 0 (the first batch has step=0, epoch=0)."""

    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    total_epochs: int = 1

    def __post_init__(self) -> None:
        if self.total_steps < 1 or self.total_epochs < 1:
            raise ThermoKDError(
                f"Progress totals must be >= 1, got total_steps={self.total_steps}, total_epochs={self.total_epochs}")
        if self.step < 0 or self.epoch < 0:
            raise ThermoKDError(f"Progress counts from 0, got step={self.step}, epoch={self.epoch}")

    @property
    def fraction(self) -> float:
        """Share of training done, in [0, 1]: step / (total_steps - 1)."""
        return min(1.0, self.step / max(1, self.total_steps - 1))


def require_progress(progress: "Progress | None", who: str) -> Progress:
    if progress is None:
        raise ThermoKDError(f"{who} depends on training progress: pass progress=thermokd.Progress(step=..., "
                            "total_steps=..., epoch=..., total_epochs=...) to the loss")
    return progress
