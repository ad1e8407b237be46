"""report.md, the summary numbers and the plots of a compare run, on a synthetic results dict."""
from __future__ import annotations

import json
import math

import pytest

from thermokd.errors import ThermoKDError
from thermokd.experiments.report import (ACCURACY_PLOT, ENTROPY_PLOT, TAU_PLOT, markdown_table, summarize,
                                         total_training_seconds, tuned_kd, verdicts, write_report)

EPOCHS = 4
# method -> seed -> (best_acc, last_acc, final tau_teacher_mean, normalised entropy std, s/epoch)
NUMBERS = {
    "ce": {0: (0.80, 0.79, None, None, 1.0), 1: (0.82, 0.80, None, None, 1.2)},
    "kd": {0: (0.85, 0.84, 4.0, 0.30, 1.5), 1: (0.86, 0.85, 4.0, 0.32, 1.7)},
    "cist": {0: (0.90, 0.89, 3.0, 0.10, 2.0), 1: (0.91, 0.90, 5.0, 0.20, 2.2)},
}


def _run(method: str, seed: int) -> dict:
    best, last, tau, ent_std, wall = NUMBERS[method][seed]
    distils = tau is not None
    history = []
    for e in range(EPOCHS):
        h = {"epoch": e, "val_acc": best + 0.01 - 0.05 * (EPOCHS - 1 - e), "test_acc": best - 0.05 * (EPOCHS - 1 - e),
             "train_loss": 1.0 / (e + 1), "lr": 0.05}
        if distils:
            h |= {"tau_teacher_mean": tau, "tau_student_mean": tau * 0.9, "teacher_entropy_mean": 0.5}
        history.append(h)
    run = {"method": method, "seed": seed, "best_acc": best, "best_val_acc": best + 0.01, "best_epoch": EPOCHS - 1,
           "last_acc": last,
           "wall_time_per_epoch": wall, "history": history, "final": {}, "teacher_entropy": None, "tau_trace": []}
    if distils:
        run["final"] = {"tau_teacher_mean": tau, "tau_teacher_min": tau, "tau_teacher_max": tau,
                        "tau_student_mean": tau * 0.9, "teacher_entropy_mean": 0.6, "teacher_entropy_std": 9.9,
                        "weight_std": 0.0}
        counts = [0] * 20
        counts[5 + seed], counts[12] = 30, 70
        run["teacher_entropy"] = {"mean": 0.5, "std": ent_std, "histogram_edges": [i / 20 for i in range(21)],
                                  "histogram_counts": counts}
        run["tau_trace"] = [[s, tau + 0.1 * s, 0.9 * tau] for s in range(0, 40, 10)]
    return run


def _results(seeds=(0, 1)) -> dict:
    return {"data": "digits", "created": "2026-11-23T01:30:00", "machine": "test box",
            "teacher": {"model": "mlp", "test_acc": 0.97, "key": "ab12cd"}, "student": {"model": "mlp"},
            "epochs": EPOCHS, "seeds": list(seeds), "methods": list(NUMBERS),
            "runs": [_run(m, s) for s in seeds for m in NUMBERS]}


def test_summarize_by_hand():
    s = summarize(_results()["runs"])
    assert list(s) == ["ce", "kd", "cist"]

    def sd2(a, b):  # sample std (ddof=1) of two values
        return abs(a - b) / math.sqrt(2)

    assert s["ce"]["best_mean"] == pytest.approx(0.81)
    assert s["ce"]["best_std"] == pytest.approx(sd2(0.80, 0.82))
    assert s["ce"]["last_mean"] == pytest.approx(0.795)
    assert s["ce"]["last_std"] == pytest.approx(sd2(0.79, 0.80))
    assert s["ce"]["tau_teacher_mean"] is None and s["ce"]["teacher_entropy_std"] is None
    assert s["ce"]["wall_time_per_epoch"] == pytest.approx(1.1)
    assert s["kd"]["best_mean"] == pytest.approx(0.855) and s["kd"]["best_std"] == pytest.approx(sd2(0.85, 0.86))
    assert s["cist"]["tau_teacher_mean"] == pytest.approx(4.0)
    assert s["cist"]["teacher_entropy_std"] == pytest.approx(0.15)  # the normalised test-set std, not final's
    assert s["cist"]["n"] == 2 and s["cist"]["seeds"] == [0, 1]


