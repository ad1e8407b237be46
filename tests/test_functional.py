"""docs/methods.md, "The loss": the shared pieces (divergences, Hinton KD, the total loss, entropy, centred max,
float32 maths)."""
from __future__ import annotations

import math

import pytest
import torch

import thermokd as tk
from thermokd import functional as F


def _hand_divergence(hand, log_p, log_q, kind):
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return hand.kl(log_p, log_q)
    if kind == "reverse_kl":
        return hand.kl(log_q, log_p)
    if kind == "js":
        log_m = torch.log((p + q) / 2)
        return 0.5 * hand.kl(log_p, log_m) + 0.5 * hand.kl(log_q, log_m)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "tvd"])
def test_divergences_match_hand_formulas(hand, assert_close, kind):
    s, t, _ = hand.batch(n=16, c=7, seed=1)
    log_p, log_q = hand.log_softmax(t, 2.0), hand.log_softmax(s, 2.0)
    got = F.divergence(log_p.float(), log_q.float(), kind)
    assert got.shape == (16,)
    assert_close(got, _hand_divergence(hand, log_p, log_q, kind))


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "tvd"])
def test_loss_uses_the_chosen_divergence_with_tau_squared(hand, assert_close, kind):
    s, t, y = hand.batch(n=24, c=9, seed=2)
    loss = tk.DistillationLoss(tk.temperature.Fixed(3.0), divergence=kind, ce_weight=0.0, kd_weight=1.0)
    out = loss(s, t, y)
    expected = 9.0 * _hand_divergence(hand, hand.log_softmax(t, 3.0), hand.log_softmax(s, 3.0), kind).mean()
    assert_close(out.loss, expected)
    assert_close(out.terms["kd"], expected)


def test_divergence_properties(hand):
    s, t, _ = hand.batch(n=8, c=5, seed=3)
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    for kind in F.DIVERGENCES:
        assert torch.all(F.divergence(log_p, log_q, kind) >= -1e-6)
        assert torch.allclose(F.divergence(log_p, log_p, kind), torch.zeros(8), atol=1e-6)
    js = F.divergence(log_p, log_q, "js")
    assert torch.all(js <= math.log(2) + 1e-6)
    assert torch.allclose(js, F.divergence(log_q, log_p, "js"), atol=1e-6)  # symmetric
    tvd = F.divergence(log_p, log_q, "tvd")
    assert torch.all(tvd <= 1 + 1e-6)


def test_kd_is_tau_squared_kl(hand, assert_close):
    s, t, y = hand.batch(n=32, c=10, seed=4)
    s.requires_grad_(True)
    out = tk.DistillationLoss(4.0, ce_weight=0, kd_weight=1)(s, t, y)
    expected = 16.0 * hand.kl(hand.log_softmax(t, 4.0), hand.log_softmax(s, 4.0)).mean()
    assert_close(out.loss, expected)
    # the gradient too: the τ² factor makes ∂L/∂z^s = τ·(q − p)/N
    out.loss.backward()
    p, q = torch.softmax(t.double() / 4, -1), torch.softmax(s.detach().double() / 4, -1)
    assert_close(s.grad, 4.0 * (q - p) / 32)


@pytest.mark.parametrize("ce_weight,kd_weight", [(0.1, 0.9), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_total_is_weighted_ce_plus_kd(hand, assert_close, ce_weight, kd_weight):
    s, t, y = hand.batch(n=20, c=6, seed=5)
    out = tk.DistillationLoss(4.0, ce_weight=ce_weight, kd_weight=kd_weight)(s, t, y)
    ce = hand.ce(s, y).mean()
    kd = hand.kd(s, t, 4.0)
    assert_close(out.loss, ce_weight * ce + kd_weight * kd)
    assert_close(out.terms["ce"], ce)
    if kd_weight:
        assert_close(out.terms["kd"], kd)


def test_default_loss_is_cifar_kd(hand, assert_close):
    s, t, y = hand.batch(n=16, c=10, seed=6)
    out = tk.DistillationLoss()(s, t, y)
    assert_close(out.loss, 0.1 * hand.ce(s, y).mean() + 0.9 * hand.kd(s, t, 4.0))


def test_scale_none_drops_the_tau_product(hand, assert_close):
    s, t, y = hand.batch(n=16, c=10, seed=7)
    out = tk.DistillationLoss(4.0, ce_weight=0, kd_weight=1, scale="none")(s, t, y)
    assert_close(out.loss, hand.kd(s, t, 4.0) / 16.0)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "js", "tvd"])
@pytest.mark.parametrize("check_inputs", [True, False])
def test_no_nan_when_probabilities_underflow(kind, check_inputs):
    # at τ = 1 a gap of 2e4 makes every non-max probability exactly 0 in float32 (and float64)
    t = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, 1e4, 1e4]])
    s = torch.tensor([[-1e4, 1e4, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]], requires_grad=True)
    loss = tk.DistillationLoss(1.0, divergence=kind, ce_weight=0.5, kd_weight=1.0, check_inputs=check_inputs)
    out = loss(s, t, torch.tensor([0, 2]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert all(math.isfinite(v) for v in out.stats.values())
    # the value is the exact one: KL(p‖q) with p one-hot on class 0 is −log q_0 = 2e4 (row 0)
    if kind == "kl" and check_inputs:
        row1 = -math.log(2) - 0.5 * torch.log_softmax(s[1].detach().double(), -1)[2:].sum().item()
        assert out.terms["kd"].item() == pytest.approx((2e4 + row1) / 2, rel=1e-5)


def test_functional_divergence_with_zero_probabilities():
    log_p = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert F.divergence(log_p, log_q, "kl").item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.isfinite(F.divergence(log_p, log_q, "js")).all()
    assert F.divergence(log_p, log_q, "tvd").item() == pytest.approx(0.5, rel=1e-6)
    assert F.entropy_from_log_probs(log_p).item() == 0.0


def test_entropy_and_normalised_entropy(hand, assert_close):
    _, t, _ = hand.batch(n=12, c=8, seed=8)
    assert_close(F.soft_label_entropy(t, 2.5), hand.entropy(hand.log_softmax(t, 2.5)))
    assert_close(F.normalised_entropy(t, 2.5), hand.entropy(hand.log_softmax(t, 2.5)) / math.log(8))
    assert_close(F.soft_label_entropy(torch.zeros(2, 8)), torch.full((2,), math.log(8)))


def test_centred_max_is_shift_invariant(hand, assert_close):
    _, t, _ = hand.batch(n=12, c=8, seed=9)
    assert_close(F.centred_max(t), hand.centred_max(t))
    shifted = t + 100 * torch.randn(12, 1, generator=torch.Generator().manual_seed(0))
    assert_close(F.centred_max(shifted), hand.centred_max(t), atol=1e-4, rtol=1e-5)
    assert F.centred_max(t).shape == (12, 1)


def test_maths_run_in_float32_whatever_the_dtype(hand):
    s, t, y = hand.batch(n=16, c=10, seed=10)
    s16, t16 = s.to(torch.bfloat16), t.to(torch.bfloat16)
    loss = tk.DistillationLoss(tk.temperature.CIST(ratio=1.0), weighting=tk.weighting.ConfidenceDifficulty())
    out16 = loss(s16, t16, y)
    out32 = loss(s16.float(), t16.float(), y)
    assert out16.loss.dtype == torch.float32
    assert out16.loss.item() == out32.loss.item()
