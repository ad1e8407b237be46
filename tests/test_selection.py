"""Nothing is chosen on the test split; divergence is never silent; paired intervals; compare with equal tuning."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from thermokd import ThermoKDError
from thermokd.cli import main
from thermokd.engine.divergence import check_finite_loss, collapse
from thermokd.experiments.stats import paired_difference, paired_verdict, t_interval

from engine_helpers import write_config


def _digits_npz(path, shuffle_test: bool):
    """The digits set as an npz (with its validation split), optionally with the test labels permuted."""
    from thermokd.data import load_data

    b = load_data("digits")
    y_test = b.test.y.numpy()
    if shuffle_test:
        y_test = np.random.default_rng(0).permutation(y_test)
    np.savez(path, x_train=b.train.x.numpy(), y_train=b.train.y.numpy(), x_val=b.val.x.numpy(),
             y_val=b.val.y.numpy(), x_test=b.test.x.numpy(), y_test=y_test)
    return f"npz:{path}"


def test_shuffling_the_test_labels_changes_no_choice(tmp_path, monkeypatch):
    """Same data but the test labels permuted: the tuned setting, every trial's score and every run's chosen epoch
    are the same; only the reported test accuracies move."""
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml", train={"epochs": 3}))
    outcomes = []
    for shuffle in (False, True):
        data = _digits_npz(tmp_path / f"d{int(shuffle)}.npz", shuffle)
        out = tmp_path / f"tune{int(shuffle)}"
        assert main(["tune", "--config", cfg, "--data", data, "--trials", "3", "--out", str(out),
                     "--no-progress"]) == 0
        summary = json.loads((out / "tune.json").read_text())
        runs = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/result.json"))]
        outcomes.append((summary, runs))
    (a, runs_a), (b, runs_b) = outcomes
    assert a["params"] == b["params"] and a["best_trial"] == b["best_trial"]
    assert [(t["params"], t["value"], t["state"]) for t in a["trials"]] == \
        [(t["params"], t["value"], t["state"]) for t in b["trials"]]
    assert runs_a and [r["best_epoch"] for r in runs_a] == [r["best_epoch"] for r in runs_b]
    assert [r["best_acc"] for r in runs_a] != [r["best_acc"] for r in runs_b]  # the test numbers did change


def test_non_finite_loss_stops_the_run_naming_step_method_and_tau():
    check_finite_loss({"loss": 1.0}, "at step 3 (epoch 0)", "kd seed 0")
    with pytest.raises(ThermoKDError) as err:
        check_finite_loss({"loss": math.nan, "tau_teacher_mean": 4.0, "tau_student_mean": 3.5},
                          "at step 17 (epoch 2)", "cist seed 1")
    message = str(err.value)
    assert "\n" not in message and "step 17" in message and "cist seed 1" in message
    assert "tau_teacher_mean=4" in message and "tau_student_mean=3.5" in message


def test_a_diverging_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml", train={"epochs": 2, "log_every": 1}))
    code = main(["distill", "--config", cfg, "--set", "train.optimizer.lr=1.0e+30", "--set",
                 "method.loss={check_inputs: false}", "--out", str(tmp_path / "o"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "non-finite loss" in lines[0] and "kd seed 0" in lines[0], lines
    assert re.search(r"at step \d+ \(epoch 0\)", lines[0]) and "tau_teacher_mean=4" in lines[0]


def test_collapse_is_flagged_past_half_way_to_chance():
    history = [{"epoch": 0, "val_acc": 0.50}, {"epoch": 1, "val_acc": 0.73}, {"epoch": 2, "val_acc": 0.42}]
    assert collapse(history, 0.1) is None  # 0.42 > 0.73 − (0.73 − 0.1)/2 = 0.415
    event = collapse(history + [{"epoch": 3, "val_acc": 0.41}], 0.1)
    assert event == {"epoch": 3, "val_acc": 0.41, "best_val_acc": 0.73, "best_epoch": 1, "chance": 0.1}
    assert collapse([{"epoch": 0, "val_acc": 0.1}, {"epoch": 1, "val_acc": 0.0}], 0.1) is None  # never above chance


def test_collapsed_runs_are_flagged_in_the_report(tmp_path):
    from test_report import _results

    from thermokd.experiments.report import write_report

    results = _results()
    results["runs"][1]["collapse"] = {"epoch": 3, "val_acc": 0.41, "best_val_acc": 0.73, "best_epoch": 1,
                                      "chance": 0.1}
    text = write_report(results, tmp_path).read_text()
    assert "## Flags: validation collapse" in text
    assert "kd seed 0: validation accuracy fell to 41.00 % at epoch 3" in text


def test_t_interval_by_hand():
    # mean 2, sample std 1; with 2 degrees of freedom Student's t has the closed-form quantile
    # t_p = (2p − 1)/√(2p(1 − p)), so t(0.975) = 0.95/√0.04875 ≈ 4.3027; half-width t·s/√3
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) / math.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-12)
    assert t_interval([1.0]) is None


def test_paired_difference_uses_shared_seeds_only():
    runs = [{"method": "a", "seed": s, "best_acc": v} for s, v in enumerate([0.90, 0.925, 0.905, 0.5])]
    runs += [{"method": "b", "seed": s, "best_acc": v} for s, v in enumerate([0.88, 0.90, 0.89])]
    d = paired_difference(runs, "a", "b")
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02)
    assert d["lo"] > 0 and paired_verdict(d, "b").startswith("beats b (Δ +2.00 pp")
    assert paired_difference(runs, "a", "c") is None


def test_compare_with_equal_tuning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml"))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", cfg, "--methods", "ce,kd,dts", "--seeds", "3", "--tune", "2", "--out",
                 str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    tuning = results["tuning"]
    assert tuning["ce"]["params"] == {} and tuning["kd"]["budget"] == tuning["dts"]["budget"] == 2
    for run in results["runs"]:  # final runs use the tuned setting
        for knob, value in tuning[run["method"]]["params"].items():
            section, argument = knob.split(".")
            assert run["method_config"][section][argument] == value
    assert len(results["runs"]) == 9 and (out / "tune" / "kd" / "study.db").is_file()
    text = (out / "report.md").read_text()
    assert "## Tuning (same budget" in text and "Δ vs kd (pp, 95 % CI)" in text and "Δ vs ce (pp, 95 % CI)" in text
    assert "| dts | " in text and "### Verdicts" in text
    code = main(["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "2", "--tune", "2", "--out",
                 str(tmp_path / "two"), "--no-progress"])
    assert code == 2 and ">= 3 seeds" in capsys.readouterr().err


def test_recommend_regret_against_tune(tmp_path, monkeypatch):
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml", train={"epochs": 1}))
    assert main(["recommend", "--config", cfg, "--verify", "--grid", "1,4", "--seeds", "2", "--against-tune", "2",
                 "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    v = json.loads((tmp_path / "r" / "recommend.json").read_text())["verification"]
    tuned = json.loads((tmp_path / "r" / "tune" / "tune.json").read_text())["params"]["temperature.tau"]
    assert v["tuned_tau"] == pytest.approx(tuned, rel=1e-3)
    by_seed = {c["seed"]: c["best_acc"] for c in v["cells"] if c["tau"] == v["tuned_tau"]}
    proposal = {c["seed"]: c["best_acc"] for c in v["cells"] if c["tau"] == v["proposal_tau"]}
    assert v["regret"]["mean"] == pytest.approx(sum(by_seed[s] - proposal[s] for s in (0, 1)) / 2)
    assert "regret against it" in (tmp_path / "r" / "recommend.md").read_text()
