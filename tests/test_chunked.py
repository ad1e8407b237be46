"""The chunked DistillationLoss gives the plain loss's value, gradients, statistics and strategy state."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thermokd import DistillationLoss, Progress, build_loss, method_names
from thermokd.errors import ThermoKDError

from loss_helpers import assert_chunked_value_matches_float64

PROGRESS = Progress(step=5, total_steps=20, epoch=1, total_epochs=4)


def _inputs(b=3, length=11, vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, length, vocab, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(b, length, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[-1, -3:] = -100  # padding
    return student, teacher, labels


def _pair(method: str, chunk: int, **kwargs):
    plain = build_loss(method, **kwargs)
    chunked = build_loss(method, chunk_size=chunk, **kwargs)
    chunked.load_state_dict(plain.state_dict())
    return plain, chunked


def _run(loss, student, teacher, labels, **kwargs):
    out = loss(student, teacher, labels, progress=PROGRESS, **kwargs)
    params = [p for p in loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, [student, *params])
    return out, grads


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_equals_plain_for_every_method(method, chunk):
    student, teacher, labels = _inputs()
    plain, chunked = _pair(method, chunk)
    out_p, grads_p = _run(plain, student, teacher, labels)
    out_c, grads_c = _run(chunked, student, teacher, labels)
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    for g_c, g_p in zip(grads_c, grads_p):  # the logits', and CTKD's θ where it learns
        torch.testing.assert_close(g_c, g_p, rtol=1e-4, atol=1e-6)
    assert out_c.stats.keys() == out_p.stats.keys()
    for key in out_p.stats:
        assert out_c.stats[key] == pytest.approx(out_p.stats[key], rel=1e-4, abs=1e-6), key
    for name, term in out_p.terms.items():
        torch.testing.assert_close(out_c.terms[name], term.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "tvd"])
def test_other_divergences_and_an_explicit_mask(divergence):
    student, teacher, labels = _inputs(seed=3)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[1, 2:5] = False
    kwargs = dict(temperature="cist", divergence=divergence, weighting="confidence-difficulty")
    plain, chunked = DistillationLoss(**kwargs), DistillationLoss(chunk_size=4, **kwargs)
    chunked.load_state_dict(plain.state_dict())
    out_p, (g_p,) = _run(plain, student, teacher, labels, mask=mask)
    out_c, (g_c,) = _run(chunked, student, teacher, labels, mask=mask)
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_p, rtol=1e-4, atol=1e-6)
    # masked rows get no gradient
    assert g_c[1, 2:5].abs().max() == 0 and g_c[0, :4].abs().max() == 0 and g_c[2, -3:].abs().max() == 0


def test_without_labels_and_in_bfloat16():
    student, teacher, _ = _inputs(dtype=torch.bfloat16)
    plain, chunked = _pair("cist", 7)
    out_p, (g_p,) = _run(plain, student, teacher, None)
    out_c, (g_c,) = _run(chunked, student, teacher, None)
    assert g_c.dtype == torch.bfloat16  # the gradient buffer stays in the logits' dtype
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c.float(), g_p.float(), rtol=2e-2, atol=1e-3)


def test_cist_calibrates_on_the_whole_batch_and_dts_continues_identically():
    student, teacher, labels = _inputs(seed=5)
    plain, chunked = _pair("cist", 3)
    _run(plain, student, teacher, labels)
    _run(chunked, student, teacher, labels)
    assert float(chunked.temperature.ratio) == pytest.approx(float(plain.temperature.ratio), rel=1e-6)
    plain, chunked = _pair("dts", 3)
    for _ in range(3):
        for loss in (plain, chunked):
            out, _ = _run(loss, student, teacher, labels)
            loss.observe(out)
    torch.testing.assert_close(chunked.state_dict(), plain.state_dict())


def test_small_batches_take_the_plain_path_and_errors_are_clear():
    student, teacher, labels = _inputs()
    loss = build_loss("kd", chunk_size=10_000)
    out = loss(student, teacher, labels)
    assert out.terms["kd"].requires_grad  # the plain path keeps differentiable terms
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ThermoKDError, match="chunk_size"):
            DistillationLoss(chunk_size=bad)
    chunked = build_loss("kd", chunk_size=4)
    bad_teacher = teacher.clone()
    bad_teacher[1, 3, 0] = float("nan")
    with pytest.raises(ThermoKDError, match="teacher logits contain NaN"):
        chunked(student, bad_teacher, labels)
    bad_labels = labels.clone()
    bad_labels[1, 1] = 99
    with pytest.raises(ThermoKDError, match="label 99 is out of range"):
        chunked(student, teacher, bad_labels)
    out = chunked(student, teacher, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(ThermoKDError, match="one backward pass"):
        out.loss.backward()


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), length=st.integers(1, 9), vocab=st.integers(2, 40), chunk=st.integers(1, 12),
       seed=st.integers(0, 10_000), method=st.sampled_from(["kd", "cist", "entropy-target", "lskd", "dkd"]))
def test_chunking_never_changes_the_result(b, length, vocab, chunk, seed, method):
    student, teacher, labels = _inputs(b, length, vocab, seed)
    labels[0, 0] = 0  # at least one valid row
    plain, chunked = _pair(method, chunk)
    out_p, (g_p, *_) = _run(plain, student, teacher, labels)
    out_c, (g_c, *_) = _run(chunked, student, teacher, labels)
    torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_c, g_p, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_chunked_value_within_1e6_of_float64(tau: float) -> None:
    """The chunked loss value against Hinton KD + CE written in float64, at a language-model vocabulary."""
    assert_chunked_value_matches_float64(64, tau, 16)

@pytest.mark.parametrize("method", ["kd", "cist", "dts", "erkd"])
@pytest.mark.parametrize("labelled", [True, False])
def test_the_fused_softmax_kernels_branch_gives_the_same_loss(monkeypatch, method, labelled):
    """On CUDA the closed-form chunk uses torch's one-kernel log-softmax (and σ(z^s) from log σ(z^s)) instead of the
    explicit passes the CPU needs for precision: the same value, gradient and statistics (the branch, run here)."""
    import thermokd.objective as objective

    if method == "dts" and not labelled:
        pytest.skip("DTS reads the labels (its update is the cross-entropy gap)")
    student, teacher, labels = _inputs(seed=5)
    y = labels if labelled else None
    plain, chunked = _pair(method, 5)
    out_p, grads_p = _run(plain, student, teacher, y)
    calls = []
    monkeypatch.setattr(objective, "native_softmax", lambda x: calls.append(x.device) or True)
    out_n, grads_n = _run(chunked, student, teacher, y)
    assert calls, "the chunked loss did not reach the closed-form chunk"
    torch.testing.assert_close(out_n.loss, out_p.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_n[0], grads_p[0], rtol=1e-4, atol=1e-6)
    for key in out_p.stats:
        assert out_n.stats[key] == pytest.approx(out_p.stats[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("chunk", [None, 5])
def test_a_uniform_weighting_is_skipped_and_changes_nothing(monkeypatch, chunk):
    """``mix`` 0 makes every weight 1 (CIST's LM preset): the loss computes none of it, and gives what CIST without a
    weighting gives; a chunked CIST then visits the rows once (its τ is row-local once ρ is calibrated)."""
    import thermokd.chunked as chunked
    import thermokd.loss as loss_module
    from thermokd.weighting import ConfidenceDifficulty

    student, teacher, labels = _inputs(seed=7)
    uniform = build_loss("cist", weighting={"mix": 0.0}, chunk_size=chunk)
    bare = build_loss("cist", chunk_size=chunk)
    bare.weighting = None
    for loss in (uniform, bare):
        loss.temperature.calibrate(teacher)
    calls = []
    monkeypatch.setattr(ConfidenceDifficulty, "log_unnormalised", lambda self, rows: calls.append(rows))
    visits = []
    first_pass = chunked.temperatures_by_chunk
    counted = lambda *a, **k: visits.append(1) or first_pass(*a, **k)  # noqa: E731
    monkeypatch.setattr(loss_module, "temperatures_by_chunk", counted)  # the name the loss calls
    out_u, grads_u = _run(uniform, student, teacher, labels)
    out_b, grads_b = _run(bare, student, teacher, labels)
    assert not calls and not visits
    torch.testing.assert_close(out_u.loss, out_b.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads_u[0], grads_b[0], rtol=1e-6, atol=1e-7)
    assert dict(out_u.stats).keys() == dict(out_b.stats).keys()
    uniform.observe(out_u)


@pytest.mark.parametrize("rule", ["teacher", "ratio", "interpolate", "own-ratio"])
def test_cist_in_one_visit_equals_the_plain_loss(rule):
    """Without a weighting, a calibrated CIST's τ is computed chunk by chunk in the loss's own visit (it is
    row-local): value, gradient, statistics and own-ratio's running scale as the plain loss gives them."""
    student, teacher, labels = _inputs(seed=11)
    plain, chunked = _pair("cist", 4, temperature={"student": rule}, weighting={"mix": 0.0})
    for _ in range(2):  # the second step uses own-ratio's scale from the first observe
        out_p, grads_p = _run(plain, student, teacher, labels)
        out_c, grads_c = _run(chunked, student, teacher, labels)
        torch.testing.assert_close(out_c.loss, out_p.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads_c[0], grads_p[0], rtol=1e-4, atol=1e-6)
        for key in out_p.stats:
            assert out_c.stats[key] == pytest.approx(out_p.stats[key], rel=1e-4, abs=1e-6), key
        plain.observe(out_p)
        chunked.observe(out_c)
    torch.testing.assert_close(chunked.temperature.state_dict(), plain.temperature.state_dict())
