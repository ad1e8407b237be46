"""CIST: Consistently Informative Soft-label Temperature (Luong et al., arXiv 2605.20357).

The rule's forms and constants are reconstructed (METHODS.md §1): the paper states the principle (hold the
ratio of the centred max logit to τ fixed across samples, separately for teacher and student), not a formula.
"""
from __future__ import annotations

import torch

from ..errors import ThermoKDError, choice_error
from ..functional import centred_max
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register

STUDENT_RULES = ("ratio", "teacher")


def _max_minus_mean(z: torch.Tensor) -> torch.Tensor:
    """The centred max of float32 rows without ``centred_max``'s clamp (τ is clamped afterwards)."""
    return z.amax(-1, keepdim=True) - z.mean(-1, keepdim=True)


@register("cist")
class CIST(TemperatureStrategy):
    """Sample-wise ``τ^t_i = clip(m^t_i/ρ)``, ``τ^s_i = clip(m^s_i/ρ)`` with ``m`` the centred max logit.

    ``ratio``: ρ as a number, or ``"auto"`` to calibrate it once so that the median teacher τ equals ``tau0``
    (from the first batch, or from a whole set of cached teacher logits via :meth:`calibrate`). The calibrated
    ρ is a buffer, saved and restored with ``state_dict``. ``student="teacher"`` shares the teacher's τ with the
    student (the teacher-adaptive-only ablation).
    """

    name = "cist"

    def __init__(self, tau0: float = 4.0, ratio: "float | str" = "auto", tau_min: float = 0.5,
                 tau_max: float = 20.0, student: str = "ratio") -> None:
        super().__init__()
        self.tau0 = check_positive("tau0", tau0)
        self.tau_min, self.tau_max = check_bounds(tau_min, tau_max)
        if student not in STUDENT_RULES:
            raise choice_error("CIST student rule", student, STUDENT_RULES)
        self.student_rule = student
        if ratio == "auto":
            initial = float("nan")
        elif isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            initial = check_positive("ratio", ratio)
        else:
            raise ThermoKDError(f"CIST ratio must be a positive number or 'auto', got {ratio!r}")
        self.register_buffer("ratio", torch.tensor(initial, dtype=torch.float32))
        self._calibrated: "bool | None" = None  # cache of "ratio is set", dropped when state is loaded
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_calibrated", None))

    @property
    def calibrated(self) -> bool:
        if self._calibrated is None:
            self._calibrated = not bool(torch.isnan(self.ratio))
        return self._calibrated

    @torch.no_grad()
    def calibrate(self, teacher_logits: torch.Tensor) -> float:
        """Set ρ = median(m^t)/tau0 over these teacher logits (``[..., C]``) and return it."""
        m = centred_max(teacher_logits.reshape(-1, teacher_logits.shape[-1]))
        median = float(m.median())
        if not median > 0:
            raise ThermoKDError("cannot calibrate CIST: the teacher's logits are constant per row (centred max 0)")
        self.ratio.fill_(median / self.tau0)
        self._calibrated = True
        return float(self.ratio)

    def prepare(self, teacher_logits: torch.Tensor) -> None:
        """With ``ratio="auto"``, calibrate ρ on the whole training set's teacher logits (once)."""
        if not self.calibrated:
            self.calibrate(teacher_logits)

    @property
    def needs_batch_preparation(self) -> bool:
        return not self.calibrated

    def prepare_batch(self, teacher: torch.Tensor) -> None:
        if not self.calibrated:  # what forward would do with the whole batch
            self.calibrate(teacher)

    def forward(self, rows: Rows) -> Temperatures:
        # both inputs are detached: no autograd bookkeeping is needed (this runs every step)
        if not self.calibrated:
            self.calibrate(rows.teacher)
        rho = self.ratio if self.ratio.device == rows.teacher.device else self.ratio.to(rows.teacher.device)
        if self.student_rule == "teacher":
            tau_t = _max_minus_mean(rows.teacher).div_(rho).clamp_(self.tau_min, self.tau_max)
            return Temperatures(teacher=tau_t, student=tau_t)
        # teacher and student rows in one pass of reductions: fewer, larger kernels
        n = rows.num_rows
        tau = _max_minus_mean(torch.cat([rows.teacher, rows.student_detached])).div_(rho)
        tau.clamp_(self.tau_min, self.tau_max)
        return Temperatures(teacher=tau[:n], student=tau[n:])

    def extra_repr(self) -> str:
        return (f"tau0={self.tau0:g}, ratio={float(self.ratio):g}, tau_min={self.tau_min:g}, "
                f"tau_max={self.tau_max:g}, student={self.student_rule}")
