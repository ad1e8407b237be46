"""Per-sample weights for the distillation term (one hook, ``log_unnormalised``, and a declared normalisation),
never differentiated."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import normalisation as norm
from .errors import ThermoKDError, choice_error
from .functional import soft_label_entropy
from .normalisation import Normalisation
from .registry import Registry
from .rows import Rows

if TYPE_CHECKING:
    from .loss import LossOutput

# the loss's part of a weighting, which a subclass may not define (the old finish/shares would be bypassed)
_LOSS_OWNED = ("forward", "observe", "shares_of", "finish", "shares")


class Weighting(nn.Module):
    """Base class of per-sample weights. A subclass defines one method, ``log_unnormalised(rows) -> [N]`` (``log
    w̃`` per row, from that row alone: a chunked loss sees the rows a chunk at a time), and declares how the
    ``w̃`` are normalised over the batch as data, a :class:`~thermokd.normalisation.Normalisation` (default: mean 1
    over the valid rows); the loss applies it (``thermokd.normalisation``), the same way on every path.

    ``normalisation``: a class attribute, or an instance's own (pass it to ``__init__``). A ``running`` mean adds
    the ``running_mean`` buffer (``state_dict``), moved once per optimiser step by :meth:`observe`."""

    name = ""
    normalisation: Normalisation = Normalisation()  # frozen, so a class-level default is safe to share

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for hook in _LOSS_OWNED:
            if hook in vars(cls):
                raise ThermoKDError(f"{cls.__name__} defines {hook}: a Weighting defines log_unnormalised(rows) "
                                    "only and declares its normalisation (thermokd.normalisation.Normalisation)")

    def __init__(self, normalisation: "Normalisation | None" = None) -> None:
        super().__init__()
        self.normalisation = normalisation or type(self).normalisation
        if self.normalisation.stateful:  # the running mean of the batches' mean w̃; NaN until the first observe
            self.register_buffer("running_mean", torch.tensor(float("nan")))
        self.step_means = norm.StepMeans()  # this step's batch means, committed by observe (tensors: no sync)

    def log_unnormalised(self, rows: Rows) -> Tensor:
        raise ThermoKDError(f"{type(self).__name__} does not define log_unnormalised(rows): a Weighting gives "
                            "log w̃ per row there and declares its normalisation")

    def shares_of(self, log_w: Tensor, keep: "Tensor | None" = None, count: "Tensor | None" = None) -> Tensor:
        """``w_i/N`` of the declared normalisation for the ``log w̃`` of every valid row (what the loss uses);
        with ``keep``/``count``, of those rows only, the others at 0 (``normalisation.shares``)."""
        return norm.shares(log_w, self.normalisation, self._buffers.get("running_mean"), self.step_means, keep,
                           count)

    @property
    def uniform(self) -> bool:
        """Every weight is 1 whatever the rows (``mix`` 0: the blend is all uniform), so the loss skips computing
        them: no weights, no weight statistics, nothing to observe."""
        return self.normalisation.mix == 0.0

    def forward(self, rows: Rows) -> Tensor:  # not a hook: see _LOSS_OWNED
        """The weights ``[N]`` of these (valid) rows: mean 1 under a ``batch`` normalisation."""
        return self.shares_of(self.log_unnormalised(rows)) * rows.num_rows

    def observe(self, output: "LossOutput | None" = None) -> None:
        """Called by ``DistillationLoss.observe`` after the optimiser step: a running mean moves (no sync)."""
        running = self._buffers.get("running_mean")
        if running is not None:
            norm.commit(running, self.step_means, self.normalisation.momentum)


CONFIDENCES = ("label", "max")
DIFFICULTIES = ("error", "ce")
NORMALISATIONS = ("batch", "running")


class ConfidenceDifficulty(Weighting):
    """CIST's weights (reconstructed: the paper gives no formula; the bounding options are ours, docs/methods.md):
    ``w̃_i = a_i^α · (d_i + ε)^β``, normalised as it declares (``thermokd.normalisation``, in this order):
    ``max_ratio`` R floors every ``w̃`` at 1/R of the largest (None: off); ``normalise`` divides by the batch's mean
    ``w̃`` (``batch``) or by a running mean of the batches' means (``running``, a buffer moved once per optimiser
    step with ``momentum``; the batch's own mean until then); ``mix`` λ blends with uniform weights,
    ``w_i = (1 − λ) + λ·ŵ_i`` (λ = 1: off).

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
        if not (alpha >= 0 and beta >= 0 and eps > 0):
            raise ThermoKDError(f"ConfidenceDifficulty needs alpha >= 0, beta >= 0, eps > 0; got "
                                f"alpha={alpha}, beta={beta}, eps={eps}")
        for kind, value, allowed in (("confidence", confidence, CONFIDENCES), ("difficulty", difficulty, DIFFICULTIES),
                                     ("normalise", normalise, NORMALISATIONS)):
            if value not in allowed:
                raise choice_error(f"ConfidenceDifficulty {kind}", value, allowed)
        # Normalisation checks max_ratio, mix and momentum (one place for the weights' options)
        super().__init__(Normalisation(mean=normalise, max_ratio=max_ratio, mix=mix, momentum=momentum))
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.confidence, self.difficulty = confidence, difficulty

    # the normalisation's options, read-only: the declared Normalisation is the one place they live
    normalise = property(lambda self: self.normalisation.mean)
    mix = property(lambda self: self.normalisation.mix)
    max_ratio = property(lambda self: self.normalisation.max_ratio)
    momentum = property(lambda self: self.normalisation.momentum)

    @staticmethod
    def search_space() -> dict[str, Any]:
        """The knobs a tuner may search, by keyword: ``(low, high, log)`` for a number, a list for a choice."""
        return {"alpha": (0.0, 2.0, False), "beta": (0.0, 2.0, False), "eps": (1e-3, 1.0, True),
                "confidence": list(CONFIDENCES), "difficulty": list(DIFFICULTIES), "mix": (0.0, 1.0, False),
                "max_ratio": (1.0, 100.0, True), "normalise": list(NORMALISATIONS)}

    def max_weight(self, num_rows: int) -> float:
        """The largest weight a batch of ``num_rows`` rows can get with ``normalise="batch"`` (``num_rows`` itself
        without ``max_ratio`` and with ``mix=1``)."""
        return norm.max_weight(self.normalisation, num_rows)

    def log_unnormalised(self, rows: Rows) -> Tensor:
        # inputs are detached, so no autograd bookkeeping is needed (this runs every step).
        # log w̃ = α log a + β log(d+ε); the loss normalises it as declared (thermokd.normalisation)
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

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, beta={self.beta:g}, eps={self.eps:g}, confidence={self.confidence}, "
                f"difficulty={self.difficulty}, mix={self.mix:g}, max_ratio={self.max_ratio}, "
                f"normalise={self.normalise}")


