"""Per-sample weights for the distillation term, normalised to mean 1 over the valid rows, never differentiated."""
from __future__ import annotations


import torch
from torch import Tensor, nn

from .errors import ThermoKDError, choice_error
from .functional import soft_label_entropy
from .rows import Rows


class Weighting(nn.Module):
    """Base class: ``forward(rows) -> [N]`` weights with mean 1 (rows are the valid rows only).

    A weighting is two steps so that a chunked loss can see the rows a chunk at a time: ``log_unnormalised(rows)``
    gives ``log w̃`` per row (row-local), and ``finish(log_w)`` normalises over every row of the batch."""

    name = ""

    def log_unnormalised(self, rows: Rows) -> Tensor:
        raise ThermoKDError(f"{type(self).__name__} does not define log_unnormalised(rows): a weighting that only "
                            "overrides forward works in a plain loss, but a chunked one (chunk_size) normalises the "
                            "weights over all chunks and needs log_unnormalised (and, if not a softmax, finish)")

    def finish(self, log_w: Tensor) -> Tensor:
        """``w_i = N·w̃_i/Σw̃``, computed as ``N·softmax(log w̃)`` (stable; mean 1 over the rows given)."""
        return self.shares(log_w) * log_w.shape[0]

    def shares(self, log_w: Tensor) -> Tensor:
        """``w_i/N``: the weights of :meth:`finish` divided by the number of rows (they sum to 1 when normalised).
        The loss takes ``Σ_i share_i·D_i`` in one product, which equals ``mean_i w_i·D_i``."""
        return torch.softmax(log_w, dim=0)

    def forward(self, rows: Rows) -> Tensor:
        return self.finish(self.log_unnormalised(rows))

    @staticmethod
    def normalise(raw: Tensor) -> Tensor:
        """``w_i = w̃_i · N / Σ w̃``: mean 1 over the rows given."""
        return raw * (raw.numel() / raw.sum().clamp_min(1e-12))


class ConfidenceDifficulty(Weighting):
    """CIST's weights (reconstructed, METHODS.md §1): ``w̃_i = a_i^α · (d_i + ε)^β`` with teacher confidence
    ``a_i = σ(z^t_i)[y_i]`` and student difficulty ``d_i = 1 − σ(z^s_i)[y_i]`` (max-probability versions
    without labels). ``alpha=0`` or ``beta=0`` switches a factor off (the ablations)."""

    name = "confidence-difficulty"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, eps: float = 1e-3) -> None:
        super().__init__()
        if alpha < 0 or beta < 0 or eps <= 0:
            raise ThermoKDError(f"ConfidenceDifficulty needs alpha >= 0, beta >= 0, eps > 0; got "
                                f"alpha={alpha}, beta={beta}, eps={eps}")
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)

    def log_unnormalised(self, rows: Rows) -> Tensor:
        # inputs are detached, so no autograd bookkeeping is needed (this runs every step).
        # log w̃ = α log a + β log(d+ε), normalised by ``finish`` in one stable softmax
        if self.alpha == 0.0:  # not 0·log a, which is NaN where a underflows to 0
            log_w = torch.zeros_like(rows.teacher_label_log_prob)
        else:
            log_w = rows.teacher_label_log_prob if self.alpha == 1.0 else self.alpha * rows.teacher_label_log_prob
        if self.beta:
            # d + ε = ε − expm1(log p_y): exact where p_y is close to 1, in fewer kernels than log(1 + ε − exp)
            log_d = torch.rsub(torch.expm1(rows.student_label_log_prob), self.eps).log_()
            if self.beta != 1.0:
                log_d.mul_(self.beta)
            log_w = log_d.add_(log_w)  # log_d is a fresh tensor: add in place
        return log_w.view(-1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, beta={self.beta:g}, eps={self.eps:g}"


class TeacherEntropy(Weighting):
    """ER-KD: weight each sample by the entropy of the teacher's soft label at ``tau`` (default 4).

    Normalised to mean 1 (``normalize=False`` keeps the raw entropies, as the ER-KD code does)."""

    name = "teacher-entropy"

    def __init__(self, tau: float = 4.0, normalize: bool = True) -> None:
        super().__init__()
        if not tau > 0:
            raise ThermoKDError(f"TeacherEntropy tau must be > 0, got {tau!r}")
        self.tau, self.normalize = float(tau), bool(normalize)

    @torch.no_grad()
    def log_unnormalised(self, rows: Rows) -> Tensor:
        return soft_label_entropy(rows.teacher, self.tau).clamp_min(1e-30).log()  # a one-hot row has H = 0

    def finish(self, log_w: Tensor) -> Tensor:
        return super().finish(log_w) if self.normalize else log_w.exp()

    def shares(self, log_w: Tensor) -> Tensor:
        return super().shares(log_w) if self.normalize else log_w.exp() / log_w.shape[0]


_WEIGHTINGS = {"none": None, "confidence-difficulty": ConfidenceDifficulty, "teacher-entropy": TeacherEntropy}


def build(name: str, **kwargs) -> "Weighting | None":
    """Weighting by name: ``none``, ``confidence-difficulty`` or ``teacher-entropy``."""

    key = name.strip().lower().replace("_", "-")
    if key not in _WEIGHTINGS:
        raise choice_error("weighting", name, list(_WEIGHTINGS))
    cls = _WEIGHTINGS[key]
    return None if cls is None else cls(**kwargs)


__all__ = ["ConfidenceDifficulty", "TeacherEntropy", "Weighting", "build"]
