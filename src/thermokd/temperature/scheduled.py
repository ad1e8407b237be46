"""τ as a pure function of training progress: constant, linear, cosine or step, with optional warm-up."""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ThermoKDError, choice_error
from ..progress import require_progress
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_positive, register, scalar

KINDS = ("constant", "linear", "cosine", "step")


@register("scheduled", "schedule")
class Scheduled(TemperatureStrategy):
    """Shared τ moving from ``start`` to ``end`` over training.

    ``kind``: ``constant`` (always ``start``), ``linear``, ``cosine`` (half-cosine), ``step`` (piecewise constant,
    geometric steps from ``start`` to ``end`` at the ``milestones``, given as fractions of training).
    ``warmup``: a fraction of training spent going linearly from ``warmup_from`` (default ``end``) up to ``start``
    before the schedule begins ("warm-up then decay"). ``by``: ``"step"`` or ``"epoch"`` progress.
    """

    name = "scheduled"
    row_local = True

    def __init__(self, start: float = 4.0, end: float = 1.0, kind: str = "cosine", warmup: float = 0.0,
                 warmup_from: "float | None" = None, milestones: Sequence[float] = (0.5,), by: str = "step") -> None:
        super().__init__()
        if kind not in KINDS:
            raise choice_error("schedule kind", kind, KINDS)
        if by not in ("step", "epoch"):
            raise choice_error("schedule unit 'by'", by, ("step", "epoch"))
        if not 0.0 <= warmup < 1.0:
            raise ThermoKDError(f"warmup is a fraction of training in [0, 1), got {warmup!r}")
        if kind == "step" and not milestones:
            raise ThermoKDError("a 'step' schedule needs at least one milestone (a fraction of training in (0, 1))")
        if any(not 0.0 < m < 1.0 for m in milestones):
            raise ThermoKDError(f"milestones are fractions of training in (0, 1), got {list(milestones)!r}")
        self.start = check_positive("start", start)
        self.end = check_positive("end", end)
        self.warmup_from = check_positive("warmup_from", self.end if warmup_from is None else warmup_from)
        self.kind, self.warmup, self.by = kind, float(warmup), by
        self.milestones = sorted(float(m) for m in milestones)

    def value(self, fraction: float) -> float:
        """τ at a training fraction in [0, 1]."""
        f = min(max(fraction, 0.0), 1.0)
        if f < self.warmup:
            return self.warmup_from + (self.start - self.warmup_from) * f / self.warmup
        f = (f - self.warmup) / (1.0 - self.warmup)
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * f
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * f))
        passed = sum(f >= m for m in self.milestones)
        return self.start * (self.end / self.start) ** (passed / len(self.milestones))

    def forward(self, rows: Rows) -> Temperatures:
        p = require_progress(rows.progress, "Scheduled temperature")
        fraction = p.fraction if self.by == "step" else p.epoch / max(1, p.total_epochs - 1)
        tau = scalar(self.value(fraction), rows.teacher)
        return Temperatures(teacher=tau, student=tau)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, start={self.start:g}, end={self.end:g}, warmup={self.warmup:g}, by={self.by}"
