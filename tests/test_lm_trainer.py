"""`thermokd lm` on the Hugging Face Trainer: a run killed with SIGKILL and resumed ends exactly as an
uninterrupted one (perplexity, curves, DTS/CTKD/CIST state); configs with --set; bf16; top-k capture then
distillation without the teacher; two CPU processes under torchrun match one process (slow)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import thermokd as tk
from thermokd.cli import main
from thermokd.lm import load_corpus


TINY = ["--teacher", "1x32x2", "--student", "1x16x2", "--vocab-size", "300", "--context", "32",
        "--teacher-steps", "8", "--max-train-tokens", "2048", "--no-progress"]
SAME = ("val_ppl", "val_acc", "ppl", "acc", "history", "final")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tales.txt"
    path.write_text("\n\n".join(d.text[:2500] for d in load_corpus("grimm-tales")[:8]), encoding="utf-8")
    return path


def lm_args(corpus: Path, tmp: Path, out: str, *extra: str) -> list[str]:
    return ["lm", "--corpus", str(corpus), "--cache", str(tmp / "cache"), "--out", str(tmp / out), *TINY, *extra]


def loss_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "thermokd_loss.safetensors"))


def comparable(run: dict) -> dict:
    out = {k: run[k] for k in SAME}
    out["history"] = [{k: v for k, v in h.items() if k not in ("epoch",)} for h in run["history"]]
    return out


def test_kill_9_then_resume_ends_exactly_as_an_uninterrupted_run(corpus, tmp_path):
    steps = ["--methods", "dts,ctkd,cist", "--seeds", "1", "--steps", "40", "--batch-size", "4",
             "--eval-every", "4", "--set", "train.save_every=4"]
    assert main(lm_args(corpus, tmp_path, "straight", *steps)) == 0  # also trains and caches the teacher
    # the killed run uses this process's thread count: float sums in the logged statistics depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "thermokd.cli", *lm_args(corpus, tmp_path, "killed", *steps)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed" / "runs" / "ctkd" / "seed0"
    deadline = time.time() + 300
    while not (run_dir / "checkpoint-8" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run of the second method: dts finished, ctkd half-way, cist not begun
    proc.wait()
    assert not (run_dir / "result.json").exists()
    assert main(lm_args(corpus, tmp_path, "killed", *steps, "--resume")) == 0
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert [comparable(r) for r in resumed["runs"]] == [comparable(r) for r in straight["runs"]]
    for method in ("dts", "ctkd", "cist"):
        a = loss_state(tmp_path / "straight" / "runs" / method / "seed0")
        b = loss_state(tmp_path / "killed" / "runs" / method / "seed0")
        assert a.keys() == b.keys() and a  # DTS's T, CTKD's θ, CIST's ρ
        for key in a:
            assert torch.equal(a[key], b[key]), (method, key)


def test_a_folder_is_continued_only_with_resume_and_the_same_settings(corpus, tmp_path, capsys):
    steps = ["--methods", "ce", "--seeds", "1", "--steps", "4", "--batch-size", "4", "--eval-every", "4"]
    assert main(lm_args(corpus, tmp_path, "run", *steps)) == 0
    before = (tmp_path / "run" / "results.json").read_bytes()
    capsys.readouterr()
    assert main(lm_args(corpus, tmp_path, "run", *steps)) == 2  # no --resume: refused
    assert "--resume" in capsys.readouterr().err
    assert main(lm_args(corpus, tmp_path, "run", *steps, "--lr", "0.5", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr" in err
    assert (tmp_path / "run" / "results.json").read_bytes() == before  # nothing overwritten
    assert main(lm_args(corpus, tmp_path, "run", *steps, "--resume")) == 0  # same settings: continued


def test_config_file_sets_and_shorthands(tmp_path):
    from thermokd.errors import ConfigError
    from thermokd.lm.config import load_lm_config

    cfg = load_lm_config("grimm", ["train.steps=7", "teacher.source=topk", "methods=[kd, cist]"])
    assert cfg.train.steps == 7 and cfg.teacher.source == "topk" and cfg.methods == ["kd", "cist"]
    assert cfg.data.corpus == "grimm-tales" and cfg.teacher.size == "3x192"
    bench = load_lm_config("bench")
    assert bench.teacher.steps >= 2000
    from thermokd.lm.models import build_lm, count_parameters

    assert count_parameters(build_lm(bench.teacher.size, bench.data.vocab_size, bench.data.context)) >= 4_000_000
    assert bench.tune.methods and set(bench.tune.methods) <= set(bench.methods)  # every tuned label also at its preset
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "lm"
    for shipped in ("presets.yaml", "presets_tune.yaml"):  # the configs the LM docs' tables come from still load
        assert load_lm_config(root / shipped).data.corpus == "grimm-tales"
    for overrides, needle in ((["on_policy.fraction=0.5", "teacher.source=logits"], "needs teacher.source: online"),
                              (["train.batch_size=10", "train.grad_accum=4"], "divisible"),
                              (["methods=[kd, nope]"], "unknown method 'nope'"),
                              (["data.test_fraction=0.95"], "sum < 1"),
                              (["on_policy.top_p=0"], "top_p")):
        with pytest.raises(ConfigError, match=needle):
            load_lm_config(None, overrides)
    with pytest.raises(ConfigError, match="neither a file nor a bundled config"):
        load_lm_config("nope")


def test_build_loss_lm_domain_uses_the_presets():
    from thermokd.methods import LM_PRESETS

    assert tk.build_loss("kd", domain="lm").temperature.tau == LM_PRESETS["kd"]["temperature"]["tau"]
    assert tk.build_loss("kd").temperature.tau == 4.0  # the default domain keeps the paper defaults
    dts = tk.build_loss("dts", domain="lm").temperature
    assert (dts.t_init, dts.t_min, dts.t_max) == (3.0, 1.0, 3.0)
    cist = tk.build_loss("cist", domain="lm").temperature
    assert cist.tau0 == LM_PRESETS["cist"]["temperature"]["tau0"]
    assert cist.student_rule == LM_PRESETS["cist"]["temperature"]["student"]
    assert cist.tau_min == LM_PRESETS["cist"]["temperature"]["tau_min"] == 0.05  # below KD's tuned LM τ
    assert tk.build_loss("cist").temperature.tau_min == 0.5  # the image default is unchanged
    assert tk.build_loss("cist", domain="lm").weighting.mix == 0.0 != tk.build_loss("cist").weighting.mix  # w ≡ 1
    assert tk.build_loss("cist", domain="lm", weighting={"mix": 0.25}).weighting.mix == 0.25  # overrides win
    assert tk.build_loss("kd", domain="lm", temperature={"tau": 3.0}).temperature.tau == 3.0  # overrides win
    with pytest.raises(tk.ThermoKDError, match="domain"):
        tk.build_loss("kd", domain="speech")


def test_bf16_trains_on_cpu(tmp_path):
    from thermokd.lm import build_lm, make_windows
    from thermokd.lm.trainer import RunSettings, train_run

    g = torch.Generator().manual_seed(0)
    w = make_windows([torch.randint(1, 50, (40,), generator=g).tolist() for _ in range(4)], 16, 0)
    result = train_run(build_lm("1x16x2", 50, 16, 0.0, 0), tk.build_loss("cist", domain="lm"), w, w,
                       RunSettings(steps=3, batch_size=4, eval_every=3, save_every=3, mixed_precision="bf16"),
                       tmp_path / "bf16", teacher=build_lm("1x32x2", 50, 16, 0.0, 1))
    assert result["trainer"].args.bf16 and 1.0 < result["val_ppl"] < 1e3 and result["final"]["kd"] >= 0


def test_capture_topk_then_distil_without_the_teacher(corpus, tmp_path, capsys):
    file = tmp_path / "teacher-top16.safetensors"
    assert main(lm_args(corpus, tmp_path, "unused", "--capture-topk", str(file), "--set", "teacher.k=16")) == 0
    assert "top-16" in capsys.readouterr().out and file.is_file()
    # elsewhere: another cache folder (no teacher in it), the same corpus: distil from the file alone
    args = ["lm", "--corpus", str(corpus), "--cache", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "out"),
            *TINY, "--methods", "kd,cist", "--seeds", "1", "--steps", "4", "--batch-size", "4",
            "--set", "teacher.source=topk", "--set", f"teacher.file={file}"]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["teacher"]["file"] == str(file) and "key" not in results["teacher"]
    assert not (tmp_path / "elsewhere" / "lm-teachers").exists()
    assert all(r["final"]["kd"] > 0 for r in results["runs"])
    # a file from another tokenizer (another vocabulary size): one line, exit 2
    bad = [{"300": "320", str(tmp_path / "out"): str(tmp_path / "out-bad")}.get(a, a) for a in args]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thermokd: error:") and "another tokenizer" in err and "\n" not in err


DDP_ARGS = ["--methods", "kd,dts", "--seeds", "1", "--steps", "6", "--batch-size", "8", "--eval-every", "2",
            "--set", "train.save_every=6"]


@pytest.mark.slow
def test_two_processes_match_one_process(corpus, tmp_path):
    """torchrun, 2 CPU processes (gloo) × 4 windows against one process × 8: the same global batches (Accelerate
    shards one seeded order), token-weighted means over both processes (DistillationTrainer), DTS's T from the
    gathered statistics. What differs is the order of float32 sums (all-reduce of gradients, per-process partial
    sums): measured ≤ 5e-7 relative over 6 steps on the logged losses, validation perplexities and DTS's T; rtol
    1e-5 leaves 20× room, while a real difference (another batch, a per-process mean) moves them by 1e-3 or more."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    assert main(lm_args(corpus, tmp_path, "one", *DDP_ARGS)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "thermokd.cli",
                           *lm_args(corpus, tmp_path, "two", *DDP_ARGS)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for a, b in zip(one["runs"], two["runs"]):
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [2, 4, 6]
        for ha, hb in zip(a["history"], b["history"]):
            for key in ("loss", "val_ppl", "kd", "ce", "tau_teacher_mean"):
                assert hb[key] == pytest.approx(ha[key], rel=1e-5), (a["method"], ha["step"], key)
        state_a = loss_state(tmp_path / "one" / "runs" / a["method"] / "seed0")
        state_b = loss_state(tmp_path / "two" / "runs" / b["method"] / "seed0")
        for key in state_a:
            torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=0)


def test_the_shipped_config_runs(tmp_path):
    """`thermokd lm --config grimm` (its teacher read from a logits file) with the sizes cut down."""
    args = ["lm", "--config", "grimm", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *TINY,
            "--methods", "ce,kd", "--seeds", "1", "--steps", "3", "--batch-size", "4", "--eval-every", "3"]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["teacher"]["source"] == "logits" and results["corpus"] == "grimm-tales"
    assert len(list((tmp_path / "cache" / "lm-teachers").glob("*/*.npy"))) == 1
    assert [r["method"] for r in results["runs"]] == ["ce", "kd"]
