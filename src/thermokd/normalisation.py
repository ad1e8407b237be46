"""How a weighting's per-row ``log w̃`` become the weights the loss uses: the one place that maths lives.

A :class:`~thermokd.weighting.Weighting` defines ``log_unnormalised(rows)`` and declares a :class:`Normalisation`
(data, not code); the loss (plain, chunked and fused paths alike) turns the two into weights here. In order:

1. ``max_ratio`` R (None: off): ``w̃_i ← max(w̃_i, max_j w̃_j / R)``, so no weight is below 1/R of the largest;
2. ``mean``: ``batch`` divides by the batch's mean ``w̃`` (mean 1 over the rows given); ``running`` by a running
   mean of the batches' mean ``w̃`` (the weighting's ``running_mean`` buffer, moved by :func:`commit` once per
   optimiser step with ``momentum``; the batch's own mean until the first commit); ``none`` keeps ``w̃``;
3. ``mix`` λ ∈ [0, 1]: ``w_i = (1 − λ) + λ·ŵ_i``, a blend with uniform weights (λ = 1: off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ThermoKDError, choice_error

MEANS = ("batch", "running", "none")


@dataclass(frozen=True)
class Normalisation:
    """A weighting's declared normalisation (see the module docstring); the default is mean 1 over the batch."""

    mean: str = "batch"
    max_ratio: "float | None" = None
    mix: float = 1.0
    momentum: float = 0.9  # of the running mean; unused by the other means

    def __post_init__(self) -> None:  # the one place these options are checked (ConfidenceDifficulty's included)
        if self.mean not in MEANS:
            raise choice_error("normalisation mean", self.mean, MEANS)
        for name, allowed, ok in (("max_ratio", ">= 1 or None", lambda v: v is None or (_number(v) and v >= 1)),
                                  ("mix", "in [0, 1]", lambda v: _number(v) and 0.0 <= v <= 1.0),
                                  ("momentum", "in [0, 1)", lambda v: _number(v) and 0.0 <= v < 1.0)):
            value = getattr(self, name)
            if not ok(value):
                raise ThermoKDError(f"normalisation {name} must be {allowed} (a number), got {value!r}")
            if value is not None:
                object.__setattr__(self, name, float(value))

    @property
    def stateful(self) -> bool:
        """Whether the weights depend on earlier batches (a ``running`` mean): a loss checks its inputs first."""
        return self.mean == "running"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class StepMeans:
    """The batch means of ``w̃`` seen since the last :func:`commit` (several with gradient accumulation), summed
    as a device tensor: no sync. Transient: a checkpoint holds the running mean, not an unfinished step."""

    def __init__(self) -> None:
        self.total: "Tensor | None" = None
        self.count: "int | Tensor" = 0

    def add(self, mean: Tensor, present: "Tensor | None" = None) -> None:
        """``present`` (a 0-d bool tensor): whether the batch had any valid row, decided on the device (rows
        weighted by zero); a batch without one adds nothing."""
        if present is not None:
            mean = torch.where(present, mean, 0.0)
        self.total = mean if self.total is None else self.total + mean
        self.count = self.count + (1 if present is None else present.float())

    def take(self) -> "tuple[Tensor, Tensor | None] | None":
        """Their mean and, when batches were counted on the device, whether there was any (a 0-d bool tensor;
        None: there was); None if none was added. Then start afresh."""
        total, count = self.total, self.count
        self.total, self.count = None, 0
        if total is None:
            return None
        if isinstance(count, Tensor):
            return total / count.clamp_min(1.0), count > 0
        return total / count, None


