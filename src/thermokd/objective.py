"""The per-row distillation maths, shared by the plain, chunked and fused (hidden states + head) paths.

A :class:`RowObjective` is immutable: it holds what a loss *is* (family, divergence, scale, DKD's α/β) and
turns rows of logits plus temperatures into per-row divergences. It never reads a value back to the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .dkd import dkd_terms
from .errors import ThermoKDError
from .functional import divergence


def log_softmax(x: Tensor, precise: bool = False) -> Tensor:
    """``log σ(x)`` over the last axis. ``precise``: the normaliser is an explicit ``.sum`` (torch's cascade
    summation), because ``torch.log_softmax``'s own accumulation leaves a systematic error at large vocabularies
    that a divergence summed over the vocabulary keeps (measured in docs/methods.md, the chunked loss)."""
    if not precise:
        return torch.log_softmax(x, dim=-1)
    shifted = x - x.amax(-1, keepdim=True)
    log_norm = shifted.exp().sum(-1, keepdim=True).log_()
    return shifted.sub_(log_norm) if not shifted.requires_grad else shifted - log_norm


def _softmax_pair(x: Tensor, fresh: bool = False) -> tuple[Tensor, Tensor]:
    """``(log σ(x), σ(x))`` without gradient, the normaliser an explicit sum (as ``log_softmax(precise=True)``)
    and one ``exp`` for both. ``fresh``: ``x`` is a temporary that may be overwritten."""
    log_p = x.sub_(x.amax(-1, keepdim=True)) if fresh else x - x.amax(-1, keepdim=True)
    p = log_p.exp()
    norm = p.sum(-1, keepdim=True)
    log_p.sub_(norm.log())
    return log_p, p.div_(norm)


def native_softmax(x: Tensor) -> bool:
    """Whether the chunked and fused paths use torch's fused log-softmax kernel on ``x``'s device: on CUDA (one
    kernel instead of six passes over the block; its reduction is a tree, accurate to float32 round-off at a
    50k vocabulary), not on the CPU, whose accumulation is the error ``log_softmax(precise=True)`` avoids."""
    return x.device.type == "cuda"


def _tempered_pair(x: Tensor, native: bool) -> tuple[Tensor, Tensor]:
    """``(log σ(x), σ(x))`` of a temporary block ``x`` that may be overwritten: two blocks alive, not three."""
    if not native:
        return _softmax_pair(x, fresh=True)
    log_p = torch.log_softmax(x, dim=-1)
    return log_p, torch.exp(log_p, out=x)


def kl_summands(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """Forward KL's ``p·(log p − log q)`` per entry, ``[N, C]``, written into ``log_p`` (no temporary block)."""
    return log_p.sub_(log_q).mul_(p)


@torch.no_grad()
def closed_form_gradient(q: Tensor, p: Tensor, kd_coef: "Tensor | float", sigma: "Tensor | None",
                         column: "Tensor | None", ce_coef: "Tensor | float") -> Tensor:
    """``kd_coef·(q − p) + ce_coef·(σ(z^s) − onehot(y))``, written into ``q``: the gradient of forward KL
    (``kd_coef`` = each row's factor/τ^s, scalar or ``[N, 1]``) plus cross-entropy (``sigma`` = σ(z^s) at τ=1 and
    ``column`` = the labels as ``[N, 1]``; None: no CE). Coefficients may be tensors (an incoming gradient, no
    host read) or floats."""
    grad = q.sub_(p).mul_(kd_coef)
    if column is not None:
        if isinstance(ce_coef, Tensor):
            grad.addcmul_(sigma, ce_coef)
            minus = ce_coef.neg().expand(column.shape)
        else:
            grad.add_(sigma, alpha=ce_coef)
            minus = torch.full(column.shape, -ce_coef, dtype=grad.dtype, device=grad.device)
        grad.scatter_add_(-1, column, minus)  # − ce_coef at each row's label: N entries, no one-hot block
    return grad


class RowDivergence(NamedTuple):
    """``per_row``: ``[N]`` divergence before scale and weights; ``dkd``: DKD's unscaled (TCKD, NCKD) rows;
    ``entropy``: the teacher's soft-label entropy per row ``[N]`` (a statistic, no gradient)."""

    per_row: Tensor
    dkd: "tuple[Tensor, Tensor] | None"
    entropy: "Tensor | None"


