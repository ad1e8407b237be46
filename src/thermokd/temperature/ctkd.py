"""CTKD: Curriculum Temperature for KD (Li et al., AAAI 2023), global and instance-wise, as in the public code."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..progress import require_progress
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_positive, register


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by λ (λ < 0 reverses it)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.lam * grad, None


def grl_lambda(epoch: int, lam_max: float = 0.0, lam_min: float = -1.0, loops: int = 10) -> float:
    """CTKD's cosine curriculum for the 1-based epoch ``e``: λ goes from ``lam_max`` (0) to ``lam_min`` (−1)."""
    e = min(max(epoch, 0), loops)
    return lam_min + (lam_max - lam_min) * (1.0 + math.cos(math.pi * e / loops)) / 2.0


class _CurriculumTemperature(TemperatureStrategy):
    """Shared parts: ``T = t_start + t_end·sigmoid(θ)`` and the gradient-reversal curriculum."""

    learnable = True
    row_local = True  # one τ for all (CTKD), or each row's from that row alone

    def __init__(self, init: float, t_start: float, t_end: float, lam_max: float, lam_min: float,
                 loops: int) -> None:
        super().__init__()
        self.t_start, self.t_end = float(t_start), check_positive("t_end", t_end)
        init = check_positive("init", init)
        frac = min(max((init - self.t_start) / self.t_end, 1e-4), 1 - 1e-4)  # keep θ₀ finite at the range ends
        self.theta0 = math.log(frac / (1.0 - frac))
        self.lam_max, self.lam_min, self.loops = float(lam_max), float(lam_min), int(loops)

    def _curriculum(self, raw: Tensor, rows: Rows) -> Tensor:
        p = require_progress(rows.progress, type(self).__name__)
        lam = grl_lambda(p.epoch + 1, self.lam_max, self.lam_min, self.loops)  # public code counts epochs from 1
        return self.t_start + self.t_end * torch.sigmoid(_GradientReversal.apply(raw, lam))


@register("ctkd")
class CTKD(_CurriculumTemperature):
    """Global learnable temperature θ (train it with the student's optimiser: pass ``loss.parameters()``)."""

    name = "ctkd"

    def __init__(self, init: float = 4.0, t_start: float = 1.0, t_end: float = 20.0, lam_max: float = 0.0,
                 lam_min: float = -1.0, loops: int = 10) -> None:
        super().__init__(init, t_start, t_end, lam_max, lam_min, loops)
        self.theta = nn.Parameter(torch.tensor(self.theta0, dtype=torch.float32))

    def forward(self, rows: Rows) -> Temperatures:
        tau = self._curriculum(self.theta, rows)
        return Temperatures(teacher=tau, student=tau)


@register("ctkd-instance")
class InstanceCTKD(_CurriculumTemperature):
    """Instance-wise CTKD: a small MLP maps the concatenated teacher and student logits to a per-sample T.

    Vectorised over the batch (the public version loops over samples in Python). The logits enter detached:
    only the MLP learns through T.
    """

    name = "ctkd-instance"

    def __init__(self, num_classes: int, hidden: int = 128, init: float = 4.0, t_start: float = 1.0,
                 t_end: float = 20.0, lam_max: float = 0.0, lam_min: float = -1.0, loops: int = 10) -> None:
        super().__init__(init, t_start, t_end, lam_max, lam_min, loops)
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # start every sample near ``init``
            self.mlp[2].weight.mul_(0.01)
            self.mlp[2].bias.fill_(self.theta0)

    def forward(self, rows: Rows) -> Temperatures:
        features = torch.cat([rows.teacher, rows.student_detached], dim=-1)
        tau = self._curriculum(self.mlp(features), rows)
        return Temperatures(teacher=tau, student=tau)
