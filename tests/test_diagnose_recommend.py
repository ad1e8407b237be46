"""``diagnose`` (soft-label entropy of a real teacher under each τ/method, calibration) and ``recommend`` (a τ from
the teacher's entropy, checked against short KD students), on the tiny digits config."""
from __future__ import annotations

import json
import math

import pytest
import torch

from thermokd import ThermoKDError
from thermokd.config import load_config
from thermokd.engine.run import Experiment
from thermokd.experiments.diagnose import expected_calibration_error, nll, nll_optimal_tau, run_diagnose
from thermokd.experiments.recommend import recommend, target_adjustment, verify

from engine_helpers import write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny config with its teacher cache in a temporary folder shared by this module's tests."""
    root = tmp_path_factory.mktemp("diagnose")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THERMOKD_CACHE", str(root / "cache"))
        yield load_config(write_config(root / "c.yaml")), root


@pytest.fixture(scope="module")
def diagnosed(setup):
    cfg, root = setup
    out = root / "diag"
    result = run_diagnose(cfg, out, [8, 1, 2, 4], ["cist", "dts", "entropy_target"], progress_bar=False)
    return cfg, out, result


def test_diagnose_writes_consistent_json_markdown_and_plots(diagnosed):
    import matplotlib.image

    cfg, out, result = diagnosed
    for name in ("diagnose.json", "diagnose.md", "entropy_by_tau.png", "entropy_vs_tau.png"):
        assert (out / name).is_file(), name
    stored = json.loads((out / "diagnose.json").read_text())
    assert stored["taus"] == [1.0, 2.0, 4.0, 8.0] and stored["methods"] == ["cist", "dts", "entropy-target"]
    assert "no student" in stored["note"].lower()
    n_train = Experiment(cfg).bundle.train.x.shape[0]
    assert stored["split"] == "train" and stored["num_rows"] == n_train
    log_c = math.log(stored["num_classes"])
    labels = ["τ=1", "τ=2", "τ=4", "τ=8", "cist", "dts", "entropy-target"]
    assert [e["label"] for e in stored["strategies"]] == labels
    for e in stored["strategies"]:
        r = e["report"]
        assert 0.0 <= r["entropy"]["min"] <= r["entropy"]["mean"] <= r["entropy"]["max"] <= log_c + 1e-5
        assert 0.0 <= r["normalised_entropy"]["min"] and r["normalised_entropy"]["max"] <= 1.0 + 1e-6
        assert sum(r["histogram_counts"]) == n_train
        assert 0.0 <= r["over_sharp"] <= 1.0 and 0.0 <= r["over_flat"] <= 1.0
    fixed = [e["report"]["entropy"]["mean"] for e in stored["strategies"] if e["kind"] == "fixed"]
    assert all(a < b for a, b in zip(fixed, fixed[1:])), fixed
    # the exact per-row solve holds the entropy (nearly) constant, unlike a fixed τ of the same mean entropy
    target = next(e for e in stored["strategies"] if e["label"] == "entropy-target")
    assert target["report"]["normalised_entropy"]["std"] < 0.2 * target["matched_fixed_normalised_entropy_std"]
    cist = next(e for e in stored["strategies"] if e["label"] == "cist")
    # CIST's ratio rule evens the entropy out too (≈3.5× lower std than the matched fixed τ on this teacher)
    assert cist["report"]["normalised_entropy"]["std"] < 0.5 * cist["matched_fixed_normalised_entropy_std"]
    assert cist["cist_ratio"] > 0 and abs(cist["report"]["tau_teacher"]["q50"] - 4.0) < 0.1  # tau0's calibration
    cal = stored["teacher"]["calibration"]
    assert 0.0 <= cal["ece"] <= 1.0 and 0.0 <= cal["ece_at_optimal_tau"] <= 1.0
    assert cal["nll_at_optimal_tau"] <= cal["nll"] + 1e-6 and cal["nll_optimal_tau"] > 0
    assert cal["test_acc"] == pytest.approx(stored["teacher"]["test_acc"])
    md = (out / "diagnose.md").read_text()
    assert "normalised entropy std" in md and "ECE" in md and "entropy-target" in md
    for name in ("entropy_by_tau.png", "entropy_vs_tau.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_diagnose_on_the_test_split(setup, tmp_path):
    cfg, _ = setup
    result = run_diagnose(cfg, tmp_path, [4], [], split="test", progress_bar=False)
    n_test = Experiment(cfg).bundle.test.x.shape[0]
    assert result["split"] == "test" and result["num_rows"] == n_test
    assert sum(result["strategies"][0]["report"]["histogram_counts"]) == n_test


def test_calibration_helpers_on_known_cases():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4000,), generator=g)
    confident = torch.nn.functional.one_hot(labels, 5).float() * 50
    assert expected_calibration_error(confident, labels) < 1e-6  # right and sure
    assert expected_calibration_error(confident, (labels + 1) % 5) > 0.99  # wrong and sure
    # labels drawn from softmax(z): the logits 3·z are over-confident by exactly τ = 3
    z = torch.randn(20000, 5, generator=g) * 2
    drawn = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    tau = nll_optimal_tau(3 * z, drawn)
    assert tau == pytest.approx(3.0, rel=0.05)
    assert nll(3 * z, drawn, tau) < nll(3 * z, drawn)


