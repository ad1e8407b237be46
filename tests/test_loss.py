"""DistillationLoss as a whole: per-sample weights (CIST, ER-KD), the full CIST loss, DKD, masks and per-token
logits, and the statistics docs/design.md promises."""
from __future__ import annotations

import math

import pytest
import torch

import thermokd as tk
from thermokd import normalisation
from thermokd.rows import Rows
from thermokd.temperature import CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, LogitStandardization
from thermokd.weighting import ConfidenceDifficulty, TeacherEntropy


def _hand_cd_weights(s, t, y, alpha=1.0, beta=1.0, eps=1e-3):
    p_t, p_s = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    if y is None:
        a, d = p_t.max(-1).values, 1 - p_s.max(-1).values
    else:
        a, d = p_t.gather(-1, y[:, None]).squeeze(-1), 1 - p_s.gather(-1, y[:, None]).squeeze(-1)
    raw = a ** alpha * (d + eps) ** beta
    return raw * len(raw) / raw.sum()



# CIST as first reconstructed; the library's defaults differ (docs/methods.md, chosen on validation)
SPEC_CIST = {"student": "ratio"}
SPEC_WEIGHTS = {"mix": 1.0, "max_ratio": None}

# -- weights ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (2.0, 0.5), (0.0, 0.0)])
@pytest.mark.parametrize("labelled", [True, False])
def test_confidence_difficulty_weights(hand, assert_close, alpha, beta, labelled):
    s, t, y = hand.batch(n=24, c=10, seed=0)
    y = y if labelled else None
    want = _hand_cd_weights(s, t, y, alpha, beta)
    got = ConfidenceDifficulty(alpha=alpha, beta=beta, **SPEC_WEIGHTS)(Rows(s, t, y))
    assert got.shape == (24,)
    assert_close(got, want, rtol=2e-4)  # d + ε = (1 + ε) − p cancels in float32 when p ≈ 1
    assert got.mean().item() == pytest.approx(1.0, rel=1e-6)
    if alpha == 0 and beta == 0:
        assert_close(got, torch.ones(24))
    weighting = ConfidenceDifficulty(alpha=alpha, beta=beta, **SPEC_WEIGHTS)
    loss = tk.DistillationLoss(Fixed(4.0), weighting=weighting, ce_weight=0, kd_weight=1)
    out = loss(s, t, y)
    assert_close(out.loss, hand.kd(s, t, 4.0, weights=want), rtol=2e-4)
    assert out.stats["weight_std"] == pytest.approx(want.std(correction=0).item(), rel=1e-4, abs=1e-7)