class TeacherEntropy(Weighting):
    """ER-KD: weight each sample by the entropy of the teacher's soft label at ``tau`` (default 4).

    Normalised to mean 1 (``normalize=False`` keeps the raw entropies, as the ER-KD code does)."""

    name = "teacher-entropy"

    def __init__(self, tau: float = 4.0, normalize: bool = True) -> None:
        super().__init__(Normalisation(mean="batch" if normalize else "none"))
        if not tau > 0:
            raise ThermoKDError(f"TeacherEntropy tau must be > 0, got {tau!r}")
        self.tau, self.normalize = float(tau), bool(normalize)

    @torch.no_grad()
    def log_unnormalised(self, rows: Rows) -> Tensor:
        return soft_label_entropy(rows.teacher, self.tau).clamp_min(1e-30).log()  # a one-hot row has H = 0


WEIGHTINGS: "Registry[Weighting | None]" = Registry("weighting", {
    "none": lambda: None, "confidence-difficulty": ConfidenceDifficulty, "teacher-entropy": TeacherEntropy})


def build(name: str, **kwargs) -> "Weighting | None":
    """Weighting by name: ``none``, ``confidence-difficulty`` or ``teacher-entropy``."""
    return WEIGHTINGS.build(name, **kwargs)


__all__ = ["ConfidenceDifficulty", "Normalisation", "TeacherEntropy", "Weighting", "build"]
