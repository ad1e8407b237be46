"""Engine behaviour: exact kill-and-resume, atomic checkpoints, code-free loading, caches."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thermokd import ThermoKDError
from thermokd.engine import checkpoint as ckpt
from thermokd.engine.metrics import read_metrics
from thermokd.files import digest

from engine_helpers import env, run_cli, without_times, write_config


def _run_killed_then_resumed(cfg: Path, out: Path, cache: Path) -> None:
    """Start a run, SIGKILL it as soon as its first checkpoint exists, then --resume it to the end."""
    cmd = [sys.executable, "-m", "thermokd.cli", "distill", "--config", str(cfg), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    killed_at = json.loads(latest.read_text())["name"]
    run_cli("distill", "--config", cfg, "--out", out, "--resume", cache=cache)
    return killed_at


@pytest.mark.parametrize("method", ["cist", "dts", "ctkd"])
def test_killed_run_resumes_to_the_same_result(tmp_path, method):
    cache = tmp_path / "cache"
    # many short epochs with mid-epoch checkpoints, so the kill lands inside an epoch
    cfg = write_config(tmp_path / "c.yaml", method={"name": method},
                       train={"epochs": 12, "checkpoint_every": 5, "batch_size": 32})
    run_cli("train-teacher", "--config", cfg, cache=cache)
    run_cli("distill", "--config", cfg, "--out", tmp_path / "straight", cache=cache)
    killed_at = _run_killed_then_resumed(cfg, tmp_path / "resumed", cache)
    a, b = tmp_path / "straight", tmp_path / "resumed"
    wa, wb = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ at {k} after resuming from {killed_at}"
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert without_times(ra["history"]) == without_times(rb["history"])
    assert ra["best_acc"] == rb["best_acc"] and ra["last_acc"] == rb["last_acc"] and ra["final"] == rb["final"]
    assert without_times(read_metrics(a / "metrics.jsonl")) == without_times(read_metrics(b / "metrics.jsonl"))
    # the strategy's own state ended identical too (DTS's T, CTKD's θ, CIST's ρ)
    sa = ckpt.load_latest(a / "checkpoints").tensors
    sb = ckpt.load_latest(b / "checkpoints").tensors
    loss_keys = [k for k in sa if k.startswith("model.loss_fn.")]
    assert loss_keys, "the strategy state is part of the checkpoint"
    for k in loss_keys:
        assert torch.equal(sa[k], sb[k])


def _save(root: Path, name: str, value: float) -> None:
    ckpt.save_checkpoint(root, name, {"w": torch.full((3,), value)}, {"state": {}, "param_groups": []},
                         {"step": value})


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    _save(root, "step-1", 1.0)

    def crash(*args, **kwargs):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        _save(root, "step-2", 2.0)
    latest = ckpt.load_latest(root)
    assert latest.state == {"step": 1.0} and torch.equal(latest.tensors["w"], torch.full((3,), 1.0))
    monkeypatch.undo()
    _save(root, "step-3", 3.0)  # the leftover temporary folder does not get in the way
    assert ckpt.load_latest(root).state == {"step": 3.0}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-3"]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_exploit(folder: Path, marker: Path) -> None:
    """Replace optimizer.pt by a code-running pickle and re-sign the manifest, as an attacker who knows the
    format would: the checksum then passes and only the code-free loader stands in the way."""
    with open(folder / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Exploit(marker)}, f)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = digest((folder / "optimizer.pt").read_bytes())
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the attacker's pickle, expected
def test_tampered_checkpoint_is_refused_not_executed(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, "step-1", 1.0)
    marker = tmp_path / "pwned"
    _plant_exploit(root / "step-1", marker)
    with pytest.raises(ThermoKDError, match="refusing to load checkpoint") as info:
        ckpt.load_latest(root)
    assert not marker.exists() and "weights_only" not in str(info.value)


def test_tampered_checkpoint_through_the_cli(tmp_path):
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    out = tmp_path / "run"
    run_cli("distill", "--config", cfg, "--out", out, cache=cache)
    (out / "result.json").unlink()  # pretend it never finished
    name = json.loads((out / "checkpoints" / "latest.json").read_text())["name"]
    marker = tmp_path / "pwned"
    _plant_exploit(out / "checkpoints" / name, marker)
    proc = run_cli("distill", "--config", cfg, "--out", out, "--resume", cache=cache, check=False)
    assert proc.returncode == 2 and "refusing to load checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()


def test_teacher_is_trained_once_and_reused(tmp_path):
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 1})
    first = run_cli("train-teacher", "--config", cfg, cache=cache)
    teachers = list((cache / "teachers").iterdir())
    assert len(teachers) == 1 and (teachers[0] / "teacher.safetensors").is_file()
    stamp = (teachers[0] / "teacher.safetensors").stat().st_mtime_ns
    second = run_cli("train-teacher", "--config", cfg, cache=cache)
    assert (teachers[0] / "teacher.safetensors").stat().st_mtime_ns == stamp
    assert first.stdout.split("test accuracy")[1].split(";")[0] == second.stdout.split("test accuracy")[1].split(";")[0]
    # a different teacher config gets its own entry
    run_cli("train-teacher", "--config", cfg, "--set", "teacher.epochs=1", cache=cache)
    assert len(list((cache / "teachers").iterdir())) == 2


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum=2 over micro-batches of 32 equals one batch of 64: the same mean gradient, up to float
    summation order (the MLP student has no batch norm, and KD's weights are all 1)."""
    cache = tmp_path / "cache"
    runs = {}
    for accum in (1, 2):
        cfg = write_config(tmp_path / f"c{accum}.yaml", train={"epochs": 1, "grad_accum": accum, "batch_size": 64})
        run_cli("distill", "--config", cfg, "--out", tmp_path / f"a{accum}", cache=cache)
        runs[accum] = load_file(str(tmp_path / f"a{accum}" / "student.safetensors"))
        runs[f"m{accum}"] = read_metrics(tmp_path / f"a{accum}" / "metrics.jsonl")
    for k in runs[1]:
        torch.testing.assert_close(runs[1][k], runs[2][k], rtol=1e-4, atol=1e-5)
    first = [r for r in runs["m1"] if r["type"] == "step"][0], [r for r in runs["m2"] if r["type"] == "step"][0]
    assert abs(first[0]["loss"] - first[1]["loss"]) < 1e-5


def test_bf16_mixed_precision_runs_on_the_cpu(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", method={"name": "cist"}, train={"epochs": 1, "mixed_precision": "bf16"})
    run_cli("distill", "--config", cfg, "--out", tmp_path / "bf16", cache=tmp_path / "cache")
    result = json.loads((tmp_path / "bf16" / "result.json").read_text())
    assert 0.0 <= result["last_acc"] <= 1.0
    assert all(v == v for v in result["final"].values())  # no NaN statistics


def test_the_run_loss_ignores_no_class_label_unless_told():
    """Class labels are never ignored, so the engine's loss selects no rows (on a GPU, finding ignored rows would
    be a host-device sync every step); a loss section that names an ignore_index keeps it."""
    import thermokd
    from thermokd.config import load_config
    from thermokd.engine.run import method_loss

    digits = Path(thermokd.__file__).parent / "configs" / "digits.yaml"
    assert method_loss(load_config(digits, ["method.name=cist"])).ignore_index is None
    assert method_loss(load_config(digits, ["method.name=kd", "method.loss.ignore_index=-1"])).ignore_index == -1
