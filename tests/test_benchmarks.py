"""Smoke tests of the benchmark scripts: they run, and print what the README quotes."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_loss_overhead_prints_a_ratio_and_its_round_quartiles_per_method():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "loss_overhead.py"), "--rounds", "3", "--block", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(re.findall(r"^\s+(\S+)\s+([\d.]+x\s+\[[\d.]+-[\d.]+\])", proc.stdout, flags=re.M))
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from loss_overhead import METHODS, REFERENCES
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert sorted(lines) == sorted(METHODS + list(REFERENCES))
    assert "Hinton KD" in proc.stdout and "target <= 1.05x" in proc.stdout and "target <= 1.20x" in proc.stdout
    for method, text in lines.items():
        ratio, low, high = map(float, re.findall(r"[\d.]+(?=x|\]|-)", text))
        assert ratio > 0 and 0 < low <= high, (method, text)


def test_loss_overhead_times_masked_rows_kept_and_gathered():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "loss_overhead.py"), "--rounds", "2", "--block", "1",
                           "--threads", "1", "--methods", "kd-masked-kept,kd-masked-gathered,cist-masked-kept"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("kd-masked-kept", "kd-masked-gathered", "cist-masked-kept"):
        assert re.search(rf"^\s+{method}\s+[\d.]+x", proc.stdout, flags=re.M), proc.stdout


def test_paired_reproduces_the_readmes_gamma_figures():
    """benchmarks/paired.py on the committed digits results: the README's γ 0.75 − γ 0.5 figures."""
    results = BENCHMARKS / "results" / "digits-cist-gamma-10" / "results.json"
    for extra, figure in (([], "−1.50 [−2.60, −0.40]"), (["--on", "val"], "−1.18 [−2.42, +0.06]")):
        proc = subprocess.run([sys.executable, str(BENCHMARKS / "paired.py"), str(results), "cist", "cist-g05", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert figure in proc.stdout, proc.stdout


def test_the_hand_written_cist_reference_is_thermokds_default_cist():
    """The benchmark's ``cist-by-hand`` must compute what ``build_loss("cist")`` computes (value and gradient),
    or its time says nothing about thermokd's overhead."""
    import torch

    import thermokd as tk

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from loss_overhead import cist_ratio, hand_cist
    finally:
        sys.path.remove(str(BENCHMARKS))
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(64, 10, generator=gen) * (1 + 4 * torch.rand(64, 1, generator=gen))
    labels = torch.randint(0, 10, (64,), generator=gen)
    for scale in (2.0, 0.01):  # a student far from and near its initialisation (τ^s at its floor)
        student = (torch.randn(64, 10, generator=gen) * scale).requires_grad_(True)
        mine = hand_cist(student, teacher, labels, cist_ratio(teacher))
        (g_mine,) = torch.autograd.grad(mine, student)
        theirs = tk.build_loss("cist")(student, teacher, labels).loss
        (g_theirs,) = torch.autograd.grad(theirs, student)
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6), (scale, mine.item(), theirs.item())
        assert torch.allclose(g_mine, g_theirs, rtol=1e-4, atol=1e-7), scale


def test_the_overhead_benchmarks_kd_node_is_the_hinton_loss():
    """``kd-node`` (thermokd's closed-form node called directly) computes the baseline's loss and gradient."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from loss_overhead import hinton_kd, kd_node
    finally:
        sys.path.remove(str(BENCHMARKS))
    gen = torch.Generator().manual_seed(4)
    teacher = torch.randn(64, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (64,), generator=gen)
    student = (torch.randn(64, 10, generator=gen) * 2).requires_grad_(True)
    mine, theirs = kd_node(student, teacher, labels), hinton_kd(student, teacher, labels)
    (g_mine,), (g_theirs,) = torch.autograd.grad(mine, student), torch.autograd.grad(theirs, student)
    assert torch.allclose(mine, theirs, rtol=1e-5) and torch.allclose(g_mine, g_theirs, rtol=1e-4, atol=1e-7)


def test_lm_loss_memory_prints_memory_time_and_differences_for_both_modes():
    for mode, shape, rows in (("fused", "1,16,8,300", "default"), ("fused", "1,16,8,300", "on"),
                              ("chunked", "1,16,300", "on")):
        proc = subprocess.run([sys.executable, str(BENCHMARKS / "lm_loss_memory.py"), "--mode", mode, "--shape", shape,
                               "--chunk", "5", "--rounds", "1", "--threads", "1", "--methods", "kd", "--rows", rows],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        row = re.search(r"^kd\s+(\d+)\s+(\d+)\s+([\d.]+|nan)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+([\d.e+-]+)\s+([\d.e+-]+)$",
                        proc.stdout, flags=re.M)
        assert row is not None, proc.stdout
        assert float(row.group(5)) < 1e-5 and float(row.group(6)) < 1e-4  # same value and gradients


def test_evidence_overview_reads_each_setup_and_bolds_only_resolved_differences(tmp_path):
    import json

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from evidence_overview import METHODS, table
    finally:
        sys.path.remove(str(BENCHMARKS))
    runs = [{"method": m, "seed": s, "best_acc": acc + 0.001 * s} for s in range(3)
            for m, acc in (("ce", 0.70), ("kd", 0.73), ("cist", 0.73))]
    runs += [{"method": "dts", "seed": s, "best_acc": 0.73 + (0.01 if s == 1 else -0.01 * s)} for s in range(3)]
    (tmp_path / "trec").mkdir()
    (tmp_path / "trec" / "results.json").write_text(json.dumps({"runs": runs}))
    header, rule, row = table(tmp_path)  # set-ups without a results.json are left out
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["TREC questions, fine-tuned MiniLM teacher", "3", "**+3.00 [+3.00, +3.00]**"]
    assert cells[3] == "+0.00 [+0.00, +0.00]" and not cells[5].startswith("**")  # cist ties; dts's spread spans 0
    assert cells[4] == "—" and len(cells) == 3 + len(METHODS) == len(header.strip("|").split("|"))


def test_lm_across_folders_pairs_each_method_with_the_other_folders_reference_by_seed(tmp_path):
    import json

    def folder(name: str, runs: list[dict]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"runs": runs}))
        return tmp_path / name

    here = folder("gpu", [{"method": m, "seed": s, "ppl": p + s, "acc": 0.3} for s in range(3)
                          for m, p in (("kd-tuned", 30.0), ("cist", 31.0))])
    there = folder("cpu", [{"method": "kd-tuned", "seed": s, "ppl": 30.5 + s + 0.1 * (s == 1), "acc": 0.29}
                           for s in range(3)])
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "lm_across_folders.py"), str(here), str(there)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()[1:]}
    assert rows["cist"].startswith("+0.47 [") and rows["kd-tuned"].startswith("-0.53 [")  # ppl: +0.5, +0.4, +0.5
    assert rows["cist"].endswith("+1.00 [+1.00, +1.00]")  # accuracy in pp, identical on every seed


def test_gamma_selection_pools_set_ups_alike_and_chooses_on_validation(tmp_path):
    """Two set-ups of three seeds: per set-up the paired differences to γ = 0.5, pooled as the mean of the set-ups'
    means with the standard errors combined; the choice is the highest pooled validation difference."""
    import json
    import math
    import statistics

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gamma_selection as gs
    finally:
        sys.path.remove(str(BENCHMARKS))
    # validation accuracies per γ and seed; γ 0.25 leads by 1, 2, 3 pp in set-up a and by 0 in b
    val = {"a": {0.0: [80, 81, 82], 0.25: [91, 93, 95], 0.5: [90, 91, 92], 0.75: [89, 90, 91], 1.0: [85, 85, 85]},
           "b": {0.0: [70, 70, 71], 0.25: [70, 71, 72], 0.5: [70, 71, 72], 0.75: [72, 71, 70], 1.0: [60, 60, 60]}}
    setups = {}
    for setup, by_gamma in val.items():
        runs = [{"method": f"g{g}", "seed": seed, "best_val_acc": acc / 100, "best_acc": 0.5}
                for g, accs in by_gamma.items() for seed, acc in enumerate(accs)]
        (tmp_path / setup).mkdir()
        (tmp_path / setup / "results.json").write_text(json.dumps({"runs": runs}))
        setups[setup] = {g: (setup, f"g{g}") for g in by_gamma}
    setups["missing"] = {g: ("nowhere", f"g{g}") for g in gs.GAMMAS}
    old, gs.SETUPS = gs.SETUPS, setups
    try:
        lines = gs.report(tmp_path, "val")
        per_setup = [gs.differences(gs.gamma_runs(tmp_path, setups[s]), "best_val_acc") for s in ("a", "b")]
    finally:
        gs.SETUPS = old
    assert per_setup[0][0.25]["mean"] == pytest.approx(0.02) and per_setup[1][0.25]["mean"] == pytest.approx(0.0)
    se_a = statistics.stdev([0.01, 0.02, 0.03]) / math.sqrt(3)  # set-up b's differences are 0, 0, 0
    pool = gs.pooled(per_setup)
    assert pool[0.25]["mean"] == pytest.approx(0.01)
    assert pool[0.25]["hi"] - pool[0.25]["mean"] == pytest.approx(1.96 * math.sqrt(se_a ** 2) / 2)
    assert gs.choose(pool) == 0.25 and "chosen on validation: γ = 0.25" in lines
    assert "missing (not pooled): missing" in lines and any(line.startswith("| **pooled**") for line in lines)
    assert gs.choose({g: {"mean": -0.01} for g in (0.0, 0.25, 0.75, 1.0)}) == 0.5  # nothing beats the reference
