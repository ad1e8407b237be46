"""Logit standardisation (Sun et al., CVPR 2024): KD on z-scored logits with a base temperature."""
from __future__ import annotations

from ..functional import logit_std
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_positive, register, scalar


@register("lskd", "logit-standardization", "logit-standardisation")
class LogitStandardization(TemperatureStrategy):
    """``σ(Z(z)/τ_b)`` with ``Z(z) = (z − mean)/(std + 1e-7)`` equals ``σ(z/(τ_b·(std + 1e-7)))``: per-sample,
    per-model temperatures. The loss is scaled by ``τ_b²`` as in the authors' code.

    As in that code the student's standardisation is part of its forward pass, so the student's τ keeps its
    gradient (the one exception, with CTKD, to "no gradient through τ"). Paper defaults: ``base=2`` with
    ``kd_weight=9``, ``ce_weight=0.1`` (``thermokd.build_loss("lskd")``).
    """

    name = "lskd"
    learnable = True
    row_local = True

    def __init__(self, base: float = 2.0, eps: float = 1e-7) -> None:
        super().__init__()
        self.base = check_positive("base", base)
        self.eps = float(eps)

    def forward(self, rows: Rows) -> Temperatures:
        tau_t = self.base * logit_std(rows.teacher, self.eps)
        tau_s = self.base * logit_std(rows.student, self.eps)
        return Temperatures(teacher=tau_t, student=tau_s, scale=scalar(self.base ** 2, rows.teacher))

    def extra_repr(self) -> str:
        return f"base={self.base:g}"
