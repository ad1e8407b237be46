"""CIST's variant space (docs/methods.md): every option of ``CIST`` and ``ConfidenceDifficulty`` against a float64
reference written here, shift invariance (and where it breaks), no gradient through τ or w, masked rows, chunked
equals plain, state saved and restored, the weight bound as a property, and the tuner-readable search spaces."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import thermokd as tk
from thermokd.config import load_config, validate_method
from thermokd.rows import Rows
from thermokd.temperature import CIST
from thermokd.weighting import ConfidenceDifficulty

RHO = 1.5
DIGITS = Path(tk.__file__).parent / "configs" / "digits.yaml"

# one entry per option value (defaults elsewhere); labels name the option
CIST_OPTIONS = {
    "ratio": {"student": "ratio"}, "teacher": {"student": "teacher"},
    "interpolate-0.3": {"student": "interpolate", "gamma": 0.3},
    "interpolate-0": {"student": "interpolate", "gamma": 0.0},
    "interpolate-1": {"student": "interpolate", "gamma": 1.0},
    "own-ratio": {"student": "own-ratio"}, "floor-0.6": {"student": "ratio", "student_floor": 0.6},
    "max-min": {"student": "ratio", "max_kind": "max-min"}, "raw": {"student": "ratio", "max_kind": "raw"},
    "teacher-squared": {"student": "ratio", "scale": "teacher-squared"}, "scale-none": {"scale": "none"},
}
WEIGHT_OPTIONS = {
    "spec": {"max_ratio": None, "mix": 1.0}, "default": {}, "alpha-beta-eps": {"alpha": 0.5, "beta": 2.0, "eps": 0.01},
    "confidence-max": {"confidence": "max", "max_ratio": None}, "difficulty-ce": {"difficulty": "ce"},
    "mix": {"mix": 0.3, "max_ratio": None}, "max-ratio": {"max_ratio": 4.0, "mix": 1.0},
    "running": {"normalise": "running", "max_ratio": None, "mix": 1.0},
    "running-bounded": {"normalise": "running", "max_ratio": 3.0, "mix": 0.5},
}
WEIGHT_DEFAULTS = {k: p.default for k, p in inspect.signature(ConfidenceDifficulty).parameters.items()}
SHIFT_INVARIANT = [k for k in CIST_OPTIONS if k != "raw"]  # the raw max moves with a per-row shift


# -- float64 references ----------------------------------------------------------------------------------
def ref_m(z, kind):
    z = z.double()
    top = z.max(-1, keepdim=True).values
    if kind == "centred":
        return top - z.mean(-1, keepdim=True)
    return top - z.min(-1, keepdim=True).values if kind == "max-min" else top


def ref_temperatures(s, t, opts, c=None, tau_min=0.5, tau_max=20.0):
    """(τ^t, τ^s, scale) per docs/methods.md; ``c``: own-ratio's running log-scale (None: unset)."""
    kind, rule, gamma = opts.get("max_kind", "centred"), opts.get("student", "interpolate"), opts.get("gamma", 0.5)
    m_t, m_s = ref_m(t, kind), ref_m(s, kind)
    tau_t = (m_t / RHO).clamp(tau_min, tau_max)
    if rule == "teacher" or (rule == "own-ratio" and c is None):
        tau_s = tau_t.clone()
    elif rule == "ratio":
        tau_s = m_s / RHO
    elif rule == "interpolate":
        tau_s = tau_t * (m_s.clamp_min(1e-6) / m_t.clamp_min(1e-6)) ** gamma
    else:
        tau_s = m_s / (RHO * math.exp(c))
    if rule != "teacher":
        tau_s = torch.maximum(tau_s, opts.get("student_floor", 0.0) * tau_t).clamp(tau_min, tau_max)
    scale = {"product": tau_t * tau_s, "teacher-squared": tau_t ** 2,
             "none": torch.ones_like(tau_t)}[opts.get("scale", "product")]
    return tau_t, tau_s, scale.reshape(-1)


def ref_log_scale(s, t, kind="centred"):
    """own-ratio's per-batch statistic: mean_i log(m^s_i/m^t_i)."""
    return (ref_m(s, kind).clamp_min(1e-6).log() - ref_m(t, kind).clamp_min(1e-6).log()).mean().item()


