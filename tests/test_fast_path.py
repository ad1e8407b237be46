"""The fixed-τ fast path (plain Hinton KD in a hand-written loss's kernels) gives what the general path gives: the
same value, gradients and statistics; it follows τ when it is set or loaded and steps aside when the loss does."""
from __future__ import annotations

import pytest
import torch
from loss_helpers import assert_same_terms_and_stats

import thermokd as tk
from thermokd.temperature import Fixed
from thermokd.weighting import ConfidenceDifficulty


class GeneralFixed(Fixed):
    """The same fixed τ, but a subclass: the loss takes its general path for it."""


def _inputs(rows=24, classes=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=g) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(rows, classes, generator=g) * 3).to(dtype)
    labels = torch.randint(0, classes, (rows,), generator=g)
    return student, teacher, labels


def _run(loss_fn, student, teacher, labels, **kw):
    s = student.detach().clone().requires_grad_()
    out = loss_fn(s, teacher, labels, **kw)
    out.loss.backward()
    return out, s.grad


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("with_labels", [True, False])
def test_fast_path_equals_the_general_path(tau, with_labels):
    fast, general = tk.DistillationLoss(Fixed(tau)), tk.DistillationLoss(GeneralFixed(tau))
    assert fast._fixed_tau_kl() and not general._fixed_tau_kl()
    student, teacher, labels = _inputs()
    labels = labels if with_labels else None
    (a, grad_a), (b, grad_b) = _run(fast, student, teacher, labels), _run(general, student, teacher, labels)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-8)
    assert_same_terms_and_stats(a, b, rtol=1e-6, atol=1e-7, stats_abs=1e-7)


def test_fast_path_with_ignored_rows_a_mask_and_half_precision():
    fast, general = tk.DistillationLoss(Fixed(2.0)), tk.DistillationLoss(GeneralFixed(2.0))
    student, teacher, labels = _inputs(dtype=torch.bfloat16)
    labels[:4] = -100
    mask = torch.ones(24, dtype=torch.bool)
    mask[7] = False
    (a, grad_a), (b, grad_b) = (_run(fast, student, teacher, labels, mask=mask),
                                _run(general, student, teacher, labels, mask=mask))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-5, atol=1e-7)
    assert a.stats["rows"] == 19.0 and a.stats["teacher_entropy_mean"] == pytest.approx(b.stats["teacher_entropy_mean"])


def test_fast_path_follows_tau_set_and_loaded():
    """τ is a host float; assigning a tensor and load_state_dict are seen (a write in place to the buffer is not:
    seeing it needs a device read per step or torch's private version counters)."""
    student, teacher, labels = _inputs()
    loss_fn = tk.DistillationLoss(4.0)
    _run(loss_fn, student, teacher, labels)  # τ = 4 read
    loss_fn.temperature.tau = torch.tensor(2.0)
    want = _run(tk.DistillationLoss(GeneralFixed(2.0)), student, teacher, labels)[0].loss
    torch.testing.assert_close(_run(loss_fn, student, teacher, labels)[0].loss, want)
    loss_fn.load_state_dict(tk.DistillationLoss(3.0).state_dict())
    want = _run(tk.DistillationLoss(GeneralFixed(3.0)), student, teacher, labels)[0].loss
    torch.testing.assert_close(_run(loss_fn, student, teacher, labels)[0].loss, want)


def test_the_route_is_decided_again_when_the_loss_changes():
    loss_fn = tk.DistillationLoss(4.0)
    assert loss_fn._fixed_tau_kl()
    loss_fn.weighting = ConfidenceDifficulty()
    assert not loss_fn._fixed_tau_kl()
    loss_fn.weighting = None
    loss_fn.kd_weight = 0.0
    assert not loss_fn._fixed_tau_kl()


def test_fast_path_still_refuses_bad_inputs():
    loss_fn = tk.DistillationLoss(4.0)
    student, teacher, labels = _inputs()
    for who, x in (("student", student), ("teacher", teacher)):
        bad = x.detach().clone()
        bad[3, 2] = float("inf") if who == "student" else float("nan")
        args = (bad, teacher) if who == "student" else (student, bad)
        with pytest.raises(tk.ThermoKDError, match=f"{who} logits contain NaN or inf"):
            loss_fn(*args, labels)
    with pytest.raises(tk.ThermoKDError, match="out of range"):
        loss_fn(student, teacher, torch.full_like(labels, 11))
