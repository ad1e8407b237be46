"""Property tests (hypothesis) over every ready-made method (``thermokd.method_names()``) and every divergence.

What docs/methods.md and docs/design.md promise for all of them:
- shift invariance: a per-row constant added to the teacher and/or student logits changes neither the loss nor
  the statistics (every rule reads centred quantities; CTKD-instance is left out on purpose: its MLP reads the
  raw logits, as in the authors' code, so its temperature is not shift invariant);
- finite loss and gradients for logits up to ±1e4 in float32, float16 and bfloat16;
- no gradient through τ or the weights: the student's gradient equals that of the same formula with τ^t, τ^s
  and w frozen as constants (CTKD's θ does get a gradient; logit standardisation keeps the student's τ in the
  graph by design, so there the gradient must equal KD's on z-scored logits);
- masked rows (``labels == -100`` or ``mask=False``) count nowhere, whatever garbage they hold;
- per-token ``[B, L, V]`` logits give exactly what the flattened ``[B·L, V]`` rows give.

Data are drawn as a few shape/scale parameters and a seed (cheap to generate, shrinkable). Set
``THERMOKD_EXAMPLES=10`` (a multiplier) for a longer hunt.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, reject, settings
from hypothesis import strategies as st

import thermokd as tk
from thermokd.rows import Rows

torch.set_num_threads(min(2, torch.get_num_threads()))

DIVERGENCES = ("kl", "reverse_kl", "js", "tvd")
NEED_LABELS = {"ce", "dkd", "dts"}  # CE-only and DKD split on the label; DTS reads the CE gap
# the kd family takes any divergence; DKD is KL by definition and CE never reads it
CONFIGS = [(name, div) for name in tk.method_names() for div in DIVERGENCES
           if name not in ("ce", "dkd") or div == "kl"]
CONFIG_IDS = [f"{name}-{div}" for name, div in CONFIGS]
# epoch 2 of 10: DKD's warm-up is ramping (0.15) and CTKD's reversal factor λ is non-zero
PROGRESS = tk.Progress(step=5, total_steps=100, epoch=2, total_epochs=10)
_FACTOR = float(os.environ.get("THERMOKD_EXAMPLES", "1"))


def examples(n: int):
    return settings(max_examples=max(1, int(n * _FACTOR)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def make_loss(name: str, divergence: str) -> tk.DistillationLoss:
    return tk.build_loss(name, **({} if name == "dkd" else {"divergence": divergence}))


# -- data ---------------------------------------------------------------------------------------------
KINDS = ("gaussian", "peaked", "ties", "constant-row", "opposed")


def logits_pair(shape: tuple[int, ...], seed: int, t_scale: float, s_scale: float, kind: str,
                limit: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits of ``shape`` (class axis last), float32, with entries within ±``limit``.

    ``peaked``: one dominant class per row; ``ties``: integer logits (ties at the max); ``constant-row``: the
    first row is constant in both; ``opposed``: the student's top class is the teacher's bottom one.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g) * t_scale + torch.randn(*shape[:-1], 1, generator=g) * 3
    s = torch.randn(shape, generator=g) * s_scale + torch.randn(*shape[:-1], 1, generator=g) * 3
    if kind == "peaked":
        hot = torch.randint(shape[-1], (*shape[:-1], 1), generator=g)
        t = t.scatter_add(-1, hot, torch.full(hot.shape, 4.0 * t_scale))
        s = s.scatter_add(-1, hot, torch.full(hot.shape, 4.0 * s_scale))
    elif kind == "ties":
        t, s = t.round(), s.round()
    elif kind == "constant-row":
        t.reshape(-1, shape[-1])[0] = 1.5
        s.reshape(-1, shape[-1])[0] = -0.5
    elif kind == "opposed":
        s = -t * (s_scale / t_scale)
    return s.clamp(-limit, limit), t.clamp(-limit, limit)


@st.composite
def batches(draw, max_rows: int = 6, max_classes: int = 12, max_scale: float = 30.0, tokens: bool = False):
    """(student, teacher, labels): ``[N, C]`` (or ``[B, L, C]`` with ``tokens``) float32 logits and labels."""
    lead = (draw(st.integers(1, 3)), draw(st.integers(1, 4))) if tokens else (draw(st.integers(1, max_rows)),)
    c = draw(st.integers(2, max_classes))
    seed = draw(st.integers(0, 2**31 - 1))
    t_scale = draw(st.floats(0.05, max_scale))
    s_scale = draw(st.floats(0.05, max_scale))
    kind = draw(st.sampled_from(KINDS))
    s, t = logits_pair((*lead, c), seed, t_scale, s_scale, kind)
    labels = torch.randint(c, lead, generator=torch.Generator().manual_seed(seed + 1))
    return s, t, labels


def run(loss_fn: tk.DistillationLoss, student: torch.Tensor, teacher: torch.Tensor, labels, **kwargs):
    """Loss output and the gradient w.r.t. the student logits (a leaf copy of ``student``)."""
    s = student.detach().clone().requires_grad_(True)
    try:
        out = loss_fn(s, teacher, labels, progress=PROGRESS, **kwargs)
    except tk.ThermoKDError as exc:
        # CIST's ratio="auto" refuses, by design, to calibrate on a batch whose median teacher row is constant
        if "cannot calibrate CIST" in str(exc):
            reject()
        raise
    out.loss.backward()
    return out, s.grad


def has_constant_row(x: torch.Tensor) -> bool:
    return bool((x == x[..., :1]).all(-1).any())


def near_tvd_kink(loss_fn: tk.DistillationLoss, student: torch.Tensor, teacher: torch.Tensor, labels) -> bool:
    """True for TVD where some p_c ≈ q_c: ½Σ|p−q| has a kink there and its gradient flips with rounding
    (DTKD with two classes, for one, makes p = q exactly)."""
    if loss_fn.divergence != "tvd" or not loss_fn.kd_weight:
        return False
    temps = loss_fn.temperature.temperatures(student, teacher, labels, PROGRESS)

    def col(x):
        return x.reshape(-1, 1) if x.dim() else x

    p = torch.softmax(teacher.double() / col(temps.teacher).double(), -1)
    q = torch.softmax(student.double() / col(temps.student).double(), -1)
    return bool(((p - q).abs() < 1e-3).any())


def assert_stats_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=atol), (key, a[key], b[key])


# -- 1. shift invariance ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "divergence"), CONFIGS, ids=CONFIG_IDS)
@examples(25)
@given(data=batches(), shift=st.sampled_from(["teacher", "student", "both"]), shift_seed=st.integers(0, 10**6),
       with_labels=st.booleans())
def test_per_row_shift_changes_nothing(name, divergence, data, shift, shift_seed, with_labels):
    student, teacher, labels = data
    if not with_labels and name not in NEED_LABELS:
        labels = None
    g = torch.Generator().manual_seed(shift_seed)
    # integer shifts keep the shifted logits close to exactly representable
    c_t = torch.randint(-50, 51, (student.shape[0], 1), generator=g).float() * (shift != "student")
    c_s = torch.randint(-50, 51, (student.shape[0], 1), generator=g).float() * (shift != "teacher")
    base, grad = run(make_loss(name, divergence), student, teacher, labels)
    moved, grad_moved = run(make_loss(name, divergence), student + c_s, teacher + c_t, labels)
    # float32 rounding of z + c (|c| <= 50) perturbs z/τ by ~1e-5; the solved τ of entropy-target moves
    # within its tolerance: a rule that read raw logits would be off by O(1)
    assert_stats_close(base.stats, moved.stats, rtol=2e-3, atol=2e-3)
    assert math.isclose(base.loss.item(), moved.loss.item(), rel_tol=2e-3, abs_tol=2e-3)
    # z-scoring divides by each row's std: the rounding of z + c is amplified as much, on both sides
    amplification = 1.0
    if name == "lskd":
        for z in (student, teacher):
            amplification /= min(1.0, max(z.std(-1).min().item(), 1e-6))
    atol = 2e-3 * (1 + grad.abs().max().item()) * amplification
    if not near_tvd_kink(make_loss(name, divergence), student, teacher, labels):
        torch.testing.assert_close(grad_moved, grad, rtol=2e-2, atol=atol)
    # the same invariance, to first order: the student's gradient has no component along (1, …, 1)
    if not (name == "lskd" and has_constant_row(student)):  # see test_lskd_at_a_constant_student_row
        torch.testing.assert_close(grad.sum(-1), torch.zeros(grad.shape[0]), rtol=0,
                                   atol=1e-4 * (1 + grad.abs().sum().item()) * amplification)


# -- 2. finite everywhere ------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "divergence"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@examples(12)
@given(data=batches(max_scale=1e4), pattern=st.sampled_from(["random", "extreme", "opposed-extreme"]))
def test_finite_loss_and_gradients_at_large_magnitudes(name, divergence, dtype, data, pattern):
    student, teacher, labels = data
    if pattern != "random":  # every entry at ±1e4: a one-hot teacher the student agrees or fully disagrees with
        teacher = torch.where(teacher >= teacher.amax(-1, keepdim=True), 1e4, -1e4)
        student = teacher.clone() if pattern == "extreme" else -teacher
        student[..., 0] = 1e4  # at least one top class for the student too
    if name == "lskd" and dtype == torch.float16:
        assume(not has_constant_row(student.to(dtype)))  # see test_lskd_at_a_constant_student_row
    out, grad = run(make_loss(name, divergence), student.to(dtype), teacher.to(dtype), labels)
    assert grad.dtype == dtype
    assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(grad.float()).all(), grad
    assert all(math.isfinite(v) for v in out.stats.values()), out.stats


# -- 3. no gradient through τ or the weights ---------------------------------------------------------------
def _log_softmax64(z: torch.Tensor, tau) -> torch.Tensor:
    return torch.log_softmax(z.double() / tau, dim=-1)


def _plogp_diff(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _divergence64(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """docs/methods.md, "The loss", by hand, per row, float64."""
    if kind == "kl":
        return _plogp_diff(log_p, log_q)
    if kind == "reverse_kl":
        return _plogp_diff(log_q, log_p)
    if kind == "js":
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _plogp_diff(log_p, log_m) + 0.5 * _plogp_diff(log_q, log_m)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _dkd64(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, tau_t, tau_s, alpha: float, beta: float):
    """DKD (Zhao et al. 2022) per row: α·TCKD + β·NCKD, unscaled, float64."""
    gt = torch.nn.functional.one_hot(y, s.shape[-1]).bool()
    log_pt, log_ps = _log_softmax64(t, tau_t), _log_softmax64(s, tau_s)

    def binary(log_p):  # log [p_target, 1 − p_target], the second in log space (no cancellation)
        return torch.stack([log_p[gt], torch.logsumexp(log_p.masked_fill(gt, -math.inf), -1)], -1)

    def non_target(z, tau):  # log-distribution over the non-target classes; 0 (unused) at the target
        return torch.log_softmax((z.double() / tau).masked_fill(gt, -math.inf), -1).masked_fill(gt, 0.0)

    tckd = _plogp_diff(binary(log_pt), binary(log_ps))
    log_nt_t, log_nt_s = non_target(t, tau_t), non_target(s, tau_s)
    nckd = (log_nt_t.exp().masked_fill(gt, 0.0) * (log_nt_t - log_nt_s)).sum(-1)
    return alpha * tckd + beta * nckd


def _frozen_reference(loss_fn: tk.DistillationLoss, s32: torch.Tensor, t: torch.Tensor, y):
    """The loss of docs/methods.md with τ^t, τ^s and w computed first, under no_grad, by the strategy and the
    weighting, then used as constants; returns (loss, gradient w.r.t. the student logits, noise floors), float64.
    """
    temps = loss_fn.temperature.temperatures(s32, t, y, PROGRESS)
    assert not temps.teacher.requires_grad and not temps.student.requires_grad

    def col(x):
        return x.double().reshape(-1, 1) if x.dim() else x.double()

    tau_t, tau_s = col(temps.teacher), col(temps.student)
    w = None
    if loss_fn.weighting is not None:
        with torch.no_grad():
            w = loss_fn.weighting(Rows(s32.float(), t.float(), y, PROGRESS)).double()
    s = s32.detach().double().requires_grad_(True)
    total = s.new_zeros(())
    if y is not None:
        total = total + loss_fn.ce_weight * torch.nn.functional.cross_entropy(s, y)
    if loss_fn.kd_weight:
        if loss_fn.family == "dkd":
            per_row = _dkd64(s, t, y, tau_t, tau_s, loss_fn.dkd_alpha, loss_fn.dkd_beta)
            ramp = min((PROGRESS.epoch + 1) / loss_fn.dkd_warmup, 1.0)
        else:
            per_row = _divergence64(_log_softmax64(t, tau_t), _log_softmax64(s, tau_s), loss_fn.divergence)
            ramp = 1.0
        per_row = per_row * (tau_t * tau_s).reshape(-1)
        if w is not None:
            per_row = per_row * w
        total = total + loss_fn.kd_weight * ramp * per_row.mean()
    total.backward()
    # float32 noise where the divergence is (nearly) zero: ~1e-7 of each log-probability, times the factors
    noise = 1e-6 * loss_fn.kd_weight
    # CE's gradient p − 1 at a label whose probability is within ~1e-6 of 1 is resolved only to float32's
    # spacing near 1 (6e-8) per ulp of p: a few 1e-7 absolute, over a batch mean
    ce_noise = 4e-7 * loss_fn.ce_weight / max(1, s32.reshape(-1, s32.shape[-1]).shape[0])
    floors = (noise * (1 + (tau_t * tau_s).max().item()) + 1e-6,
              noise * (1 + tau_t.max().item()) + 1e-7 + ce_noise)
    return total.detach(), s.grad, floors


def _grad_close(actual: torch.Tensor, expected: torch.Tensor, floor: float) -> None:
    """float32 autograd against the float64 reference; ``floor``: the float32 rounding noise of a gradient that
    is (nearly) zero, e.g. where the tempered student already matches the teacher."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-3, atol=1e-4 * scale + floor)


