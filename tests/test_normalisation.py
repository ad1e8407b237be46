"""A weighting's declared normalisation (``thermokd.normalisation``) against float64 references written here, its
invariants as properties, and a custom weighting that defines only ``log_unnormalised`` on the plain, chunked and
fused paths."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thermokd as tk
from thermokd import normalisation as norm
from thermokd.normalisation import Normalisation
from thermokd.weighting import Weighting

SPECS = {
    "batch": Normalisation(), "batch-floor": Normalisation(max_ratio=3.0), "batch-mix": Normalisation(mix=0.3),
    "batch-floor-mix": Normalisation(max_ratio=4.0, mix=0.5), "none": Normalisation(mean="none"),
    "none-floor-mix": Normalisation(mean="none", max_ratio=2.0, mix=0.7),
    "running": Normalisation(mean="running"),
    "running-floor-mix": Normalisation(mean="running", max_ratio=3.0, mix=0.5, momentum=0.5),
}


def ref_floored(log_w, spec):
    """w̃ in float64, floored at max/R when the spec has a max_ratio."""
    raw = log_w.double().exp()
    return raw if spec.max_ratio is None else torch.maximum(raw, raw.max() / spec.max_ratio)


def ref_weights(log_w, spec, running=None):
    """Floor, divide by the batch mean (or the running mean once set; nothing for 'none'), blend with uniform."""
    raw = ref_floored(log_w, spec)
    if spec.mean == "none":
        hat = raw
    else:
        hat = raw / (raw.mean() if spec.mean == "batch" or running is None else running)
    return (1 - spec.mix) + spec.mix * hat


def _log_w(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("label", list(SPECS))
def test_each_declared_normalisation_matches_its_reference(label, assert_close):
    """Three optimiser steps; the second has two micro-batches (gradient accumulation). A running mean starts at the
    first step's batch mean and then moves with the spec's momentum; the other means ignore the state."""
    spec = SPECS[label]
    running = torch.tensor(float("nan")) if spec.stateful else None
    step = norm.StepMeans()
    ref_running = None
    for batches in ([_log_w(12, 0)], [_log_w(9, 1), _log_w(15, 2)], [_log_w(7, 3)]):
        for log_w in batches:
            got = norm.weights(log_w, spec, running, step)
            assert_close(got, ref_weights(log_w, spec, ref_running))
            assert_close(norm.shares(log_w, spec, running, norm.StepMeans()), got / log_w.shape[0])
        if running is None:
            continue
        norm.commit(running, step, spec.momentum)
        value = sum(ref_floored(log_w, spec).mean() for log_w in batches) / len(batches)
        ref_running = value if ref_running is None else spec.momentum * ref_running + (1 - spec.momentum) * value
        assert_close(running, ref_running)
    if running is not None:  # a step without a batch moves nothing
        before = running.clone()
        norm.commit(running, step, spec.momentum)
        assert_close(running, before)


def test_a_running_mean_needs_its_state():
    with pytest.raises(tk.ThermoKDError, match="running normalisation needs its running_mean"):
        norm.shares(_log_w(4, 0), Normalisation(mean="running"))


@pytest.mark.parametrize("kwargs,match", [
    ({"mean": "median"}, "normalisation mean"), ({"max_ratio": 0.5}, "max_ratio must be >= 1"),
    ({"mix": 1.5}, r"mix must be in \[0, 1\]"), ({"momentum": 1.0}, r"momentum must be in \[0, 1\)")])
def test_a_bad_normalisation_is_refused(kwargs, match):
    with pytest.raises(tk.ThermoKDError, match=match):
        Normalisation(**kwargs)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), scale=st.floats(0.0, 40.0), seed=st.integers(0, 10_000),
       max_ratio=st.one_of(st.none(), st.floats(1.0, 50.0)), mix=st.floats(0.0, 1.0))
def test_a_batch_mean_gives_mean_one_within_the_bound(n, scale, seed, max_ratio, mix):
    """Mean 1 over the rows, every weight at least 1 − λ and at most the bound of ``max_weight``."""
    spec = Normalisation(max_ratio=max_ratio, mix=mix)
    log_w = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    w = norm.weights(log_w, spec)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-4)
    assert w.min().item() >= (1 - mix) - 1e-5
    assert w.max().item() <= norm.max_weight(spec, n) * (1 + 1e-5)


# -- a custom weighting with one hook, on every path -----------------------------------------------------
class Margin(Weighting):
    """``log w̃_i`` = half the teacher's top-2 logit margin: row-local, written once."""

    normalisation = Normalisation(max_ratio=3.0, mix=0.5)

    def log_unnormalised(self, rows):
        top = rows.teacher.topk(2, dim=-1).values
        return (top[:, 0] - top[:, 1]) / 2