def ref_raw_weights(s, t, y, opts):
    """w̃ = a^α (d+ε)^β."""
    full = {"alpha": 1.0, "beta": 1.0, "eps": 1e-3, "confidence": "label", "difficulty": "error", **opts}
    p_t, p_s = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    a = p_t.max(-1).values if full["confidence"] == "max" or y is None else p_t.gather(-1, y[:, None]).squeeze(-1)
    p_y = p_s.max(-1).values if y is None else p_s.gather(-1, y[:, None]).squeeze(-1)
    d = -p_y.log() if full["difficulty"] == "ce" else 1 - p_y
    return a ** full["alpha"] * (d + full["eps"]) ** full["beta"]


def ref_weights(s, t, y, opts, running_mean=None):
    """Floor at max/R, divide by the batch mean (or the running mean), blend with uniform."""
    full = {**WEIGHT_DEFAULTS, **opts}
    raw = ref_raw_weights(s, t, y, opts)
    if full["max_ratio"] is not None:
        raw = torch.maximum(raw, raw.max() / full["max_ratio"])
    mean = raw.mean() if running_mean is None else running_mean
    return (1 - full["mix"]) + full["mix"] * raw / mean


def _loss(cist_opts, weight_opts=None, **kwargs):
    weighting = None if weight_opts is None else ConfidenceDifficulty(**weight_opts)
    return tk.DistillationLoss(CIST(ratio=RHO, **cist_opts), weighting=weighting, ce_weight=0.0, kd_weight=1.0,
                               **kwargs)


def _batch(hand, n=24, c=9, seed=0):
    return hand.batch(n=n, c=c, seed=seed, spread=(0.2, 8.0))


# -- formulas ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", list(CIST_OPTIONS))
def test_cist_option_matches_reference(label, hand, assert_close):
    opts = CIST_OPTIONS[label]
    s, t, y = _batch(hand, seed=1)
    loss = _loss(opts, WEIGHT_OPTIONS["spec"])
    w = ref_weights(s, t, y, WEIGHT_OPTIONS["spec"])
    tau_t, tau_s, scale = ref_temperatures(s, t, opts)
    out = loss(s, t, y)
    per_row = hand.kl(hand.log_softmax(t, tau_t), hand.log_softmax(s, tau_s))
    assert_close(out.loss, (w * scale * per_row).mean())
    temps = loss.temperature.temperatures(s, t, y)
    assert_close(temps.teacher, tau_t)
    assert_close(temps.student, tau_s)
    if opts.get("student") == "own-ratio":  # after one observe, τ^s = m^s/(ρ·e^c) with c this batch's statistic
        loss.observe(out)
        c = ref_log_scale(s, t)
        assert_close(loss.temperature.student_log_scale, c)
        s2, t2, _ = _batch(hand, seed=2)
        assert_close(loss.temperature.temperatures(s2, t2).student, ref_temperatures(s2, t2, opts, c=c)[1])
        loss.observe(loss(s2, t2, y))  # the running mean moves with momentum 0.9
        assert_close(loss.temperature.student_log_scale, 0.9 * c + 0.1 * ref_log_scale(s2, t2))


@pytest.mark.parametrize("k", [0.01, 0.3, 5.0])
def test_own_ratio_matches_the_teachers_scale_whatever_the_students(k, hand, assert_close):
    """A student whose logits are the teacher's times k gets the teacher's τ once c has seen one batch (momentum 0);
    for any student, the geometric mean of τ^s equals that of τ^t on the batch c was taken from (no clipping)."""
    s, t, y = _batch(hand, seed=16)
    strategy = CIST(ratio=RHO, student="own-ratio", momentum=0.0, tau_min=1e-4, tau_max=1e4)
    loss = tk.DistillationLoss(strategy)
    loss.observe(loss(k * t, t, y))
    temps = strategy.temperatures(k * t, t, y)
    assert_close(temps.student, temps.teacher, rtol=1e-4)
    loss.observe(loss(s, t, y))
    temps = strategy.temperatures(s, t, y)
    assert_close(temps.student.log().mean(), temps.teacher.log().mean(), atol=1e-5)


def test_interpolate_spans_teacher_and_per_row_ratio(hand, assert_close):
    """γ = 0 shares the teacher's τ; γ = 1 is τ^t·m^s/m^t, the ratio rule wherever τ^t is not clipped."""
    s, t, y = _batch(hand, seed=3)
    zero = CIST(ratio=RHO, student="interpolate", gamma=0.0).temperatures(s, t, y)
    assert_close(zero.student, zero.teacher)
    one = CIST(ratio=RHO, student="interpolate", gamma=1.0, tau_min=1e-3, tau_max=1e3).temperatures(s, t, y)
    ratio = CIST(ratio=RHO, student="ratio", tau_min=1e-3, tau_max=1e3).temperatures(s, t, y)
    assert_close(one.student, ratio.student, rtol=1e-4)


