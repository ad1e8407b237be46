"""On a CUDA device (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs them): no step of the loss makes the host
wait for the device, the fused path equals the plain one there, and bf16 autocast keeps the maths in float32."""
from __future__ import annotations

import pytest
import torch

import thermokd as tk
from thermokd.methods import method_names

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


def test_fused_equals_plain_on_the_device():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 64, generator=g).cuda().requires_grad_()
    h_t = torch.randn(300, 64, generator=g).cuda()
    head, head_t = torch.nn.Linear(64, 3000).cuda(), torch.nn.Linear(64, 3000).cuda()
    y = torch.randint(0, 3000, (300,), generator=g).cuda()
    loss_fn = tk.build_loss("cist")
    with torch.no_grad():
        teacher = head_t(h_t)
    plain = loss_fn(head(h), teacher, y, progress=PROGRESS)
    plain.loss.backward()
    grads = h.grad.clone(), head.weight.grad.clone()
    h.grad = None
    head.zero_grad()
    fused = tk.build_loss("cist")
    fused.load_state_dict(loss_fn.state_dict())
    out = fused.forward_hidden(h, head, h_t, head_t, y, progress=PROGRESS, chunk_size=64)
    out.loss.backward()
    torch.testing.assert_close(out.loss, plain.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "lskd", "dkd"])
def test_bf16_autocast_keeps_float32_maths(method):
    s, t, y = _inputs()
    s16, t16 = s.detach().bfloat16(), t.bfloat16()
    ref = tk.build_loss(method)(s16.float(), t16.float(), y, progress=PROGRESS).loss
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = tk.build_loss(method)(s16, t16, y, progress=PROGRESS).loss
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
