"""Top-k teacher caches for LMs: capture, re-temper, save/load (the loss reads them through thermokd.lm.sources)."""
from __future__ import annotations

import math

import pytest
import torch

import thermokd as tk
from thermokd.lm import TopK, capture_topk, load_topk, retemper, save_topk

B, L, V, K = 2, 8, 1000, 64


def lm_logits(seed: int = 0, b: int = B, l: int = L, v: int = V) -> torch.Tensor:
    """Peaked, long-tailed LM-like rows: Zipf(1.1)-ranked logits ×2 plus noise (top-1 p ≈ 0.6, top-64 ≈ 99.5%)."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float32))
    z = base[torch.randperm(v, generator=g)].expand(b, l, v)
    return 2.0 * z + 0.8 * torch.randn(b, l, v, generator=g)


def collapsed(logits: torch.Tensor, indices: torch.Tensor, tau) -> torch.Tensor:
    """Reference: full-logit log σ(z/τ) (float64) collapsed onto [k cached classes, rest]."""
    full = torch.log_softmax(logits.double() / (tau.double() if torch.is_tensor(tau) else tau), -1)
    rest = full.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([full.gather(-1, indices), rest], -1)


def test_capture_matches_full_distribution_and_rows_sum_to_one():
    z = lm_logits(1)
    t = capture_topk(z, K, capture_tau=1.5)
    assert t.indices.shape == (B, L, K) and t.log_probs.shape == (B, L, K) and t.rest_log_mass.shape == (B, L)
    assert (t.capture_tau, t.vocab_size, t.k) == (1.5, V, K)
    assert torch.equal(t.indices, torch.topk(z / 1.5, K, -1).indices)
    ref = collapsed(z, t.indices, 1.5)
    assert torch.allclose(t.log_probs.double(), ref[..., :-1], atol=1e-5)
    assert torch.allclose(t.rest_log_mass.double().exp(), ref[..., -1].exp(), atol=1e-6)
    back = retemper(t, 1.5)  # at the capture temperature: exact
    assert back.shape == (B, L, K + 1)
    assert torch.allclose(back.double().exp(), ref.exp(), atol=1e-6)
    assert torch.allclose(back.exp().sum(-1), torch.ones(B, L), atol=1e-6)


def test_tiny_rest_mass_is_stable():
    z = torch.zeros(3, 50)
    z[:, :5] = 40.0  # rest mass ≈ 45·e^-40: 1 − Σp would round to 0 in float32
    t = capture_topk(z, 5)
    assert torch.allclose(t.rest_log_mass, torch.full((3,), math.log(45) - 40 - math.log(5)), atol=1e-4)


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.0, 4.0, 10.0])
def test_k_equals_v_retempers_exactly(tau):
    z = lm_logits(2, v=100)
    t = capture_topk(z, 100, capture_tau=1.0)
    assert torch.isneginf(t.rest_log_mass).all()
    got = retemper(t, tau)
    assert torch.isneginf(got[..., -1]).all()
    expected = torch.log_softmax(z / tau, -1).gather(-1, t.indices)
    assert torch.allclose(got[..., :-1], expected, atol=1e-5)
    assert torch.allclose(got.exp(), torch.cat([expected.exp(), torch.zeros(B, L, 1)], -1), atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_equal_missing_logits_make_retempering_exact(tau):
    z = lm_logits(3)
    idx = z.topk(K, -1).indices
    floor = z.gather(-1, idx)[..., -1:] - 1.0  # every missing class gets the same logit, below the k-th
    z = torch.full_like(z, 0.0) + floor
    z = z.scatter(-1, idx, lm_logits(3).gather(-1, idx))
    t = capture_topk(z, K, capture_tau=1.0)
    assert torch.allclose(retemper(t, tau).double().exp(), collapsed(z, t.indices, tau).exp(), atol=1e-6)


def _rest_bracket(t: TopK, tau: float):
    """The true rest mass at τ lies between R·p_k^(r−1) and m^(1−r)·R^r (r = τ_c/τ, m = V−k, every missing
    p_j ≤ p_k): unnormalised, relative to the cached classes' r·log p_i. Returns the rest-probability interval."""
    r, m = t.capture_tau / tau, t.vocab_size - t.k
    lp, rest = t.log_probs.double(), t.rest_log_mass.double()
    a = rest + (r - 1) * lp[..., -1]  # R·p_k^(r−1)
    b = (1 - r) * math.log(m) + r * rest  # m^(1−r)·R^r  (the uniform approximation)
    s = (r * lp).logsumexp(-1)
    to_p = lambda x: torch.sigmoid(x - s)  # noqa: E731 - rest share x/(S+x) in log space
    return torch.minimum(to_p(a), to_p(b)), torch.maximum(to_p(a), to_p(b))


