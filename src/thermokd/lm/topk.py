"""Top-k teacher caches for language models, re-tempered when the distillation τ differs from the capture τ.

A cache holds, per token, the teacher's k most probable classes under ``softmax(z/τ_c)`` (``τ_c`` = capture
temperature), their log-probabilities ``log p_i``, and ``log R`` = the log of the remaining mass, over the
vocabulary axis (last). Re-tempering to τ uses ``z_i/τ = r·(log p_i + A)`` with ``r = τ_c/τ`` and ``A`` the
capture log-partition, so over the cached classes ``log p_i(τ) = r·log p_i − log Z(τ)`` exactly. The
``V − k`` missing classes are unknown; they are treated as equally likely at capture (each ``log R − log(V−k)``),
which gives the rest bucket the unnormalised log-mass ``r·(log R − log(V−k)) + log(V−k)``. That is exact when
the missing logits are equal. Otherwise, by the power-mean inequality, it overestimates the rest mass for
τ > τ_c (r < 1) and underestimates it for τ < τ_c; see docs/methods.md for the measured error.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ThermoKDError
from ..functional import as_float32

FORMAT = "thermokd.topk/2"  # /2: written by the file layer, with a checksum


@dataclass
class TopK:
    """A top-k teacher cache. ``indices``/``log_probs``: ``[..., k]`` (sorted by decreasing probability);
    ``rest_log_mass``: ``[...]`` (``-inf`` when k == V); ``capture_tau``; ``vocab_size`` (V)."""

    indices: Tensor
    log_probs: Tensor
    rest_log_mass: Tensor
    capture_tau: float
    vocab_size: int

    def __post_init__(self) -> None:
        self.capture_tau = float(self.capture_tau)
        self.vocab_size = int(self.vocab_size)
        if not (math.isfinite(self.capture_tau) and self.capture_tau > 0):
            raise ThermoKDError(f"capture_tau must be a finite number > 0, got {self.capture_tau!r}")
        if self.indices.shape != self.log_probs.shape or self.indices.dim() < 1:
            raise ThermoKDError(f"TopK indices {tuple(self.indices.shape)} and log_probs "
                                f"{tuple(self.log_probs.shape)} must have the same shape [..., k]")
        if self.rest_log_mass.shape != self.indices.shape[:-1]:
            raise ThermoKDError(f"TopK rest_log_mass has shape {tuple(self.rest_log_mass.shape)}; expected "
                                f"{tuple(self.indices.shape[:-1])} (the indices' shape without k)")
        if not 1 <= self.k <= self.vocab_size:
            raise ThermoKDError(f"TopK k must be in [1, vocab_size={self.vocab_size}], got k={self.k}")

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])

    def to(self, device) -> "TopK":
        return TopK(self.indices.to(device), self.log_probs.to(device), self.rest_log_mass.to(device),
                    self.capture_tau, self.vocab_size)


def _check_tau(tau, name: str = "tau") -> "Tensor | float":
    if isinstance(tau, Tensor):
        tau = as_float32(tau.detach())
        if tau.numel() == 0 or not bool(torch.isfinite(tau).all()) or not bool((tau > 0).all()):
            raise ThermoKDError(f"{name} must be finite and > 0 everywhere")
        return tau
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ThermoKDError(f"{name} must be a finite number > 0 or a tensor of them, got {tau!r}")
    return float(tau)


def _check_tau_shape(tau, lead: torch.Size, name: str = "tau") -> None:
    """A tensor τ must be a scalar or ``[..., 1]`` broadcasting against the leading shape ``lead``."""
    if isinstance(tau, Tensor) and tau.dim() > 0:
        try:
            ok = tau.shape[-1] == 1 and torch.broadcast_shapes(tau.shape[:-1], lead) == lead
        except RuntimeError:
            ok = False
        if not ok:
            raise ThermoKDError(f"{name} of shape {tuple(tau.shape)} must be a scalar or [..., 1] broadcasting "
                                f"against the cache's leading shape {tuple(lead)}")


@torch.no_grad()
def capture_topk(logits: Tensor, k: int, capture_tau: float = 1.0) -> TopK:
    """Cache the top-k log-probabilities of ``softmax(logits/capture_tau)`` and the log of the remaining mass."""
    if logits.dim() < 1:
        raise ThermoKDError("logits must have a vocabulary axis (last); got a 0-d tensor")
    vocab = int(logits.shape[-1])
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ThermoKDError(f"k must be an integer in [1, V={vocab}], got {k!r}")
    capture_tau = _check_tau(capture_tau, "capture_tau")
    if isinstance(capture_tau, Tensor):
        raise ThermoKDError("capture_tau must be a Python number (it is stored with the cache)")
    log_p = torch.log_softmax(as_float32(logits.detach()) / capture_tau, dim=-1)
    values, indices = log_p.topk(k, dim=-1, largest=True, sorted=True)
    # log R = logsumexp over the classes not kept: stable for any R (no 1 − Σp cancellation); −inf when k == V
    rest = log_p.scatter(-1, indices, float("-inf")).logsumexp(-1)
    return TopK(indices, values, rest, capture_tau, vocab)


def _rest_bucket(rest_log_mass: Tensor, missing: int, ratio) -> Tensor:
    """Unnormalised log-mass at ``r = τ_c/τ`` of ``missing`` classes holding ``R`` at capture, taken as equal."""
    rest = as_float32(rest_log_mass.detach()).unsqueeze(-1)
    if missing == 0:
        return torch.full_like(rest, float("-inf"))
    log_m = math.log(missing)
    bucket = ratio * (rest - log_m) + log_m
    return torch.where(torch.isneginf(rest), torch.full_like(bucket, float("-inf")), bucket)


def retemper(topk: TopK, tau: "float | Tensor") -> Tensor:
    """The teacher's log-probabilities at ``tau`` over ``[k cached classes, rest]``: shape ``[..., k+1]``.

    Exact on the cached classes up to the rest bucket's share; the rest bucket assumes the missing classes were
    equally likely at capture (exact when their logits are equal). ``tau``: scalar or ``[..., 1]``.
    """
    tau = _check_tau(tau)
    _check_tau_shape(tau, topk.log_probs.shape[:-1])
    ratio = topk.capture_tau / tau
    cached = ratio * as_float32(topk.log_probs.detach())
    rest = _rest_bucket(topk.rest_log_mass, topk.vocab_size - topk.k, ratio)
    rest = rest.expand(*cached.shape[:-1], 1)
    return torch.log_softmax(torch.cat([cached, rest], dim=-1), dim=-1)


def save_topk(topk: TopK, path: "str | os.PathLike", extra: "dict[str, str] | None" = None,
              key: "str | None" = None) -> None:
    """Write a cache to a safetensors file atomically, with its checksum (and the ``key`` it was made for); τ_c, V
    and ``extra`` (e.g. the tokenizer's key) go in the metadata (indices as int32 when V fits)."""
    from ..files import save_tensors

    small = topk.vocab_size <= torch.iinfo(torch.int32).max
    tensors = {
        "indices": topk.indices.detach().to("cpu", torch.int32 if small else torch.int64).contiguous(),
        "log_probs": as_float32(topk.log_probs.detach()).cpu().contiguous(),
        "rest_log_mass": as_float32(topk.rest_log_mass.detach()).cpu().contiguous(),
    }
    meta = {**(extra or {}), "format": FORMAT, "capture_tau": repr(topk.capture_tau),
            "vocab_size": str(topk.vocab_size)}
    save_tensors(path, tensors, meta, key=key)


def load_topk(path: "str | os.PathLike", device: "str | torch.device" = "cpu", with_metadata: bool = False
              ) -> "TopK | tuple[TopK, dict[str, str]]":
    """Read a cache written by :func:`save_topk` (safetensors: data only, no code is executed), verified against
    the checksum it records; with ``with_metadata`` also its metadata."""
    from ..files import load_tensors

    remedy = f"delete {os.fspath(path)} and capture it again"
    tensors, meta = load_tensors(path, remedy=remedy)
    if meta.get("format") != FORMAT or {"indices", "log_probs", "rest_log_mass"} - tensors.keys():
        raise ThermoKDError(f"{os.fspath(path)!r} is not a thermokd top-k cache (format {FORMAT!r})")
    try:
        capture_tau, vocab = float(meta["capture_tau"]), int(meta["vocab_size"])
        topk = TopK(tensors["indices"].long().to(device), tensors["log_probs"].to(device),
                    tensors["rest_log_mass"].to(device), capture_tau, vocab)
    except (KeyError, ValueError, ThermoKDError) as exc:
        raise ThermoKDError(f"{os.fspath(path)!r}: bad top-k cache ({str(exc).splitlines()[0]}); {remedy}") from None
    return (topk, meta) if with_metadata else topk
