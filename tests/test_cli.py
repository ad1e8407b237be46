"""End-to-end tests of the thermokd command on tiny data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from thermokd import method_names
from thermokd.cli import main

from engine_helpers import env, run_cli, write_config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_compare_writes_results_report_and_plots(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--config", cfg, "--methods", "ce,kd,cist", "--seeds", "2", "--epochs", "1",
                    "--out", out, cache=cache)
    assert "cist" in proc.stdout and "test @ best val" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["ce", "kd", "cist"] and results["seeds"] == [0, 1]
    assert 0.5 < results["teacher"]["test_acc"] <= 1.0
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in ["ce", "kd", "cist"]
                                                                     for s in [0, 1])
    for r in runs:
        assert 0.0 <= r["best_acc"] <= 1.0 and 0.0 <= r["last_acc"] <= 1.0 and 0.0 <= r["best_val_acc"] <= 1.0
        assert r["wall_time_per_epoch"] > 0 and len(r["history"]) == 1
        assert r["history"][0]["val_acc"] == r["best_val_acc"] and r["history"][0]["test_acc"] == r["best_acc"]
        if r["method"] != "ce":
            assert r["final"]["tau_teacher_mean"] > 0 and r["teacher_entropy"]["histogram_counts"]
    # different seeds are different runs; the same seed gives every method the same data order
    kd = {r["seed"]: r for r in runs if r["method"] == "kd"}
    assert kd[0]["history"] != kd[1]["history"]
    for name in ("report.md", "accuracy_curves.png", "tau_traces.png", "entropy_histograms.png"):
        assert (out / name).is_file()
    # a second compare reuses every finished run (and the teacher)
    again = run_cli("compare", "--config", cfg, "--methods", "ce,kd,cist", "--seeds", "2", "--epochs", "1",
                     "--out", out, cache=cache)
    assert json.loads((out / "results.json").read_text())["runs"] == runs and "teacher" in again.stdout


def test_compare_runs_the_configs_compare_section(tmp_path, cache):
    """kd@TAU grid points and named variants (the CIST ablations) from the config; the report picks KD's best τ."""
    import yaml

    cfg = write_config(tmp_path / "c.yaml")
    raw = yaml.safe_load(cfg.read_text())
    raw["compare"] = {"seeds": 1, "methods": ["kd@1", "kd", "cist-plain"],
                      "variants": {"cist-plain": {"name": "cist", "weighting": {"alpha": 0, "beta": 0}}}}
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    run_cli("compare", "--config", cfg, "--epochs", "1", "--out", out, cache=cache)
    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["kd@1", "kd", "cist-plain"] and results["seeds"] == [0]
    assert results["kd_grid"] == {"kd@1": 1.0, "kd": 4.0}
    by_label = {r["method"]: r for r in results["runs"]}
    assert by_label["cist-plain"]["base_method"] == "cist"
    assert by_label["cist-plain"]["method_config"]["weighting"] == {"alpha": 0, "beta": 0}
    assert by_label["kd@1"]["final"]["tau_teacher_mean"] == pytest.approx(1.0)
    assert by_label["kd"]["final"]["tau_teacher_mean"] == pytest.approx(4.0)
    assert (out / "runs" / "cist-plain-seed0" / "result.json").is_file()
    best = max(("kd@1", "kd"), key=lambda label: by_label[label]["best_val_acc"])  # chosen on validation
    assert f"KD at its best grid τ is `{best}`" in (out / "report.md").read_text()
    # --methods on the command line still wins over the config's list
    run_cli("compare", "--config", cfg, "--epochs", "1", "--methods", "kd@1", "--out", tmp_path / "one", cache=cache)
    assert json.loads((tmp_path / "one" / "results.json").read_text())["methods"] == ["kd@1"]


