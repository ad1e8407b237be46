"""DTS: Dynamic Temperature Scheduler (Islam et al., arXiv 2511.13767); the update rule of the authors' code."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ThermoKDError
from ..progress import require_progress
from ..rows import Rows
from ..stats import device_count, stat_tensor
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register

if TYPE_CHECKING:
    from ..loss import LossOutput


def dts_multiplier(ce_gap: "float | Tensor") -> "float | Tensor":
    """``mult`` of the DTS rule from ``ΔL = CE(teacher) − CE(student)`` (negative while the student lags); a
    tensor gap gives a tensor, computed on its device (no read back to the host)."""
    gap = torch.as_tensor(ce_gap, dtype=torch.float64 if not isinstance(ce_gap, Tensor) else None)
    s = gap / (gap + 1.0 + 1e-4)
    mult = torch.where(s <= 1.0, 1.0, torch.where(s <= 2.0, s, 1.35))  # scalars: no constant tensors to fill
    return mult if isinstance(ce_gap, Tensor) else float(mult)


@register("dts")
class DTS(TemperatureStrategy):
    """One global T for teacher and student, moved after each optimiser step towards
    ``clip(T_init · ½(1+cos(kπe/E)) · mult(ΔL), T_min, T_max)`` with momentum 0.9.

    The current T is a buffer: a resumed run continues from the saved T.
    """

    name = "dts"
    row_local = True

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
        tau = self.current.to(rows.teacher.device, copy=True)  # a snapshot: observe() moves the buffer in place
        with torch.no_grad():
            stats = {"dts_ce_teacher": -rows.mean(rows.teacher_label_log_prob),
                     "dts_ce_student": -rows.mean(rows.student_label_log_prob)}
        return Temperatures(teacher=tau, student=tau, stats=stats)

    def target(self, ce_gap: "float | Tensor", epoch: int, total_epochs: int) -> "float | Tensor":
        """``T_tgt`` for ``ΔL`` at a 0-based epoch (DTS uses the 1-based ``e = epoch + 1``); a tensor gap gives a
        tensor on its device."""
        cosf = 0.5 * (1.0 + math.cos(self.k * math.pi * (epoch + 1) / total_epochs))
        t_tgt = (self.t_init * cosf * dts_multiplier(ce_gap))
        if isinstance(t_tgt, Tensor):
            return t_tgt.clamp(self.t_min, self.t_max)
        return min(max(t_tgt, self.t_min), self.t_max)

    @torch.no_grad()
    def observe(self, output: "LossOutput") -> None:
        """Move T on the device: the gap stays a tensor, so a training step never waits for the device here."""
        if "dts_ce_teacher" not in output.stats:
            return  # a batch with no valid rows carries no gap
        p = require_progress(output.progress, "DTS")
        device = self.current.device
        gap = stat_tensor(output.stats, "dts_ce_teacher", device) - stat_tensor(output.stats, "dts_ce_student", device)
        t_tgt = self.target(gap, p.epoch, p.total_epochs).to(self.current.dtype)
        moved = self.current.mul(self.momentum).add_(t_tgt, alpha=1.0 - self.momentum)
        rows = device_count(output.stats)
        # rows counted on the device (sync_free_rows): a batch of no valid rows moves nothing, decided there
        self.current.copy_(moved if rows is None else torch.where(rows.to(device) > 0, moved, self.current))

    def extra_repr(self) -> str:
        return f"T={float(self.current):.4g}, t_init={self.t_init:g}, t_min={self.t_min:g}, t_max={self.t_max:g}"
