"""No step of the loss reads a device value back to the host unless someone reads its statistics.

On a CPU there is no device to wait for, so the test counts the calls that would make the host wait on an
accelerator: every Python-level way of turning a tensor into a host value (and ``nonzero``, whose output size
depends on the data).
"""
from __future__ import annotations

import pytest
import torch

import thermokd as tk
from thermokd.methods import method_names

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")
PROGRESS = tk.Progress(step=3, total_steps=100, epoch=1, total_epochs=10)
# the entropy-target solver stops early on the CPU by reading its convergence flag (no device to wait for
# there); elsewhere it runs its iterations without reading. The test asks for the accelerator behaviour.
OPTIONS = {"entropy-target": {"temperature": {"early_exit": False}}}


class Reads:
    """Counts host reads of tensor values while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    self.calls.append(_name)
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        self.active = False


def _inputs(shape=(24, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=g).requires_grad_()
    teacher = torch.randn(*shape, generator=g) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return student, teacher, labels


def _steps(loss_fn, reads: Reads, call, count: int = 3) -> list[str]:
    """Warm up twice (CIST calibrates ρ on the first batch and reads the new value once on the next), then count
    over ``count`` steps."""
    for step in range(count + 2):
        reads.active = step > 1
        out = call()
        out.loss.backward()
        loss_fn.observe(out)
        reads.active = False
    return reads.calls


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("path", ["plain", "chunked"])
def test_no_host_read_when_stats_are_not_read(method: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = {"chunk_size": 5} if path == "chunked" else {}
    loss_fn = tk.build_loss(method, ignore_index=None, **OPTIONS.get(method, {}), **chunk)
    student, teacher, labels = _inputs()
    reads = Reads(monkeypatch)
    calls = _steps(loss_fn, reads, lambda: loss_fn(student, teacher, labels, progress=PROGRESS))
    assert calls == []
    out = loss_fn(student, teacher, labels, progress=PROGRESS)
    reads.active = True
    stats = dict(out.stats)  # reading the statistics: one transfer for all of them
    assert reads.calls == ["tolist"] and stats["rows"] == 24.0


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "ctkd", "lskd", "dkd", "entropy-target"])
def test_fused_path_reads_nothing(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loss_fn = tk.build_loss(method, ignore_index=None, **OPTIONS.get(method, {}))
    g = torch.Generator().manual_seed(1)
    hidden, teacher_hidden = torch.randn(20, 6, generator=g).requires_grad_(), torch.randn(20, 6, generator=g)
    head, teacher_head = torch.nn.Linear(6, 9), torch.nn.Linear(6, 9)
    labels = torch.randint(0, 9, (20,), generator=g)
    reads = Reads(monkeypatch)
    calls = _steps(loss_fn, reads, lambda: loss_fn.forward_hidden(hidden, head, teacher_hidden, teacher_head, labels,
                                                                  progress=PROGRESS, chunk_size=7))
    assert calls == []


def test_a_mask_costs_exactly_one_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which rows count is data: finding them (``nonzero``) is the one read a masked batch needs."""
    loss_fn = tk.build_loss("dts")
    student, teacher, labels = _inputs()
    labels[:3] = -100
    mask = torch.ones(24, dtype=torch.bool)
    mask[5] = False
    reads = Reads(monkeypatch)
    calls = _steps(loss_fn, reads, lambda: loss_fn(student, teacher, labels, mask=mask, progress=PROGRESS), count=2)
    assert calls == ["nonzero", "nonzero"]


def test_bad_inputs_are_still_caught_on_the_cpu() -> None:
    loss_fn = tk.build_loss("kd", ignore_index=None)
    student, teacher, labels = _inputs()
    with pytest.raises(tk.ThermoKDError, match="label 11 is out of range for 11 classes"):
        loss_fn(student, teacher, torch.full_like(labels, 11))
    teacher[2, 3] = float("nan")
    with pytest.raises(tk.ThermoKDError, match="teacher logits contain NaN or inf"):
        loss_fn(student, teacher, labels)


def test_cist_own_ratio_observes_without_a_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """CIST's own-ratio rule moves its scale from a batch statistic in observe: as a tensor, never read (it used to
    read every statistic of the step)."""
    loss_fn = tk.build_loss("cist", ignore_index=None, temperature={"student": "own-ratio"})
    student, teacher, labels = _inputs()
    reads = Reads(monkeypatch)
    assert _steps(loss_fn, reads, lambda: loss_fn(student, teacher, labels, progress=PROGRESS)) == []
    assert torch.isfinite(loss_fn.temperature.student_log_scale).all()