class RunningMargin(Margin):
    normalisation = Normalisation(mean="running", max_ratio=3.0, mix=0.5, momentum=0.5)


def _heads(seed, n=23, hidden=6, vocab=9):
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(n, hidden, generator=g), torch.randn(n, hidden, generator=g) * 2
    head_s, head_t = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        for head in (head_s, head_t):
            head.weight.copy_(torch.randn(vocab, hidden, generator=g))
            head.bias.copy_(torch.randn(vocab, generator=g))
    return h_s, head_s, h_t, head_t, torch.randint(0, vocab, (n,), generator=g)


@pytest.mark.parametrize("kind", [Margin, RunningMargin])
def test_a_custom_weighting_defining_only_log_unnormalised_works_on_every_path(kind, hand, assert_close):
    """Plain, chunked (5 rows) and fused (5 rows) losses with masked rows against a float64 reference, over two
    steps (the second reads the running mean the first step's observe wrote); gradients too."""
    keep = torch.arange(23) % 4 != 1
    losses = {path: tk.DistillationLoss(2.0, weighting=kind(), ce_weight=0.0, kd_weight=1.0,
                                        chunk_size=None if path == "plain" else 5)
              for path in ("plain", "chunked", "fused")}
    ref_running = None
    for step in range(2):
        h_s, head_s, h_t, head_t, y = _heads(seed=step)
        with torch.no_grad():
            t = head_t(h_t)
        s_ref = head_s(h_s).detach().double()[keep].requires_grad_()
        t_valid = t.double()[keep]
        top = t_valid.topk(2, dim=-1).values
        spec = kind.normalisation
        w = ref_weights((top[:, 0] - top[:, 1]) / 2, spec, ref_running)
        ref = hand.kd(s_ref, t_valid, 2.0, weights=w)
        ref.backward()
        for path, loss in losses.items():
            hidden = h_s.clone().requires_grad_()
            if path == "fused":
                out = loss.forward_hidden(hidden, head_s, h_t, head_t, y, mask=keep)
            else:
                out = loss(head_s(hidden), t, y, mask=keep)
            assert_close(out.loss, ref)
            out.loss.backward()
            # the gradient reaching the hidden states: the reference's logit gradient through the head
            want = torch.zeros(23, head_s.weight.shape[0], dtype=torch.float64)
            want[keep] = s_ref.grad
            assert_close(hidden.grad, want @ head_s.weight.detach().double(), rtol=1e-4, atol=1e-6)
            loss.observe(out)
            head_s.zero_grad()
        if spec.stateful:
            value = ref_floored((top[:, 0] - top[:, 1]) / 2, spec).mean()
            ref_running = value if ref_running is None else spec.momentum * ref_running + (1 - spec.momentum) * value
            for loss in losses.values():
                assert_close(loss.weighting.running_mean, ref_running)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_a_running_custom_weighting_never_syncs_on_cuda(path):
    """Forward, backward and observe of a running-mean weighting wait for the device nowhere."""
    h_s, head_s, h_t, head_t, y = (x.cuda() for x in _heads(seed=0))
    loss = tk.DistillationLoss(2.0, weighting=RunningMargin(), ignore_index=None,
                               chunk_size=5 if path == "chunked" else None).cuda()
    with torch.no_grad():
        t = head_t(h_t)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            hidden = h_s.clone().requires_grad_()
            out = loss(head_s(hidden), t, y)
            out.loss.backward()
            loss.observe(out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.isnan(loss.weighting.running_mean).item()