@pytest.mark.parametrize("taus, methods, split, match", [
    ([], ["cist"], "train", "empty"),
    ([1, 0], [], "train", "positive"),
    ([-2], [], "train", "positive"),
    ([4], ["cist", "nope"], "train", "unknown method 'nope'.*allowed: .*cist.*dts"),
    ([4], ["ce"], "train", "does not distil"),
    ([4], [], "valid", "unknown split"),
])
def test_diagnose_rejects_bad_input_early(tmp_path, taus, methods, split, match):
    from thermokd.config import RunConfig

    with pytest.raises(ThermoKDError, match=match):
        run_diagnose(RunConfig(), tmp_path, taus, methods, split=split, progress_bar=False)
    assert not (tmp_path / "diagnose.json").exists()


def test_target_adjustment_by_optimiser_and_budget():
    assert target_adjustment("adamw", 3)["shift"] == 0.0
    assert target_adjustment("adamw", 500)["shift"] == 0.0
    assert target_adjustment("sgd", 20)["shift"] == 0.0
    assert target_adjustment("sgd", 5)["shift"] == pytest.approx(-0.10)
    assert target_adjustment("sgd", 80)["shift"] == pytest.approx(0.10)
    assert target_adjustment("sgd", 240)["shift"] == pytest.approx(0.15)  # capped
    assert target_adjustment("sgd", 1)["shift"] == pytest.approx(-0.15)
    assert "short" in target_adjustment("sgd", 5)["reason"] and "AdamW" in target_adjustment("adamw", 5)["reason"]
    assert target_adjustment("adamw", 5)["caveat"] and target_adjustment("sgd", 5)["caveat"] is None
    with pytest.raises(ThermoKDError, match="optimiser"):
        target_adjustment("lamb", 5)


def test_recommend_is_deterministic_on_the_grid_and_explains_itself(setup):
    cfg, _ = setup
    grid = [1, 2, 4, 8, 16]
    a = recommend(cfg, grid=grid, progress_bar=False)
    b = recommend(cfg, grid=grid, progress_bar=False)
    assert a == b
    assert a["tau"] in grid and a["cist_tau0"] == a["tau"]
    assert min(grid) <= a["tau"] <= max(grid) and a["tau_exact"] > 0
    # the tiny config trains its student for 2 SGD epochs: a short budget, so a lower target
    assert a["adjustment"]["optimizer"] == "sgd" and a["adjustment"]["shift"] < 0
    assert a["target"] == pytest.approx(0.5 + a["adjustment"]["shift"])
    assert "heuristic" in a["rule"]
    # the exact τ reaches the target entropy; a higher target gives a higher τ
    curve = {p["tau"]: p["mean"] for p in a["entropy_curve"]}
    assert sorted(curve.values()) == [curve[t] for t in sorted(curve)]
    higher = recommend(cfg, target=0.8, grid=grid, progress_bar=False)
    assert higher["tau_exact"] > a["tau_exact"]
    unadjusted = recommend(cfg, grid=grid, adjust=False, progress_bar=False)
    assert unadjusted["target"] == 0.5 and unadjusted["tau_exact"] > a["tau_exact"]
    with pytest.raises(ThermoKDError, match="strictly between 0 and 1"):
        recommend(cfg, target=1.5)
    with pytest.raises(ThermoKDError, match="grid"):
        recommend(cfg, grid=[])


def test_verify_reports_the_gap_and_reuses_finished_cells(setup, tmp_path):
    cfg, _ = setup
    grid = [2.0, 8.0]
    proposal = recommend(cfg, grid=grid, progress_bar=False)
    out = tmp_path / "verify"
    first = verify(cfg, proposal, grid, 1, [0], out, progress_bar=False, echo=lambda s: None)
    stored = json.loads((out / "recommend.json").read_text())
    v = stored["verification"]
    assert v["best_tau"] in grid and v["proposal_tau"] == proposal["tau"] and v["epochs"] == 1
    assert v["gap_pp"] == pytest.approx(100 * (v["best_acc"] - v["proposal_acc"]))
    assert v["gap_pp"] >= 0 and len(v["cells"]) == 2
    assert "budget" in (v["budget_note"] or "")  # proposed for 2 epochs, checked with 1
    assert (out / "recommend.md").is_file() and "gap" in (out / "recommend.md").read_text()
    results = sorted(out.glob("tau-*-seed0/result.json"))
    assert [p.parent.name for p in results] == ["tau-2-seed0", "tau-8-seed0"]
    mtimes = [p.stat().st_mtime_ns for p in results]
    second = verify(cfg, proposal, grid, 1, [0], out, progress_bar=False, echo=lambda s: None)
    assert [p.stat().st_mtime_ns for p in results] == mtimes
    assert second["verification"]["cells"] == first["verification"]["cells"]
    with pytest.raises(ThermoKDError, match="seeds"):
        verify(cfg, proposal, grid, 1, [], out)
    with pytest.raises(ThermoKDError, match="proposal"):
        verify(cfg, {"tau": -1}, grid, 1, [0], out)
