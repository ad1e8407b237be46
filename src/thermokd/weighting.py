"""Per-sample weights for the distillation term, normalised to mean 1 over the valid rows, never differentiated."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import ThermoKDError, choice_error
from .functional import soft_label_entropy
from .registry import Registry
from .rows import Rows

if TYPE_CHECKING:
    from .loss import LossOutput


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

    def observe(self, output: "LossOutput") -> None:
        """Called by ``DistillationLoss.observe`` after the optimiser step; stateful weightings update here."""


CONFIDENCES = ("label", "max")
DIFFICULTIES = ("error", "ce")
NORMALISATIONS = ("batch", "running")


def _in_unit_interval(label: str, value: float, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0.0 <= value < 1.0 if open_high else 0.0 <= value <= 1.0):
        raise ThermoKDError(f"ConfidenceDifficulty {label} must be in [0, 1{')' if open_high else ']'}, "
                            f"got {value!r}")
    return float(value)


class ConfidenceDifficulty(Weighting):
    """CIST's weights (reconstructed: the paper gives no formula; the bounding options are ours, docs/methods.md):
    ``w̃_i = a_i^α · (d_i + ε)^β``, then

    1. ``max_ratio`` R (None: off): ``w̃_i ← max(w̃_i, max_j w̃_j / R)``, so no weight is below 1/R of the largest;
    2. ``normalise``: ``batch`` divides by the batch's mean ``w̃`` (mean 1 over the rows given); ``running`` by a
       running mean of the batches' mean ``w̃`` (a buffer, moved in :meth:`observe` with ``momentum``; the batch's
       own mean until the first update), so a batch's weights need not have mean 1;
    3. ``mix`` λ ∈ [0, 1]: ``w_i = (1 − λ) + λ·ŵ_i``, a blend with uniform weights (λ = 1: off).

    With ``normalise="batch"`` the largest weight of a batch of N rows is at most
    ``(1 − λ) + λ·N·R/(R + N − 1) < (1 − λ) + λ·R`` (:meth:`max_weight`).

    Confidence ``a_i``: ``label`` = ``σ(z^t_i)[y_i]`` (``max`` without labels) or ``max`` = ``max_c σ(z^t_i)``.
    Difficulty ``d_i``: ``error`` = ``1 − σ(z^s_i)[y_i]`` or ``ce`` = ``−log σ(z^s_i)[y_i]`` (max-probability
    versions without labels). ``alpha=0`` or ``beta=0`` switches a factor off.
    """

    name = "confidence-difficulty"

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, eps: float = 1e-3, confidence: str = "label",
                 difficulty: str = "error", mix: float = 0.5, max_ratio: "float | None" = 4.0,
                 normalise: str = "batch", momentum: float = 0.9) -> None:
        super().__init__()
        if not (alpha >= 0 and beta >= 0 and eps > 0):
            raise ThermoKDError(f"ConfidenceDifficulty needs alpha >= 0, beta >= 0, eps > 0; got "
                                f"alpha={alpha}, beta={beta}, eps={eps}")
        for kind, value, allowed in (("confidence", confidence, CONFIDENCES), ("difficulty", difficulty, DIFFICULTIES),
                                     ("normalise", normalise, NORMALISATIONS)):
            if value not in allowed:
                raise choice_error(f"ConfidenceDifficulty {kind}", value, allowed)
        if max_ratio is not None and (isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float))
                                      or not max_ratio >= 1):
            raise ThermoKDError(f"ConfidenceDifficulty max_ratio must be a number >= 1 or None, got {max_ratio!r}")
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.confidence, self.difficulty, self.normalise = confidence, difficulty, normalise
        self.mix = _in_unit_interval("mix", mix)
        self.momentum = _in_unit_interval("momentum", momentum, open_high=True)
        self.max_ratio = None if max_ratio is None else float(max_ratio)
        self._log_floor = None if max_ratio is None else math.log(max_ratio)
        if normalise == "running":  # the running mean of the batches' mean w̃; NaN until the first observe
            self.register_buffer("running_mean", torch.tensor(float("nan")))
        # this step's summed batch means and their count, committed by observe (a tensor: no sync)
        self._pending: "tuple[Tensor, int] | None" = None

    @staticmethod
    def search_space() -> dict[str, Any]:
        """The knobs a tuner may search, by keyword: ``(low, high, log)`` for a number, a list for a choice."""
        return {"alpha": (0.0, 2.0, False), "beta": (0.0, 2.0, False), "eps": (1e-3, 1.0, True),
                "confidence": list(CONFIDENCES), "difficulty": list(DIFFICULTIES), "mix": (0.0, 1.0, False),
                "max_ratio": (1.0, 100.0, True), "normalise": list(NORMALISATIONS)}

    def max_weight(self, num_rows: int) -> float:
        """The largest weight a batch of ``num_rows`` rows can get with ``normalise="batch"`` (``num_rows`` itself
        without ``max_ratio`` and with ``mix=1``)."""
        n, lam = float(num_rows), self.mix
        top = n if self.max_ratio is None else n * self.max_ratio / (self.max_ratio + n - 1.0)
        return (1.0 - lam) + lam * top

    def log_unnormalised(self, rows: Rows) -> Tensor:
        # inputs are detached, so no autograd bookkeeping is needed (this runs every step).
        # log w̃ = α log a + β log(d+ε), normalised by ``finish`` in one stable softmax
        if self.alpha == 0.0:  # not 0·log a, which is NaN where a underflows to 0
            log_w = torch.zeros_like(rows.teacher_label_log_prob)
        else:
            log_a = (rows.teacher_log_probs.amax(-1, keepdim=True) if self.confidence == "max"
                     else rows.teacher_label_log_prob)
            log_w = log_a if self.alpha == 1.0 else self.alpha * log_a
        if self.beta:
            if self.difficulty == "ce":  # d + ε = ε − log p_y
                log_d = torch.rsub(rows.student_label_log_prob, self.eps).log_()
            else:  # d + ε = ε − expm1(log p_y): exact where p_y is close to 1, in fewer kernels than log(1 + ε − exp)
                log_d = torch.rsub(torch.expm1(rows.student_label_log_prob), self.eps).log_()
            if self.beta != 1.0:
                log_d.mul_(self.beta)
            log_w = log_d.add_(log_w)  # log_d is a fresh tensor: add in place
        return log_w.view(-1)

    def finish(self, log_w: Tensor) -> Tensor:
        return self._shares(log_w) * log_w.shape[0]

    def shares(self, log_w: Tensor) -> Tensor:
        # a subclass that changes ``finish`` alone keeps its own weights
        if type(self).finish is not ConfidenceDifficulty.finish:
            return self.finish(log_w) / log_w.shape[0]
        return self._shares(log_w)

    def _shares(self, log_w: Tensor) -> Tensor:
        """The weights of the class docstring divided by the number of rows."""
        n = log_w.shape[0]
        if self._log_floor is not None:
            log_w = torch.maximum(log_w, log_w.max() - self._log_floor)
        if self.normalise == "batch":
            shares = torch.softmax(log_w, dim=0)
        else:
            log_mean = torch.logsumexp(log_w, dim=0) - math.log(n)
            total, count = self._pending or (0.0, 0)
            self._pending = (log_mean.detach().exp() + total, count + 1)
            ref = self.running_mean.to(log_w.device).log()
            shares = (log_w - torch.where(torch.isnan(ref), log_mean, ref)).exp_().div_(n)
        return shares if self.mix == 1.0 else shares.mul_(self.mix).add_((1.0 - self.mix) / n)  # a fresh tensor

    @torch.no_grad()
    def observe(self, output: "LossOutput") -> None:
        """``normalise="running"``: move the running mean towards this step's mean ``w̃`` (tensor ops, no sync)."""
        if self._pending is None:
            return
        value = (self._pending[0] / self._pending[1]).to(self.running_mean.device)
        self._pending = None
        r = self.running_mean
        r.copy_(torch.where(torch.isnan(r), value, torch.lerp(value, r, self.momentum)))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, beta={self.beta:g}, eps={self.eps:g}, confidence={self.confidence}, "
                f"difficulty={self.difficulty}, mix={self.mix:g}, max_ratio={self.max_ratio}, "
                f"normalise={self.normalise}")


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


WEIGHTINGS: "Registry[Weighting | None]" = Registry("weighting", {
    "none": lambda: None, "confidence-difficulty": ConfidenceDifficulty, "teacher-entropy": TeacherEntropy})


def build(name: str, **kwargs) -> "Weighting | None":
    """Weighting by name: ``none``, ``confidence-difficulty`` or ``teacher-entropy``."""
    return WEIGHTINGS.build(name, **kwargs)


__all__ = ["ConfidenceDifficulty", "TeacherEntropy", "Weighting", "build"]
