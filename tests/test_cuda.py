"""On a CUDA device (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs them): no step of the loss makes the host
wait for the device, the fused path equals the plain one there, and bf16 autocast keeps the maths in float32."""
from __future__ import annotations

import pytest
import torch

import thermokd as tk
from thermokd.methods import method_names

from loss_helpers import assert_chunked_value_matches_float64

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROGRESS = tk.Progress(step=3, total_steps=100, epoch=1, total_epochs=10)
OPTIONS = {"entropy-target": {"temperature": {"early_exit": False}}}


def _inputs(rows: int = 64, classes: int = 50):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(rows, classes, generator=g).cuda().requires_grad_()
    t = (torch.randn(rows, classes, generator=g) * 3).cuda()
    y = torch.randint(0, classes, (rows,), generator=g).cuda()
    return s, t, y


@pytest.mark.parametrize("method", [m for m in method_names() if m != "ctkd-instance"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_no_sync_in_forward_backward_observe(method, chunk):
    loss_fn = tk.build_loss(method, ignore_index=None, chunk_size=chunk, **OPTIONS.get(method, {})).cuda()
    s, t, y = _inputs()
    for step in range(4):
        if step == 2:  # after CIST's one-time calibration
            torch.cuda.set_sync_debug_mode("error")
        try:
            out = loss_fn(s, t, y, progress=PROGRESS)
            out.loss.backward()
            loss_fn.observe(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert set(out.stats) >= {"loss", "rows"}


@pytest.mark.parametrize("method, domain", [("kd", "default"), ("cist", "lm"), ("dtkd", "default"),
                                            ("entropy-target", "default"), ("dts", "default"), ("cist", "default"),
                                            ("erkd", "default"), ("dkd", "default"), ("ctkd", "default"),
                                            ("lskd", "default"), ("ce", "default")])
@pytest.mark.parametrize("path", ["plain", "chunked", "fused"])
def test_no_sync_with_a_mask_and_ignored_labels(method, domain, path):
    """A language-model batch (a mask, labels of -100): the built-in losses weight the rows that count nowhere by
    zero on the device (sync_free_rows, the default there) instead of gathering the others, which would read their
    count; on the plain path, a chunk at a time (chunk_size) and from hidden states and heads (forward_hidden)."""
    loss_fn = tk.build_loss(method, domain=domain, chunk_size=16 if path == "chunked" else None,
                            **OPTIONS.get(method, {})).cuda()
    s, t, y = _inputs()
    y[::5] = -100
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[::7] = False
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(s.shape[0], 8, generator=g).cuda().requires_grad_()
    heads = _head(8, s.shape[1], g), _head(8, s.shape[1], g)
    for step in range(4):
        if step == 2:  # after CIST's one-time calibration
            torch.cuda.set_sync_debug_mode("error")
        try:
            if path == "fused":
                out = loss_fn.forward_hidden(hidden, heads[0], hidden.detach(), heads[1], y, mask=mask,
                                             progress=PROGRESS, chunk_size=16)
            else:
                out = loss_fn(s, t, y, mask=mask, progress=PROGRESS)
            out.loss.backward()
            loss_fn.observe(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    valid = mask & (y != -100)
    assert out.stats["rows"] == float(valid.sum())


@pytest.fixture
def ieee_float32_matmuls():
    """Full float32 matmuls for the test, whatever an earlier test or a user left set: with TF32 (10-bit mantissa)
    the plain and fused heads round differently by ~1e-3, and the comparison would test TF32, not the loss."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _head(inputs: int, outputs: int, g: torch.Generator) -> torch.nn.Linear:
    """A head initialised from ``g`` (not from the global RNG, which earlier tests have advanced by some amount)."""
    head = torch.nn.Linear(inputs, outputs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(outputs, inputs, generator=g) / inputs ** 0.5)
        head.bias.copy_(torch.randn(outputs, generator=g) * 0.1)
    return head.cuda()


def _close_at_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Two float32 evaluations of the same sums differ by rounding that scales with the summed magnitudes, not with
    each entry: an entry near 0 is a sum that cancelled. So the allowed difference is relative to the tensor's
    largest entry: 1e-5 of it (a GPU tree reduction over V = 3000 terms rounds at ~log2(V)·2^-24 ≈ 1e-6 of the
    magnitudes), plus 1e-4 relative per entry. A wrong chunk, mask or τ gives errors of order 1 of the scale."""
    scale = want.abs().max().item()
    worst = (got - want).abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: largest difference {worst:.3g} at scale {scale:.3g}\n{m}")


@pytest.mark.parametrize("method", ["kd", "cist"])
def test_fused_equals_plain_on_the_device(method, ieee_float32_matmuls):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    h_t = torch.randn(300, 64, generator=g).cuda()
    head, head_t = _head(64, 3000, g), _head(64, 3000, g)
    y = torch.randint(0, 3000, (300,), generator=g).cuda()
    loss_fn = tk.build_loss(method).cuda()
    with torch.no_grad():
        teacher = head_t(h_t)
    plain = loss_fn(head(h), teacher, y, progress=PROGRESS)  # CIST: this first batch calibrates ρ
    plain.loss.backward()
    grads = h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    h.grad = None
    head.zero_grad()
    fused = tk.build_loss(method).cuda()
    fused.load_state_dict(loss_fn.state_dict())  # the same calibrated ρ
    out = fused.forward_hidden(h, head, h_t, head_t, y, progress=PROGRESS, chunk_size=64)
    out.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=0.0)  # one number of order 1
    _close_at_scale(h.grad, grads[0], "gradient to the hidden states")
    _close_at_scale(head.weight.grad, grads[1], "gradient to the head's weight")
    _close_at_scale(head.bias.grad, grads[2], "gradient to the head's bias")


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "lskd", "dkd"])
def test_bf16_autocast_keeps_float32_maths(method):
    s, t, y = _inputs()
    s16, t16 = s.detach().bfloat16(), t.bfloat16()
    ref = tk.build_loss(method)(s16.float(), t16.float(), y, progress=PROGRESS).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = tk.build_loss(method)(s16, t16, y, progress=PROGRESS).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("chunk", [16, 512])
def test_chunked_value_within_1e6_of_float64_on_the_device(tau, chunk):
    """The chunked path on CUDA uses torch's one-kernel log-softmax: its value against Hinton KD + CE written in
    float64, at a language-model vocabulary (the CPU's explicit passes are held to the same bound elsewhere)."""
    assert_chunked_value_matches_float64(1024, tau, chunk, device="cuda")
