"""Input checks that never read a value back to the host.

The checks queue one device-side assertion (``torch._assert_async``): on the CPU it fails at once and is turned
into a :class:`ThermoKDError` naming the bad value; on an accelerator it fails when the kernel runs, without
making the host wait for the device on every step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ThermoKDError


def check_rows(student: "Tensor | None", teacher: "Tensor | None", labels: "Tensor | None", num_classes: int) -> None:
    """Raise if the logits hold NaN or inf (their minima and maxima carry any) or a label is outside
    ``0..num_classes-1``. Give the valid rows only: masked and ignored rows may hold anything."""
    parts = [torch.aminmax(x.detach()) for x in (student, teacher) if x is not None and x.numel()]
    conditions = [torch.isfinite(torch.stack([v for pair in parts for v in pair])).all()] if parts else []
    if labels is not None and labels.numel():
        low, high = torch.aminmax(labels)
        conditions.append((low >= 0) & (high < num_classes))
    if not conditions:
        return
    ok = conditions[0] if len(conditions) == 1 else torch.stack(conditions).all()
    try:
        torch._assert_async(ok, "thermokd: NaN or inf logits, or a label out of range")
    except RuntimeError:  # the CPU checked at once: say what was wrong
        _explain(student, teacher, labels, num_classes)
        raise


def _explain(student, teacher, labels, num_classes: int) -> None:
    for who, x in (("student", student), ("teacher", teacher)):
        if x is not None and not torch.isfinite(x).all():
            raise ThermoKDError(f"{who} logits contain NaN or inf")
    bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
    raise ThermoKDError(f"label {bad} is out of range for {num_classes} classes (allowed: 0..{num_classes - 1}, "
                        "or the loss's ignore_index to ignore a row)")


def check_finite(student: Tensor, teacher: Tensor) -> None:
    """Raise if either logits tensor holds NaN or inf."""
    check_rows(student, teacher, None, 0)


def check_finite_sum(student: Tensor, teacher: Tensor) -> None:
    """The per-step check of the plain loss, in four small kernels: a finite sum of all logits proves every one
    finite. The sum accumulates in float32 (float16 logits of ±1e4 overflow their own range). On the CPU a sum that
    overflowed is re-checked entry by entry; on an accelerator logits summing beyond ~3e38 would trip it."""
    if not student.numel():
        return
    check_finite_value(torch.isfinite(student.detach().sum(dtype=torch.float32) + teacher.sum(dtype=torch.float32)),
                       student, teacher)


def check_finite_value(ok: Tensor, student: Tensor, teacher: Tensor) -> None:
    """Raise unless ``ok``: whether a value that every entry of both logits reaches (NaN and ±inf make it NaN or
    inf) is finite, a 0-d bool tensor; one device-side assertion. On the CPU a failure is re-checked entry by entry
    (a sum may overflow with finite entries: then nothing is wrong)."""
    try:
        torch._assert_async(ok, "thermokd: NaN or inf logits")
    except RuntimeError:
        for who, x in (("student", student), ("teacher", teacher)):
            if not torch.isfinite(x).all():
                raise ThermoKDError(f"{who} logits contain NaN or inf") from None
        # every entry is finite: the sum overflowed, nothing is wrong


def explain_labels(labels: Tensor, num_classes: int) -> None:
    """Raise the error for labels outside ``0..num_classes-1`` (after a kernel refused them on the CPU)."""
    if bool(((labels < 0) | (labels >= num_classes)).any()):
        _explain(None, None, labels, num_classes)
