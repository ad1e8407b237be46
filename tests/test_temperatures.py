"""Temperature strategies against docs/methods.md: CIST, DTS, CTKD, logit standardisation, DTKD, the entropy
target and the schedules."""
from __future__ import annotations

import math

import pytest
import torch

import thermokd as tk
from thermokd.temperature import (CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, InstanceCTKD, LogitStandardization,
                                  Scheduled, dts_multiplier, grl_lambda)


def _kd_only(temperature, **kwargs):
    return tk.DistillationLoss(temperature, ce_weight=0.0, kd_weight=1.0, **kwargs)


# -- CIST ------------------------------------------------------------------------------------------------

def test_cist_with_clamped_constant_tau_equals_kd_exactly(hand):
    s, t, y = hand.batch(n=32, c=10, seed=0)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    cist = _kd_only(CIST(student="ratio", ratio=1.0, tau_min=4.0, tau_max=4.0), weighting=None)(s1, t, y)
    kd = _kd_only(Fixed(4.0))(s2, t, y)
    assert cist.loss.item() == kd.loss.item()
    cist.loss.backward()
    kd.loss.backward()
    assert torch.equal(s1.grad, s2.grad)


def test_cist_on_rows_with_equal_centred_max_is_kd_at_tau0(hand, assert_close):
    # permutations of one vector plus a per-row shift share the centred max, so the auto ratio gives τ = tau0
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, generator=g) * 2
    t = torch.stack([base[torch.randperm(12, generator=g)] for _ in range(15)]) + torch.randn(15, 1, generator=g)
    s = torch.stack([base[torch.randperm(12, generator=g)] for _ in range(15)]) + torch.randn(15, 1, generator=g)
    y = torch.randint(0, 12, (15,), generator=g)
    out = _kd_only(CIST(student="ratio", tau0=3.0), weighting=None)(s, t, y)
    assert out.stats["tau_teacher_min"] == pytest.approx(3.0, rel=1e-5)
    assert out.stats["tau_teacher_max"] == pytest.approx(3.0, rel=1e-5)
    assert out.stats["tau_student_mean"] == pytest.approx(3.0, rel=1e-5)
    assert_close(out.loss, hand.kd(s, t, 3.0), rtol=1e-4)


def test_cist_tau_is_clipped_centred_max_over_ratio(hand, assert_close):
    s, t, y = hand.batch(n=40, c=10, seed=2, spread=(0.05, 60.0))
    temps = CIST(student="ratio", ratio=2.0, tau_min=0.5, tau_max=20.0).temperatures(s, t, y)
    want_t = (hand.centred_max(t) / 2.0).clamp(0.5, 20.0)
    want_s = (hand.centred_max(s) / 2.0).clamp(0.5, 20.0)
    assert temps.teacher.shape == (40, 1) and temps.student.shape == (40, 1)
    assert_close(temps.teacher, want_t)
    assert_close(temps.student, want_s)
    assert (want_t == 0.5).any() and (want_t == 20.0).any() and ((want_t > 0.5) & (want_t < 20)).any()
    # shift invariance per row
    shift = torch.randn(40, 1, generator=torch.Generator().manual_seed(0)) * 50
    shifted = CIST(student="ratio", ratio=2.0).temperatures(s + shift, t - shift, y)
    assert_close(shifted.teacher, want_t, rtol=1e-4, atol=1e-4)
    assert_close(shifted.student, want_s, rtol=1e-4, atol=1e-4)
    # the teacher-only ablation shares the teacher's τ
    shared = CIST(ratio=2.0, student="teacher").temperatures(s, t, y)
    assert_close(shared.student, want_t)


