"""What a temperature strategy does to the soft labels: τ and teacher-entropy statistics over a set of logits."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .errors import ThermoKDError
from .functional import soft_label_entropy
from .progress import Progress
from .rows import Rows
from .temperature import TemperatureStrategy

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def summarize(values: Tensor) -> dict[str, float]:
    """Mean, std (population), min, max and the 5/25/50/75/95 % quantiles of a 1-D tensor."""
    v = values.detach().float().reshape(-1)
    if v.numel() == 0:
        raise ThermoKDError("cannot summarise an empty set of values")
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=torch.float32)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std(correction=0)), "min": float(v.min()),
            "max": float(v.max()), **{f"q{int(p * 100):02d}": x for p, x in zip(QUANTILES, q)}}


@dataclass
class SoftLabelReport:
    """Statistics of one strategy on one set of logits. Entropies in nats at the teacher's τ; ``normalised``
    entropies are divided by log C. ``over_sharp`` / ``over_flat``: share of rows whose normalised entropy is
    below / above the thresholds. ``histogram``: counts of normalised entropy over ``bins`` equal bins of [0, 1]."""

    strategy: str
    num_rows: int
    num_classes: int
    tau_teacher: dict[str, float]
    tau_student: dict[str, float]
    entropy: dict[str, float]
    normalised_entropy: dict[str, float]
    over_sharp: float
    over_flat: float
    histogram_edges: list[float]
    histogram_counts: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def per_row_temperatures(strategy: TemperatureStrategy, teacher_logits: Tensor,
                         student_logits: "Tensor | None" = None, labels: "Tensor | None" = None,
                         progress: "Progress | None" = None, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Teacher and student τ per row (``[N]`` each) of ``[..., C]`` logits, computed in batches.

    Without student logits the teacher's stand in (a student that matches its teacher). Strategies that read
    progress get ``progress`` (default: the start of training)."""
    c = teacher_logits.shape[-1]
    teacher = teacher_logits.reshape(-1, c).float()
    student = teacher if student_logits is None else student_logits.reshape(-1, c).float()
    if student.shape != teacher.shape:
        raise ThermoKDError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                            "must have the same shape")
    flat_labels = None if labels is None else labels.reshape(-1).long()
    progress = progress or Progress()
    taus_t, taus_s = [], []
    for start in range(0, teacher.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        temps = strategy(Rows(student[sl], teacher[sl], None if flat_labels is None else flat_labels[sl], progress))
        n = teacher[sl].shape[0]
        taus_t.append(temps.teacher.detach().float().expand(n, 1).reshape(-1))
        taus_s.append(temps.student.detach().float().expand(n, 1).reshape(-1))
    return torch.cat(taus_t), torch.cat(taus_s)


@torch.no_grad()
def soft_label_report(strategy: TemperatureStrategy, teacher_logits: Tensor, student_logits: "Tensor | None" = None,
                      labels: "Tensor | None" = None, progress: "Progress | None" = None, bins: int = 20,
                      sharp_below: float = 0.1, flat_above: float = 0.9, name: "str | None" = None) -> SoftLabelReport:
    """Entropy and temperature statistics of ``strategy`` on a set of teacher logits (``[..., C]``)."""
    if not 0.0 <= sharp_below < flat_above <= 1.0:
        raise ThermoKDError(f"need 0 <= sharp_below < flat_above <= 1, got {sharp_below}, {flat_above}")
    c = teacher_logits.shape[-1]
    teacher = teacher_logits.reshape(-1, c).float()
    tau_t, tau_s = per_row_temperatures(strategy, teacher, student_logits, labels, progress)
    entropy = soft_label_entropy(teacher, tau_t.unsqueeze(-1))
    normalised = entropy / math.log(c)
    counts = torch.histc(normalised, bins=bins, min=0.0, max=1.0)
    return SoftLabelReport(
        strategy=name or getattr(strategy, "name", type(strategy).__name__), num_rows=teacher.shape[0],
        num_classes=c, tau_teacher=summarize(tau_t), tau_student=summarize(tau_s), entropy=summarize(entropy),
        normalised_entropy=summarize(normalised), over_sharp=float((normalised < sharp_below).float().mean()),
        over_flat=float((normalised > flat_above).float().mean()),
        histogram_edges=torch.linspace(0.0, 1.0, bins + 1).tolist(), histogram_counts=[int(x) for x in counts])


def matched_fixed_tau(teacher_logits: Tensor, mean_entropy: float, tau_min: float = 1e-3,
                      tau_max: float = 1e3, iters: int = 60) -> float:
    """The one fixed τ whose mean teacher soft-label entropy equals ``mean_entropy`` (bisection on log τ)."""
    c = teacher_logits.shape[-1]
    teacher = teacher_logits.reshape(-1, c).float()
    lo, hi = math.log(tau_min), math.log(tau_max)
    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            if float(soft_label_entropy(teacher, math.exp(mid)).mean()) < mean_entropy:
                lo = mid
            else:
                hi = mid
    return math.exp(0.5 * (lo + hi))