def _entropy(p: Tensor, log_p: Tensor) -> Tensor:
    """``−Σ p log p`` per row, no gradient: computed with the loss (two kernels) so that the statistics, read
    later or never, hold ``[N]`` values rather than the teacher's ``[N, C]`` rows."""
    return (p.detach() * log_p.detach()).sum(-1).neg_()


class ClosedFormChunk(NamedTuple):
    """One chunk of forward KL + CE with its gradient in closed form (see :meth:`RowObjective.kl_chunk`)."""

    grad: Tensor
    kd_sum: Tensor
    ce_sum: Tensor
    entropy: Tensor


@dataclass(frozen=True)
class RowObjective:
    """``family`` ("kd" or "dkd"), ``divergence`` (kl, reverse_kl, js, tvd), ``scale`` ("product" or "none"),
    DKD's ``dkd_alpha``/``dkd_beta``; ``learnable``: τ carries a gradient (the student rows are centred);
    ``finite``: the inputs were checked finite, so forward KL needs no underflow guard; ``precise``: log-softmax
    normalisers as explicit sums (the chunked and fused paths, which work on a chunk at a time)."""

    family: str = "kd"
    divergence: str = "kl"
    scale: str = "product"
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    learnable: bool = False
    finite: bool = True
    precise: bool = False

    @property
    def closed_form(self) -> bool:
        """Whether :meth:`kl_chunk` (forward KL, gradient written down) computes this objective."""
        return self.family == "kd" and self.divergence == "kl" and self.finite and not self.learnable

    def rows(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", tau_t: Tensor,
             tau_s: Tensor, entropy: bool = True) -> RowDivergence:
        """Per-row divergence of float32 ``[N, C]`` rows at τ^t, τ^s (scalars or ``[N, 1]``); ``entropy=False``
        leaves the teacher's entropy out (None; :meth:`teacher_entropy` computes it later if wanted)."""
        if self.learnable:
            # the value is unchanged (softmax ignores a per-row shift), but the gradient loses the uniform
            # component that float noise in q − p picks up when divided by a τ carrying its own gradient
            # (a constant student row gives logit standardisation a τ of ~1e-7)
            student = student - student.mean(-1, keepdim=True)
        if self.family == "dkd":
            if labels is None:
                raise ThermoKDError("family 'dkd' needs labels: it splits the target class from the others")
            tckd, nckd = dkd_terms(student, teacher, labels, tau_t, tau_s)
            h = self.teacher_entropy(teacher, tau_t.detach()) if entropy else None
            return RowDivergence(self.dkd_alpha * tckd + self.dkd_beta * nckd, (tckd, nckd), h)
        log_p_t = log_softmax(teacher / tau_t, self.precise)
        log_q = log_softmax(student / tau_s, self.precise)
        if self.divergence == "kl" and self.finite:  # finite inputs: log p_t is finite, no 0·∞ to guard
            if not entropy:  # p_t is not needed apart: the same Σ p_t·(log p_t − log q) in one call
                return RowDivergence(F.kl_div(log_q, log_p_t, reduction="none", log_target=True).sum(-1), None, None)
            p_t = log_p_t.exp()
            return RowDivergence((p_t * (log_p_t - log_q)).sum(-1), None, _entropy(p_t, log_p_t))
        h = _entropy(log_p_t.exp(), log_p_t) if entropy else None
        return RowDivergence(divergence(log_p_t, log_q, self.divergence), None, h)

    def mean(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", tau_t: Tensor, tau_s: Tensor,
             entropy: bool = True) -> tuple[Tensor, "Tensor | None"]:
        """``mean_i D_i`` and the teacher entropies ``[N]`` (None with ``entropy=False``); forward KL as one
        reduction over every entry (no per-row sums to keep a graph for)."""
        if self.family == "kd" and self.divergence == "kl" and self.finite and not self.learnable:
            log_p_t = log_softmax(teacher / tau_t, self.precise)
            log_q = log_softmax(student / tau_s, self.precise)
            if not entropy:
                return F.kl_div(log_q, log_p_t, reduction="sum", log_target=True) / student.shape[0], None
            p_t = log_p_t.exp()
            return (p_t * (log_p_t - log_q)).sum() / student.shape[0], _entropy(p_t, log_p_t)
        rows = self.rows(student, teacher, labels, tau_t, tau_s, entropy)
        return rows.per_row.mean(), rows.entropy

    def row_scale(self, tau_t: Tensor, tau_s: Tensor, strategy_scale: "Tensor | None") -> "Tensor | None":
        """The τ^t·τ^s factor (or the strategy's own), scalar or ``[N]``; None with ``scale="none"``."""
        if self.scale != "product":
            return None
        factor = strategy_scale if strategy_scale is not None else tau_t * tau_s
        return factor.reshape(-1) if factor.dim() else factor

    @staticmethod
    def factor(scale: "Tensor | None", weights: "Tensor | None") -> "Tensor | None":
        """What multiplies each row's divergence: the scale times the weights (either may be absent)."""
        if weights is None:
            return scale
        return weights if scale is None else scale * weights

    def dkd_scale(self, tau_t: Tensor, tau_s: Tensor) -> "Tensor | float":
        """DKD's terms are reported scaled by τ^t·τ^s per row."""
        return (tau_t * tau_s).detach().reshape(-1) if self.scale == "product" else 1.0

    @staticmethod
    @torch.no_grad()
    def teacher_entropy(teacher: Tensor, tau_t: Tensor) -> Tensor:
        """Soft-label entropy of the teacher at τ^t per row, ``[N]`` (a statistic: no gradient)."""
        log_p = torch.log_softmax(teacher / tau_t, dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    @staticmethod
    @torch.no_grad()
    def kl_chunk(teacher: Tensor, student: Tensor, labels: "Tensor | None", tau_t: Tensor, tau_s: Tensor,
                 factor: "Tensor | None", kd_coef: float, ce_weight: float, n: "int | Tensor",
                 fresh_teacher: bool = False, row_mask: "Tensor | None" = None) -> ClosedFormChunk:
        """Forward KL (plus CE) for one chunk of float32 rows with the gradient in closed form,
        ``∂/∂z^s = coef·f·(q − p)/τ^s + ce_weight·(σ(z^s) − onehot)/N``.
        Per-row sums are plain ``.sum`` reductions (a ``bmm`` row dot product loses ~4e-5 relative in float32).
        ``fresh_teacher``: ``teacher`` is a temporary of the caller's that may be overwritten. ``row_mask``
        (``[n]``, 1 or 0): rows at 0 count nowhere, in the value or the gradient (their logits must be finite)."""
        if row_mask is not None:
            factor = row_mask if factor is None else factor * row_mask
        # a teacher block made for this chunk (a head's output) is scaled in place: one [n, C] block less alive
        native = native_softmax(student)
        log_p, p = _tempered_pair(teacher.div_(tau_t) if fresh_teacher else teacher / tau_t, native)
        del teacher
        entropy = -(p * log_p).sum(-1)  # before the student's blocks exist: its temporary is not the peak
        log_q, q = _tempered_pair(student / tau_s, native)
        kl = kl_summands(p, log_p, log_q).sum(-1)
        del log_p, log_q
        coef = kd_coef / tau_s / n
        if factor is not None:
            coef = coef * (factor.unsqueeze(-1) if factor.dim() else factor)
        ce = q.new_zeros(())
        probs = column = None
        if labels is not None:
            column = labels.unsqueeze(-1)
            if native:  # log σ(z^s) in one kernel, then σ(z^s) in its place
                probs = torch.log_softmax(student, dim=-1)
                ce_rows = probs.gather(-1, column)
                probs.exp_()
            else:
                # σ(z^s) and log σ(z^s)_y = (z_y − max) − log Σ exp(z − max) from one [n, C] block (no log σ block)
                top = student.amax(-1, keepdim=True)
                probs = (student - top).exp_()
                norm = probs.sum(-1, keepdim=True)
                ce_rows = (student.gather(-1, column) - top).sub_(norm.log())
                probs.div_(norm)
            ce = -(ce_rows.sum() if row_mask is None else torch.dot(ce_rows.reshape(-1), row_mask))
        ce_coef = ce_weight / n if row_mask is None else (ce_weight / n) * row_mask.unsqueeze(-1)
        grad = closed_form_gradient(q, p, coef, probs, column if ce_weight else None, ce_coef)
        del p, probs
        weighted = kl if factor is None else kl * factor
        return ClosedFormChunk(grad, weighted.sum(), ce, entropy)