def test_cist_auto_ratio_calibrates_once_on_the_first_batch(hand, assert_close):
    s, t, y = hand.batch(n=33, c=10, seed=3)  # odd: one median
    strategy = CIST(student="ratio", tau0=4.0)
    assert not strategy.calibrated
    loss = _kd_only(strategy, weighting=None)
    out = loss(s, t, y)
    rho = hand.centred_max(t).median().item() / 4.0
    assert float(strategy.ratio) == pytest.approx(rho, rel=1e-6)
    assert strategy.calibrated
    assert out.stats["tau_teacher_mean"] == pytest.approx(
        (hand.centred_max(t) / rho).clamp(0.5, 20.0).mean().item(), rel=1e-5)
    # a later batch of another scale does not move ρ
    s2, t2, y2 = hand.batch(n=33, c=10, seed=4, spread=(5.0, 20.0))
    out2 = loss(s2, t2, y2)
    assert float(strategy.ratio) == pytest.approx(rho, rel=1e-6)
    want = (hand.centred_max(t2) / rho).clamp(0.5, 20.0)
    assert out2.stats["tau_teacher_mean"] == pytest.approx(want.mean().item(), rel=1e-5)
    assert_close(out2.loss, hand.kd(s2, t2, want, (hand.centred_max(s2) / rho).clamp(0.5, 20.0)))


def test_cist_calibrate_on_a_set_of_logits(hand):
    _, t, _ = hand.batch(n=99, c=10, seed=5)
    strategy = CIST(student="ratio", tau0=2.0)
    rho = strategy.calibrate(t.reshape(3, 33, 10))  # any leading shape
    assert rho == pytest.approx(hand.centred_max(t).median().item() / 2.0, rel=1e-6)
    assert float(strategy.ratio) == pytest.approx(rho)
    s, t2, y = hand.batch(n=5, c=10, seed=6)
    strategy.temperatures(s, t2, y)  # the first batch no longer recalibrates
    assert float(strategy.ratio) == pytest.approx(rho)


def test_cist_fixed_ratio_is_never_recalibrated(hand):
    s, t, y = hand.batch(n=9, c=10, seed=7)
    strategy = CIST(student="ratio", ratio=1.5)
    strategy.temperatures(s, t, y)
    assert float(strategy.ratio) == 1.5


def test_cist_reads_a_ratio_set_or_loaded(hand, assert_close):
    """ρ is a host float for speed; every public write (set_ratio, load_state_dict, assignment) must be seen.
    Writes in place to the ``ratio`` buffer are not supported: seeing them needs a device read per step or torch's
    private version counters."""
    s, t, y = hand.batch(n=12, c=10, seed=8)
    strategy = CIST(student="ratio", ratio=2.0)
    strategy.temperatures(s, t, y)  # reads ρ
    strategy.set_ratio(3.0)
    assert_close(strategy.temperatures(s, t, y).teacher, (hand.centred_max(t) / 3.0).clamp(0.5, 20.0))
    strategy.load_state_dict({"ratio": torch.tensor(5.0)})
    assert_close(strategy.temperatures(s, t, y).student, (hand.centred_max(s) / 5.0).clamp(0.5, 20.0))
    strategy.ratio = torch.tensor(float("nan"))  # replaced by an uncalibrated buffer: calibrates again
    assert not strategy.calibrated
    strategy.temperatures(s, t, y)
    assert float(strategy.ratio) == pytest.approx(hand.centred_max(t).median().item() / 4.0, rel=1e-6)


