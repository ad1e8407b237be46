"""DTS: Dynamic Temperature Scheduler (Islam et al., arXiv 2511.13767); the update rule of the authors' code."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import ThermoKDError
from ..progress import require_progress
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register

if TYPE_CHECKING:
    from ..loss import LossOutput


def dts_multiplier(ce_gap: float) -> float:
    """``mult`` of the DTS rule from ``ΔL = CE(teacher) − CE(student)`` (negative while the student lags)."""
    s = ce_gap / (ce_gap + 1.0 + 1e-4)
    if s <= 1.0:
        return 1.0
    return s if s <= 2.0 else 1.35


@register("dts")
class DTS(TemperatureStrategy):
    """One global T for teacher and student, moved after each optimiser step towards
    ``clip(T_init · ½(1+cos(kπe/E)) · mult(ΔL), T_min, T_max)`` with momentum 0.9.

    The current T is a buffer: a resumed run continues from the saved T.
    """

    name = "dts"

    def __init__(self, t_init: float = 4.0, t_min: float = 2.0, t_max: float = 4.0, momentum: float = 0.9,
                 k: float = 1.0) -> None:
        super().__init__()
        self.t_init = check_positive("t_init", t_init)
        self.t_min, self.t_max = check_bounds(t_min, t_max)
        if not 0.0 <= momentum < 1.0:
            raise ThermoKDError(f"DTS momentum must be in [0, 1), got {momentum!r}")
        self.momentum, self.k = float(momentum), float(k)
        self.register_buffer("current", torch.tensor(self.t_init, dtype=torch.float32))

    def forward(self, rows: Rows) -> Temperatures:
        if rows.labels is None:
            raise ThermoKDError("DTS needs labels: its update reads the teacher-student cross-entropy gap")
        require_progress(rows.progress, "DTS")
        tau = self.current.to(rows.teacher.device)
        with torch.no_grad():
            stats = {"dts_ce_teacher": -rows.teacher_label_log_prob.mean(),
                     "dts_ce_student": -rows.student_label_log_prob.mean()}
        return Temperatures(teacher=tau, student=tau, stats=stats)

    def target(self, ce_gap: float, epoch: int, total_epochs: int) -> float:
        """``T_tgt`` for ``ΔL`` at a 0-based epoch (DTS uses the 1-based ``e = epoch + 1``)."""
        cosf = 0.5 * (1.0 + math.cos(self.k * math.pi * (epoch + 1) / total_epochs))
        return min(max(self.t_init * cosf * dts_multiplier(ce_gap), self.t_min), self.t_max)

    @torch.no_grad()
    def observe(self, output: "LossOutput") -> None:
        if "dts_ce_teacher" not in output.stats:
            return  # a batch with no valid rows carries no gap
        p = require_progress(output.progress, "DTS")
        gap = output.stats["dts_ce_teacher"] - output.stats["dts_ce_student"]
        t_tgt = self.target(gap, p.epoch, p.total_epochs)
        self.current.mul_(self.momentum).add_((1.0 - self.momentum) * t_tgt)

    def extra_repr(self) -> str:
        return f"T={float(self.current):.4g}, t_init={self.t_init:g}, t_min={self.t_min:g}, t_max={self.t_max:g}"
