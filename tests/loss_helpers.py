"""Shared assertions for tests that compare two of the loss's paths (fast and general, closed form and autograd)."""
from __future__ import annotations

import pytest
import torch


def assert_same_terms_and_stats(a, b, rtol: float, atol: float, stats_abs: float) -> None:
    """Two ``LossOutput``s carry the same terms (values within ``rtol``/``atol``) and the same statistics."""
    assert a.terms.keys() == b.terms.keys()
    for key in a.terms:
        torch.testing.assert_close(a.terms[key], b.terms[key], rtol=rtol, atol=atol)
    assert dict(a.stats).keys() == dict(b.stats).keys()
    for key, value in dict(b.stats).items():
        assert a.stats[key] == pytest.approx(value, rel=1e-5, abs=stats_abs), key


def assert_chunked_value_matches_float64(rows: int, tau: float, chunk: int, device: str = "cpu") -> None:
    """The chunked loss value (at weights 0.9/0.1 and 1/0) within 1e-6 relative of Hinton KD + CE written in float64,
    on ``rows`` random rows of a 32,000-class vocabulary."""
    from thermokd import DistillationLoss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(rows, 32000, generator=g) * 2, torch.randn(rows, 32000, generator=g) * 3
    labels = torch.randint(0, 32000, (rows,), generator=g)
    log_p = torch.log_softmax(teacher.double() / tau, -1)
    log_q = torch.log_softmax(student.double() / tau, -1)
    kd = tau * tau * (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    ce = -torch.log_softmax(student.double(), -1).gather(-1, labels[:, None]).mean()
    for kd_weight, ce_weight, want in ((0.9, 0.1, 0.9 * kd + 0.1 * ce), (1.0, 0.0, kd)):
        loss_fn = DistillationLoss(tau, ce_weight=ce_weight, kd_weight=kd_weight, chunk_size=chunk)
        out = loss_fn(student.to(device).requires_grad_(), teacher.to(device), labels.to(device))
        assert abs(float(out.loss.detach().double()) - float(want)) <= 1e-6 * abs(float(want))