def test_cist_ratio_survives_a_state_dict_round_trip_as_a_float(hand, assert_close):
    """A calibrated ρ goes into ``state_dict`` as a tensor (the key older checkpoints have) and comes back as the
    float the strategy reads; a checkpoint saved before calibration leaves the loaded strategy uncalibrated."""
    s, t, y = hand.batch(n=12, c=10, seed=8)
    saved = CIST(student="ratio")
    rho = saved.calibrate(t)
    state = saved.state_dict()
    assert isinstance(state["ratio"], torch.Tensor) and state["ratio"].dtype == torch.float32
    assert float(state["ratio"]) == rho  # the float is the value the checkpoint holds, not a float64 neighbour
    restored = CIST(student="ratio")
    restored.load_state_dict({"ratio": state["ratio"].clone()})  # as an older checkpoint gives it
    assert restored.calibrated and isinstance(restored.host_float("ratio"), float)
    assert restored.host_float("ratio") == rho
    assert_close(restored.temperatures(s, t, y).teacher, saved.temperatures(s, t, y).teacher)
    loss = tk.DistillationLoss(CIST(student="ratio"))
    loss.load_state_dict(tk.DistillationLoss(saved).state_dict())  # through the loss: the child's load is seen too
    assert loss.temperature.host_float("ratio") == rho
    loss.load_state_dict(tk.DistillationLoss(CIST()).state_dict())
    assert not loss.temperature.calibrated
    restored.load_state_dict({"ratio": torch.tensor(0.1, dtype=torch.float64)})  # the float is what the buffer holds
    assert restored.host_float("ratio") == float(restored.ratio) == float(torch.tensor(0.1, dtype=torch.float32))
    with pytest.raises(tk.ThermoKDError, match="ratio must be > 0"):
        restored.set_ratio(-1.0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", ["cist", "fixed"])
def test_host_floats_are_loaded_and_used_on_cuda_without_a_sync(temperature, hand, assert_close):
    """After calibration, no step waits for the device, nor the first step after loading a host state_dict (a
    checkpoint, the HF trainer's rank-0 share; the load's own host-to-device copy may wait); the loaded value is
    used."""
    s, t, y = (x.cuda() for x in hand.batch(n=40, c=30, seed=3))
    loss = tk.DistillationLoss(CIST() if temperature == "cist" else Fixed(3.0), ignore_index=None).cuda()
    loss.observe(loss(s, t, y))  # CIST calibrates here (its one read of the device)
    saved = {k: v.cpu() * 2 for k, v in loss.state_dict().items()}  # ρ or τ doubled
    for load in (False, True):
        if load:
            loss.load_state_dict(saved)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                out = loss(s.clone().requires_grad_(), t, y)
                out.loss.backward()
                loss.observe(out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    host = tk.DistillationLoss(CIST() if temperature == "cist" else Fixed(3.0), ignore_index=None)
    host.load_state_dict(saved)
    assert_close(out.loss.cpu(), host(s.cpu(), t.cpu(), y.cpu()).loss, rtol=1e-4, atol=1e-6)


def test_cist_under_autocast_keeps_float32_temperatures(hand, assert_close):
    """The temperatures are float32 under autocast: none of their reductions may run in a lower precision."""
    s, t, y = hand.batch(n=64, c=1000, seed=9, spread=(0.5, 30.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        temps = CIST(student="ratio", ratio=2.0).temperatures(s, t, y)
    assert temps.teacher.dtype == temps.student.dtype == torch.float32
    assert_close(temps.teacher, (hand.centred_max(t) / 2.0).clamp(0.5, 20.0))
    assert_close(temps.student, (hand.centred_max(s) / 2.0).clamp(0.5, 20.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (float16 autocast)")
def test_cist_under_cuda_autocast_keeps_float32_temperatures(hand, assert_close):
    s, t, y = hand.batch(n=64, c=1000, seed=9, spread=(0.5, 30.0))
    with torch.autocast("cuda", dtype=torch.float16):
        temps = CIST(student="ratio", ratio=2.0).temperatures(s.cuda(), t.cuda(), y.cuda())
    assert temps.teacher.dtype == torch.float32
    assert_close(temps.teacher.cpu(), (hand.centred_max(t) / 2.0).clamp(0.5, 20.0))


# -- DTS -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gap,mult", [(1.5, 1.35), (2.5, 1.667), (3.0, 1.5), (5.0, 1.25), (0.5, 1.0), (-1.0, 1.0),
                                      (0.0, 1.0), (1.0, 1.0), (1.01, 1.35)])
def test_dts_multiplier_table(gap, mult):
    # ΔL = CE(teacher) − CE(student) = −g; at g = 1 exactly, s = −1/1e-4 < 1 gives mult = 1
    assert dts_multiplier(-gap) == pytest.approx(mult, abs=1e-3)


def _hand_dts_step(T, ce_t, ce_s, epoch, total_epochs, t_init, t_min, t_max):
    dl = ce_t - ce_s
    cosf = 0.5 * (1 + math.cos(math.pi * (epoch + 1) / total_epochs))
    s = dl / (dl + 1 + 1e-4)
    mult = 1.0 if s <= 1 else (s if s <= 2 else 1.35)
    return 0.9 * T + 0.1 * min(max(t_init * cosf * mult, t_min), t_max), mult


@pytest.mark.parametrize("t_init,t_min,t_max", [(4.0, 1.0, 6.0), (4.0, 2.0, 4.0)])
def test_dts_trajectory_matches_the_update_rule(hand, assert_close, t_init, t_min, t_max):
    c, n, steps_per_epoch, epochs, total_epochs = 10, 16, 3, 3, 4
    dts = DTS(t_init=t_init, t_min=t_min, t_max=t_max)
    loss = _kd_only(dts)
    g = torch.Generator().manual_seed(8)
    # student's margin on the label per batch: sets the CE gap g (≈1.5, 2.3, 4.2, 0.15 nats)
    margins = [1.0, 0.0, -2.0, 4.0, 0.5, 1.0, -1.0, 3.0, 0.0]
    T, mults = t_init, set()
    for epoch in range(epochs):
        for j in range(steps_per_epoch):
            step = epoch * steps_per_epoch + j
            y = torch.randint(0, c, (n,), generator=g)
            onehot = torch.nn.functional.one_hot(y, c).float()
            t = 8 * onehot + 0.3 * torch.randn(n, c, generator=g)
            s = margins[step] * onehot + 0.3 * torch.randn(n, c, generator=g)
            progress = tk.Progress(step=step, total_steps=steps_per_epoch * total_epochs, epoch=epoch,
                                   total_epochs=total_epochs)
            out = loss(s, t, y, progress=progress)
            # this batch is computed at the current T
            assert out.stats["tau_teacher_mean"] == pytest.approx(T, rel=1e-5)
            assert out.stats["tau_student_mean"] == pytest.approx(T, rel=1e-5)
            assert_close(out.terms["kd"], hand.kd(s, t, T), rtol=1e-4)
            assert float(dts.current) == pytest.approx(T, rel=1e-5)  # forward alone changes nothing
            loss.observe(out)
            T, mult = _hand_dts_step(T, hand.ce(t, y).mean().item(), hand.ce(s, y).mean().item(), epoch,
                                     total_epochs, t_init, t_min, t_max)
            mults.add(1.0 if mult == 1.0 else (1.35 if mult == 1.35 else 1.5))
            assert float(dts.current) == pytest.approx(T, rel=1e-5)
    assert mults == {1.0, 1.35, 1.5}  # every branch of the multiplier was exercised


# -- CTKD ------------------------------------------------------------------------------------------------

def _lam(e, lam_max=0.0, lam_min=-1.0, loops=10):
    return lam_min + (lam_max - lam_min) * (1 + math.cos(math.pi * min(e, loops) / loops)) / 2


def test_ctkd_lambda_curriculum():
    for e in range(0, 16):
        assert grl_lambda(e) == pytest.approx(_lam(e), abs=1e-12)
    assert grl_lambda(0) == 0.0 and grl_lambda(10) == -1.0 and grl_lambda(25) == -1.0
    assert grl_lambda(3, lam_max=1.0, lam_min=0.5, loops=5) == pytest.approx(_lam(3, 1.0, 0.5, 5))


@pytest.mark.parametrize("init", [1.5, 4.0, 12.0])
def test_ctkd_starts_near_init_and_stays_in_range(hand, init):
    s, t, y = hand.batch(n=8, c=10, seed=9)
    ctkd = CTKD(init=init)
    temps = ctkd.temperatures(s, t, y, progress=tk.Progress())
    assert float(temps.teacher) == pytest.approx(init, abs=1e-4)
    for theta in (-100.0, -5.0, 0.0, 5.0, 100.0):
        with torch.no_grad():
            ctkd.theta.fill_(theta)
        T = float(ctkd.temperatures(s, t, y, progress=tk.Progress()).teacher)
        assert 1.0 <= T <= 21.0
        assert T == pytest.approx(1 + 20 / (1 + math.exp(-theta)), rel=1e-6)


@pytest.mark.parametrize("epoch", [0, 2, 5, 9, 14])
def test_ctkd_theta_gradient_is_reversed_by_lambda(hand, assert_close, epoch):
    s, t, y = hand.batch(n=16, c=10, seed=10)
    ctkd = CTKD(init=4.0)
    out = _kd_only(ctkd)(s, t, y, progress=tk.Progress(epoch=epoch, total_epochs=20))
    out.loss.backward()
    theta = ctkd.theta.detach().double().clone().requires_grad_()
    T = 1 + 20 * torch.sigmoid(theta)
    ref = hand.kd(s, t, T)
    ref.backward()
    assert_close(out.loss, ref)
    assert_close(ctkd.theta.grad, _lam(epoch + 1) * theta.grad, rtol=1e-4, atol=1e-7)


def _kd_after_one_step(ctkd, s, t, y, progress, lr=0.5):
    loss = _kd_only(ctkd)
    opt = torch.optim.SGD(loss.parameters(), lr=lr)
    before = loss(s, t, y, progress=progress)
    before.loss.backward()
    opt.step()
    with torch.no_grad():
        after = loss(s, t, y, progress=progress)
    return before.loss.item(), after.loss.item()


def test_ctkd_theta_ascends_the_kd_loss_while_lambda_is_negative(hand):
    s, t, y = hand.batch(n=16, c=10, seed=11)
    before, after = _kd_after_one_step(CTKD(init=4.0), s, t, y, tk.Progress(epoch=5, total_epochs=20))
    assert after > before
    # with λ forced positive the same step descends
    before, after = _kd_after_one_step(CTKD(init=4.0, lam_max=1.0, lam_min=1.0), s, t, y,
                                       tk.Progress(epoch=5, total_epochs=20))
    assert after < before


def test_instance_ctkd_is_vectorised_per_sample_and_in_range(hand):
    s, t, y = hand.batch(n=512, c=10, seed=12)
    strategy = InstanceCTKD(num_classes=10, init=4.0)
    calls = []
    strategy.mlp.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    loss = _kd_only(strategy)
    s.requires_grad_(True)
    out = loss(s, t, y, progress=tk.Progress(epoch=3, total_epochs=10))
    assert calls == [torch.Size([512, 20])]  # one call for the whole batch
    tau = strategy.temperatures(s.detach(), t, y, progress=tk.Progress(epoch=3, total_epochs=10)).teacher
    assert tau.shape == (512, 1)
    assert ((tau >= 1) & (tau <= 21)).all()
    assert (tau - 4.0).abs().max() < 0.5  # starts near init
    assert tau.std() > 0  # genuinely per sample
    # each row's τ depends on that row only
    single = strategy.temperatures(s.detach()[7:8], t[7:8], progress=tk.Progress()).teacher
    assert single.item() == pytest.approx(tau[7].item(), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in strategy.parameters())
    with torch.no_grad():
        strategy.mlp[2].bias.fill_(1e3)
    assert strategy.temperatures(s.detach(), t, progress=tk.Progress()).teacher.max() <= 21.0


# -- logit standardisation -------------------------------------------------------------------------------

def _z_score(z):
    mean = z.mean(-1, keepdim=True)
    std = torch.sqrt(((z - mean) ** 2).sum(-1, keepdim=True) / (z.shape[-1] - 1))
    return (z - mean) / (std + 1e-7)


def test_logit_standardisation_is_kd_on_z_scored_logits(hand, assert_close):
    s, t, y = hand.batch(n=24, c=10, seed=13)
    s_lib = s.clone().requires_grad_()
    out = _kd_only(LogitStandardization(base=2.0))(s_lib, t, y)
    out.loss.backward()
    s_ref = s.double().clone().requires_grad_()
    ref = hand.kd(_z_score(s_ref), _z_score(t.double()), 2.0)
    ref.backward()
    assert_close(out.loss, ref)
    assert_close(s_lib.grad, s_ref.grad, rtol=1e-4, atol=1e-7)
    # the paper's weights: 0.1·CE + 9·KD
    total = tk.build_loss("lskd")(s, t, y)
    assert_close(total.loss, 0.1 * hand.ce(s, y).mean() + 9.0 * ref.detach(), rtol=1e-5)
    # equivalent to per-sample temperatures τ_b·std(z_i)
    temps = LogitStandardization(base=2.0).temperatures(s, t, y)
    std_t = torch.sqrt(((t.double() - t.double().mean(-1, keepdim=True)) ** 2).sum(-1, keepdim=True) / 9)
    assert_close(temps.teacher, 2.0 * (std_t + 1e-7))


# -- DTKD ------------------------------------------------------------------------------------------------

def test_dtkd_temperatures_use_centred_max_and_clamp(hand, assert_close):
    s, t, y = hand.batch(n=30, c=10, seed=14)
    s[0] = s[0] * 1e-3  # nearly flat student: τ^t → 2T (clamped), τ^s → 0 (clamped)
    t[1] = t[1] - 1000.0  # all-negative raw logits: the raw-max rule of the public code would go negative
    strategy = DTKD(tau=4.0, tau_min=0.5, tau_max=6.0)
    temps = strategy.temperatures(s, t, y)
    m_t, m_s = hand.centred_max(t), hand.centred_max(s)
    want_t = (2 * m_t / (m_t + m_s) * 4.0).clamp(0.5, 6.0)
    want_s = (2 * m_s / (m_t + m_s) * 4.0).clamp(0.5, 6.0)
    assert_close(temps.teacher, want_t, rtol=1e-5, atol=1e-5)
    assert_close(temps.student, want_s, rtol=1e-5, atol=1e-5)
    assert temps.teacher[0].item() == 6.0 and temps.student[0].item() == 0.5
    assert (temps.teacher > 0).all() and (temps.student > 0).all()
    shift = torch.randn(30, 1, generator=torch.Generator().manual_seed(1)) * 30
    shifted = strategy.temperatures(s + shift, t + shift, y)
    assert_close(shifted.teacher, want_t, rtol=1e-4, atol=1e-4)
    out = _kd_only(strategy)(s, t, y)
    assert_close(out.loss, hand.kd(s, t, want_t, want_s), rtol=1e-4)


# -- entropy target --------------------------------------------------------------------------------------

def _varied_100_class_logits(n=64, seed=15):
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.linspace(math.log(0.05), math.log(50.0), n)).unsqueeze(-1)
    z = torch.randn(n, 100, generator=g)
    z[::3] = torch.rand(z[::3].shape, generator=g) ** 4 * 3  # skewed shapes
    z[1::3] = torch.randn(z[1::3].shape, generator=g).exp()  # heavy right tail
    z = z * scales + torch.randn(n, 1, generator=g) * 10
    unreachable = torch.zeros(2, 100)
    unreachable[0] = torch.randn(100, generator=g) * 1e-3  # nearly flat: H > H* even at τ_min
    unreachable[1, 3] = 1e4  # one class dominates: H < H* even at τ_max
    return torch.cat([z, unreachable])


@pytest.mark.parametrize("kwargs,target", [({"target": 0.5}, 0.5 * math.log(100)),
                                           ({"target": 0.2}, 0.2 * math.log(100)),
                                           ({"target_nats": 1.5}, 1.5)])
def test_entropy_target_reaches_the_target_or_the_bound(hand, kwargs, target):
    z = _varied_100_class_logits()
    strategy = EntropyTarget(**kwargs)
    tau = strategy.temperatures(z, z).teacher
    assert tau.shape == (66, 1)
    entropy = hand.entropy(hand.log_softmax(z, tau.double()))
    h_lo = hand.entropy(hand.log_softmax(z, 0.05))
    h_hi = hand.entropy(hand.log_softmax(z, 100.0))
    reachable = (h_lo <= target) & (target <= h_hi)
    assert reachable.sum() >= 40
    assert (entropy[reachable] - target).abs().max() < 1e-3
    too_flat, too_peaked = h_lo > target, h_hi < target
    assert too_flat.any() and too_peaked.any()
    torch.testing.assert_close(tau[too_flat], torch.full_like(tau[too_flat], 0.05), rtol=1e-5, atol=0)
    torch.testing.assert_close(tau[too_peaked], torch.full_like(tau[too_peaked], 100.0), rtol=1e-5, atol=0)


def test_entropy_target_student_rules(hand, assert_close):
    s, t, y = hand.batch(n=20, c=50, seed=16)
    target = 0.5 * math.log(50)
    tau_t = EntropyTarget().temperatures(s, t, y).teacher
    ratio = EntropyTarget(student="ratio").temperatures(s, t, y)
    assert_close(ratio.teacher, tau_t)
    # CIST's ratio rule with the row's solved ratio: τ^s = m^s·τ^t/m^t
    assert_close(ratio.student, (hand.centred_max(s) * tau_t.double() / hand.centred_max(t)).clamp(0.05, 100),
                 rtol=1e-4)
    entropy = EntropyTarget(student="entropy").temperatures(s, t, y)
    assert (hand.entropy(hand.log_softmax(s, entropy.student.double())) - target).abs().max() < 1e-3
    shared = EntropyTarget(student="teacher").temperatures(s, t, y)
    assert torch.equal(shared.student, shared.teacher)
    # the loss uses these temperatures with the τ^t·τ^s factor
    out = _kd_only(EntropyTarget(student="ratio"))(s, t, y)
    assert_close(out.loss, hand.kd(s, t, ratio.teacher.double(), ratio.student.double()), rtol=1e-4)


def test_entropy_target_is_shift_invariant(hand, assert_close):
    _, t, _ = hand.batch(n=10, c=30, seed=17)
    a = EntropyTarget().temperatures(t, t).teacher
    b = EntropyTarget().temperatures(t + 500.0, t + 500.0).teacher
    assert_close(a, b, rtol=1e-3, atol=1e-4)


# -- schedules -------------------------------------------------------------------------------------------

def _tau(strategy, **progress):
    z = torch.zeros(2, 3)
    return float(strategy.temperatures(z, z, progress=tk.Progress(**progress)).teacher)


def test_scheduled_values():
    total = 11  # fraction = step / (total − 1)
    for step in range(total):
        f = step / (total - 1)
        assert _tau(Scheduled(4.0, 1.0, "constant"), step=step, total_steps=total) == pytest.approx(4.0)
        assert _tau(Scheduled(4.0, 1.0, "linear"), step=step, total_steps=total) == pytest.approx(4 - 3 * f)
        assert _tau(Scheduled(4.0, 1.0, "cosine"), step=step, total_steps=total) == pytest.approx(
            1 + 3 * (1 + math.cos(math.pi * f)) / 2)
        assert _tau(Scheduled(4.0, 1.0, "step"), step=step, total_steps=total) == pytest.approx(
            4.0 if f < 0.5 else 1.0)
        assert _tau(Scheduled(8.0, 1.0, "step", milestones=(0.25, 0.5, 0.75)), step=step,
                    total_steps=total) == pytest.approx(8.0 * 0.5 ** sum(f >= m for m in (0.25, 0.5, 0.75)))


def test_scheduled_warmup_then_decay():
    sched = Scheduled(4.0, 1.0, "cosine", warmup=0.2, warmup_from=2.0)
    total = 21
    for step in range(total):
        f = step / (total - 1)
        if f < 0.2:
            want = 2.0 + (4.0 - 2.0) * f / 0.2
        else:
            want = 1 + 3 * (1 + math.cos(math.pi * (f - 0.2) / 0.8)) / 2
        assert _tau(sched, step=step, total_steps=total) == pytest.approx(want)
    assert _tau(Scheduled(4.0, 1.0, "linear", warmup=0.5), step=0, total_steps=3) == pytest.approx(1.0)


def test_scheduled_by_epoch():
    sched = Scheduled(4.0, 2.0, "linear", by="epoch")
    assert _tau(sched, step=0, total_steps=100, epoch=0, total_epochs=5) == pytest.approx(4.0)
    assert _tau(sched, step=99, total_steps=100, epoch=2, total_epochs=5) == pytest.approx(3.0)
    assert _tau(sched, step=99, total_steps=100, epoch=4, total_epochs=5) == pytest.approx(2.0)


def test_scheduled_in_the_loss(hand, assert_close):
    s, t, y = hand.batch(n=8, c=10, seed=18)
    out = _kd_only(Scheduled(4.0, 1.0, "linear"))(s, t, y, progress=tk.Progress(step=5, total_steps=11))
    assert_close(out.loss, hand.kd(s, t, 2.5))
