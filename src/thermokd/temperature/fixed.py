"""Hinton KD's single shared temperature."""
from __future__ import annotations

import torch

from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_positive, register, scalar


@register("fixed")
class Fixed(TemperatureStrategy):
    """One τ for teacher and student, all samples (default 4, the CIFAR convention)."""

    name = "fixed"
    row_local = True
    host_floats = ("tau",)  # the loss's fast path scales by τ² on the host: no device read per step

    def __init__(self, tau: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(check_positive("tau", tau)))
        self._read_host_float("tau")

    def value(self) -> float:
        """τ as a Python float (kept current by assignment and ``load_state_dict``; see ``host_floats``)."""
        return self.host_float("tau")

    def forward(self, rows: Rows) -> Temperatures:
        tau = scalar(self.value(), rows.teacher)  # the float the fast path uses, so that both paths agree
        return Temperatures(teacher=tau, student=tau)

    def extra_repr(self) -> str:
        return f"tau={self.value():g}"
