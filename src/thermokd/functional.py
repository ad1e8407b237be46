"""Pure tensor maths for distillation. The class/vocabulary axis is last; temperatures broadcast with a
trailing axis of 1 (``[B,1]``, ``[B,L,1]``) or are scalars. Everything is computed in float32."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import choice_error

DIVERGENCES = ("kl", "reverse_kl", "js", "tvd")


def as_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def tempered_log_softmax(logits: Tensor, tau: "Tensor | float" = 1.0) -> Tensor:
    """``log σ(z/τ)`` over the last axis, in float32."""
    return torch.log_softmax(as_float32(logits) / tau, dim=-1)


def _plogp_diff(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ p (log p − log q) per row; exact zeros where p underflows, so no 0·∞ NaN."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence(log_p: Tensor, log_q: Tensor, kind: str = "kl") -> Tensor:
    """Per-row divergence between teacher ``p`` and student ``q``, given log-probabilities.

    ``kl``: KL(p‖q) (Hinton KD); ``reverse_kl``: KL(q‖p); ``js``: ½KL(p‖m)+½KL(q‖m) with m=(p+q)/2;
    ``tvd``: ½Σ|p−q|.
    """
    if kind == "kl":
        return _plogp_diff(log_p, log_q)
    if kind == "reverse_kl":
        return _plogp_diff(log_q, log_p)
    if kind == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * (_plogp_diff(log_p, log_m) + _plogp_diff(log_q, log_m))
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise choice_error("divergence", kind, DIVERGENCES)


def entropy_from_log_probs(log_p: Tensor) -> Tensor:
    """Shannon entropy in nats per row, ``−Σ p log p``; rows of ``-inf`` entries are handled."""
    return -_plogp_diff(log_p, torch.zeros_like(log_p))


def soft_label_entropy(logits: Tensor, tau: "Tensor | float" = 1.0) -> Tensor:
    """Entropy (nats) of ``σ(z/τ)`` per row."""
    return entropy_from_log_probs(tempered_log_softmax(logits, tau))


def normalised_entropy(logits: Tensor, tau: "Tensor | float" = 1.0) -> Tensor:
    """Entropy of ``σ(z/τ)`` divided by ``log C``, in [0, 1]."""
    return soft_label_entropy(logits, tau) / math.log(logits.shape[-1])


def centred_max(logits: Tensor) -> Tensor:
    """``max_c z_c − mean_c z_c ≥ 0`` per row, keepdim (shape ``[..., 1]``); unchanged by a per-row shift."""
    z = as_float32(logits)
    return (z.amax(-1, keepdim=True) - z.mean(-1, keepdim=True)).clamp_min(0.0)


def logit_std(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Unbiased per-row standard deviation plus ``eps``, keepdim."""
    return as_float32(logits).std(-1, keepdim=True) + eps