def test_write_report_contents_and_plots(tmp_path):
    import matplotlib.image

    results = json.loads(json.dumps(_results()))  # exactly what results.json gives back
    path = write_report(results, tmp_path)
    assert path == tmp_path / "report.md"
    text = path.read_text()
    s = summarize(results["runs"])
    for method, row in s.items():
        assert f"| {method} |" in text
        assert f"{100 * row['best_mean']:.2f} ± {100 * row['best_std']:.2f}" in text
        assert f"{100 * row['last_mean']:.2f} ± {100 * row['last_std']:.2f}" in text
    assert "| 4.00 |" in text and "| 0.150 |" in text  # cist's τ and entropy std
    assert f"{100 * (s['cist']['best_mean'] - s['kd']['best_mean']):+.2f}" in text  # +5.00 pp
    # paired per-seed differences: cist − kd is +5 pp on both seeds (a zero-width interval), ce − kd is −5 and −4
    # pp: mean −4.5, sample std 0.5·√2, t(0.975, 1 dof) = 12.7062 → half-width 12.7062·0.7071/√2 = 6.35 pp
    assert "**cist**: beats kd (Δ +5.00 pp, 95 % CI [+5.00, +5.00], 2 seeds); beats ce (Δ +9.50 pp" in text
    assert "**ce**: not resolved from kd (Δ -4.50 pp, 95 % CI [-10.85, +1.85], 2 seeds)" in text
    assert "| cist | +5.00 [+5.00, +5.00] | +9.50 [" in text
    for line in ("data: `digits`", "teacher: `mlp`, test accuracy 97.00 %", "student: `mlp`", "epochs: 4",
                 "seeds: 0, 1"):
        assert line in text
    for name in (ACCURACY_PLOT, TAU_PLOT, ENTROPY_PLOT):
        assert f"({name})" in text
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 100


def test_single_seed(tmp_path):
    results = _results(seeds=(0,))
    s = summarize(results["runs"])
    assert all(row["n"] == 1 and row["best_std"] == 0.0 and row["last_std"] == 0.0 for row in s.values())
    text = write_report(results, tmp_path, title="One seed").read_text()
    assert text.startswith("# One seed")
    assert "**cist**: Δ +5.00 pp vs kd on one seed: no interval" in text
    assert "**ce**: Δ -5.00 pp vs kd on one seed: no interval" in text
    assert (tmp_path / ENTROPY_PLOT).is_file()


def test_within_noise_and_reference_handling():
    s = summarize(_results()["runs"])
    s["cist"]["best_mean"], s["cist"]["best_std"] = 0.86, 0.02
    assert verdicts(s)["cist"].startswith("within noise of kd (Δ +0.50 pp")
    assert "Δ best" not in markdown_table(s, reference=None)
    with pytest.raises(ThermoKDError, match="dts"):
        markdown_table(s, reference="dts")


def test_only_ce_runs(tmp_path):
    runs = [_run("ce", 0), _run("ce", 1)]
    text = write_report({"data": "digits", "runs": runs}, tmp_path).read_text()
    assert "| ce |" in text and "Δ best vs ce (pp)" in text and "**ce**: reference" in text
    for name in (ACCURACY_PLOT, TAU_PLOT, ENTROPY_PLOT):
        assert (tmp_path / name).is_file()


def test_reference_is_kd_at_its_best_grid_tau(tmp_path):
    results = _results()
    kd8 = [dict(_run("kd", s), method="kd@8") for s in (0, 1)]
    for run, best in zip(kd8, (0.93, 0.95)):  # τ=8 beats τ=4 and cist on validation
        run["best_acc"], run["best_val_acc"] = best - 0.10, best
    results["runs"] += kd8
    results["kd_grid"] = {"kd": 4.0, "kd@8": 8.0, "kd@16": 16.0}  # kd@16 never ran
    s = summarize(results["runs"])
    assert tuned_kd(s, results["kd_grid"]) == "kd@8"
    assert tuned_kd(s, {"kd": 4.0}) is None and tuned_kd(s, None) is None
    text = write_report(results, tmp_path).read_text()
    assert "KD at its best grid τ is `kd@8` (τ = 8)" in text
    assert "| 8 | kd@8 **(best)** | 94.00 ± 1.41 | 84.00 ± 1.41 |" in text
    assert "| 4 | kd | 86.50 ± 0.71 | 85.50 ± 0.71 |" in text
    assert "kd@16" not in text
    # kd@8 wins on validation but is worse on test: the report keeps the validation choice
    assert "**cist**: beats kd@8 (Δ +6.50 pp" in text
    assert "Δ best vs kd@8 (pp)" in text


def test_compute_spent_sums_student_epochs_and_teacher():
    results = _results()
    results["teacher"]["train_seconds"] = 120.0
    spent = total_training_seconds(results)
    expected = sum(NUMBERS[m][s][4] * EPOCHS for m in NUMBERS for s in (0, 1))
    assert spent == {"students": pytest.approx(expected), "teacher": 120.0}