@pytest.mark.parametrize("tau,tol", [(0.5, 1e-5), (2.0, 0.1), (4.0, 0.1)])
def test_retemper_error_on_lm_like_logits_is_measured_and_bounded(tau, tol):
    """k = 64 of V = 1000, captured at τ_c = 1. Cooling (τ < τ_c) is exact to float error: the missing
    classes' share shrinks like R^r. Heating (τ > τ_c) needs the unknown tail: the uniform guess overestimates
    the rest bucket (power-mean inequality). Measured max |Δp| over 3 seeds: ≈ 4e-6 at τ = 0.5, 0.091 at τ = 2
    (rest bucket; ≤ 0.03 on any cached class), 0.057 at τ = 4. The tolerance keeps ~10% headroom, and the error
    must also stay within the worst case the cache itself certifies (the bracket of ``_rest_bracket``)."""
    worst = 0.0
    for seed in range(3):
        z = lm_logits(seed)
        t = capture_topk(z, K, capture_tau=1.0)
        ref = collapsed(z, t.indices, tau).exp()
        got = retemper(t, tau).double().exp()
        err = (got - ref).abs()
        worst = max(worst, err.max().item())
        lo, hi = _rest_bracket(t, tau)
        assert (ref[..., -1] >= lo - 1e-6).all() and (ref[..., -1] <= hi + 1e-6).all()
        assert (err[..., -1] <= (hi - lo) + 1e-6).all()
    assert worst < tol, f"max |p_retempered − p_full| = {worst:.3g} at τ = {tau}"


def test_per_token_tau():
    z = lm_logits(4, v=120)
    tau = torch.rand(B, L, 1, generator=torch.Generator().manual_seed(0)) * 4 + 0.5
    t = capture_topk(z, 120, capture_tau=2.0)
    assert torch.allclose(retemper(t, tau)[..., :-1], torch.log_softmax(z / tau, -1).gather(-1, t.indices), atol=1e-5)
    t = capture_topk(z, 16, capture_tau=2.0)
    got = retemper(t, tau)
    for b in range(B):
        for i in range(L):
            one = TopK(t.indices[b, i], t.log_probs[b, i], t.rest_log_mass[b, i], 2.0, 120)
            assert torch.allclose(got[b, i], retemper(one, float(tau[b, i])), atol=1e-6)


def test_save_load_round_trip(tmp_path):
    t = capture_topk(lm_logits(9), K, capture_tau=1.25)
    path = tmp_path / "cache.safetensors"
    save_topk(t, path)
    u = load_topk(path)
    assert (u.capture_tau, u.vocab_size) == (1.25, V)
    assert u.indices.dtype == torch.long and torch.equal(u.indices, t.indices)
    assert torch.equal(u.log_probs, t.log_probs) and torch.equal(u.rest_log_mass, t.rest_log_mass)
    assert torch.equal(retemper(u, 3.0), retemper(t, 3.0))


def test_load_rejects_foreign_or_corrupt_files(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(tk.ThermoKDError, match="carries no thermokd checksum"):
        load_topk(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(tk.ThermoKDError, match="is damaged"):
        load_topk(junk)
    with pytest.raises(tk.ThermoKDError, match="is missing"):
        load_topk(tmp_path / "missing.safetensors")


def test_bad_input_raises_clear_errors():
    z = lm_logits(10, v=50)
    for k in (0, 51, 2.0):
        with pytest.raises(tk.ThermoKDError, match="k must be"):
            capture_topk(z, k)
    with pytest.raises(tk.ThermoKDError, match="capture_tau"):
        capture_topk(z, 5, capture_tau=0.0)
    t = capture_topk(z, 5)
    for tau in (0.0, -1.0, float("nan"), torch.tensor([[[1.0]], [[0.0]]])):
        with pytest.raises(tk.ThermoKDError, match="tau must be"):
            retemper(t, tau)
    with pytest.raises(tk.ThermoKDError, match=r"\[\.\.\., 1\]"):
        retemper(t, torch.ones(B, L, 5))
    with pytest.raises(tk.ThermoKDError, match="same shape"):
        TopK(t.indices, t.log_probs[..., :4], t.rest_log_mass, 1.0, 50)
