"""Entropy-targeted temperature (ours): solve per row for the τ whose soft label has a target entropy.

The exact version of CIST's principle (docs/methods.md, "Entropy-targeted τ"): where CIST's closed-form ratio rule
only roughly equalises soft-label entropy across samples, this solves ``H(σ(z_i/τ_i)) = H*`` for each row.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ThermoKDError, choice_error
from ..functional import as_float32, centred_max
from ..rows import Rows
from .base import Temperatures, TemperatureStrategy, check_bounds, check_positive, register

STUDENT_RULES = ("ratio", "entropy", "teacher")


def _entropy_and_slope(z: Tensor, log_tau: Tensor) -> tuple[Tensor, Tensor]:
    """``H(σ(z/τ))`` and ``dH/d log τ = Var_p(z/τ)`` per row, for ``log_tau`` of shape ``[N, 1]``.

    Both come from the moments of ``log p`` (``Var_p(z/τ) = Var_p(log p)``: they differ by a per-row constant);
    ``log_softmax`` is several times faster than ``logsumexp`` on the CPU.
    """
    log_p = torch.log_softmax(z * torch.exp(-log_tau), dim=-1)
    p_log_p = log_p.exp() * log_p
    first = p_log_p.sum(-1, keepdim=True)
    second = (p_log_p * log_p).sum(-1, keepdim=True)
    return -first, (second - first.square()).clamp_min(0.0)


@torch.no_grad()
def solve_temperature(logits: Tensor, target_nats: "Tensor | float", tau_min: float = 0.05,
                      tau_max: float = 100.0, tol: float = 1e-4, max_iter: int = 50,
                      early_exit: "bool | None" = None) -> Tensor:
    """Per-row τ (``[N, 1]``) with ``H(σ(z_i/τ_i)) = target`` in nats, by safeguarded Newton on ``log τ``.

    H rises monotonically with τ. Each step is a Newton step kept inside the current bracket (a bisection
    otherwise); rows whose target lies outside ``[H(τ_min), H(τ_max)]`` converge to the bound. Converged rows stay
    put, so extra iterations change nothing. ``early_exit``: stop once every row has converged, which reads a
    value back to the host each iteration; None (default) does so on the CPU only, where that waits for no
    device; elsewhere all ``max_iter`` iterations run without a sync.
    """
    z = as_float32(logits)
    z = z - z.mean(-1, keepdim=True)  # shift invariance, and smaller numbers in exp
    n = z.shape[0]
    log_min, log_max = math.log(tau_min), math.log(tau_max)
    lo = torch.full((n, 1), log_min, device=z.device)
    hi = torch.full((n, 1), log_max, device=z.device)
    # a float becomes a device tensor by a fill kernel: torch.as_tensor would copy it from the host (a CUDA sync)
    target = target_nats.to(device=z.device, dtype=torch.float32) if torch.is_tensor(target_nats) \
        else torch.full((), float(target_nats), dtype=torch.float32, device=z.device)
    # start where the centred max over τ makes a two-level soft label of roughly the target entropy
    r0 = (math.log(z.shape[-1]) - target).clamp_min(0.05) * 1.5
    x = torch.log((centred_max(z) / r0).clamp(tau_min, tau_max))
    for _ in range(max_iter):
        entropy, slope = _entropy_and_slope(z, x)
        f = entropy - target
        at_lo_bound = (x <= log_min + 1e-7) & (f > 0)
        at_hi_bound = (x >= log_max - 1e-7) & (f < 0)
        done = (f.abs() < tol) | at_lo_bound | at_hi_bound
        if (early_exit if early_exit is not None else z.device.type == "cpu") and bool(done.all()):
            break
        lo = torch.where(f < 0, torch.maximum(lo, x), lo)
        hi = torch.where(f > 0, torch.minimum(hi, x), hi)
        newton = (x - f / slope.clamp_min(1e-12)).clamp(log_min, log_max)
        inside = (newton >= lo) & (newton <= hi)
        x = torch.where(done, x, torch.where(inside, newton, 0.5 * (lo + hi)))
    return torch.exp(x)


@register("entropy-target", "entropy")
class EntropyTarget(TemperatureStrategy):
    """Teacher τ solved per sample so that its soft label has entropy ``target·log C`` (``target`` in (0, 1),
    default 0.5) or ``target_nats``. Student: ``"teacher"`` (share the teacher's per-sample τ; default),
    ``"ratio"`` (CIST's rule with the row's solved ratio, ``τ^s_i = m^s_i·τ^t_i/m^t_i``) or ``"entropy"`` (solve
    the student to the same entropy).

    Why ``"teacher"`` by default: with the other two rules a freshly initialised student (near-zero logits) gets
    τ^s at its lower bound and near one-hot soft labels, and fails to train (the runs are in docs/methods.md)."""

    name = "entropy-target"
    row_local = True

    def __init__(self, target: "float | None" = 0.5, target_nats: "float | None" = None, tau_min: float = 0.05,
                 tau_max: float = 100.0, student: str = "teacher", tol: float = 1e-4, max_iter: int = 50,
                 early_exit: "bool | None" = None) -> None:
        super().__init__()
        if target_nats is not None:
            self.target, self.target_nats = None, check_positive("target_nats", target_nats)
        elif target is not None and 0.0 < target < 1.0:
            self.target, self.target_nats = float(target), None
        else:
            raise ThermoKDError(f"EntropyTarget target must be a fraction of log C in (0, 1), got {target!r}")
        self.tau_min, self.tau_max = check_bounds(tau_min, tau_max)
        if student not in STUDENT_RULES:
            raise choice_error("EntropyTarget student rule", student, STUDENT_RULES)
        self.student_rule, self.tol, self.max_iter = student, float(tol), int(max_iter)
        self.early_exit = early_exit  # see solve_temperature

    def target_for(self, num_classes: int) -> float:
        """The target entropy in nats for ``num_classes`` classes."""
        if self.target_nats is not None:
            if self.target_nats >= math.log(num_classes):
                raise ThermoKDError(f"target_nats={self.target_nats} is not below log C = {math.log(num_classes):.4f}")
            return self.target_nats
        return self.target * math.log(num_classes)

    def _solve(self, logits: Tensor) -> Tensor:
        return solve_temperature(logits, self.target_for(logits.shape[-1]), self.tau_min, self.tau_max,
                                 self.tol, self.max_iter, self.early_exit)

    def forward(self, rows: Rows) -> Temperatures:
        with torch.no_grad():
            tau_t = self._solve(rows.teacher)
            if self.student_rule == "teacher":
                tau_s = tau_t
            elif self.student_rule == "entropy":
                tau_s = self._solve(rows.student_detached)
            else:
                ratio = centred_max(rows.teacher) / tau_t
                tau_s = (centred_max(rows.student_detached) / ratio.clamp_min(1e-12)).clamp_(self.tau_min, self.tau_max)
        return Temperatures(teacher=tau_t, student=tau_s)

    def extra_repr(self) -> str:
        goal = f"target_nats={self.target_nats:g}" if self.target_nats is not None else f"target={self.target:g}"
        return f"{goal}, tau_min={self.tau_min:g}, tau_max={self.tau_max:g}, student={self.student_rule}"