@pytest.mark.parametrize(("name", "divergence"), [c for c in CONFIGS if c[0] != "lskd"],
                         ids=[i for c, i in zip(CONFIGS, CONFIG_IDS) if c[0] != "lskd"])
@examples(25)
@given(data=batches(max_scale=20.0), with_labels=st.booleans())
def test_gradient_treats_temperatures_and_weights_as_constants(name, divergence, data, with_labels):
    student, teacher, labels = data
    if not with_labels and name not in NEED_LABELS:
        labels = None
    loss_fn = make_loss(name, divergence)
    out, grad = run(loss_fn, student, teacher, labels)
    # after the call: CIST's ratio is calibrated on this batch, as the loss saw it
    ref_loss, ref_grad, (loss_floor, grad_floor) = _frozen_reference(loss_fn, student, teacher, labels)
    assert math.isclose(out.loss.item(), ref_loss.item(), rel_tol=1e-4, abs_tol=loss_floor)
    if not near_tvd_kink(loss_fn, student, teacher, labels):
        _grad_close(grad, ref_grad, grad_floor)


@examples(80)
@given(data=batches(max_scale=20.0))
def test_logit_standardisation_gradient_is_kd_on_z_scored_logits(data):
    """LSKD's student τ = τ_b·std(z^s) stays in the graph (the authors standardise inside the forward pass)."""
    student, teacher, labels = data
    if student.shape[-1] < 3:  # z-scoring needs a spread; with 2 classes Z(z) = ±1/√2 whatever z is
        student, teacher = torch.cat([student, teacher[:, :1]], -1), torch.cat([teacher, student[:, :1]], -1)
    assume(not has_constant_row(student))  # see test_lskd_at_a_constant_student_row
    loss_fn = tk.build_loss("lskd")
    base = loss_fn.temperature.base
    out, grad = run(loss_fn, student, teacher, labels)

    def z_score(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)

    s = student.double().requires_grad_(True)
    kd = _plogp_diff(_log_softmax64(z_score(teacher.double()), base), _log_softmax64(z_score(s), base))
    ref = loss_fn.ce_weight * torch.nn.functional.cross_entropy(s, labels) + loss_fn.kd_weight * base**2 * kd.mean()
    ref.backward()
    assert math.isclose(out.loss.item(), ref.item(), rel_tol=1e-4, abs_tol=1e-5)
    # ∂Z/∂z is 1/std: float32 noise in the probabilities is amplified as much
    _grad_close(grad, s.grad, floor=1e-6 * loss_fn.kd_weight * base / student.std(-1).min().item() + 1e-7)


