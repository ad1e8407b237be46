"""Masked and ignored rows weighted by zero instead of gathered (``sync_free_rows``): the step never reads how many
rows are valid, and gives what gathering them gives (value, gradients, terms, statistics). On an accelerator this is
the default where the loss allows it; here on the CPU it is switched on by hand."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import thermokd as tk
from thermokd.steps import StatWindow

from test_host_sync import PROGRESS, Reads

# the losses that can weight rows by zero: label -> (method, build options). CIST without weights (its LM preset,
# and the own-ratio rule, whose batch statistic feeds its state), DTS (its CE means feed T), batch-normalised
# weights (CIST's default: floored at max/4 and blended with uniform; without either; ER-KD's entropies), a running
# mean of the weights; DKD, other divergences and a learnable τ (CTKD's, logit standardisation's) by autograd;
# a cross-entropy-only loss
KEPT = {"kd": ("kd", {}), "dtkd": ("dtkd", {}),
        "entropy-target": ("entropy-target", {"temperature": {"early_exit": False}}),
        "cist-lm": ("cist", {"domain": "lm"}), "dts": ("dts", {}),
        "cist-own-ratio": ("cist", {"temperature": {"student": "own-ratio"}, "weighting": {"mix": 0.0}}),
        "cist": ("cist", {}), "erkd": ("erkd", {}),
        "cist-unbounded": ("cist", {"weighting": {"mix": 1.0, "max_ratio": None}}),
        "cist-running": ("cist", {"weighting": {"normalise": "running"}}),
        "dkd": ("dkd", {}), "dkd-unscaled": ("dkd", {"scale": "none"}), "js": ("kd", {"divergence": "js"}),
        "reverse-kl-weighted": ("erkd", {"divergence": "reverse_kl"}),
        "ctkd": ("ctkd", {}), "lskd": ("lskd", {}), "ce": ("ce", {})}
NEEDS_LABELS = {"dts": "DTS needs labels", "dkd": "needs labels", "dkd-unscaled": "needs labels",
                "ce": "needs labels"}


def _pair(method: str, **extra):
    name, options = KEPT[method]
    options = {**options, **extra}
    kept, gathered = (tk.build_loss(name, sync_free_rows=flag, **options) for flag in (True, False))
    kept.load_state_dict(gathered.state_dict())  # learnable parts start alike
    return kept, gathered


def _batch(seed: int, shape=(3, 7, 13), ignored: float = 0.3, masked: float = 0.2, garbage: bool = True,
           labelled: bool = True):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=g) * 2
    teacher = torch.randn(*shape, generator=g) * (1 + 3 * torch.rand(*shape[:-1], 1, generator=g))
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < ignored] = -100
    mask = torch.rand(shape[:-1], generator=g) >= masked
    if garbage:  # rows that count nowhere may hold anything: they must not reach the loss
        out = ~mask | (labels == -100) if labelled else ~mask
        student[out], teacher[out] = float("nan"), float("inf")
    return student, teacher, labels, mask


def _run(loss_fn, student, teacher, labels, mask):
    s = student.clone().requires_grad_()
    out = loss_fn(s, teacher, labels, mask=mask, progress=PROGRESS)
    out.loss.backward()
    return out, s.grad


def _assert_same(method: str, batch, with_labels: bool = True, **extra) -> None:
    kept, gathered = _pair(method, **extra)
    student, teacher, labels, mask = batch
    if KEPT[method][0] == "cist":  # the same ρ for both (CIST calibrates on the teacher's logits)
        valid = teacher[mask & (labels != -100) if with_labels else mask]
        kept.prepare(valid)
        gathered.prepare(valid)
    labels = labels if with_labels else None
    a, grad_a = _run(kept, student, teacher, labels, mask)
    b, grad_b = _run(gathered, student, teacher, labels, mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
    assert set(a.terms) == set(b.terms)
    for key in a.terms:
        # DKD's TCKD, a binary KL of near-equal distributions, cancels: ~eps·|logits| absolute, whatever its size
        torch.testing.assert_close(a.terms[key], b.terms[key], rtol=1e-5, atol=1e-5 if key == "tckd" else 1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)
    for p_a, p_b in zip(kept.parameters(), gathered.parameters(), strict=True):  # a learnable τ's (CTKD's θ)
        torch.testing.assert_close(p_a.grad, p_b.grad, rtol=1e-4, atol=1e-7)
    assert torch.isfinite(grad_a).all() and set(a.stats) == set(b.stats)
    for key in a.stats:
        assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", list(KEPT))
@pytest.mark.parametrize("with_labels", [True, False])
def test_weighting_rows_by_zero_equals_gathering_them(method, with_labels):
    if method in NEEDS_LABELS and not with_labels:  # they need labels either way
        for loss_fn in _pair(method):
            with pytest.raises(tk.ThermoKDError, match=NEEDS_LABELS[method]):
                _run(loss_fn, *_batch(0, labelled=False)[:2], None, _batch(0)[3])
        return
    _assert_same(method, _batch(0, labelled=with_labels), with_labels)


@pytest.mark.parametrize("method", list(KEPT))
def test_chunked_rows_weighted_by_zero_equal_gathered_chunks(method):
    """``chunk_size``: every row is visited a chunk at a time, those that count nowhere weighted by zero."""
    _assert_same(method, _batch(0), chunk_size=4)


@pytest.mark.parametrize("chunk", [None, 4])
def test_instance_ctkd_weights_rows_by_zero_like_gathering(chunk):
    """Instance-wise CTKD: an MLP gives each row its τ (its weights get the same gradient either way)."""
    kept, gathered = (tk.DistillationLoss(tk.temperature.InstanceCTKD(num_classes=13), chunk_size=chunk,
                                          sync_free_rows=flag) for flag in (True, False))
    kept.load_state_dict(gathered.state_dict())
    student, teacher, labels, mask = _batch(2)
    (a, grad_a), (b, grad_b) = (_run(loss_fn, student, teacher, labels, mask) for loss_fn in (kept, gathered))
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)
    for p_a, p_b in zip(kept.parameters(), gathered.parameters(), strict=True):
        assert p_b.grad.abs().sum() > 0
        torch.testing.assert_close(p_a.grad, p_b.grad, rtol=1e-4, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(list(KEPT)), ignored=st.floats(0, 1),
       masked=st.floats(0, 1), rows=st.integers(1, 9), chunk=st.sampled_from([None, 3, 16]))
def test_weighting_rows_by_zero_equals_gathering_them_for_any_mask(seed, method, ignored, masked, rows, chunk):
    batch = _batch(seed, shape=(rows, 5, 11), ignored=ignored, masked=masked)
    if not (batch[3] & (batch[2] != -100)).any():  # no valid row: the gathered loss is a plain 0
        kept, _ = _pair(method, chunk_size=chunk)
        out, grad = _run(kept, *batch)
        assert out.loss.item() == 0.0 and not grad.any() and out.stats["rows"] == 0.0
        return
    _assert_same(method, batch, chunk_size=chunk)


@pytest.mark.parametrize("method", list(KEPT))
def test_a_masked_step_reads_nothing_back(method, monkeypatch):
    """The reason for the mode: with a mask and ignored labels (a language-model batch), forward, backward and
    observe make no host read (the gathered path reads the valid rows' count: ``nonzero``)."""
    kept, gathered = _pair(method)
    student, teacher, labels, mask = _batch(1, garbage=False)
    reads = Reads(monkeypatch)
    for loss_fn, expect_reads in ((kept, False), (gathered, True)):
        reads.calls.clear()
        for step in range(4):
            reads.active = step > 1  # after CIST's calibration on the first batch
            out = loss_fn(student.clone().requires_grad_(), teacher, labels, mask=mask, progress=PROGRESS)
            out.loss.backward()
            loss_fn.observe(out)
            reads.active = False
        assert bool(reads.calls) == expect_reads, (method, reads.calls)


class _OwnTau(tk.temperature.Fixed):
    """A strategy of the user's: nothing says its τ or its statistics are row-local."""


def test_only_losses_that_allow_it_weight_rows_by_zero():
    cpu = torch.device("cpu")
    assert not tk.build_loss("kd")._keeps_rows(cpu)  # the default: on accelerators only
    assert not tk.build_loss("kd", sync_free_rows=False)._keeps_rows(cpu)
    for name in ("kd", "dkd", "ctkd", "lskd", "ce", "dts", "dtkd", "erkd"):
        assert tk.build_loss(name, sync_free_rows=True)._keeps_rows(cpu), name
    assert tk.build_loss("kd", sync_free_rows=True, chunk_size=4)._keeps_rows(cpu)  # chunked and fused paths too
    cist = tk.build_loss("cist", sync_free_rows=True)
    assert not cist._keeps_rows(cpu)  # its first batch calibrates ρ on every valid row: gathered
    cist.prepare(torch.randn(50, 7) * 3)
    assert cist._keeps_rows(cpu)
    running = tk.build_loss("cist", sync_free_rows=True, weighting={"normalise": "running"})
    running.prepare(torch.randn(50, 7) * 3)
    assert running._keeps_rows(cpu)  # the running mean counts its batches on the device
    assert not tk.DistillationLoss(_OwnTau(), sync_free_rows=True)._keeps_rows(cpu)
    with pytest.raises(tk.ThermoKDError, match="sync_free_rows must be None"):
        tk.DistillationLoss(sync_free_rows="yes")


@pytest.mark.parametrize("method", ["dts", "cist-own-ratio", "cist-running"])
def test_state_moves_alike_over_steps_including_a_batch_of_no_valid_rows(method):
    """DTS's T, CIST's own-ratio scale and a running mean of the weights follow batch statistics (means over the
    rows that count): weighting rows by zero moves them as gathering does, and a batch of no valid row moves
    nothing (decided on the device)."""
    kept, gathered = _pair(method)
    for loss_fn in (kept, gathered):
        loss_fn.prepare(_batch(0, garbage=False)[1].reshape(-1, 13))
    for seed, masked in ((7, 0.2), (8, 1.0), (9, 0.4), (10, 0.0)):
        batch = _batch(seed, masked=masked)
        a, _ = _run(kept, *batch)
        b, _ = _run(gathered, *batch)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
        kept.observe(a)
        gathered.observe(b)
        for key, value in gathered.state_dict().items():
            torch.testing.assert_close(kept.state_dict()[key], value, rtol=1e-6, atol=1e-7, equal_nan=True,
                                       msg=lambda m, key=key, seed=seed: f"{key} after seed {seed}: {m}")
    if method == "dts":  # T moved, and stayed finite through the batch of no valid row
        assert float(kept.temperature.current) != 4.0 and torch.isfinite(kept.temperature.current)


def test_a_window_of_device_counted_rows_averages_over_the_valid_rows():
    """The step bookkeeping takes a row count that is a device tensor (no read per micro-batch); a micro-batch with
    no valid row weighs nothing, and the extremes ignore it."""
    kept, gathered = _pair("kd")
    windows = []
    for loss_fn in (kept, gathered):
        window = StatWindow()
        for seed, masked in ((3, 0.2), (4, 1.0), (5, 0.5)):
            out = _run(loss_fn, *_batch(seed, masked=masked))[0]
            window.add(out.stats, PROGRESS)
        windows.append(window)
    a, b = windows[0].means(), windows[1].means()
    assert set(a) == set(b)
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    state = windows[0].state()  # a checkpoint holds floats
    assert isinstance(state["rows"], float) and state["rows"] == b["rows"]


def test_nan_in_a_valid_row_is_still_an_error_and_garbage_in_a_masked_row_is_not():
    kept, _ = _pair("kd")
    student, teacher, labels, mask = _batch(6)  # NaN and inf in every row that counts nowhere
    kept(student, teacher, labels, mask=mask)
    row = int(torch.nonzero((mask & (labels != -100)).reshape(-1))[0])
    student.reshape(-1, student.shape[-1])[row, 0] = float("nan")
    with pytest.raises(tk.ThermoKDError, match="student logits contain NaN or inf"):
        kept(student, teacher, labels, mask=mask)


# -- the fused linear-layer loss (hidden states and heads) ---------------------------------------------------------

def _hidden_batch(seed: int, rows: int = 19, hidden: int = 6, vocab: int = 11, masked: float = 0.25,
                  ignored: float = 0.25, garbage: bool = True):
    """Hidden states (NaN in the rows that count nowhere), heads with bias, labels with −100 and a mask."""
    g = torch.Generator().manual_seed(seed)
    h_s, h_t = torch.randn(2, rows, hidden, generator=g), torch.randn(2, rows, hidden + 1, generator=g)
    head_s, head_t = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden + 1, vocab)
    with torch.no_grad():
        for head in (head_s, head_t):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 2)
            head.bias.copy_(torch.randn(vocab, generator=g))
    labels = torch.randint(0, vocab, (2, rows), generator=g)
    labels[torch.rand(2, rows, generator=g) < ignored] = -100
    mask = torch.rand(2, rows, generator=g) >= masked
    if garbage:
        out = ~mask | (labels == -100)
        h_s[out], h_t[out] = float("nan"), float("inf")
    return h_s, h_t, head_s, head_t, labels, mask