@pytest.mark.parametrize("label", list(WEIGHT_OPTIONS))
@pytest.mark.parametrize("labelled", [True, False])
def test_weighting_option_matches_reference(label, labelled, hand, assert_close):
    opts = WEIGHT_OPTIONS[label]
    s, t, y = _batch(hand, seed=4)
    y = y if labelled else None
    weighting = ConfidenceDifficulty(**opts)
    assert_close(weighting(Rows(s, t, y)), ref_weights(s, t, y, opts), rtol=1e-5, atol=1e-5)
    if opts.get("normalise") != "running":
        return
    # the first batch used its own mean; observe stores it, the next batch is divided by it, then momentum 0.9
    first = ref_raw_weights(s, t, y, opts)
    if opts.get("max_ratio"):
        first = torch.maximum(first, first.max() / opts["max_ratio"])
    weighting.observe(None)
    assert_close(weighting.running_mean, first.mean())
    s2, t2, _ = _batch(hand, seed=5)
    assert_close(weighting(Rows(s2, t2, y)), ref_weights(s2, t2, y, opts, running_mean=first.mean()),
                 rtol=1e-5, atol=1e-5)
    second = ref_raw_weights(s2, t2, y, opts)
    if opts.get("max_ratio"):
        second = torch.maximum(second, second.max() / opts["max_ratio"])
    weighting.observe(None)
    assert_close(weighting.running_mean, 0.9 * first.mean() + 0.1 * second.mean())


def test_running_normalisation_averages_the_micro_batches_of_a_step(hand, assert_close):
    """Two forward calls before one observe (gradient accumulation): the running mean moves to their mean."""
    weighting = ConfidenceDifficulty(normalise="running", max_ratio=None)
    batches = [_batch(hand, seed=k) for k in (6, 7)]
    for s, t, y in batches:
        weighting(Rows(s, t, y))
    weighting.observe(None)
    expected = sum(ref_raw_weights(s, t, y, {}).mean() for s, t, y in batches) / 2
    assert_close(weighting.running_mean, expected)


# -- invariances, gradients, masks, chunks, state --------------------------------------------------------
@pytest.mark.parametrize("label", list(CIST_OPTIONS))
def test_shift_invariance(label, hand, assert_close):
    """Adding a constant per row changes nothing, except with the raw max, which moves with the shift."""
    s, t, y = _batch(hand, seed=8)
    shift_s, shift_t = torch.randn(s.shape[0], 1) * 5, torch.randn(t.shape[0], 1) * 5
    a = _loss(CIST_OPTIONS[label], {})(s, t, y).loss
    b = _loss(CIST_OPTIONS[label], {})(s + shift_s, t + shift_t, y).loss
    if label in SHIFT_INVARIANT:
        assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(a, b, rtol=1e-3)


@pytest.mark.parametrize("weight_label", list(WEIGHT_OPTIONS))
@pytest.mark.parametrize("label", ["ratio", "interpolate-0.3", "own-ratio", "floor-0.6", "teacher-squared"])
def test_no_gradient_through_tau_or_weights(label, weight_label, hand, assert_close):
    """The student's gradient equals that of the reference loss with τ, scale and w held as constants."""
    opts, weight_opts = CIST_OPTIONS[label], WEIGHT_OPTIONS[weight_label]
    s, t, y = _batch(hand, seed=9)
    loss = _loss(opts, weight_opts)
    if label == "own-ratio":  # give c a value so that τ^s depends on the student's logits
        loss.observe(loss(s, t, y))
    s_lib = s.clone().requires_grad_()
    loss(s_lib, t, y).loss.backward()
    c = loss.temperature.student_log_scale.item() if label == "own-ratio" else None
    tau_t, tau_s, scale = ref_temperatures(s, t, opts, c=c)
    r = getattr(loss.weighting, "running_mean", None)  # set by the own-ratio case's observe
    w = ref_weights(s, t, y, weight_opts, running_mean=None if r is None or r.isnan() else r.double())
    s_ref = s.double().requires_grad_()
    per_row = hand.kl(hand.log_softmax(t, tau_t), hand.log_softmax(s_ref, tau_s))
    (w * scale * per_row).mean().backward()
    assert_close(s_lib.grad, s_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label", list(CIST_OPTIONS))
def test_masked_rows_count_nowhere(label, hand, assert_close):
    opts = CIST_OPTIONS[label]
    s, t, y = _batch(hand, seed=10)
    keep = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(0)) > 0.3
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[~keep], t_masked[~keep] = 1e4, -1e4  # garbage in masked rows must not reach τ, weights or stats
    masked, plain = _loss(opts, {}), _loss(opts, {})
    out_masked = masked(s_masked, t_masked, y, mask=keep)
    out_plain = plain(s[keep], t[keep], y[keep])
    assert_close(out_masked.loss, out_plain.loss)
    masked.observe(out_masked)
    plain.observe(out_plain)
    torch.testing.assert_close(masked.state_dict(), plain.state_dict(), equal_nan=True)