def shares(log_w: Tensor, spec: Normalisation, running_mean: "Tensor | None" = None,
           step: "StepMeans | None" = None, keep: "Tensor | None" = None, count: "Tensor | None" = None) -> Tensor:
    """``w_i/N`` for the ``[N]`` ``log w̃`` of every valid row of a batch: the loss takes ``Σ_i share_i·D_i``,
    which equals ``mean_i w_i·D_i``. A ``running`` mean reads ``running_mean`` (NaN: not set yet) and records the
    batch's mean in ``step``. ``keep`` (``[N]`` bool) and ``count`` (a tensor): only those rows are valid, the
    others get a share of 0, and nothing reads the count."""
    if spec.mean == "running" and (running_mean is None or step is None):
        raise ThermoKDError("a running normalisation needs its running_mean buffer and the step's means")
    if keep is not None:
        return _kept_shares(log_w, spec, keep, count, running_mean, step)
    n = log_w.shape[0]
    if spec.max_ratio is not None:
        log_w = torch.maximum(log_w, log_w.max() - math.log(spec.max_ratio))
    if spec.mean == "batch":  # N·w̃_i/Σw̃ computed as a softmax: stable
        out = torch.softmax(log_w, dim=0)
    elif spec.mean == "none":
        out = log_w.exp().div_(n)
    else:
        log_mean = torch.logsumexp(log_w, dim=0) - math.log(n)
        step.add(log_mean.detach().exp())
        out = (log_w - _reference(running_mean, log_mean)).exp_().div_(n)
    return out if spec.mix == 1.0 else out.mul_(spec.mix).add_((1.0 - spec.mix) / n)  # a fresh tensor


def _reference(running_mean: Tensor, log_mean: Tensor) -> Tensor:
    """``log`` of what a running normalisation divides by: the running mean, or the batch's own until it is set."""
    ref = running_mean.to(log_mean.device).log()
    return torch.where(torch.isnan(ref), log_mean, ref)


def _kept_shares(log_w: Tensor, spec: Normalisation, keep: Tensor, count: Tensor,
                 running_mean: "Tensor | None", step: "StepMeans | None") -> Tensor:
    """:func:`shares` over the rows of ``keep`` with the others at 0, computed on the device: their ``log w̃`` is
    −inf for the floor's maximum, the softmax and the batch's mean, and the uniform part of the blend is 1/count.
    A batch with no valid row adds nothing to a running mean's step."""
    none = torch.tensor(-math.inf, dtype=log_w.dtype, device=log_w.device)
    log_w = torch.where(keep, log_w, none)
    if spec.max_ratio is not None:
        log_w = torch.where(keep, torch.maximum(log_w, log_w.max() - math.log(spec.max_ratio)), none)
    rows = count.clamp_min(1.0)
    if spec.mean == "batch":  # over no valid row the softmax is NaN everywhere: those shares are 0
        out = torch.where(keep, torch.softmax(log_w, dim=0), 0.0)
    elif spec.mean == "none":
        out = log_w.exp().div_(rows)
    else:
        log_mean = torch.logsumexp(log_w, dim=0) - rows.log()
        step.add(log_mean.detach().exp(), present=count > 0)
        out = torch.where(keep, (log_w - _reference(running_mean, log_mean)).exp(), 0.0).div_(rows)
    return out if spec.mix == 1.0 else out.mul_(spec.mix).add_(keep.float().mul_(1.0 - spec.mix).div_(rows))


def weights(log_w: Tensor, spec: Normalisation, running_mean: "Tensor | None" = None,
            step: "StepMeans | None" = None) -> Tensor:
    """The weights ``w_i`` themselves: :func:`shares` times the number of rows."""
    return shares(log_w, spec, running_mean, step) * log_w.shape[0]


@torch.no_grad()
def commit(running_mean: Tensor, step: StepMeans, momentum: float) -> None:
    """Once per optimiser step: move ``running_mean`` towards the step's mean ``w̃`` (its value if still NaN);
    tensor ops in place, no sync. Nothing happens if no batch was seen."""
    taken = step.take()
    if taken is None:
        return
    value, seen = taken[0].to(running_mean.device), taken[1]
    moved = torch.where(torch.isnan(running_mean), value, torch.lerp(value, running_mean, momentum))
    running_mean.copy_(moved if seen is None else torch.where(seen, moved, running_mean))


def max_weight(spec: Normalisation, num_rows: int) -> float:
    """The largest weight a batch of ``num_rows`` rows can get under a ``batch`` mean: ``(1 − λ) + λ·N·R/(R + N −
    1) < (1 − λ) + λ·R`` (``N`` itself without ``max_ratio`` and with ``mix=1``)."""
    n, lam = float(num_rows), spec.mix
    top = n if spec.max_ratio is None else n * spec.max_ratio / (spec.max_ratio + n - 1.0)
    return (1.0 - lam) + lam * top


__all__ = ["MEANS", "Normalisation", "StepMeans", "commit", "max_weight", "shares", "weights"]
