"""CIST: Consistently Informative Soft-label Temperature (Luong et al., arXiv 2605.20357).

The rule's forms and constants are reconstructed (docs/methods.md, CIST): the paper states the principle (hold the
ratio of the max logit to τ fixed across samples, separately for teacher and student), not a formula. The
student rules other than ``ratio``, the "max" variants and the scale variants are ours (docs/methods.md).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ThermoKDError, choice_error
from ..rows import Rows
from ..stats import device_count, stat_tensor
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register

if TYPE_CHECKING:
    from ..loss import LossOutput

STUDENT_RULES = ("ratio", "teacher", "own-ratio", "interpolate")
MAX_KINDS = ("centred", "max-min", "raw")
SCALES = ("product", "teacher-squared", "none")
OWN_SCALE_STAT = "cist_student_log_scale"  # mean_i log(m^s_i/m^t_i) of a batch, read back by ``observe``
_TINY = 1e-6  # floor of m before a log: a student at initialisation has m ≈ 0


def logit_spread(z: Tensor, kind: str = "centred") -> Tensor:
    """The "max" ``m`` per row of ``[M, C]`` as ``[M, 1]``: ``max − mean`` (``centred``; shift-invariant),
    ``max − min`` (``max-min``; shift-invariant) or ``max`` (``raw``; changes with a per-row shift). Not clamped:
    τ is clamped afterwards. Plain reductions on purpose: a matmul for the mean measured slower inside the loss
    and would follow TF32/autocast precision settings."""
    top = z.amax(-1, keepdim=True)
    if kind == "centred":
        return top.sub_(z.mean(-1, keepdim=True))
    if kind == "max-min":
        return top.sub_(z.amin(-1, keepdim=True))
    return top


def _log_m(m: Tensor) -> Tensor:
    return m.clamp_min(_TINY).log_()


@register("cist")
class CIST(TemperatureStrategy):
    """Sample-wise teacher ``τ^t_i = clip(m^t_i/ρ, tau_min, tau_max)`` and a student τ^s by one of four rules.

    - ``ratio``: ρ as a number, or ``"auto"`` to calibrate it once so that the median teacher τ equals ``tau0``
      (from the first batch, or from a whole set of cached teacher logits via :meth:`calibrate`). ρ is a Python
      float (no device read per step) kept in a buffer for ``state_dict``; change it with :meth:`set_ratio`,
      :meth:`calibrate` or ``load_state_dict``, never by writing the buffer in place.
    - ``max_kind``: what ``m`` is (:func:`logit_spread`): ``centred`` (default), ``max-min`` or ``raw``.
    - ``student``: ``ratio`` (``τ^s = m^s/ρ``, the teacher's ρ on the student's logits), ``teacher`` (``τ^s =
      τ^t``), ``own-ratio`` (``τ^s = m^s/ρ_s`` with the student's own ``ρ_s = ρ·exp(c)``, ``c`` a running mean
      of ``mean_i log(m^s_i/m^t_i)`` updated in :meth:`observe` with ``momentum``; before the first update
      ``τ^s = τ^t``) or ``interpolate`` (default; ``τ^s = τ^t·(m^s/m^t)^gamma``, γ ∈ [0, 1], default 0.5: 0 is
      ``teacher``, 1 the per-row ``ratio``).
    - ``student_floor``: f ∈ [0, 1]; ``τ^s ≥ f·τ^t`` (a floor relative to the teacher's τ); then ``τ^s`` is
      clipped to [tau_min, tau_max].
    - ``scale``: the factor on each row's divergence: ``product`` (``τ^t·τ^s``), ``teacher-squared``
      (``(τ^t)²``) or ``none`` (1). (``DistillationLoss(scale="none")`` turns any factor off.)
    """

    name = "cist"
    host_floats = ("ratio",)  # ρ is read as a float: at calibration and load, never per step
    # once ρ is calibrated (needs_batch_preparation is False until then), τ_i reads row i, ρ and own-ratio's running
    # scale only; own-ratio's statistic is a mean over rows, which a chunked visit accumulates exactly
    row_local = True

    def __init__(self, tau0: float = 4.0, ratio: "float | str" = "auto", tau_min: float = 0.5,
                 tau_max: float = 20.0, student: str = "interpolate", gamma: float = 0.5, student_floor: float = 0.0,
                 max_kind: str = "centred", scale: str = "product", momentum: float = 0.9) -> None:
        super().__init__()
        self.tau0 = check_positive("tau0", tau0)
        self.tau_min, self.tau_max = check_bounds(tau_min, tau_max)
        for kind, value, allowed in (("CIST student rule", student, STUDENT_RULES),
                                     ("CIST max_kind", max_kind, MAX_KINDS), ("CIST scale", scale, SCALES)):
            if value not in allowed:
                raise choice_error(kind, value, allowed)
        for label, value, high_open in (("gamma", gamma, False), ("student_floor", student_floor, False),
                                        ("momentum", momentum, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0.0 <= value < 1.0 if high_open else 0.0 <= value <= 1.0):
                raise ThermoKDError(f"CIST {label} must be in [0, 1{')' if high_open else ']'}, got {value!r}")
        self.student_rule, self.max_kind, self.scale = student, max_kind, scale
        self.gamma, self.student_floor, self.momentum = float(gamma), float(student_floor), float(momentum)
        if ratio == "auto":
            initial = float("nan")
        elif isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            initial = check_positive("ratio", ratio)
        else:
            raise ThermoKDError(f"CIST ratio must be a positive number or 'auto', got {ratio!r}")
        self.register_buffer("ratio", torch.tensor(initial, dtype=torch.float32))
        self._read_host_float("ratio")
        if student == "own-ratio":  # c = running mean of log(m^s/m^t); NaN until the first observe (τ^s = τ^t)
            self.register_buffer("student_log_scale", torch.tensor(float("nan"), dtype=torch.float32))

    @staticmethod
    def search_space() -> dict[str, Any]:
        """The knobs a tuner may search, by keyword: ``(low, high, log)`` for a number, a list for a choice."""
        return {"tau0": (1.0, 16.0, True), "student": list(STUDENT_RULES), "gamma": (0.0, 1.0, False),
                "student_floor": (0.0, 1.0, False), "max_kind": list(MAX_KINDS), "scale": list(SCALES)}

    def _ratio_value(self) -> float:
        return self.host_float("ratio")

    def set_ratio(self, value: float) -> float:
        """Set ρ (NaN: not calibrated, so the next batch or :meth:`prepare` calibrates it); returns it as stored.
        The public way to change ρ besides :meth:`calibrate`, assigning a tensor and ``load_state_dict``: a write
        in place to the ``ratio`` buffer is not seen (``host_floats``)."""
        if not math.isnan(value):
            check_positive("ratio", value)
        return self.set_float("ratio", value)

    @property
    def calibrated(self) -> bool:
        return not math.isnan(self._ratio_value())

    @torch.no_grad()
    def calibrate(self, teacher_logits: torch.Tensor) -> float:
        """Set ρ = median(m^t)/tau0 over these teacher logits (``[..., C]``) and return it."""
        m = logit_spread(teacher_logits.reshape(-1, teacher_logits.shape[-1]).float(), self.max_kind)
        median = float(m.median())
        if not median > 0:
            raise ThermoKDError(f"cannot calibrate CIST: the median of the teacher's {self.max_kind} max logit is "
                                f"{median:g}, not > 0 (constant rows, or max_kind='raw' with negative logits)")
        return self.set_float("ratio", median / self.tau0)

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
        rho = self._ratio_value()
        if math.isnan(rho):  # ratio="auto", not calibrated yet: this first batch calibrates it
            rho = self.calibrate(rows.teacher)
        m_t = logit_spread(rows.teacher, self.max_kind)
        tau_t = (m_t / rho).clamp_(self.tau_min, self.tau_max)
        scale = self._scale(tau_t)
        if self.student_rule == "teacher":
            return Temperatures(teacher=tau_t, student=tau_t, scale=scale)
        # teacher and student apart, not concatenated: no [2N, C] copy, and at classification sizes each reduction
        # stays on one thread (a 2N-row one pays for waking a second)
        m_s = logit_spread(rows.student_detached, self.max_kind)
        stats: dict[str, Tensor] = {}
        if self.student_rule == "ratio":
            tau_s = m_s.div_(rho)
        elif self.student_rule == "interpolate":
            tau_s = m_s.clamp_min_(_TINY).div_(m_t.clamp_min(_TINY)).pow_(self.gamma).mul_(tau_t)
        else:  # own-ratio
            log_scale = _log_m(m_s.clone()).sub_(_log_m(m_t))
            stats[OWN_SCALE_STAT] = rows.mean(log_scale)
            c = self.student_log_scale.to(m_s.device)
            # on device, no sync: τ^t until c has a value
            tau_s = torch.where(torch.isnan(c), tau_t, m_s.div_(c.nan_to_num().exp().mul(rho)))
        if self.student_floor:
            tau_s = torch.maximum(tau_s, tau_t * self.student_floor)
        return Temperatures(teacher=tau_t, student=tau_s.clamp_(self.tau_min, self.tau_max), scale=scale,
                            stats=stats)

    def _scale(self, tau_t: Tensor) -> "Tensor | None":
        if self.scale == "teacher-squared":
            return tau_t * tau_t
        if self.scale == "none":
            return tau_t.new_ones(())
        return None  # the loss's default τ^t·τ^s

    @torch.no_grad()
    def observe(self, output: "LossOutput") -> None:
        """``own-ratio``: move ``c`` towards this step's ``mean_i log(m^s_i/m^t_i)`` (tensor ops, no sync)."""
        if self.student_rule != "own-ratio" or OWN_SCALE_STAT not in output.stats:  # `in` reads no value
            return
        c = self.student_log_scale
        value = stat_tensor(output.stats, OWN_SCALE_STAT, c.device).to(c.dtype)  # no device sync
        ok = torch.isfinite(value)
        rows = device_count(output.stats)
        if rows is not None:  # counted on the device (sync_free_rows): a batch of no valid rows moves nothing
            ok = ok & (rows.to(c.device) > 0)
        moved = torch.where(torch.isnan(c), value, torch.lerp(value, c, self.momentum))
        c.copy_(torch.where(ok, moved, c))

    def extra_repr(self) -> str:
        return (f"tau0={self.tau0:g}, ratio={self._ratio_value():g}, tau_min={self.tau_min:g}, "
                f"tau_max={self.tau_max:g}, student={self.student_rule}, gamma={self.gamma:g}, "
                f"student_floor={self.student_floor:g}, max_kind={self.max_kind}, scale={self.scale}")