@pytest.mark.parametrize("weight_label", ["default", "running-bounded", "difficulty-ce"])
@pytest.mark.parametrize("label", list(CIST_OPTIONS))
def test_chunked_equals_plain(label, weight_label, hand, assert_close):
    """Value, gradient and the state after observe, with chunks of 5 rows (and masked rows) against one pass."""
    opts, weight_opts = CIST_OPTIONS[label], WEIGHT_OPTIONS[weight_label]
    s, t, y = _batch(hand, n=23, seed=11)
    keep = torch.arange(23) % 4 != 1
    plain, chunked = _loss(opts, weight_opts), _loss(opts, weight_opts, chunk_size=5)
    for step in range(2):  # the second step reads the state the first observe wrote
        s_p, s_c = (s + step).requires_grad_(), (s + step).clone().requires_grad_()
        out_p, out_c = plain(s_p, t, y, mask=keep), chunked(s_c, t, y, mask=keep)
        assert_close(out_c.loss, out_p.loss)
        out_p.loss.backward()
        out_c.loss.backward()
        assert_close(s_c.grad, s_p.grad, rtol=1e-4, atol=1e-7)
        plain.observe(out_p)
        chunked.observe(out_c)
    for key, value in plain.state_dict().items():
        assert_close(chunked.state_dict()[key], value)


@pytest.mark.parametrize("label", ["own-ratio", "running"])
def test_state_is_saved_and_restored(label, hand, assert_close):
    """A loss restored from ``state_dict`` continues exactly where the saved one was."""
    def make():
        if label == "own-ratio":
            return _loss({"student": "own-ratio"}, {})
        return _loss({}, WEIGHT_OPTIONS["running-bounded"])

    batches = [_batch(hand, seed=k) for k in range(12, 16)]
    first = make()
    for s, t, y in batches[:2]:
        first.observe(first(s, t, y))
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    assert not any(torch.isnan(v).any() for v in saved.values())
    restored = make()
    restored.load_state_dict(saved)
    for s, t, y in batches[2:]:
        a, b = first(s, t, y), restored(s, t, y)
        assert_close(b.loss, a.loss)
        first.observe(a)
        restored.observe(b)
    for key, value in first.state_dict().items():
        assert_close(restored.state_dict()[key], value)


def test_state_of_a_checkpoint_without_the_new_buffers_still_loads():
    """The running statistics exist only for the options that use them: older checkpoints keep loading."""
    assert set(tk.DistillationLoss(CIST(student="ratio"), weighting=ConfidenceDifficulty()).state_dict()) == {
        "temperature.ratio"}
    own = tk.DistillationLoss(CIST(student="own-ratio"), weighting=ConfidenceDifficulty(normalise="running"))
    assert set(own.state_dict()) == {"temperature.ratio", "temperature.student_log_scale", "weighting.running_mean"}


# -- the weight bound ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 64), c=st.integers(2, 30), scale=st.floats(0.01, 60.0), seed=st.integers(0, 10_000),
       keep_fraction=st.floats(0.05, 1.0), labelled=st.booleans())