def _fused(loss_fn, h_s, head_s, labels, mask, chunk, **teacher):
    hidden = h_s.clone().requires_grad_()
    head_s.zero_grad(set_to_none=True)
    out = loss_fn.forward_hidden(hidden, head_s, labels=labels, mask=mask, progress=PROGRESS, chunk_size=chunk,
                                 **teacher)
    out.loss.backward()
    return out, [hidden.grad.clone(), head_s.weight.grad.clone(), head_s.bias.grad.clone()]


def _assert_same_fused(method: str, batch, chunk: int, topk=None) -> None:
    h_s, h_t, head_s, head_t, labels, mask = batch
    kept, gathered = _pair(method)
    teacher = {"teacher_topk": topk} if topk is not None else {"teacher_hidden": h_t, "teacher_head": head_t}
    if KEPT[method][0] == "cist":  # the same ρ for both
        valid = (mask & (labels != -100)).reshape(-1)
        with torch.no_grad():
            logits = head_t(h_t.reshape(-1, h_t.shape[-1])[valid])
        kept.prepare(logits)
        gathered.prepare(logits)
    a, grads_a = _fused(kept, h_s, head_s, labels, mask, chunk, **teacher)
    b, grads_b = _fused(gathered, h_s, head_s, labels, mask, chunk, **teacher)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-7)
    assert set(a.terms) == set(b.terms) and set(a.stats) == set(b.stats)
    for key in a.terms:
        # DKD's TCKD, a binary KL of near-equal distributions, cancels: ~eps·|logits| absolute, whatever its size
        torch.testing.assert_close(a.terms[key], b.terms[key], rtol=1e-5, atol=1e-5 if key == "tckd" else 1e-7)
    for x, y in zip(grads_a, grads_b):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    for key in a.stats:
        assert a.stats[key] == pytest.approx(b.stats[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", list(KEPT))
def test_fused_rows_weighted_by_zero_equal_gathering_them(method):
    """The fused loss weights masked and ignored rows by zero too: the same value, gradients (hidden states, head
    weight and bias) and statistics, and the NaN hidden states of those rows reach nothing."""
    _assert_same_fused(method, _hidden_batch(0), chunk=5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), method=st.sampled_from(list(KEPT)), masked=st.floats(0, 1),
       rows=st.integers(1, 12), chunk=st.integers(1, 30))
@example(seed=8, method="dkd", masked=0.875, rows=8, chunk=2)  # TCKD 0.0327 apart by 2e-6
def test_fused_rows_weighted_by_zero_for_any_mask(seed, method, masked, rows, chunk):
    batch = _hidden_batch(seed, rows=rows, masked=masked)
    valid = batch[5] & (batch[4] != -100)
    if not valid.any():  # no valid row: a zero loss, a zero gradient for every head parameter, no read
        kept, _ = _pair(method)
        out, grads = _fused(kept, *batch[0:1], batch[2], batch[4], batch[5], chunk,
                            teacher_hidden=batch[1], teacher_head=batch[3])
        assert out.loss.item() == 0.0 and out.stats["rows"] == 0.0 and not any(g.any() for g in grads)
        return
    _assert_same_fused(method, batch, chunk)


def test_fused_rows_weighted_by_zero_with_a_topk_teacher_of_garbage_ids():
    """A top-k cache may hold anything in rows that count nowhere, class ids out of range included."""
    from thermokd.lm import capture_topk

    h_s, h_t, head_s, head_t, labels, mask = _hidden_batch(3, garbage=False)
    with torch.no_grad():
        topk = capture_topk(head_t(h_t) * 2, 4, capture_tau=2.0)
    out = ~mask | (labels == -100)
    topk.indices[out] = 10_000
    topk.log_probs[out] = float("nan")
    _assert_same_fused("cist-lm", (h_s, h_t, head_s, head_t, labels, mask), chunk=7, topk=topk)


def test_a_masked_fused_step_reads_nothing_back(monkeypatch):
    kept, gathered = _pair("cist")
    h_s, h_t, head_s, head_t, labels, mask = _hidden_batch(1, garbage=False)
    reads = Reads(monkeypatch)
    for loss_fn, expect_reads in ((kept, False), (gathered, True)):
        reads.calls.clear()
        for step in range(4):
            reads.active = step > 1  # after CIST's calibration on the first batch
            out = loss_fn.forward_hidden(h_s.clone().requires_grad_(), head_s, h_t, head_t, labels, mask=mask,
                                         progress=PROGRESS, chunk_size=8)
            out.loss.backward()
            loss_fn.observe(out)
            reads.active = False
        assert bool(reads.calls) == expect_reads, reads.calls
