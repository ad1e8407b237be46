"""Hinton KD's single shared temperature."""
from __future__ import annotations

import torch

from ..rows import Rows
from .base import BufferFloat, Temperatures, TemperatureStrategy, check_positive, register


@register("fixed")
class Fixed(TemperatureStrategy):
    """One τ for teacher and student, all samples (default 4, the CIFAR convention)."""

    name = "fixed"
    row_local = True

    def __init__(self, tau: float = 4.0) -> None:
        super().__init__()
        self.register_buffer("tau", torch.tensor(check_positive("tau", tau)))
        self._tau_float = BufferFloat()  # the loss's fast path scales by τ² on the host: no device read per step

    def value(self) -> float:
        """τ as a Python float (read from the buffer once per change of it)."""
        return self._tau_float(self._buffers["tau"])

    def forward(self, rows: Rows) -> Temperatures:
        tau = self.tau.to(rows.teacher.device)
        return Temperatures(teacher=tau, student=tau)

    def extra_repr(self) -> str:
        return f"tau={self.tau.item():g}"