LSKD_FLOAT16_CONSTANT_ROW = (
    "LSKD at an exactly constant float16 student row: the true gradient of Z(z) = (z − mean)/(std + 1e-7) is of "
    "size 1/1e-7 there, beyond float16's range, in the authors' formulation as in ours.")


def test_lskd_at_a_constant_student_row_has_a_zero_sum_gradient():
    """The loss centres the student's logits when τ carries a gradient, so float noise divided by τ ≈ 1e-7
    cannot leak along (1, …, 1)."""
    student = torch.tensor([[-0.5, -0.5, -0.5]])
    teacher = torch.tensor([[1.5, 1.5, 1.5]])
    _, grad = run(tk.build_loss("lskd"), student, teacher, torch.tensor([1]))
    # KD on Z(z) gives 0 here (both sides uniform), so only CE's zero-sum gradient remains
    torch.testing.assert_close(grad.sum(-1), torch.zeros(1), rtol=0, atol=1e-3)


@pytest.mark.xfail(strict=True, reason=LSKD_FLOAT16_CONSTANT_ROW)
def test_lskd_at_a_constant_student_row_has_a_finite_float16_gradient():
    student = torch.tensor([[1e4, 1e4]], dtype=torch.float16)
    teacher = torch.tensor([[1e4, -1e4]], dtype=torch.float16)
    _, grad = run(tk.build_loss("lskd"), student, teacher, torch.tensor([1]))
    assert torch.isfinite(grad).all()


