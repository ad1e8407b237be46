"""Bad input raises ThermoKDError naming the problem; strategy state survives state_dict() → load_state_dict()."""
from __future__ import annotations

import pytest
import torch

import thermokd as tk
from thermokd.temperature import (CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, InstanceCTKD, LogitStandardization,
                                  Scheduled)
from thermokd.weighting import ConfidenceDifficulty, TeacherEntropy


def test_the_error_family_is_a_value_error():
    assert issubclass(tk.ThermoKDError, ValueError)
    assert issubclass(tk.ConfigError, tk.ThermoKDError)


# -- bad input -------------------------------------------------------------------------------------------

def test_shape_mismatch_names_both_shapes():
    with pytest.raises(tk.ThermoKDError) as err:
        tk.DistillationLoss()(torch.zeros(4, 10), torch.zeros(4, 11), torch.zeros(4, dtype=torch.long))
    assert "(4, 10)" in str(err.value) and "(4, 11)" in str(err.value)
    with pytest.raises(tk.ThermoKDError) as err:
        tk.DistillationLoss()(torch.zeros(2, 3, 5), torch.zeros(6, 5))
    assert "(2, 3, 5)" in str(err.value) and "(6, 5)" in str(err.value)


def test_labels_and_mask_of_the_wrong_shape():
    s = torch.zeros(4, 10)
    with pytest.raises(tk.ThermoKDError, match=r"labels.*\(5,\)"):
        tk.DistillationLoss()(s, s, torch.zeros(5, dtype=torch.long))
    with pytest.raises(tk.ThermoKDError, match=r"mask.*\(3,\)"):
        tk.DistillationLoss()(s, s, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(tk.ThermoKDError, match="class axis"):
        tk.DistillationLoss()(torch.zeros(10), torch.zeros(10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("who", ["student", "teacher"])
def test_non_finite_logits(bad, who):
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    (s if who == "student" else t)[2, 3] = bad
    with pytest.raises(tk.ThermoKDError, match=f"{who} logits contain NaN or inf"):
        tk.DistillationLoss()(s, t, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("label", [10, 11, -1, -5])
def test_labels_out_of_range(label):
    y = torch.tensor([0, 1, label, 3])
    with pytest.raises(tk.ThermoKDError) as err:
        tk.DistillationLoss()(torch.randn(4, 10), torch.randn(4, 10), y)
    message = str(err.value)
    assert str(label) in message and "range" in message and "10 classes" in message


@pytest.mark.parametrize("make", [
    lambda: Fixed(0.0), lambda: Fixed(-1.0), lambda: CIST(tau0=0.0), lambda: CIST(tau0=-2.0),
    lambda: CIST(ratio=0.0), lambda: CIST(ratio=-1.0), lambda: CIST(tau_min=0.0), lambda: CIST(tau_min=5, tau_max=2),
    lambda: DTS(t_init=0.0), lambda: DTS(t_min=-1.0), lambda: CTKD(init=0.0), lambda: DTKD(tau=0.0),
    lambda: LogitStandardization(base=0.0), lambda: EntropyTarget(tau_min=0.0), lambda: Scheduled(start=0.0),
    lambda: Scheduled(end=-1.0), lambda: TeacherEntropy(tau=0.0), lambda: tk.DistillationLoss(0.0),
    lambda: tk.DistillationLoss(-4.0), lambda: tk.temperature.build("fixed", tau=0.0),
])
def test_non_positive_temperatures(make):
    with pytest.raises(tk.ThermoKDError, match="must be > 0|<="):
        make()


@pytest.mark.parametrize("make,needle", [
    (lambda: CIST(ratio="median"), "ratio"), (lambda: CIST(student="nope"), "ratio, teacher"),
    (lambda: EntropyTarget(target=1.5), "target"), (lambda: EntropyTarget(target=0.0), "target"),
    (lambda: EntropyTarget(student="nope"), "entropy, ratio, teacher"), (lambda: DTS(momentum=1.0), "momentum"),
    (lambda: Scheduled(kind="exp"), "constant, cosine, linear, step"), (lambda: Scheduled(warmup=1.0), "warmup"),
    (lambda: Scheduled(milestones=(1.5,)), "milestones"), (lambda: ConfidenceDifficulty(alpha=-1.0), "alpha"),
    (lambda: tk.DistillationLoss(family="crd"), "dkd, kd"), (lambda: tk.DistillationLoss(scale="sum"), "none"),
    (lambda: tk.DistillationLoss(ce_weight=-0.1), "ce_weight"),
    (lambda: tk.DistillationLoss(family="dkd", divergence="js"), "KL"),
    (lambda: tk.DistillationLoss(temperature=[4.0]), "temperature"),
])
def test_invalid_options_are_named(make, needle):
    with pytest.raises(tk.ThermoKDError, match=needle):
        make()


def test_entropy_target_nats_must_be_below_log_c():
    s = torch.randn(3, 10)
    with pytest.raises(tk.ThermoKDError, match="log C"):
        EntropyTarget(target_nats=3.0).temperatures(s, s)


def test_unknown_strategy_name_lists_the_valid_ones():
    with pytest.raises(tk.ThermoKDError) as err:
        tk.temperature.build("cisst")
    message = str(err.value)
    assert "'cisst'" in message
    for name in ("cist", "dts", "ctkd", "lskd", "dtkd", "entropy-target", "fixed", "scheduled"):
        assert name in message
    with pytest.raises(tk.ThermoKDError, match="bad argument.*tau00"):
        tk.temperature.build("cist", tau00=4.0)
    with pytest.raises(tk.ThermoKDError, match="'cisst'"):
        tk.DistillationLoss("cisst")


def test_unknown_divergence_lists_the_valid_ones():
    for call in (lambda: tk.DistillationLoss(divergence="kld"),
                 lambda: tk.functional.divergence(torch.zeros(1, 2), torch.zeros(1, 2), "kld")):
        with pytest.raises(tk.ThermoKDError) as err:
            call()
        assert "'kld'" in str(err.value) and "js, kl, reverse_kl, tvd" in str(err.value)


def test_unknown_method_and_options_in_build_loss():
    with pytest.raises(tk.ThermoKDError) as err:
        tk.build_loss("cristo")
    assert "'cristo'" in str(err.value)
    for name in tk.method_names():
        assert name in str(err.value)
    with pytest.raises(tk.ThermoKDError, match="ce_wieght"):
        tk.build_loss("kd", ce_wieght=0.1)
    with pytest.raises(tk.ThermoKDError, match="tau00"):
        tk.build_loss("cist", temperature={"tau00": 4.0})
    with pytest.raises(tk.ThermoKDError, match="no weighting"):
        tk.build_loss("kd", weighting={"alpha": 1.0})
    with pytest.raises(tk.ThermoKDError, match="'nope'"):
        tk.weighting.build("nope")


@pytest.mark.parametrize("make,family", [
    (lambda: DTS(), "kd"), (lambda: CTKD(), "kd"), (lambda: InstanceCTKD(num_classes=10), "kd"),
    (lambda: Scheduled(), "kd"), (lambda: Fixed(4.0), "dkd"),
])
def test_strategies_needing_progress_say_so(make, family):
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    loss = tk.DistillationLoss(make(), family=family)
    with pytest.raises(tk.ThermoKDError, match=r"progress=thermokd\.Progress"):
        loss(s, t, y)
    loss(s, t, y, progress=tk.Progress())  # fine with it


def test_strategies_without_progress_do_not_need_it():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    for strategy in (Fixed(), CIST(), DTKD(), LogitStandardization(), EntropyTarget()):
        tk.DistillationLoss(strategy, weighting=ConfidenceDifficulty())(s, t, y)


def test_label_free_misuse():
    s = torch.randn(4, 10)
    with pytest.raises(tk.ThermoKDError, match="DTS needs labels"):
        tk.DistillationLoss(DTS())(s, s, progress=tk.Progress())
    with pytest.raises(tk.ThermoKDError, match="dkd.*needs labels"):
        tk.DistillationLoss(family="dkd", dkd_warmup=0)(s, s)
    with pytest.raises(tk.ThermoKDError, match="needs labels"):
        tk.DistillationLoss(ce_weight=1.0, kd_weight=0.0)(s, s)


def test_bad_progress():
    with pytest.raises(tk.ThermoKDError):
        tk.Progress(step=-1)
    with pytest.raises(tk.ThermoKDError):
        tk.Progress(total_epochs=0)


# -- state -----------------------------------------------------------------------------------------------

def _batches(n_batches, n=17, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        y = torch.randint(0, c, (n,), generator=g)
        t = torch.randn(n, c, generator=g) * (1 + i) + 4 * torch.nn.functional.one_hot(y, c)
        s = torch.randn(n, c, generator=g) * (0.5 + 0.3 * i)
        out.append((s, t, y))
    return out


def _progress(i, per_epoch=2, epochs=6):
    return tk.Progress(step=i, total_steps=per_epoch * epochs, epoch=i // per_epoch, total_epochs=epochs)


def _run(loss, batches, start, optimizer=None):
    """Forward, step (CTKD's θ), observe; returns each batch's loss and teacher τ."""
    record = []
    for i, (s, t, y) in enumerate(batches, start):
        out = loss(s, t, y, progress=_progress(i))
        if optimizer is not None:
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        loss.observe(out)
        record.append((out.loss.item(), out.stats["tau_teacher_mean"]))
    return record


def test_dts_state_round_trip():
    batches = _batches(8)
    a = tk.DistillationLoss(DTS(t_init=4.0, t_min=1.0, t_max=6.0))
    _run(a, batches[:4], 0)
    assert float(a.temperature.current) != 4.0
    state = a.state_dict()
    assert "temperature.current" in state
    b = tk.DistillationLoss(DTS(t_init=4.0, t_min=1.0, t_max=6.0))
    b.load_state_dict(state)
    assert float(b.temperature.current) == float(a.temperature.current)
    assert _run(a, batches[4:], 4) == _run(b, batches[4:], 4)
    assert float(b.temperature.current) == float(a.temperature.current)


def test_ctkd_state_round_trip():
    batches = _batches(8)
    a = tk.DistillationLoss(CTKD(), ce_weight=0.0, kd_weight=1.0)
    _run(a, batches[:4], 0, torch.optim.SGD(a.parameters(), lr=0.5))
    assert a.temperature.theta.item() != pytest.approx(a.temperature.theta0)
    b = tk.DistillationLoss(CTKD(), ce_weight=0.0, kd_weight=1.0)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.temperature.theta, a.temperature.theta)
    rec_a = _run(a, batches[4:], 4, torch.optim.SGD(a.parameters(), lr=0.5))
    rec_b = _run(b, batches[4:], 4, torch.optim.SGD(b.parameters(), lr=0.5))
    assert rec_a == rec_b
    assert torch.equal(b.temperature.theta, a.temperature.theta)


def test_cist_state_round_trip():
    batches = _batches(6)
    a = tk.DistillationLoss(CIST(tau0=4.0), weighting=ConfidenceDifficulty())
    _run(a, batches[:2], 0)
    state = a.state_dict()
    assert "temperature.ratio" in state
    fresh = tk.DistillationLoss(CIST(tau0=4.0), weighting=ConfidenceDifficulty())
    fresh.load_state_dict(state)
    # a loss that has already calibrated on something else takes the loaded ratio too
    used = tk.DistillationLoss(CIST(tau0=4.0), weighting=ConfidenceDifficulty())
    _run(used, batches[5:], 5)
    used.load_state_dict(state)
    expected = _run(a, batches[2:], 2)
    assert _run(fresh, batches[2:], 2) == expected
    assert _run(used, batches[2:], 2) == expected
    # without the state, the first later batch would set a different ratio
    assert _run(tk.DistillationLoss(CIST(tau0=4.0), weighting=ConfidenceDifficulty()), batches[2:], 2) != expected


def test_method_names_are_not_temperature_strategies():
    """'kd' and 'dkd' are methods (a family plus a temperature), so naming one as a temperature is an error, never a
    KD-family loss under DKD's name."""
    for name in ("kd", "dkd"):
        with pytest.raises(tk.ThermoKDError, match=f"unknown temperature strategy '{name}'.*fixed"):
            tk.DistillationLoss(temperature=name)
    assert isinstance(tk.temperature.build(" Fixed ", tau=2.0), Fixed)


def test_registries_name_unknown_keywords_from_the_signature():
    from thermokd.models import build_model

    with pytest.raises(tk.ThermoKDError, match="weighting 'teacher-entropy'.*gamma.*allowed: normalize, tau"):
        tk.weighting.build("teacher_entropy", gamma=1.0)
    with pytest.raises(tk.ThermoKDError, match="method 'cist' \\(its temperature\\).*tau00"):
        tk.build_loss("cist", temperature={"tau00": 4.0})
    with pytest.raises(tk.ThermoKDError, match="model 'mlp' \\(model_args\\).*widths.*allowed: dropout, hidden"):
        build_model("mlp", 3, in_channels=4, input_size=1, widths=[8])
    with pytest.raises(tk.ThermoKDError, match="allowed: dropout, hidden"):  # what the data fills is not the user's
        build_model("mlp", 3, in_channels=4, input_size=1, in_features=5)


def test_a_type_error_inside_a_constructor_is_not_reported_as_a_bad_option():
    from thermokd.registry import Registry

    def broken(x: int = 1):
        raise TypeError("a bug inside the constructor")

    with pytest.raises(TypeError, match="a bug inside"):
        Registry("thing", {"broken": broken}).build("Broken", x=2)
