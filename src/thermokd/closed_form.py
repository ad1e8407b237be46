"""The plain path's forward KL + cross-entropy as one autograd node whose backward is written in closed form.

``L = ce_weight·CE + kd_weight·KD`` with ``KD = Σ_i c_i·KL(p_i ‖ q_i)`` (``c_i``: the row's scale × weight / N, no
gradient) and ``CE = mean_i −log σ(z^s_i)[y_i]``; ``∂L/∂z^s_i = kd_weight·c_i·(q_i − p_i)/τ^s_i +
ce_weight·(σ(z^s_i) − onehot(y_i))/N`` (``RowObjective.closed_form``: forward KL, finite inputs, τ without a
gradient). One node instead of a dozen (two log-softmaxes, the KL, the CE and their backward nodes); the gradient
blocks are made in ``backward`` from saved tensors, so a forward without a backward does none of that work.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .objective import closed_form_gradient, kl_summands

Coef = "Tensor | float"


class ClosedFormKL(torch.autograd.Function):
    """``apply(student, s32, teacher, log_sigma, labels, tau_t, tau_s, row_coef, kd_weight, ce_weight,
    no_label, ce_rows=None)`` → ``(loss, kd, ce)`` (``ce`` None without labels).

    ``student``: the logits as given (any float dtype; only its graph is used), ``s32``/``teacher``: float32 rows
    without gradient, ``log_sigma``: ``log σ(s32)`` at τ=1 (None without labels); ``tau_t``/``tau_s``: floats,
    0-d or ``[N, 1]``; ``row_coef``: ``c_i`` as a float, 0-d or ``[N]``; ``ce_rows``: each row's share of the
    cross-entropy, ``[N]`` (0 for a row that counts nowhere; ``labels`` must then be valid class ids in every row),
    or None for ``1/N`` each. Every output is differentiable: a caller may backpropagate ``kd`` or ``ce`` alone (the
    engine and the user's own code do)."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, s32: Tensor, teacher: Tensor, log_sigma: "Tensor | None",
                labels: "Tensor | None", tau_t: Coef, tau_s: Coef, row_coef: Coef, kd_weight: float,
                ce_weight: float, no_label: int, ce_rows: "Tensor | None" = None
                ) -> "tuple[Tensor, Tensor, Tensor | None]":
        log_p = torch.log_softmax(teacher / tau_t, dim=-1)
        log_q = torch.log_softmax(s32 / tau_s, dim=-1)
        p = log_p.exp()
        kl = kl_summands(p, log_p, log_q).sum(-1)
        # per-row sums either way: c_i ≡ c gives what a scalar c gives, to the bit when c is a power of two
        kd = kl.mul_(row_coef).sum() if isinstance(row_coef, Tensor) and row_coef.dim() else kl.sum() * row_coef
        ce = None
        if log_sigma is not None:
            if ce_rows is None:
                ce = F.nll_loss(log_sigma, labels, ignore_index=no_label)
            else:  # a weighted sum: no row count read, and 0 (not NaN) when no row counts
                ce = -torch.dot(log_sigma.gather(-1, labels.unsqueeze(-1)).squeeze(-1), ce_rows)
            total = torch.add(ce * ce_weight, kd, alpha=kd_weight)
        else:
            total = kd * kd_weight
        ctx.set_materialize_grads(False)  # an output nobody backpropagates gets None, not a zero to add
        ctx.save_for_backward(log_q, p, log_sigma, labels, ce_rows)
        ctx.taus, ctx.weights, ctx.dtype = (tau_s, row_coef), (kd_weight, ce_weight), student.dtype
        return total, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_total: "Tensor | None", g_kd: "Tensor | None", g_ce: "Tensor | None" = None
                 ) -> tuple["Tensor | None", ...]:
        log_q, p, log_sigma, labels, ce_rows = ctx.saved_tensors
        (tau_s, row_coef), (kd_weight, ce_weight) = ctx.taus, ctx.weights
        ce_scale = None
        if log_sigma is not None and ce_rows is None:  # ∂CE/∂z = (σ − onehot)/N
            n = log_sigma.shape[0]
            ce_scale = _incoming(g_total, ce_weight / n, None if g_ce is None else g_ce / n)
        elif log_sigma is not None:  # (σ − onehot)·(the row's share)
            ce_scale = _incoming(g_total, ce_weight, g_ce)
            ce_scale = None if ce_scale is None else ce_rows.unsqueeze(-1) * ce_scale
        per_row = row_coef.unsqueeze(-1) if isinstance(row_coef, Tensor) and row_coef.dim() else row_coef
        coef = per_row / tau_s  # c_i/τ^s_i: a float, 0-d or [N, 1]
        if isinstance(coef, Tensor):
            kd_scale = _incoming(g_total, kd_weight, g_kd)
            coef = coef * kd_scale if kd_scale is not None else 0.0
        else:  # host floats fold into one multiplication
            coef = _incoming(g_total, kd_weight * coef, None if g_kd is None else g_kd * coef)
            coef = 0.0 if coef is None else coef
        if ce_scale is None and isinstance(coef, float):
            return (None,) * 12  # neither term reaches the logits
        sigma = column = None
        if ce_scale is not None:
            sigma, column = log_sigma.exp(), labels.unsqueeze(-1)
        grad = closed_form_gradient(log_q.exp(), p, coef, sigma, column, ce_scale)
        return (grad if grad.dtype == ctx.dtype else grad.to(ctx.dtype),) + (None,) * 11


def _incoming(g_total: "Tensor | None", weight: float, g_own: "Tensor | None") -> "Tensor | None":
    """How much of a term's gradient reaches the logits: ``g_loss·weight`` plus the term's own incoming gradient
    (None: nothing, e.g. a term with weight 0 that nobody backpropagates alone)."""
    scale = g_total * weight if g_total is not None and weight else None
    if g_own is not None:
        scale = g_own if scale is None else scale + g_own
    return scale