@examples(80)
@given(data=batches(max_scale=20.0), epoch=st.integers(0, 12), init=st.floats(1.5, 15.0))
def test_ctkd_theta_gets_the_reversed_gradient(data, epoch, init):
    """θ receives λ·∂L/∂θ, λ from the cosine curriculum (0 → −1 over 10 epochs): it ascends the KD loss."""
    student, teacher, labels = data
    progress = tk.Progress(step=0, total_steps=100, epoch=epoch, total_epochs=20)
    loss_fn = tk.build_loss("ctkd", temperature={"init": init})
    strategy = loss_fn.temperature
    loss_fn(student, teacher, labels, progress=progress).loss.backward()
    theta_grad = strategy.theta.grad
    assert theta_grad is not None and torch.isfinite(theta_grad)

    theta = strategy.theta.detach().double().requires_grad_(True)
    tau = strategy.t_start + strategy.t_end * torch.sigmoid(theta)
    kd = _plogp_diff(_log_softmax64(teacher, tau), _log_softmax64(student, tau))
    (loss_fn.kd_weight * (tau * tau * kd).mean()).backward()
    lam = tk.temperature.grl_lambda(epoch + 1)
    assert lam < 0
    # ∂L/∂T = 2T·KL + T²·∂KL/∂T cancels; float32 noise is relative to the size of the parts (≤ max|z|)
    sig = torch.sigmoid(theta).item()
    parts = 2 * tau.item() * kd.mean().item() + (teacher.abs().amax(-1) + student.abs().amax(-1)).mean().item()
    noise = abs(lam) * strategy.t_end * sig * (1 - sig) * loss_fn.kd_weight * parts
    torch.testing.assert_close(theta_grad.double(), lam * theta.grad, rtol=1e-4, atol=1e-5 * noise)


