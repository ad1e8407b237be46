"""The valid rows of one batch, flattened to ``[N, C]`` float32, with the τ=1 log-probabilities that several
components need (CE, CIST weights, DTS's CE gap) computed at most once per batch."""
from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from .progress import Progress


def stand_in(logits: Tensor, keep: Tensor) -> Tensor:
    """``logits`` ``[N, C]`` with the rows outside ``keep`` (``[N]`` bool) replaced by a fixed ramp over the classes:
    rows weighted by zero (``sync_free_rows``) must be finite, whatever a masked row held, and give every strategy a
    finite τ (an all-equal row might not)."""
    ramp = torch.linspace(0.0, 1.0, logits.shape[-1], device=logits.device)
    return torch.where(keep.unsqueeze(-1), logits, ramp)


class Rows:
    """Student and teacher logits of the valid (unmasked) rows, ``[N, C]`` float32; ``labels`` ``[N]`` or None.

    The teacher logits carry no gradient. ``student`` keeps its graph; use ``student_detached`` for statistics.
    """

    def __init__(self, student: Tensor, teacher: Tensor, labels: "Tensor | None" = None,
                 progress: "Progress | None" = None, shares: "Tensor | None" = None) -> None:
        self.student = student
        self.teacher = teacher.detach()
        self.labels = labels
        self.progress = progress
        self.shares = shares  # each row's share of a mean ([N], summing to 1 or 0), or None: every row alike

    def mean(self, values: Tensor) -> Tensor:
        """The mean of per-row ``values`` (``[N]`` or ``[N, 1]``) over the rows that count: a strategy's batch
        statistics go through it, so that rows weighted by zero (``sync_free_rows``) count nowhere."""
        if self.shares is None:
            return values.mean()
        return torch.dot(values.reshape(-1).float(), self.shares)

    @property
    def num_rows(self) -> int:
        return self.student.shape[0]

    @property
    def num_classes(self) -> int:
        return self.student.shape[-1]

    @cached_property
    def student_detached(self) -> Tensor:
        return self.student.detach()

    @cached_property
    def student_log_probs(self) -> Tensor:
        """``log σ(z^s)`` at τ=1, with gradient (shared by the CE term and the weights)."""
        return torch.log_softmax(self.student, dim=-1)

    @cached_property
    def teacher_log_probs(self) -> Tensor:
        """``log σ(z^t)`` at τ=1."""
        return torch.log_softmax(self.teacher, dim=-1)

    @cached_property
    def label_column(self) -> Tensor:
        """``labels`` as ``[N, 1]`` (for ``gather``)."""
        return self.labels.unsqueeze(-1)

    def _at_label_or_max(self, log_probs: Tensor) -> Tensor:
        if self.labels is None:
            return log_probs.amax(-1, keepdim=True)
        return log_probs.gather(-1, self.label_column)

    @cached_property
    def teacher_label_log_prob(self) -> Tensor:
        """``log σ(z^t)[y]`` per row, ``[N, 1]`` (``max`` over classes when there are no labels)."""
        return self._at_label_or_max(self.teacher_log_probs)

    @cached_property
    def student_label_log_prob(self) -> Tensor:
        """``log σ(z^s)[y]`` per row, ``[N, 1]``, detached (``max`` over classes when there are no labels)."""
        return self._at_label_or_max(self.student_log_probs.detach())