@pytest.mark.parametrize("method", method_names())
def test_distill_with_each_strategy(tmp_path, cache, method, monkeypatch, capsys):
    monkeypatch.setenv("THERMOKD_CACHE", str(cache))
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    out = tmp_path / method
    assert main(["distill", "--config", str(cfg), "--method", method, "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method and 0.0 <= result["best_acc"] <= 1.0
    assert (out / "student.safetensors").is_file() and (out / "metrics.jsonl").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["type"] for line in lines} == {"step", "epoch"}
    if method != "ce":
        assert all(line["tau_teacher_mean"] > 0 for line in lines if line["type"] == "step")


def _error(args, cache, tmp_path) -> str:
    proc = run_cli(*args, cache=cache, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("thermokd: error:"), proc.stderr
    return lines[0]


def test_bad_input_gives_one_line_errors(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml")
    out = str(tmp_path / "o")
    assert "nowhere.npz" in _error(["distill", "--data", f"npz:{tmp_path}/nowhere.npz", "--out", out], cache, tmp_path)
    msg = _error(["compare", "--data", "mnist-ish", "--out", out], cache, tmp_path)
    assert "mnist-ish" in msg and "digits" in msg
    msg = _error(["distill", "--config", str(cfg), "--set", "train.epohcs=3", "--out", out], cache, tmp_path)
    assert "train.epohcs" in msg and "epochs" in msg
    msg = _error(["distill", "--config", str(cfg), "--set", "train.optimizer.name=rmsprop", "--out", out], cache,
                 tmp_path)
    assert "rmsprop" in msg and "sgd" in msg and "adamw" in msg
    assert "--methods" in _error(["compare", "--config", str(cfg), "--methods", "kd,magic", "--out", out], cache,
                                 tmp_path)
    assert "no-such.yaml" in _error(["distill", "--config", str(tmp_path / "no-such.yaml"), "--out", out], cache,
                                    tmp_path)
    assert "--out" in _error(["distill", "--config", str(cfg)], cache, tmp_path)


def test_teacher_student_class_mismatch(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    run_cli("distill", "--config", cfg, "--out", tmp_path / "ten", cache=cache)
    teacher = next((cache / "teachers").glob("*/teacher.safetensors"))
    rng = np.random.default_rng(0)  # a 5-class data set of the same 8x8 shape
    np.savez(tmp_path / "five.npz", x_train=rng.random((100, 8, 8)), y_train=np.arange(100) % 5,
             x_test=rng.random((20, 8, 8)), y_test=np.arange(20) % 5)
    msg = _error(["distill", "--config", str(cfg), "--data", f"npz:{tmp_path}/five.npz", "--set",
                  f"teacher.checkpoint={teacher}", "--out", str(tmp_path / "five")], cache, tmp_path)
    assert "teacher" in msg and ("5" in msg and "10" in msg)


def test_existing_output_needs_resume(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    out = tmp_path / "run"
    run_cli("distill", "--config", cfg, "--out", out, cache=cache)
    assert "--resume" in _error(["distill", "--config", str(cfg), "--out", str(out)], cache, tmp_path)
    done = run_cli("distill", "--config", cfg, "--out", out, "--resume", cache=cache)
    assert "at the best validation epoch" in done.stdout


@pytest.mark.skipif(shutil.which("torchrun") is None and not (
        __import__("pathlib").Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_two_process_ddp_matches_one_process(tmp_path, cache):
    """2 CPU processes (gloo) with the same global batch as one process. Each rank computes the mean loss of its
    half of the batch; DDP averages the gradients, which equals the full-batch gradient up to float summation
    order. The MLP student has no batch norm, so the runs differ only by rounding: the first step's loss agrees to
    1e-5 and, after the rounding compounds over two epochs, accuracy within 3 test samples of 360."""
    cfg = write_config(tmp_path / "c.yaml", method={"name": "dts"}, train={"epochs": 2, "batch_size": 64})
    run_cli("train-teacher", "--config", cfg, cache=cache)
    single = tmp_path / "single"
    run_cli("distill", "--config", cfg, "--out", single, cache=cache)
    torchrun = str(__import__("pathlib").Path(sys.executable).parent / "torchrun")
    ddp = tmp_path / "ddp"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "thermokd.cli", "distill",
                           "--config", str(cfg), "--out", str(ddp), "--no-progress"],
                          env=env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads((single / "result.json").read_text()), json.loads((ddp / "result.json").read_text())
    assert abs(a["last_acc"] - b["last_acc"]) <= 3 / 360 + 1e-9
    la = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb)  # rank 0 alone logs
    assert abs(la[0]["loss"] - lb[0]["loss"]) < 1e-5 * max(1.0, abs(la[0]["loss"]))
    assert abs(la[-1]["tau_teacher_mean"] - lb[-1]["tau_teacher_mean"]) < 1e-3  # DTS's T stays in step


def test_sweep_reports_best_tau_and_skips_finished_cells(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "sweep"
    args = ["sweep", "--config", cfg, "--taus", "1,4", "--optimizers", "sgd,adamw", "--budgets", "1",
            "--seeds", "1", "--methods", "cist", "--out", out]
    first = run_cli(*args, cache=cache)
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["cells"]) == 2 * 3  # 2 optimisers x (2 taus + 1 method)
    for group in sweep["groups"].values():
        assert group["best_tau"] in (1.0, 4.0) and "cist" in group["verdicts"]
        kd_best = group["summary"][f"kd@{group['best_tau']:g}"]["val_mean"]  # chosen on validation
        assert kd_best == max(group["summary"][f"kd@{t:g}"]["val_mean"] for t in (1.0, 4.0))
    assert "best KD tau" in first.stdout and "finished earlier" not in first.stdout
    for name in ("sweep.md", "accuracy_vs_tau.png", "heatmap.png"):
        assert (out / name).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}
    again = run_cli(*args, cache=cache)
    assert again.stdout.count("finished earlier") == 6
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("cells/*/result.json")}


def test_sweep_on_an_npz_file_written_by_the_export_script(tmp_path, cache):
    """The digits set exported with benchmarks/export_npz.py loads back identically and sweeps through npz:FILE."""
    from pathlib import Path

    from thermokd.data import load_data

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "export_npz.py"
    npz = tmp_path / "digits.npz"
    subprocess.run([sys.executable, str(script), "--data", "digits", "--out", str(npz)], check=True,
                   capture_output=True, env=env(cache))
    original, exported = load_data("digits"), load_data(f"npz:{npz}")
    assert exported.num_classes == original.num_classes
    assert torch.allclose(exported.train.x.flatten(1), original.train.x.flatten(1), atol=1e-5)
    assert torch.equal(exported.test.y, original.test.y) and torch.equal(exported.val.y, original.val.y)
    cfg = write_config(tmp_path / "c.yaml")
    out = tmp_path / "sweep"
    run_cli("sweep", "--config", cfg, "--data", f"npz:{npz}", "--taus", "2,8", "--optimizers", "sgd",
             "--budgets", "1", "--seeds", "1", "--methods", "dts", "--out", out, cache=cache)
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["data"] == f"npz:{npz}" and len(sweep["cells"]) == 3
    assert all(0.0 < c["best_acc"] <= 1.0 for c in sweep["cells"])


def test_diagnose_and_recommend_commands(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    proc = run_cli("diagnose", "--config", cfg, "--taus", "1,4", "--methods", "cist", "--out", tmp_path / "d",
                    cache=cache)
    assert "ECE" in proc.stdout and (tmp_path / "d" / "diagnose.md").is_file()
    proc = run_cli("recommend", "--config", cfg, "--verify", "--grid", "1,4", "--epochs", "1", "--out",
                    tmp_path / "r", cache=cache)
    assert "proposed tau" in proc.stdout and "grid's best tau" in proc.stdout
    assert json.loads((tmp_path / "r" / "recommend.json").read_text())["verification"]["best_tau"] in (1.0, 4.0)
    assert "unknown method" in _error(["diagnose", "--config", str(cfg), "--methods", "nope", "--out",
                                       str(tmp_path / "x")], cache, tmp_path)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 autocast is available with CUDA")
def test_fp16_without_cuda_is_a_clear_error(tmp_path, cache):
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1, "mixed_precision": "fp16"})
    msg = _error(["distill", "--config", str(cfg), "--out", str(tmp_path / "o")], cache, tmp_path)
    assert "fp16" in msg and "bf16" in msg
