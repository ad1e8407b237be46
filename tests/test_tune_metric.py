"""`thermokd tune` beyond accuracy: the perplexity metric (scored as −log ppl, shown as ppl), the language-model
search spaces (every LM preset inside, every draw a valid loss) and a study that refuses another base method."""
from __future__ import annotations

import json
import math

import pytest

from thermokd import ThermoKDError
from thermokd.config import MethodConfig, TuneConfig, config_from_dict
from thermokd.experiments.tune import build_space, markdown, tune_method
from thermokd.experiments.tune_metric import ACCURACY, PERPLEXITY, metric_of
from thermokd.methods import LM_PRESETS, build_loss, method_names
from thermokd.spaces import LM_SPACES, FloatRange, method_space

from engine_helpers import TINY

PEAK_TAU = 0.8


def _cfg():
    return config_from_dict({**json.loads(json.dumps(TINY)), "train": {**TINY["train"], "epochs": 4}})


def lm_curve(calls: list):
    """An LM run evaluated 4 times whose validation perplexity falls to a floor that rises with |log τ − log 0.8|."""

    def train(method, folder, on_eval):
        tau = method.temperature["tau"]
        floor = 40.0 * math.exp((math.log(tau) - math.log(PEAK_TAU)) ** 2)
        ppl = None
        for step in (25, 50, 75, 100):
            ppl = floor * (1 + 4 * math.exp(-step / 25))
            calls.append((tau, step))
            on_eval({"step": step, "val_ppl": ppl, "val_acc": 0.1})
        return {"val_ppl": ppl, "best_val_ppl": ppl}

    return train


def test_the_metrics_score_and_show_their_values():
    assert ACCURACY.score(0.9) == 0.9 and ACCURACY.text(0.9123) == "91.23 %"
    assert PERPLEXITY.score(math.e ** 3) == pytest.approx(-3.0)  # maximise −log ppl = minimise the cross-entropy
    assert PERPLEXITY.cell(PERPLEXITY.score(45.678)) == "45.68" and PERPLEXITY.cell(None) == "—"
    assert PERPLEXITY.score(10) > PERPLEXITY.score(20)  # lower perplexity scores higher
    assert metric_of({}) is ACCURACY and metric_of({"metric": "val_ppl"}) is PERPLEXITY


def test_lm_spaces_hold_every_lm_preset_and_build_valid_losses():
    for name in method_names():
        space = method_space(name, domain="lm")
        assert set(space) == set(LM_SPACES[name])
        for knob, value in LM_PRESETS.get(name, {}).get("temperature", {}).items():
            if f"temperature.{knob}" in space:
                rng = space[f"temperature.{knob}"]
                assert (rng.low <= value <= rng.high) if isinstance(rng, FloatRange) else value in rng, (name, knob)
        # every corner of the space builds (e.g. DTS's t_min <= t_max whatever is drawn)
        corners = [{}]
        for knob, rng in space.items():
            values = [rng.low, rng.high] if isinstance(rng, FloatRange) else list(rng)
            corners = [{**c, knob.split(".", 1)[1]: v} for c in corners for v in values]
        for corner in corners:
            build_loss(name, domain="lm", temperature=corner)
    assert method_space("kd", domain="lm")["temperature.tau"] == FloatRange(0.25, 4.0, log=True)
    assert method_space("cist", domain="lm")["temperature.student"] == ["teacher", "interpolate", "ratio"]
    assert method_space("kd")["temperature.tau"].low == 1.0  # the image range is unchanged
    assert "loss.kd_weight" in method_space("kd", kd_weight=True, domain="lm")
    with pytest.raises(ThermoKDError, match="domain"):
        method_space("kd", domain="audio")
    assert set(build_space(MethodConfig(name="cist"), TuneConfig(trials=1), "lm")) == {"temperature.tau0",
                                                                                       "temperature.student"}


def test_held_knobs_leave_the_space_and_each_label_keeps_its_own_setting():
    hold = TuneConfig(trials=1, hold=["temperature.student"])
    variant = MethodConfig(name="cist", temperature={"student": "interpolate", "gamma": 0.5})
    assert set(build_space(variant, hold, "lm")) == {"temperature.tau0"}
    assert set(build_space(MethodConfig(name="kd"), hold, "lm")) == {"temperature.tau"}  # not a kd knob: no effect
    for bad, words in ((["student"], "SECTION.ARGUMENT"), (["model.tau"], "SECTION.ARGUMENT"),
                       ([3], "not a knob")):
        with pytest.raises(ThermoKDError, match=words):
            build_space(variant, TuneConfig(trials=1, hold=bad), "lm")
    with pytest.raises(ThermoKDError, match="both searched"):
        build_space(variant, TuneConfig(trials=1, hold=["temperature.tau0"], space={"temperature.tau0": "1:2"}), "lm")


def test_a_perplexity_study_finds_the_lowest_perplexity_and_shows_perplexities(tmp_path):
    calls: list = []
    result = tune_method(_cfg(), MethodConfig(name="kd"), "kd", tmp_path, TuneConfig(trials=20, seed=1),
                         lm_curve(calls), echo=lambda s: None, metric=PERPLEXITY, rounds=4, domain="lm",
                         config_for=lambda m: {"variants": {"kd-tuned": m.temperature}},
                         set_prefix="variants.kd-tuned")
    assert abs(math.log(result.params["temperature.tau"] / PEAK_TAU)) < math.log(1.3)
    assert all(0.25 <= tau <= 4 for tau, _ in calls)  # the LM range, not the image one
    summary = json.loads((tmp_path / "tune.json").read_text())
    assert summary["metric"] == "val_ppl" and summary["pruned"] > 0
    floor = 40.0 * math.exp((math.log(result.params["temperature.tau"]) - math.log(PEAK_TAU)) ** 2)
    assert math.exp(-summary["best_value"]) == pytest.approx(floor * (1 + 4 * math.exp(-4)))
    text = "\n".join(markdown(summary))
    assert "| evaluations | val ppl |" in text and "best validation perplexity" in text and " %" not in text
    assert summary["set"][0] == "variants.kd-tuned.name=kd"
    assert (tmp_path / "tune_vs_knob.png").is_file() and "kd-tuned" in (tmp_path / "best_config.yaml").read_text()


def test_a_study_refuses_another_base_method(tmp_path):
    calls: list = []
    cfg = _cfg()
    tune = TuneConfig(trials=2, space={"tau": "0.25:4:log"})  # the LM range, in both domains

    def run(method, domain):
        return tune_method(cfg, method, "kd", tmp_path, tune, lm_curve(calls), echo=lambda s: None,
                           metric=PERPLEXITY, rounds=4, domain=domain)

    run(MethodConfig(name="kd"), "lm")
    run(MethodConfig(name="kd"), "lm")  # the same base: continued
    with pytest.raises(ThermoKDError, match="tunes another method") as info:  # same knobs, another starting point
        run(MethodConfig(name="kd", loss={"ce_weight": 0.5}), "lm")
    assert "\n" not in str(info.value) and "ce_weight" in str(info.value)
    with pytest.raises(ThermoKDError, match="tunes another method"):  # the image presets are another base too
        run(MethodConfig(name="kd"), "default")
