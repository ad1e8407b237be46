"""DKD's decoupled terms (Zhao et al., CVPR 2022) with temperatures that may differ per sample and per model."""
from __future__ import annotations

import torch
from torch import Tensor

from .functional import divergence


def dkd_terms(student: Tensor, teacher: Tensor, labels: Tensor, tau_t: Tensor, tau_s: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row TCKD (binary target/non-target KL) and NCKD (KL among non-target classes), unscaled.

    Works in log space with the target class excluded by ``-inf`` (the public code subtracts 1000, which is
    not enough for large logits).
    """
    gt = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, labels.unsqueeze(-1), True)
    a_t, a_s = teacher / tau_t, student / tau_s
    lse_t, lse_s = torch.logsumexp(a_t, -1, keepdim=True), torch.logsumexp(a_s, -1, keepdim=True)
    other_t = torch.logsumexp(a_t.masked_fill(gt, float("-inf")), -1, keepdim=True)
    other_s = torch.logsumexp(a_s.masked_fill(gt, float("-inf")), -1, keepdim=True)
    y = labels.unsqueeze(-1)
    binary_t = torch.cat([a_t.gather(-1, y) - lse_t, other_t - lse_t], dim=-1)
    binary_s = torch.cat([a_s.gather(-1, y) - lse_s, other_s - lse_s], dim=-1)
    tckd = divergence(binary_t, binary_s, "kl")
    # non-target distributions; the target entry gets log-prob 0 on both sides, so it contributes nothing
    log_nt_t = (a_t - other_t).masked_fill(gt, 0.0)
    log_nt_s = (a_s - other_s).masked_fill(gt, 0.0)
    p_nt_t = torch.exp(log_nt_t).masked_fill(gt, 0.0)
    nckd = (p_nt_t * (log_nt_t - log_nt_s)).sum(-1)
    return tckd, nckd
