"""DTKD: dynamic temperatures from the teacher's and student's max logits (Wei & Bai, 2024)."""
from __future__ import annotations

import torch

from ..functional import centred_max
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register


@register("dtkd")
class DTKD(TemperatureStrategy):
    """``τ^t_i = 2M^t_i/(M^t_i+M^s_i)·T``, ``τ^s_i = 2M^s_i/(M^t_i+M^s_i)·T``, loss scaled by ``τ^t τ^s``.

    Differs from the public code on purpose: ``M`` is the *centred* max logit (shift invariant) and τ is
    clamped to ``[tau_min, tau_max]``; the raw max used there can make τ negative.
    """

    name = "dtkd"
    row_local = True

    def __init__(self, tau: float = 4.0, tau_min: float = 0.5, tau_max: float = 20.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.tau_min, self.tau_max = check_bounds(tau_min, tau_max)
        self.eps = float(eps)

    def forward(self, rows: Rows) -> Temperatures:
        with torch.no_grad():
            m_t, m_s = centred_max(rows.teacher), centred_max(rows.student_detached)
            total = m_t + m_s + self.eps
            tau_t = (2.0 * self.tau * m_t / total).clamp_(self.tau_min, self.tau_max)
            tau_s = (2.0 * self.tau * m_s / total).clamp_(self.tau_min, self.tau_max)
        return Temperatures(teacher=tau_t, student=tau_s)

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}, tau_min={self.tau_min:g}, tau_max={self.tau_max:g}"