def test_ctkd_theta_moves():
    """One step of the student's optimiser on the loss's parameters changes θ (and so T)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 5
    labels = torch.randint(10, (16,), generator=g)
    loss_fn = tk.build_loss("ctkd")
    theta0 = loss_fn.temperature.theta.item()
    optimiser = torch.optim.SGD(loss_fn.parameters(), lr=1.0)
    loss_fn(student, teacher, labels, progress=PROGRESS).loss.backward()
    assert loss_fn.temperature.theta.grad.abs().item() > 1e-6
    optimiser.step()
    assert loss_fn.temperature.theta.item() != theta0


# -- 4. masked rows count nowhere ----------------------------------------------------------------------
GARBAGE = ("huge", "opposite-huge", "nan-inf")


def _garbage(shape, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "huge":
        return torch.randn(shape, generator=g) * 1e4, torch.randn(shape, generator=g) * 1e4
    if kind == "opposite-huge":
        t = torch.where(torch.rand(shape, generator=g) < 0.5, 3e4, -3e4)
        return -t, t
    s = torch.full(shape, math.nan)
    t = torch.where(torch.rand(shape, generator=g) < 0.5, math.inf, -math.inf)
    return s, t


@pytest.mark.parametrize(("name", "divergence"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("how", ["ignore-index", "mask"])
@examples(15)
@given(data=batches(tokens=True), keep_seed=st.integers(0, 10**6), garbage=st.sampled_from(GARBAGE))
def test_masked_tokens_change_nothing(name, divergence, how, data, keep_seed, garbage):
    student, teacher, labels = data
    lead = labels.shape
    keep = torch.rand(lead, generator=torch.Generator().manual_seed(keep_seed)) < 0.6
    keep.view(-1)[keep_seed % keep.numel()] = True  # at least one valid token (the empty case is tested below)
    junk_s, junk_t = _garbage(student.shape, keep_seed, garbage)
    drop = ~keep[..., None]
    dirty_s, dirty_t = torch.where(drop, junk_s, student), torch.where(drop, junk_t, teacher)
    if how == "ignore-index":
        dirty = run(make_loss(name, divergence), dirty_s, dirty_t, labels.masked_fill(~keep, -100))
    else:  # labels of masked tokens may be garbage too: out of range
        dirty = run(make_loss(name, divergence), dirty_s, dirty_t, labels.masked_fill(~keep, 10**6), mask=keep)
    clean = run(make_loss(name, divergence), student[keep], teacher[keep], labels[keep])
    assert dirty[0].stats == pytest.approx(clean[0].stats, rel=1e-6, abs=1e-6)
    assert dirty[0].loss.item() == pytest.approx(clean[0].loss.item(), rel=1e-6, abs=1e-6)
    assert (dirty[1][~keep] == 0).all()
    torch.testing.assert_close(dirty[1][keep], clean[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", tk.method_names())
@pytest.mark.parametrize("garbage", GARBAGE)
def test_fully_masked_batch_gives_zero_loss_and_zero_gradient(name, garbage):
    student, teacher = _garbage((2, 3, 5), 0, garbage)
    s = student.to(torch.float16).requires_grad_(True)
    labels = torch.full((2, 3), -100)
    out = make_loss(name, "kl")(s, teacher.to(torch.float16), labels, progress=PROGRESS)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert (s.grad == 0).all()


# -- 5. tokens are rows --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "divergence"), CONFIGS, ids=CONFIG_IDS)
@examples(15)
@given(data=batches(tokens=True), keep_seed=st.integers(0, 10**6), use_mask=st.booleans())
def test_per_token_logits_equal_flattened_rows(name, divergence, data, keep_seed, use_mask):
    student, teacher, labels = data
    c = student.shape[-1]
    mask = None
    if use_mask:
        mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(keep_seed)) < 0.7
        mask.view(-1)[0] = True
    tokens, token_grad = run(make_loss(name, divergence), student, teacher, labels, mask=mask)
    flat, flat_grad = run(make_loss(name, divergence), student.reshape(-1, c), teacher.reshape(-1, c),
                          labels.reshape(-1), mask=None if mask is None else mask.reshape(-1))
    assert tokens.stats == pytest.approx(flat.stats, rel=1e-6, abs=1e-7)
    assert tokens.loss.item() == pytest.approx(flat.loss.item(), rel=1e-6, abs=1e-7)
    assert token_grad.shape == student.shape
    torch.testing.assert_close(token_grad.reshape(-1, c), flat_grad, rtol=1e-6, atol=1e-8)


# -- CTKD-instance: not shift invariant by design, but everything else holds ------------------------------
@examples(40)
@given(data=batches(tokens=True), keep_seed=st.integers(0, 10**6))
def test_instance_ctkd_masking_tokens_and_mlp_gradient(data, keep_seed):
    student, teacher, labels = data
    c = student.shape[-1]

    def loss_fn():
        torch.manual_seed(0)  # the same MLP each time
        return tk.DistillationLoss(temperature=tk.temperature.InstanceCTKD(num_classes=c))

    keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(keep_seed)) < 0.6
    keep.view(-1)[0] = True
    fn = loss_fn()
    masked, masked_grad = run(fn, torch.where(keep[..., None], student, 1e4),
                              torch.where(keep[..., None], teacher, -1e4), labels, mask=keep)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fn.parameters())
    clean, clean_grad = run(loss_fn(), student[keep], teacher[keep], labels[keep])
    assert masked.stats == pytest.approx(clean.stats, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(masked_grad[keep], clean_grad, rtol=1e-5, atol=1e-8)
    assert (masked_grad[~keep] == 0).all()
    tokens, token_grad = run(loss_fn(), student, teacher, labels)
    flat, flat_grad = run(loss_fn(), student.reshape(-1, c), teacher.reshape(-1, c), labels.reshape(-1))
    assert tokens.loss.item() == pytest.approx(flat.loss.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(token_grad.reshape(-1, c), flat_grad, rtol=1e-6, atol=1e-8)


def test_instance_ctkd_mlp_gets_a_gradient():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 5
    loss_fn = tk.DistillationLoss(temperature=tk.temperature.InstanceCTKD(num_classes=10))
    loss_fn(student, teacher, torch.randint(10, (16,), generator=g), progress=PROGRESS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())


def test_every_method_is_covered():
    """A method added to the registry must join these properties (or be excluded here, with a reason)."""
    assert {name for name, _ in CONFIGS} == set(tk.method_names())
    assert {"ce", "cist", "ctkd", "dkd", "dtkd", "dts", "entropy-target", "erkd", "kd", "lskd"} <= set(
        tk.method_names())