def test_confidence_difficulty_ablation_factors(hand, assert_close):
    """alpha=0 keeps only the student difficulty, beta=0 only the teacher confidence."""
    s, t, y = hand.batch(n=16, c=10, seed=1)
    d = 1 - torch.softmax(s.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    a = torch.softmax(t.double(), -1).gather(-1, y[:, None]).squeeze(-1)
    assert_close(ConfidenceDifficulty(alpha=0.0, **SPEC_WEIGHTS)(Rows(s, t, y)), (d + 1e-3) * 16 / (d + 1e-3).sum())
    assert_close(ConfidenceDifficulty(beta=0.0, **SPEC_WEIGHTS)(Rows(s, t, y)), a * 16 / a.sum())


@pytest.mark.parametrize("normalize", [True, False])
def test_teacher_entropy_weights(hand, assert_close, normalize):
    s, t, y = hand.batch(n=20, c=10, seed=2)
    entropy = hand.entropy(hand.log_softmax(t, 4.0))
    want = entropy * 20 / entropy.sum() if normalize else entropy
    assert_close(TeacherEntropy(normalize=normalize)(Rows(s, t, y)), want)
    out = tk.DistillationLoss(Fixed(4.0), weighting=TeacherEntropy(normalize=normalize), ce_weight=0,
                              kd_weight=1)(s, t, y)
    assert_close(out.loss, hand.kd(s, t, 4.0, weights=want))
    erkd = tk.build_loss("erkd")(s, t, y)
    assert_close(erkd.loss, 0.1 * hand.ce(s, y).mean() + 0.9 * hand.kd(s, t, 4.0, weights=entropy * 20 / entropy.sum()))


@pytest.mark.parametrize("weighting", [ConfidenceDifficulty(), TeacherEntropy(), TeacherEntropy(normalize=False)])
def test_weight_shares_are_the_weights_over_n(hand, assert_close, weighting):
    s, t, y = hand.batch(n=18, c=10, seed=4)
    rows = Rows(s, t, y)
    log_w = weighting.log_unnormalised(rows)
    assert_close(weighting.shares_of(log_w) * 18, normalisation.weights(log_w, weighting.normalisation))
    assert_close(normalisation.weights(log_w, weighting.normalisation), weighting(rows))


@pytest.mark.parametrize("hook", ["forward", "observe", "shares_of", "finish", "shares"])
def test_a_weighting_that_defines_what_the_loss_owns_is_refused(hook):
    """One hook (log_unnormalised) and a declared normalisation: a method the loss would bypass is an error."""
    with pytest.raises(tk.ThermoKDError, match=f"Linear defines {hook}: a Weighting defines log_unnormalised"):
        type("Linear", (tk.weighting.Weighting,), {hook: lambda self, *args: None})


def test_a_weighting_without_log_unnormalised_says_so(hand):
    class Nothing(tk.weighting.Weighting):
        pass

    s, t, y = hand.batch(n=21, c=10, seed=5)
    for chunk_size in (None, 5):
        with pytest.raises(tk.ThermoKDError, match="Nothing does not define log_unnormalised"):
            tk.DistillationLoss(Fixed(3.0), weighting=Nothing(), chunk_size=chunk_size)(s, t, y)


def test_a_weighting_declaring_no_normalisation_gets_its_raw_weights(hand, assert_close):
    class Unnormalised(ConfidenceDifficulty):
        def __init__(self):
            super().__init__()
            self.normalisation = normalisation.Normalisation(mean="none")  # raw a·(d+ε), no mean-1 normalisation

    s, t, y = hand.batch(n=15, c=10, seed=6)
    p_t, p_s = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    raw = p_t.gather(-1, y[:, None]).squeeze(-1) * (1 - p_s.gather(-1, y[:, None]).squeeze(-1) + 1e-3)
    out = tk.DistillationLoss(Fixed(2.0), weighting=Unnormalised(), ce_weight=0, kd_weight=1)(s, t, y)
    assert_close(out.loss, hand.kd(s, t, 2.0, weights=raw))


def test_weighting_by_name():
    assert isinstance(tk.weighting.build("confidence-difficulty", alpha=0.5), ConfidenceDifficulty)
    assert isinstance(tk.weighting.build("teacher_entropy"), TeacherEntropy)
    assert tk.weighting.build("none") is None


# -- the full CIST loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["spec", "default"])
def test_full_cist_loss_and_gradient(hand, assert_close, variant):
    """CIST as first reconstructed (ratio rule, batch-normalised weights), and the library's default (docs/methods.md:
    τ^s = τ^t·(m^s/m^t)^0.5; weights floored at max/4, then blended half and half with uniform)."""
    s, t, y = hand.batch(n=33, c=10, seed=3)
    rho = hand.centred_max(t).median() / 4.0
    tau_t = (hand.centred_max(t) / rho).clamp(0.5, 20.0)
    w = _hand_cd_weights(s, t, y)
    if variant == "spec":
        tau_s = (hand.centred_max(s) / rho).clamp(0.5, 20.0)
        losses = [tk.DistillationLoss(CIST(tau0=4.0, **SPEC_CIST), weighting=ConfidenceDifficulty(**SPEC_WEIGHTS))]
    else:
        tau_s = (tau_t * (hand.centred_max(s) / hand.centred_max(t)) ** 0.5).clamp(0.5, 20.0)
        raw = w / w.sum()
        floored = torch.maximum(raw, raw.max() / 4.0)
        w = 0.5 + 0.5 * floored / floored.mean()
        losses = [tk.DistillationLoss(CIST(tau0=4.0), weighting=ConfidenceDifficulty()), tk.build_loss("cist")]
    s_ref = s.double().clone().requires_grad_()
    # τ and w are constants: no gradient reaches the student through them
    ref = 0.1 * hand.ce(s_ref, y).mean() + 0.9 * hand.kd(s_ref, t, tau_t, tau_s, weights=w)
    ref.backward()
    for loss in losses:
        s_lib = s.clone().requires_grad_()
        out = loss(s_lib, t, y)
        out.loss.backward()
        assert_close(out.loss, ref)
        assert_close(s_lib.grad, s_ref.grad, rtol=1e-4, atol=1e-7)
        st = out.stats
        assert st["tau_teacher_mean"] == pytest.approx(tau_t.mean().item(), rel=1e-5)
        assert st["tau_teacher_min"] == pytest.approx(tau_t.min().item(), rel=1e-5)
        assert st["tau_teacher_max"] == pytest.approx(tau_t.max().item(), rel=1e-5)
        assert st["tau_student_mean"] == pytest.approx(tau_s.mean().item(), rel=1e-5)
        entropy = hand.entropy(hand.log_softmax(t, tau_t))  # at the teacher's own τ
        assert st["teacher_entropy_mean"] == pytest.approx(entropy.mean().item(), rel=1e-5)
        assert st["teacher_entropy_std"] in (pytest.approx(entropy.std(correction=0).item(), rel=1e-4),
                                             pytest.approx(entropy.std().item(), rel=1e-4))
        assert st["weight_std"] == pytest.approx(w.std(correction=0).item(), rel=1e-4)
        assert st["ce"] == pytest.approx(hand.ce(s, y).mean().item(), rel=1e-5)
        assert st["kd"] == pytest.approx(hand.kd(s, t, tau_t, tau_s, weights=w).item(), rel=1e-5)


STAT_KEYS = ("tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "tau_student_mean", "teacher_entropy_mean",
             "teacher_entropy_std", "weight_std", "ce", "kd")


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"])
def test_stats_are_the_promised_floats(hand, method):
    s, t, y = hand.batch(n=12, c=10, seed=4)
    out = tk.build_loss(method)(s, t, y, progress=tk.Progress(step=3, total_steps=10, epoch=1, total_epochs=5))
    for key in STAT_KEYS:
        assert key in out.stats, key
    assert all(type(v) is float and math.isfinite(v) for v in out.stats.values()), out.stats


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"])
def test_a_float64_default_dtype_changes_nothing(hand, float64_default, method):
    """Users of scientific code often set float64 as the default; strategies must not build float64 helpers that
    meet the float32 rows (CIST's mean column once did)."""
    s, t, y = hand.batch(n=12, c=10, seed=6)
    progress = tk.Progress(step=3, total_steps=10, epoch=1, total_epochs=5)
    with_default = tk.build_loss(method)(s.double(), t.double(), y, progress=progress)
    torch.set_default_dtype(torch.float32)
    reference = tk.build_loss(method)(s, t, y, progress=progress)
    assert with_default.loss.dtype == torch.float32
    torch.testing.assert_close(with_default.loss, reference.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("method", ["kd", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"])
def test_autocast_changes_nothing(hand, method, chunk_size):
    """Trainers call the loss inside their autocast region; the maths must stay float32 there (no op of the loss
    may be one that autocast runs in bfloat16, such as a matmul)."""
    s, t, y = hand.batch(n=12, c=10, seed=7)
    progress = tk.Progress(step=3, total_steps=10, epoch=1, total_epochs=5)
    reference = tk.build_loss(method, chunk_size=chunk_size)(s, t, y, progress=progress)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tk.build_loss(method, chunk_size=chunk_size)(s, t, y, progress=progress)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-6, atol=1e-7)
    assert out.stats == pytest.approx(reference.stats, rel=1e-6, abs=1e-7)


# -- DKD -------------------------------------------------------------------------------------------------

def _mdistiller_dkd(zs, zt, y, tau_t, tau_s):
    """Per-row TCKD and NCKD as in mdistiller's dkd_loss (−1000 on the target logit), before the T² scaling;
    generalised to separate (per-sample) teacher and student temperatures."""
    zs, zt = zs.double(), zt.double()
    tau_t = tau_t.double() if torch.is_tensor(tau_t) else tau_t
    tau_s = tau_s.double() if torch.is_tensor(tau_s) else tau_s
    gt = torch.nn.functional.one_hot(y, zs.shape[-1]).double()
    ps, pt = torch.softmax(zs / tau_s, -1), torch.softmax(zt / tau_t, -1)
    bs = torch.stack([(ps * gt).sum(-1), (ps * (1 - gt)).sum(-1)], -1)
    bt = torch.stack([(pt * gt).sum(-1), (pt * (1 - gt)).sum(-1)], -1)
    tckd = (bt * (bt.log() - bs.log())).sum(-1)
    pt2 = torch.softmax(zt / tau_t - 1000.0 * gt, -1)
    log_ps2 = torch.log_softmax(zs / tau_s - 1000.0 * gt, -1)
    nckd = torch.where(pt2 > 0, pt2 * (pt2.log() - log_ps2), torch.zeros_like(pt2)).sum(-1)
    return tckd, nckd


@pytest.mark.parametrize("epoch,ramp", [(0, 1 / 20), (4, 5 / 20), (19, 1.0), (30, 1.0)])
def test_dkd_matches_mdistiller(hand, assert_close, epoch, ramp):
    s, t, y = hand.batch(n=24, c=10, seed=5, spread=(0.5, 4.0))
    tckd, nckd = _mdistiller_dkd(s, t, y, 4.0, 4.0)
    loss = tk.DistillationLoss(Fixed(4.0), family="dkd", ce_weight=1.0, kd_weight=1.0, dkd_alpha=1.0, dkd_beta=8.0,
                               dkd_warmup=20)
    out = loss(s, t, y, progress=tk.Progress(epoch=epoch, total_epochs=40))
    assert_close(out.terms["tckd"], 16 * tckd.mean())
    assert_close(out.terms["nckd"], 16 * nckd.mean())
    assert_close(out.terms["kd"], 16 * (tckd + 8 * nckd).mean())
    assert_close(out.loss, hand.ce(s, y).mean() + ramp * 16 * (tckd + 8 * nckd).mean())
    preset = tk.build_loss("dkd")(s, t, y, progress=tk.Progress(epoch=epoch, total_epochs=40))
    assert_close(preset.loss, out.loss)


def test_dkd_without_the_temperature_scale(hand, assert_close):
    """``scale="none"``: α·TCKD + β·NCKD without the τ² factor (this once failed: no factor multiplied None)."""
    s, t, y = hand.batch(n=12, c=7, seed=8, spread=(0.5, 4.0))
    tckd, nckd = _mdistiller_dkd(s, t, y, 3.0, 3.0)
    loss = tk.DistillationLoss(Fixed(3.0), family="dkd", ce_weight=0.0, kd_weight=1.0, dkd_alpha=1.0, dkd_beta=8.0,
                               dkd_warmup=0, scale="none")
    out = loss(s.requires_grad_(), t, y)
    assert_close(out.terms["kd"], (tckd + 8 * nckd).mean())
    assert_close(out.terms["tckd"], tckd.mean())
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_alpha_beta_and_no_warmup(hand, assert_close):
    s, t, y = hand.batch(n=16, c=10, seed=6, spread=(0.5, 4.0))
    tckd, nckd = _mdistiller_dkd(s, t, y, 2.0, 2.0)
    loss = tk.DistillationLoss(Fixed(2.0), family="dkd", ce_weight=0.5, kd_weight=2.0, dkd_alpha=0.3, dkd_beta=2.0,
                               dkd_warmup=0)
    out = loss(s, t, y)  # no warm-up, no progress needed
    assert_close(out.loss, 0.5 * hand.ce(s, y).mean() + 2.0 * 4.0 * (0.3 * tckd + 2.0 * nckd).mean())


def test_dkd_with_per_sample_temperatures(hand, assert_close):
    s, t, y = hand.batch(n=20, c=10, seed=7, spread=(0.5, 4.0))
    tau_t = (hand.centred_max(t) / 1.5).clamp(0.5, 20.0)
    tau_s = (hand.centred_max(s) / 1.5).clamp(0.5, 20.0)
    tckd, nckd = _mdistiller_dkd(s, t, y, tau_t, tau_s)
    scale = (tau_t * tau_s).squeeze(-1)
    loss = tk.DistillationLoss(CIST(ratio=1.5, student="ratio"), family="dkd", ce_weight=0.0, kd_weight=1.0,
                               dkd_warmup=0)
    out = loss(s, t, y)
    assert_close(out.terms["tckd"], (scale * tckd).mean())
    assert_close(out.terms["nckd"], (scale * nckd).mean())
    assert_close(out.loss, (scale * (tckd + 8 * nckd)).mean())


def test_dkd_is_finite_for_large_logits(hand):
    s, t, y = hand.batch(n=8, c=10, seed=8)
    s = (s * 1e3).requires_grad_()
    out = tk.DistillationLoss(Fixed(1.0), family="dkd", dkd_warmup=0)(s, t * 1e3, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(s.grad).all()


# -- masks and per-token logits --------------------------------------------------------------------------

def _losses():
    """Fresh loss objects for the mask tests (CIST's auto ratio is stateful)."""
    return {
        "kd": lambda: tk.DistillationLoss(4.0),
        "js": lambda: tk.DistillationLoss(2.0, divergence="js"),
        "cist": lambda: tk.DistillationLoss(CIST(), weighting=ConfidenceDifficulty()),
        "erkd": lambda: tk.DistillationLoss(4.0, weighting=TeacherEntropy()),
        "dts": lambda: tk.DistillationLoss(DTS()),
        "ctkd": lambda: tk.DistillationLoss(CTKD()),
        "lskd": lambda: tk.DistillationLoss(LogitStandardization(), kd_weight=9.0),
        "dtkd": lambda: tk.DistillationLoss(DTKD()),
        "entropy": lambda: tk.DistillationLoss(EntropyTarget()),
        "dkd": lambda: tk.DistillationLoss(Fixed(4.0), family="dkd"),
    }


PROGRESS = tk.Progress(step=2, total_steps=10, epoch=1, total_epochs=5)


@pytest.mark.parametrize("name", list(_losses()))
def test_ignored_and_masked_rows_change_nothing(hand, name):
    make = _losses()[name]
    s, t, y = hand.batch(n=21, c=10, seed=9)
    keep = torch.ones(21, dtype=torch.bool)
    keep[[0, 3, 7, 8, 15]] = False
    s_noisy, t_noisy = s.clone(), t.clone()
    s_noisy[~keep] *= 50  # whatever sits in a dropped row must not matter
    t_noisy[~keep] = -t_noisy[~keep] * 30
    ref = make()(s[keep], t[keep], y[keep], progress=PROGRESS)
    y_ignored = y.clone()
    y_ignored[~keep] = -100
    s_grad = s_noisy.clone().requires_grad_()
    by_label = make()(s_grad, t_noisy, y_ignored, progress=PROGRESS)
    by_mask = make()(s_noisy, t_noisy, y, mask=keep, progress=PROGRESS)
    for out in (by_label, by_mask):
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
        assert out.stats.keys() == ref.stats.keys()
        for k in ref.stats:
            assert out.stats[k] == pytest.approx(ref.stats[k], rel=1e-5, abs=1e-7), k
    by_label.loss.backward()
    assert (s_grad.grad[~keep] == 0).all()


def test_mask_without_labels(hand):
    s, t, _ = hand.batch(n=12, c=10, seed=10)
    keep = torch.tensor([True, False] * 6)
    loss = tk.DistillationLoss(CIST(), weighting=ConfidenceDifficulty())
    ref = tk.DistillationLoss(CIST(), weighting=ConfidenceDifficulty())(s[keep], t[keep])
    torch.testing.assert_close(loss(s, t, mask=keep).loss, ref.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["kd", "cist", "dkd", "entropy", "lskd"])
def test_per_token_logits_equal_the_flattened_rows(hand, name):
    make = _losses()[name]
    s, t, y = hand.batch(n=24, c=10, seed=11)
    y[[2, 5, 11]] = -100
    mask = torch.ones(24, dtype=torch.bool)
    mask[[5, 6, 20]] = False
    s3, s2 = s.reshape(4, 6, 10).clone().requires_grad_(), s.clone().requires_grad_()
    out3 = make()(s3, t.reshape(4, 6, 10), y.reshape(4, 6), mask=mask.reshape(4, 6), progress=PROGRESS)
    out2 = make()(s2, t, y, mask=mask, progress=PROGRESS)
    torch.testing.assert_close(out3.loss, out2.loss, rtol=1e-6, atol=1e-7)
    out3.loss.backward()
    out2.loss.backward()
    torch.testing.assert_close(s3.grad.reshape(24, 10), s2.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", ["kd", "cist", "dts", "dkd"])
def test_zero_valid_rows_give_a_zero_loss_that_backprops(hand, name):
    s, t, _ = hand.batch(n=6, c=10, seed=12)
    s = s.reshape(2, 3, 10).requires_grad_()
    loss = _losses()[name]()
    out = loss(s, t.reshape(2, 3, 10), torch.full((2, 3), -100), progress=PROGRESS)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert s.grad is not None and (s.grad == 0).all()
    loss.observe(out)  # a stateful strategy must cope with an empty batch
    out = loss(s, t.reshape(2, 3, 10), mask=torch.zeros(2, 3, dtype=torch.bool), progress=PROGRESS)
    assert out.loss.item() == 0.0