def test_default_weights_are_bounded(n, c, scale, seed, keep_fraction, labelled):
    """Default ConfidenceDifficulty: the largest normalised weight of N valid rows is at most
    (1 − λ) + λ·N·R/(R + N − 1) < (1 − λ) + λ·R, the smallest above 1 − λ; mean 1 over the valid rows."""
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g) if labelled else None
    keep = torch.rand(n, generator=g) < keep_fraction
    keep[0] = True
    weighting = ConfidenceDifficulty()
    w = weighting(Rows(s[keep], t[keep], None if y is None else y[keep]))
    n_valid = int(keep.sum())
    lam, ratio = weighting.mix, weighting.max_ratio
    assert ratio is not None and lam > 0  # the default is bounded
    assert w.max().item() <= weighting.max_weight(n_valid) * (1 + 1e-5)
    assert weighting.max_weight(n_valid) < (1 - lam) + lam * ratio
    assert w.min().item() >= (1 - lam) - 1e-6
    assert w.mean().item() == pytest.approx(1.0, rel=1e-4)
    # the loss sees exactly these weights for the masked batch
    y_in = None if y is None else y.clone()
    loss = tk.DistillationLoss(CIST(ratio=RHO), weighting=weighting, ce_weight=0.0, kd_weight=1.0)
    out = loss(s, t, y_in, mask=keep)
    assert out.stats["weight_std"] == pytest.approx(w.std(correction=0).item(), rel=1e-3, abs=1e-5)


def test_max_weight_bound_is_reached_when_one_row_dominates():
    """The bound is tight: one unlearned row among learned ones gets exactly N·R/(R + N − 1) before mixing."""
    weighting = ConfidenceDifficulty(mix=1.0, max_ratio=4.0)
    log_w = torch.tensor([0.0] + [-20.0] * 9)
    assert weighting.shares_of(log_w).max().item() * 10 == pytest.approx(weighting.max_weight(10), rel=1e-6)
    assert weighting.max_weight(10) == pytest.approx(10 * 4 / 13)
    assert ConfidenceDifficulty(max_ratio=None, mix=1.0).shares_of(log_w).max().item() * 10 == pytest.approx(
        10, rel=1e-6)


# -- configuration and search spaces ---------------------------------------------------------------------
def test_every_option_is_reachable_from_a_config():
    cfg = load_config(DIGITS, ["method.name=cist", "method.temperature.student=interpolate",
                               "method.temperature.gamma=0.25", "method.temperature.max_kind=max-min",
                               "method.temperature.scale=teacher-squared", "method.temperature.student_floor=0.5",
                               "method.weighting.mix=0.5", "method.weighting.max_ratio=8",
                               "method.weighting.difficulty=ce", "method.weighting.confidence=max",
                               "method.weighting.normalise=running"])
    validate_method(cfg.method, "method")
    loss = tk.build_loss("cist", temperature=cfg.method.temperature, weighting=cfg.method.weighting)
    assert (loss.temperature.student_rule, loss.temperature.gamma, loss.temperature.max_kind) == (
        "interpolate", 0.25, "max-min")
    assert (loss.weighting.mix, loss.weighting.max_ratio, loss.weighting.normalise) == (0.5, 8.0, "running")
    with pytest.raises(tk.ThermoKDError, match="gamma"):
        validate_method(load_config(DIGITS, ["method.name=cist", "method.temperature.gamma=2"]).method, "method")


@pytest.mark.parametrize("cls", [CIST, ConfidenceDifficulty])
def test_search_space_is_a_plain_dict_of_valid_settings(cls):
    """``{knob: (low, high, log) | [choices]}``: every end point and every choice builds."""
    space = cls.search_space()
    assert space
    for knob, spec in space.items():
        if isinstance(spec, tuple):
            low, high, log = spec
            assert low < high and isinstance(log, bool) and (low > 0 or not log)
            cls(**{knob: low}), cls(**{knob: high})
        else:
            assert isinstance(spec, list) and spec
            for choice in spec:
                cls(**{knob: choice})


@pytest.mark.parametrize("make, fragment", [
    (lambda: CIST(student="own"), "own-ratio"), (lambda: CIST(gamma=1.5), "gamma"),
    (lambda: CIST(student_floor=-0.1), "student_floor"), (lambda: CIST(max_kind="min"), "max-min"),
    (lambda: CIST(scale="tau"), "teacher-squared"), (lambda: CIST(momentum=1.0), "momentum"),
    (lambda: ConfidenceDifficulty(mix=1.5), "mix"), (lambda: ConfidenceDifficulty(max_ratio=0.5), "max_ratio"),
    (lambda: ConfidenceDifficulty(confidence="p"), "label"), (lambda: ConfidenceDifficulty(difficulty="x"), "error"),
    (lambda: ConfidenceDifficulty(normalise="ema"), "running"),
])
def test_bad_options_are_one_line_errors(make, fragment):
    with pytest.raises(tk.ThermoKDError, match=fragment) as info:
        make()
    assert "\n" not in str(info.value)
