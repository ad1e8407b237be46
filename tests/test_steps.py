"""The step bookkeeping every loop shares (thermokd/steps.py): statistics windows and θ's parameter group."""
from __future__ import annotations

import pytest
import torch

import thermokd as tk
from thermokd.stats import LazyStats
from thermokd.steps import StatWindow, loss_parameter_group


def _stats(rows, **values):
    return LazyStats({k: torch.tensor(v) for k, v in values.items()}, floats={"rows": float(rows)})


def test_a_window_keeps_true_extremes_and_means_over_rows():
    window = StatWindow()
    window.add(_stats(2, tau_teacher_mean=1.0, tau_teacher_min=0.5, tau_teacher_max=3.0))
    window.add(_stats(6, tau_teacher_mean=3.0, tau_teacher_min=1.5, tau_teacher_max=2.0))
    window.add(_stats(0))  # a micro-batch without valid rows counts nowhere
    means = window.means()
    assert means["tau_teacher_mean"] == pytest.approx((2 * 1.0 + 6 * 3.0) / 8)  # not the mean of the two means
    assert means["tau_teacher_min"] == 0.5 and means["tau_teacher_max"] == 3.0  # not means of extremes
    assert means["rows"] == 8.0


def test_merge_and_state_round_trip_give_the_same_window():
    a, b = StatWindow(), StatWindow()
    a.add(_stats(4, kd=1.0, weight_std_max=0.2))
    b.add(_stats(4, kd=3.0, weight_std_max=0.1))
    a.merge(b)
    restored = StatWindow.from_state(a.state())
    assert restored.means() == pytest.approx(a.means()) and a.means()["kd"] == pytest.approx(2.0)


def test_observe_reads_the_window_like_an_output():
    """A window carries the ``stats`` and ``progress`` a strategy reads: DTS moves once, from the window's gap."""
    loss = tk.DistillationLoss(temperature=tk.temperature.DTS())
    progress = tk.Progress(step=0, total_steps=10, epoch=0, total_epochs=2)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    window = StatWindow()
    window.add(loss(s, t, y, progress=progress).stats, progress)
    reference = tk.DistillationLoss(temperature=tk.temperature.DTS())
    reference.observe(reference(s, t, y, progress=progress))
    loss.observe(window)
    assert window.progress is progress
    torch.testing.assert_close(loss.temperature.current, reference.temperature.current)


def test_learnable_temperatures_get_one_group_with_the_students_weight_decay():
    assert loss_parameter_group(tk.build_loss("kd"), 5e-4) is None
    group = loss_parameter_group(tk.build_loss("ctkd"), 5e-4)
    assert group["weight_decay"] == 5e-4 and len(group["params"]) == 1
