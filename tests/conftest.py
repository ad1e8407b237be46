"""Shared test pieces: the formulas of docs/methods.md written by hand in plain float64 torch (never the library's
helpers), so the library is checked against the formulas rather than against itself."""
from __future__ import annotations

import os
import types

import pytest
import torch
try:  # the GPU checks (benchmarks/gpu_check.sh) may run where hypothesis is not installed
    from hypothesis import settings
except ImportError:  # pragma: no cover - only the property-test modules need it, and they import it themselves
    settings = None

# every test runs offline: transformers and huggingface_hub read these when first imported, and the CLI processes
# the tests start inherit them, so nothing can reach for a model hub (set here once, before any test module loads)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# CI draws the same examples on every run (the ones verified before submitting); locally, examples stay random
if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        settings.load_profile("ci")


def _t(tau):
    return tau.double() if torch.is_tensor(tau) else float(tau)


def log_softmax(z, tau=1.0):
    """log σ(z/τ) per row."""
    a = z.double() / _t(tau)
    return a - torch.logsumexp(a, -1, keepdim=True)


def kl(log_p, log_q):
    """Σ_c p (log p − log q) per row, with 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def entropy(log_p):
    """−Σ_c p log p per row (nats)."""
    return -kl(log_p, torch.zeros_like(log_p))


def centred_max(z):
    """max_c z_c − mean_c z_c, keepdim."""
    z = z.double()
    return z.max(-1, keepdim=True).values - z.mean(-1, keepdim=True)


def ce(z, y):
    """Per-row cross-entropy at τ = 1."""
    return -log_softmax(z).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def kd(zs, zt, tau_t, tau_s=None, weights=None):
    """mean_i w_i τ^t_i τ^s_i KL(p(z^t_i; τ^t_i) ‖ p(z^s_i; τ^s_i)) (Hinton KD when τ^t = τ^s = τ, w = 1)."""
    tau_s = tau_t if tau_s is None else tau_s
    per_row = kl(log_softmax(zt, tau_t), log_softmax(zs, tau_s))
    factor = _t(tau_t) * _t(tau_s)
    per_row = per_row * (factor.reshape(-1) if torch.is_tensor(factor) and factor.dim() else factor)
    if weights is not None:
        per_row = per_row * weights.double()
    return per_row.mean()


def batch(n=32, c=10, seed=0, spread=(0.3, 6.0)):
    """Student and teacher logits ``[n, c]`` with per-row scales spread log-uniformly, and labels ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.log(torch.tensor(spread))
    scale_t = torch.exp(lo + (hi - lo) * torch.rand(n, 1, generator=g))
    scale_s = torch.exp(lo + (hi - lo) * torch.rand(n, 1, generator=g))
    teacher = torch.randn(n, c, generator=g) * scale_t + torch.randn(n, 1, generator=g) * 3
    student = torch.randn(n, c, generator=g) * scale_s + torch.randn(n, 1, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    return student, teacher, labels


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: one intra-op thread is several times faster than two, and far steadier when other
    processes share the cores (OpenMP workers spin while they wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hand():
    return types.SimpleNamespace(log_softmax=log_softmax, kl=kl, entropy=entropy, centred_max=centred_max, ce=ce,
                                 kd=kd, batch=batch)


def close(actual, expected, rtol=1e-5, atol=1e-6):
    """float32 library value against a float64 hand value."""
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               rtol=rtol, atol=atol)


@pytest.fixture
def assert_close():
    return close
