"""Input checks that never read a value back to the host.

Each check queues a device-side assertion (``torch._assert_async``): on the CPU it fails at once and is turned
into a :class:`ThermoKDError` naming the bad value; on an accelerator it fails when the kernel runs, without
making the host wait for the device on every step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ThermoKDError


def _assert(condition: Tensor, message: str) -> bool:
    """Queue ``assert condition``; False when it failed on the spot (CPU), so the caller can explain it."""
    try:
        torch._assert_async(condition, message)
    except RuntimeError:
        return False
    return True


def check_finite(student: Tensor, teacher: Tensor) -> None:
    """Raise if either logits tensor holds NaN or inf (their minima and maxima carry any NaN or inf)."""
    bounds = torch.stack([*torch.aminmax(student.detach()), *torch.aminmax(teacher.detach())])
    if not _assert(torch.isfinite(bounds).all(), "thermokd: student or teacher logits contain NaN or inf"):
        who = "student" if not torch.isfinite(bounds[:2]).all() else "teacher"
        raise ThermoKDError(f"{who} logits contain NaN or inf")


def check_labels(labels: Tensor, num_classes: int, ignore_index: "int | None", keep: "Tensor | None" = None) -> None:
    """Raise if a label (other than ``ignore_index``) of a kept row (``keep``: None for all) is outside
    ``0..num_classes-1``."""
    if not labels.numel():
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if keep is not None:
        bad &= keep
    allowed = f"0..{num_classes - 1}" + (f", or {ignore_index} to ignore a row" if ignore_index is not None else "")
    if not _assert(~bad.any(), f"thermokd: a label is out of range for {num_classes} classes (allowed: {allowed})"):
        raise ThermoKDError(f"label {labels[bad][0].item()} is out of range for {num_classes} classes "
                            f"(allowed: {allowed})")
