"""The fused linear-layer loss (``DistillationLoss.forward_hidden``) equals the plain loss on the heads' logits:
value, statistics and gradients to the hidden states, the head's weight and bias and a learnable τ."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thermokd as tk
from thermokd.methods import method_names

PROGRESS = tk.Progress(step=2, total_steps=10, epoch=3, total_epochs=5)


def _models(rows: int, hidden: int, vocab: int, seed: int, bias: bool, lead: tuple = ()):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, rows) if lead else (rows,)
    h_s = torch.randn(*shape, hidden, generator=g, dtype=torch.float64).float()
    h_t = torch.randn(*shape, hidden + 1, generator=g)
    head_s = torch.nn.Linear(hidden, vocab, bias=bias)
    head_t = torch.nn.Linear(hidden + 1, vocab, bias=bias)
    with torch.no_grad():
        head_s.weight.copy_(torch.randn(vocab, hidden, generator=g))
        head_t.weight.copy_(torch.randn(vocab, hidden + 1, generator=g) * 2)
    labels = torch.randint(0, vocab, shape, generator=g)
    return h_s, h_t, head_s, head_t, labels


def _gradients(loss_fn, head, hidden):
    out = [hidden.grad, head.weight.grad] + ([head.bias.grad] if head.bias is not None else [])
    return [g.clone() for g in out] + [p.grad.clone() for p in loss_fn.parameters() if p.grad is not None]


def _both(method: str, h_s, h_t, head_s, head_t, labels, mask, chunk: int):
    """(plain output, its gradients), (fused output, its gradients), from the same initial state."""
    plain_fn = tk.build_loss(method, **({"temperature": {"num_classes": head_s.out_features}}
                                        if method == "ctkd-instance" else {}))
    fused_fn = tk.build_loss(method, **({"temperature": {"num_classes": head_s.out_features}}
                                        if method == "ctkd-instance" else {}))
    fused_fn.load_state_dict(plain_fn.state_dict())
    results = []
    for loss_fn, fused in ((plain_fn, False), (fused_fn, True)):
        hidden = h_s.clone().requires_grad_()
        head_s.zero_grad(set_to_none=True)
        if fused:
            out = loss_fn.forward_hidden(hidden, head_s, h_t, head_t, labels, mask=mask, progress=PROGRESS,
                                         chunk_size=chunk)
        else:
            with torch.no_grad():
                teacher = head_t(h_t)
            out = loss_fn(head_s(hidden), teacher, labels, mask=mask, progress=PROGRESS)
        out.loss.backward()
        results.append((out, _gradients(loss_fn, head_s, hidden)))
    return results


def _assert_same(plain, fused, rtol: float = 2e-4, atol: float = 2e-6) -> None:
    (out_p, grads_p), (out_f, grads_f) = plain, fused
    assert float(out_f.loss.detach()) == pytest.approx(float(out_p.loss.detach()), rel=1e-5, abs=1e-6)
    assert out_f.stats.keys() == out_p.stats.keys()
    for key in out_p.stats:
        assert out_f.stats[key] == pytest.approx(out_p.stats[key], rel=1e-4, abs=1e-5), key
    assert len(grads_p) == len(grads_f)
    for a, b in zip(grads_p, grads_f):
        scale = float(a.abs().max()) + 1e-12
        torch.testing.assert_close(b, a, rtol=rtol, atol=max(atol, 1e-5 * scale))


@pytest.mark.parametrize("method", [m for m in method_names() if m != "ctkd-instance"])
def test_fused_equals_plain_for_every_method(method: str) -> None:
    h_s, h_t, head_s, head_t, labels = _models(23, 7, 13, seed=0, bias=True)
    labels[:4] = -100
    mask = torch.ones(23, dtype=torch.bool)
    mask[9] = False
    _assert_same(*_both(method, h_s, h_t, head_s, head_t, labels, mask, chunk=6))


def test_fused_batch_without_valid_rows_gives_every_head_parameter_a_zero_gradient() -> None:
    """Every row masked: the plain path's zero loss reaches the head's bias too, so the fused one must."""
    h_s, h_t, head_s, head_t, labels = _models(3, 4, 5, seed=0, bias=True)
    _assert_same(*_both("kd", h_s, h_t, head_s, head_t, labels, torch.zeros(3, dtype=torch.bool), chunk=2))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 14), hidden=st.integers(1, 6), vocab=st.integers(2, 12), chunk=st.integers(1, 6),
       seed=st.integers(0, 10_000), bias=st.booleans(), masked=st.booleans(), tokens=st.booleans(),
       method=st.sampled_from(["kd", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"]))
def test_fused_equals_plain_property(rows, hidden, vocab, chunk, seed, bias, masked, tokens, method) -> None:
    lead = (2,) if tokens else ()
    h_s, h_t, head_s, head_t, labels = _models(rows, hidden, vocab, seed, bias, lead)
    mask = None
    if masked:
        mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) > 0.3
        if method in ("cist",) and not bool(mask.any()):
            mask.view(-1)[0] = True  # CIST's first batch calibrates ρ: it needs a row
    try:
        results = _both(method, h_s, h_t, head_s, head_t, labels, mask, chunk)
    except tk.ThermoKDError as exc:
        if "cannot calibrate CIST" in str(exc):
            return  # by design: a batch whose teacher rows are all constant (e.g. one class, V=... ) cannot calibrate
        raise
    _assert_same(*results, rtol=1e-3, atol=1e-5)


def test_ctkd_theta_gets_the_same_gradient() -> None:
    h_s, h_t, head_s, head_t, labels = _models(17, 5, 9, seed=3, bias=False)
    (out_p, grads_p), (out_f, grads_f) = _both("ctkd", h_s, h_t, head_s, head_t, labels, None, chunk=4)
    assert len(grads_p) == 3 and grads_p[-1].abs().item() > 0  # hidden, weight, θ
    torch.testing.assert_close(grads_f[-1], grads_p[-1], rtol=1e-4, atol=1e-7)


def _dense_topk_logits(topk: "tk.lm.TopK") -> torch.Tensor:
    """The dense teacher a top-k cache stands for: τ_c·log p on the cached classes, the rest equally likely."""
    k, vocab = topk.indices.shape[-1], topk.vocab_size
    fill = (topk.rest_log_mass - math.log(vocab - k)) if vocab > k else torch.zeros_like(topk.rest_log_mass)
    dense = fill.unsqueeze(-1).expand(*topk.rest_log_mass.shape, vocab).clone()
    return dense.scatter(-1, topk.indices, topk.log_probs) * topk.capture_tau


@pytest.mark.parametrize("k", [3, 11])
def test_topk_teacher(k: int) -> None:
    from thermokd.lm import capture_topk

    h_s, h_t, head_s, head_t, labels = _models(19, 6, 11, seed=5, bias=True)
    with torch.no_grad():
        topk = capture_topk(head_t(h_t) * 2, k, capture_tau=2.0)
    loss_fn = tk.build_loss("cist")
    plain_fn = tk.build_loss("cist")
    hidden = h_s.clone().requires_grad_()
    out = loss_fn.forward_hidden(hidden, head_s, labels=labels, teacher_topk=topk, progress=PROGRESS, chunk_size=4)
    out.loss.backward()
    plain_hidden = h_s.clone().requires_grad_()
    head_weight_grad = head_s.weight.grad.clone()
    head_s.zero_grad()
    ref = plain_fn(head_s(plain_hidden), _dense_topk_logits(topk), labels, progress=PROGRESS)
    ref.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
    torch.testing.assert_close(hidden.grad, plain_hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_weight_grad, head_s.weight.grad, rtol=1e-4, atol=1e-6)


def test_fused_never_holds_more_than_a_chunk_of_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every head product the fused path computes has at most chunk_size rows."""
    h_s, h_t, head_s, head_t, labels = _models(40, 4, 9, seed=7, bias=True)
    seen = []
    original = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        seen.append(x.shape[0])
        return original(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    out = tk.build_loss("cist").forward_hidden(h_s.requires_grad_(), head_s, h_t, head_t, labels,
                                               progress=PROGRESS, chunk_size=8)
    out.loss.backward()
    assert seen and max(seen) <= 8


def test_bad_fused_inputs_are_named() -> None:
    h_s, h_t, head_s, head_t, labels = _models(6, 4, 9, seed=1, bias=True)
    loss_fn = tk.build_loss("kd")
    with pytest.raises(tk.ThermoKDError, match="student_hidden"):
        loss_fn.forward_hidden(h_s[:, :3], head_s, h_t, head_t, labels)
    with pytest.raises(tk.ThermoKDError, match="teacher_hidden"):
        loss_fn.forward_hidden(h_s, head_s, h_t[:4], head_t, labels)
    with pytest.raises(tk.ThermoKDError, match="no teacher"):
        loss_fn.forward_hidden(h_s, head_s, labels=labels)
    with pytest.raises(tk.ThermoKDError, match="student_head"):
        loss_fn.forward_hidden(h_s, "head", h_t, head_t, labels)
    with pytest.raises(tk.ThermoKDError, match="chunk_size"):
        loss_fn.forward_hidden(h_s, head_s, h_t, head_t, labels, chunk_size=0)
