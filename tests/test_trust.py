"""Runs you can trust: content-keyed caches, resume and reuse that check what they continue, checksums, one writer
per folder, and an adversarial table of bad inputs that each end in one line on stderr, exit 2, nothing changed."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from thermokd import ThermoKDError
from thermokd.cli import main
from thermokd.files import LOCK_NAME, FolderLock, in_use, load_tensors, save_tensors

from engine_helpers import write_config

NO_PROGRESS = "--no-progress"


def _cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished one-epoch KD run, a finished compare (ce, kd; one seed) and the cache with their teacher."""
    root = tmp_path_factory.mktemp("trust")
    cfg = write_config(root / "c.yaml", train={"epochs": 1})
    cache = root / "cache"
    assert _cli("distill", "--config", cfg, "--out", root / "run", "--cache", cache, NO_PROGRESS) == 0
    assert _cli("compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "1", "--out", root / "cmp",
                "--cache", cache, NO_PROGRESS) == 0
    return root, cfg, cache


@pytest.fixture
def world(base, tmp_path):
    """Private copies of the base run, compare folder and cache, so a test may damage them."""
    root, cfg, cache = base
    for name in ("run", "cmp", "cache"):
        shutil.copytree(root / name, tmp_path / name)
    return tmp_path, cfg


def _snapshot(*folders: Path) -> dict[str, bytes]:
    """Every file's bytes (the lock file aside: taking the lock records its holder there)."""
    out = {}
    for folder in folders:
        if folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file() and f.name != LOCK_NAME:
                    out[str(f)] = f.read_bytes()
        elif folder.is_file():
            out[str(folder)] = folder.read_bytes()
    return out


def _npz(path: Path, y_train=None, seed: int = 0) -> Path:
    g = np.random.default_rng(seed)
    y = np.arange(120) % 4 if y_train is None else np.asarray(y_train)
    np.savez(path, x_train=g.normal(size=(len(y), 6)).astype(np.float32) + y[:, None], y_train=y,
             x_test=g.normal(size=(40, 6)).astype(np.float32), y_test=np.arange(40) % 4)
    return path


def _unfinished(run: Path) -> Path:
    (run / "result.json").unlink()
    return run


def _checkpoint(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["name"]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _one(path: Path, pattern: str) -> Path:
    (found,) = path.glob(pattern)
    return found


# Each row: how to set it up (returns the argv and the folders that must stay as they were) and a piece of the
# one-line error it must end in.
def _row_out_is_file(t, cfg):
    (t / "file").write_text("x")
    return ["distill", "--config", cfg, "--out", t / "file"], [t / "file"]


def _row_out_under_file(t, cfg):
    (t / "file").write_text("x")
    return ["distill", "--config", cfg, "--out", t / "file" / "sub"], [t / "file"]


def _row_cache_is_file(t, cfg):
    (t / "cfile").write_text("x")
    return ["distill", "--config", cfg, "--out", t / "new", "--cache", t / "cfile"], [t / "cfile"]


def _row_npy_as_npz(t, cfg):
    np.save(t / "x.npy", np.zeros((4, 3)))
    return ["distill", "--config", cfg, "--data", f"npz:{t / 'x.npy'}", "--out", t / "new"], [t / "x.npy"]


def _row_label_huge(t, cfg):
    y = np.arange(120) % 4
    y[7] = 10 ** 8
    return ["distill", "--config", cfg, "--data", f"npz:{_npz(t / 'd.npz', y)}", "--out", t / "new"], []


def _row_label_255(t, cfg):
    y = np.arange(120) % 4
    y[3] = 255
    return ["distill", "--config", cfg, "--data", f"npz:{_npz(t / 'd.npz', y)}", "--out", t / "new"], []


def _set(*pairs):
    def row(t, cfg):
        args = ["distill", "--config", cfg, "--out", t / "new"]
        for p in pairs:
            args += ["--set", p]
        return args, []
    return row


def _row_bad_yaml(t, cfg):
    (t / "bad.yaml").write_text("data: [unclosed\ntrain:\n  epochs: 2\n")
    return ["distill", "--config", t / "bad.yaml", "--out", t / "new"], []


def _row_empty(flag, command="distill"):
    def row(t, cfg):
        args = [command, "--config", cfg, "--out", t / "new", flag, ""]
        return (args if flag != "--out" else [command, "--config", cfg, "--out", ""]), []
    return row


def _row_resume_changed(t, cfg):
    run = _unfinished(t / "run")
    return ["distill", "--config", cfg, "--out", run, "--resume", "--set", "train.optimizer.lr=0.1",
            "--cache", t / "cache"], [run]


def _row_reuse_changed(t, cfg):
    return ["distill", "--config", cfg, "--out", t / "run", "--resume", "--epochs", "3", "--cache", t / "cache"], \
        [t / "run"]


def _row_legacy_teacher(t, cfg):
    """A run finished before identities were recorded, with a teacher of the old (path-keyed, unseeded) cache."""
    result = json.loads((t / "run" / "result.json").read_text())
    del result["identity"]
    result["teacher"]["key"] = "0ld0ld0ld0ld0ld0"
    (t / "run" / "result.json").write_text(json.dumps(result))
    return ["distill", "--config", cfg, "--out", t / "run", "--resume", "--cache", t / "cache"], [t / "run"]


def _row_compare_changed(t, cfg):
    return ["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "1", "--epochs", "2", "--out", t / "cmp",
            "--cache", t / "cache"], [t / "cmp"]


def _damage(what):
    def row(t, cfg):
        run = _unfinished(t / "run")
        ckpt = _checkpoint(run)
        if what == "truncated weights":
            _truncate(ckpt / "weights.safetensors")
        elif what == "flipped weights":
            _flip_last_byte(ckpt / "weights.safetensors")
        elif what == "edited state":
            state = json.loads((ckpt / "state.json").read_text())
            state["global_step"] += 1
            (ckpt / "state.json").write_text(json.dumps(state))
        elif what == "garbage latest":
            (run / "checkpoints" / "latest.json").write_bytes(b"\x00\xff{")
        elif what == "absolute latest":
            shutil.copytree(run, t / "other")
            (run / "checkpoints" / "latest.json").write_text(json.dumps({"name": str(_checkpoint(t / "other"))}))
        return ["distill", "--config", cfg, "--out", run, "--resume", "--cache", t / "cache"], [run, t / "other"]
    return row


def _damage_cache(pattern, how):
    def row(t, cfg):
        how(_one(t / "cache", pattern))
        return ["distill", "--config", cfg, "--out", t / "new", "--cache", t / "cache"], [t / "cache"]
    return row


TABLE = [
    ("out is a file", _row_out_is_file, "is a file"),
    ("out under a file", _row_out_under_file, "a file is in the way"),
    ("cache is a file", _row_cache_is_file, "cfile"),
    (".npy given as npz:", _row_npy_as_npz, "single .npy array"),
    ("label 10**8", _row_label_huge, "never occur"),
    ("label 255 in 4 classes", _row_label_255, "never occur"),
    ("adamw betas [2, 0.5]", _set("train.optimizer.name=adamw", "train.optimizer.betas=[2, 0.5]"), "betas"),
    ("hidden [-5]", _set("student.model_args.hidden=[-5]"), "bad model_args"),
    ("hidden 'big'", _set("student.model_args.hidden=big"), "bad model_args"),
    ("teacher of 1e9 units", _set("teacher.model_args.hidden=[1000000000]"), "parameters"),
    ("YAML syntax error", _row_bad_yaml, "not valid YAML"),
    ("lr .inf", _set("train.optimizer.lr=.inf"), "train.optimizer.lr"),
    ("weight_decay .nan", _set("train.optimizer.weight_decay=.nan"), "weight_decay"),
    ("negative gamma", _set("train.schedule.name=step", "train.schedule.milestones=[1]",
                            "train.schedule.gamma=-0.5"), "gamma"),
    ("tau inf", _set("method.temperature.tau=.inf"), "tau"),
    ("tau 1e20", _set("method.temperature.tau=1e20"), "square"),
    ("ce_weight nan", _set("method.loss.ce_weight=.nan"), "ce_weight"),
    ("kd@inf", lambda t, cfg: (["compare", "--config", cfg, "--methods", "kd@inf", "--out", t / "new"], []), "kd@inf"),
    ("--out ''", _row_empty("--out"), "--out"),
    ("--data ''", _row_empty("--data"), "--data"),
    ("--methods ''", _row_empty("--methods", "compare"), "--methods"),
    ("resume with another lr", _row_resume_changed, "train.optimizer.lr: 0.05 -> 0.1"),
    ("reuse with other epochs", _row_reuse_changed, "cannot reuse"),
    ("compare with other epochs", _row_compare_changed, "train.epochs: 1 -> 2"),
    ("old run with an old teacher", _row_legacy_teacher, "teacher key: 0ld0ld0ld0ld0ld0 ->"),
    ("truncated checkpoint weights", _damage("truncated weights"), "checksum"),
    ("flipped bytes in checkpoint weights", _damage("flipped weights"), "checksum"),
    ("hand-edited state.json", _damage("edited state"), "checksum"),
    ("damaged latest.json", _damage("garbage latest"), "not valid JSON"),
    ("absolute path in latest.json", _damage("absolute latest"), "not a checkpoint folder inside"),
    ("truncated teacher-logit cache", _damage_cache("teachers/*/logits-*.safetensors", _truncate), "cache entry"),
    ("flipped teacher weights", _damage_cache("teachers/*/teacher.safetensors", _flip_last_byte), "checksum"),
]


@pytest.mark.parametrize("row", TABLE, ids=[r[0] for r in TABLE])
def test_adversarial_input_is_one_line_exit_2_nothing_overwritten(world, capsys, row):
    t, cfg = world
    _, setup, expected = row
    argv, watched = setup(t, cfg)
    before = _snapshot(*watched, t / "new")
    code = _cli(*argv, NO_PROGRESS)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("thermokd: error:") and "Traceback" not in err
    assert expected in err
    assert _snapshot(*watched, t / "new") == before


def test_second_writer_is_refused_and_told_the_holder(world, capsys):
    t, cfg = world
    out = t / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from thermokd.files import FolderLock\n"
        f"with FolderLock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = _cli("distill", "--config", cfg, "--out", out, "--cache", t / "cache", NO_PROGRESS)
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and "in use by another thermokd process" in err
        assert not (out / "result.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (even by kill -9): the OS released the lock and the folder is usable
    with FolderLock(out):
        pass


def test_changed_data_at_the_same_path_gets_a_new_teacher(tmp_path):
    from thermokd.config import load_config
    from thermokd.engine.run import train_teacher

    data = _npz(tmp_path / "d.npz", seed=0)
    cfg = load_config(write_config(tmp_path / "c.yaml"), [f'data.name="npz:{data}"'])
    first = train_teacher(cfg, tmp_path / "cache", progress_bar=False)
    _npz(data, seed=1)  # same path, other bytes
    second = train_teacher(cfg, tmp_path / "cache", progress_bar=False)
    assert first["key"] != second["key"] and second["source"] == "trained"
    assert train_teacher(cfg, tmp_path / "cache", progress_bar=False)["source"] == "cache"


def test_two_caches_hold_identical_teachers(tmp_path):
    from thermokd.config import load_config
    from thermokd.engine.run import train_teacher

    cfg = load_config(write_config(tmp_path / "c.yaml"), ["teacher.epochs=1"])
    a = train_teacher(cfg, tmp_path / "a", progress_bar=False)
    torch.rand(5)  # whatever the caller's random state, the teacher's initialisation is its own
    b = train_teacher(cfg, tmp_path / "b", progress_bar=False)
    wa = load_tensors(Path(a["dir"]) / "teacher.safetensors")[0]
    wb = load_tensors(Path(b["dir"]) / "teacher.safetensors")[0]
    assert a["key"] == b["key"] and wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_compare_with_changed_epochs_reruns_with_the_flag_and_says_what_it_reused(world, capsys):
    t, cfg = world
    args = ["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "1", "--out", t / "cmp", "--cache",
            t / "cache", NO_PROGRESS]
    assert _cli(*args) == 0
    out = capsys.readouterr().out
    assert "teacher mlp from the cache" in out and out.count("(reused") == 2
    assert _cli(*args, "--epochs", "2", "--rerun-changed") == 0
    assert "(reused" not in capsys.readouterr().out
    results = json.loads((t / "cmp" / "results.json").read_text())
    assert results["epochs"] == 2 and all(len(r["history"]) == 2 for r in results["runs"])


def test_a_compare_refuses_a_teacher_rebuilt_otherwise_under_the_same_key(world, capsys):
    """A teacher trained again on another machine keeps its cache key but may score otherwise: the folder's studies
    and runs belong to the old one, so continuing is refused; the same accuracy with other logits is only said."""
    t, cfg = world
    args = ["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "1", "--out", t / "cmp", "--cache",
            t / "cache", NO_PROGRESS]
    results = t / "cmp" / "results.json"
    assert _cli(*args) == 0  # the folder's own teacher: reused as it is
    recorded = json.loads(results.read_text())
    assert len(recorded["teacher"]["fingerprint"]) == 32 and "note: the teacher" not in capsys.readouterr().out
    trained_on = recorded["teacher"]["trained_on"]  # what its cache entry recorded when it was trained
    assert trained_on["device"] == "cpu" and trained_on["threads"] >= 1
    elsewhere = {**recorded, "teacher": {**recorded["teacher"], "test_acc": recorded["teacher"]["test_acc"] - 0.0037,
                                         "fingerprint": "0" * 32}}
    results.write_text(json.dumps(elsewhere))
    before = _snapshot(t / "cmp")
    assert _cli(*args) != 0
    assert re.search(r"another teacher under the same key \w+: test accuracy [\d.]+ % there \(trained on cpu with "
                     r"\d+ thread\(s\)\), [\d.]+ % now \(trained on cpu", capsys.readouterr().err)
    assert _snapshot(t / "cmp") == before  # nothing was run or written
    results.write_text(json.dumps({**recorded, "teacher": {**recorded["teacher"], "fingerprint": "0" * 32}}))
    assert _cli(*args) == 0
    assert "gives other test logits" in capsys.readouterr().out
    old_format = {**recorded, "teacher": {k: v for k, v in recorded["teacher"].items() if k != "fingerprint"}}
    results.write_text(json.dumps(old_format))  # written before fingerprints: the accuracy alone is compared
    assert _cli(*args) == 0 and "gives other test logits" not in capsys.readouterr().out


def test_resume_of_a_killed_run_with_the_same_config_continues(world, capsys):
    t, cfg = world
    run = _unfinished(t / "run")
    config_before = (run / "config.json").read_bytes()
    assert _cli("distill", "--config", cfg, "--out", run, "--resume", "--cache", t / "cache", NO_PROGRESS) == 0
    assert "from the cache" in capsys.readouterr().out
    assert (run / "result.json").is_file() and (run / "config.json").read_bytes() == config_before
    assert "report.md" in os.listdir(run)


def test_a_run_killed_before_its_first_checkpoint_does_not_block_its_folder(world, capsys):
    t, cfg = world
    early = t / "cmp" / "runs" / "kd-seed1"
    early.mkdir()
    # the same run, killed after writing its config.json and before any checkpoint (no loss recorded yet)
    (early / "config.json").write_text((t / "cmp" / "runs" / "kd-seed0" / "config.json").read_text())
    assert _cli("compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "2", "--out", t / "cmp", "--cache",
                t / "cache", NO_PROGRESS) == 0
    assert (early / "result.json").is_file()


def test_version_and_bare_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("thermokd ")
    assert main([]) == 0
    assert "usage: thermokd" in capsys.readouterr().out


def test_report_recognises_each_kind_of_folder(world, tmp_path, capsys):
    t, _ = world
    assert _cli("report", t / "run") == 0
    assert "written by `thermokd distill`" in capsys.readouterr().out
    assert (t / "run" / "report.md").read_text().startswith("# thermokd distill")
    assert _cli("report", t / "cmp") == 0 and "`thermokd compare`" in capsys.readouterr().out
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "results.json").write_text(json.dumps({"corpus": "grimm-tales", "runs": []}))
    (lm / "report.md").write_text("the LM report")
    code = _cli("report", lm)
    captured = capsys.readouterr()
    # an lm folder gets the lm report, or (results too thin to rebuild it) one line, never a compare report
    assert (code == 0 and "`thermokd lm`" in captured.out) or \
        (code == 2 and len(captured.err.strip().splitlines()) == 1
         and (lm / "report.md").read_text() == "the LM report")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("report", empty) == 2 and "cannot tell what wrote" in capsys.readouterr().err


def test_strategy_tau_of_the_wrong_shape_and_float_labels_are_clear_errors():
    import thermokd as tk
    from thermokd.temperature.base import Temperatures

    class Broken(tk.temperature.Fixed):
        def forward(self, rows):
            return Temperatures(teacher=torch.ones(3), student=torch.ones(3))

    s, t = torch.randn(8, 5), torch.randn(8, 5)
    with pytest.raises(ThermoKDError, match=r"shape \(3,\) for 8 rows"):
        tk.DistillationLoss(Broken())(s, t, torch.arange(8) % 5)
    with pytest.raises(ThermoKDError, match="integer class ids"):
        tk.DistillationLoss(4.0)(s, t, (torch.arange(8) % 5).float() + 0.7)


def test_one_class_data_warns():
    from thermokd.data import make_bundle

    with pytest.warns(UserWarning, match="one class"):
        make_bundle("one", np.zeros((10, 3)), np.zeros(10), np.zeros((4, 3)), np.zeros(4))


def test_hf_loss_state_damage_is_one_line(tmp_path):
    import thermokd as tk
    from thermokd.integrations.hf import load_loss_state, save_loss_state

    loss = tk.DistillationLoss("dts")
    path = Path(save_loss_state(loss, str(tmp_path)))
    load_loss_state(loss, str(tmp_path))
    _flip_last_byte(path)
    with pytest.raises(ThermoKDError, match="checksum"):
        load_loss_state(loss, str(tmp_path))


def test_cache_entry_made_for_another_key_is_refused(tmp_path):
    from thermokd.files import cached_tensors

    save_tensors(tmp_path / "e.safetensors", {"a": torch.ones(2)}, key="k1")
    assert torch.equal(cached_tensors(tmp_path / "e.safetensors", "k1")[0]["a"], torch.ones(2))
    assert cached_tensors(tmp_path / "absent.safetensors", "k1") is None
    with pytest.raises(ThermoKDError, match="made for another input"):
        cached_tensors(tmp_path / "e.safetensors", "k2")


# -- random bytes and random YAML: every loader and the config parser succeed or raise ThermoKDError --------------
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_SCALARS = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=12)
_YAML_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                            | st.dictionaries(st.text(max_size=10) | st.integers(), inner, max_size=4), max_leaves=12)
_SECTIONS = st.sampled_from(["data", "teacher", "student", "method", "train", "compare", "optimizer", "epochs"])
_CONFIGS = st.dictionaries(_SECTIONS, _YAML_VALUES | st.dictionaries(
    st.sampled_from(["name", "epochs", "lr", "betas", "gamma", "model_args", "temperature", "loss", "optimizer",
                     "schedule", "milestones", "seed", "batch_size", "methods", "variants"]), _YAML_VALUES,
    max_size=4), max_size=4)


def _succeeds_or_thermokd_error(fn, *args) -> None:
    try:
        fn(*args)
    except ThermoKDError:
        pass


@_FAST
@given(data=st.binary(max_size=300))
def test_random_bytes_never_escape_the_loaders(tmp_path, data):
    from thermokd.config import load_config
    from thermokd.data import npz_file, read_idx
    from thermokd.engine.checkpoint import load_checkpoint, load_latest
    from thermokd.files import read_json

    f = tmp_path / "f"
    f.write_bytes(data)
    for loader in (load_tensors, read_json, npz_file, read_idx, load_config):
        _succeeds_or_thermokd_error(loader, f)
    # a checkpoint folder whose every file (and pointer) is those bytes
    root = tmp_path / "checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    (root / "c").mkdir(parents=True)
    for name in ("weights.safetensors", "optimizer.pt", "state.json", "manifest.json"):
        (root / "c" / name).write_bytes(data)
    (root / "latest.json").write_bytes(data)
    _succeeds_or_thermokd_error(load_checkpoint, root / "c")
    _succeeds_or_thermokd_error(load_latest, root)


@_FAST
@given(raw=_CONFIGS, text=st.text(max_size=40))
def test_random_yaml_never_escapes_the_config_parser(tmp_path, raw, text):
    from thermokd.config import apply_overrides, config_from_dict, load_config

    try:
        document = yaml.safe_dump(raw)
    except yaml.YAMLError:
        return
    (tmp_path / "c.yaml").write_text(document)
    _succeeds_or_thermokd_error(load_config, tmp_path / "c.yaml")
    _succeeds_or_thermokd_error(config_from_dict, yaml.safe_load(document) or {})
    (tmp_path / "t.yaml").write_text(text)
    _succeeds_or_thermokd_error(load_config, tmp_path / "t.yaml")
    _succeeds_or_thermokd_error(load_config, None, [text])
    _succeeds_or_thermokd_error(apply_overrides, {}, [f"train.epochs={text}", text])


def _valid_files(folder: Path) -> dict[str, bytes]:
    save_tensors(folder / "v.safetensors",
                 {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)})
    _npz(folder / "v.npz")
    return {"safetensors": (folder / "v.safetensors").read_bytes(), "npz": (folder / "v.npz").read_bytes()}


@_FAST
@given(kind=st.sampled_from(["safetensors", "npz"]), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                     min_size=1, max_size=4), cut=st.floats(0, 1))
# a NUL byte in an .npy header: numpy's fallback header parser raised tokenize.TokenError, which escaped
@example(kind="npz", edits=[(0.014563909533336087, 0)], cut=1.0)
def test_damaged_valid_files_never_escape_the_loaders(tmp_path, kind, edits, cut):
    """Valid files with bytes overwritten and the tail cut: deeper than random bytes get (headers parse)."""
    from thermokd.data import npz_file

    data = bytearray(_valid_files(tmp_path)[kind])
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    f = tmp_path / f"d.{kind}"
    f.write_bytes(bytes(data[: max(1, int(cut * len(data)))] if cut < 0.5 else data))
    _succeeds_or_thermokd_error(load_tensors if kind == "safetensors" else npz_file, f)


def test_identity_compares_data_by_content_not_path():
    from thermokd.engine.identity import differences

    def ident(name, data, lr=0.05):
        return {"config": {"data": {"name": name}, "train": {"optimizer": {"lr": lr}, "checkpoint_every": 3}},
                "teacher_key": "k", "data": data}

    assert differences(ident("npz:/a.npz", "d1"), ident("npz:/moved/a.npz", "d1")) == []
    assert differences(ident("npz:/a.npz", "d1"), ident("npz:/a.npz", "d2")) == ["data content: digest d1 -> d2"]
    assert differences(ident("npz:/a.npz", None), ident("npz:/b.npz", "d1")) == \
        ["data.name: 'npz:/a.npz' -> 'npz:/b.npz'"]
    assert differences(ident("x", "d", 0.05), ident("x", "d", 0.1)) == ["train.optimizer.lr: 0.05 -> 0.1"]


def test_a_field_added_after_a_run_was_made_is_the_same_run_at_its_default():
    from thermokd.config import RunConfig
    from thermokd.engine.identity import differences

    now = {"config": RunConfig().to_dict(), "teacher_key": "k", "data": "d"}
    before = {**now, "config": {**now["config"], "data": dict(now["config"]["data"])}}
    del before["config"]["data"]["mask_rate"]  # a run recorded before data.mask_rate existed
    assert differences(before, now) == []
    changed = {**now, "config": {**now["config"], "data": {**now["config"]["data"], "mask_rate": 0.3}}}
    assert differences(before, changed) == ["data.mask_rate: '(absent)' -> 0.3"]
    assert differences(now, changed) == ["data.mask_rate: 0.15 -> 0.3"]


def hold_lock(folder: Path, seconds: float = 1.5, plan: "dict | None" = None) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock for ``seconds`` (returned once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from thermokd.files import FolderLock\n"
        f"with FolderLock({str(folder)!r}, plan={plan!r}):\n    print('held', flush=True); time.sleep({seconds})")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def hold_lock_until(folder: Path, done: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until the file ``done`` exists (returned once it holds it)."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, time; from thermokd.files import FolderLock\n"
        f"with FolderLock({str(folder)!r}):\n    print('held', flush=True)\n    deadline = time.time() + 300\n"
        f"    while not os.path.exists({str(done)!r}) and time.time() < deadline: time.sleep(0.05)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_waiting_lock_takes_over_when_the_holder_leaves(tmp_path):
    """The teacher cache's lock waits (and says so) instead of failing; a process re-enters a lock it holds."""
    holder = hold_lock(tmp_path)
    said: list[str] = []
    started = time.monotonic()
    with FolderLock(tmp_path, wait=True, echo=said.append):
        assert time.monotonic() - started > 0.5 and said and said[0].startswith("waiting for")
        with FolderLock(tmp_path):  # re-entered by its holder, not refused
            pass
    holder.wait()


def test_compare_waits_for_a_run_another_process_is_making(world, capsys):
    t, cfg = world
    folder = t / "cmp" / "runs" / "kd-seed1"
    holder = hold_lock(folder, seconds=2.0)  # e.g. `thermokd distill` making seed 1 while compare does the rest
    assert _cli("compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "2", "--out", t / "cmp", "--cache",
                t / "cache", NO_PROGRESS) == 0
    holder.wait()
    out = capsys.readouterr().out
    assert f"waiting for {folder.resolve()}, in use by pid {holder.pid}" in out
    assert (folder / "result.json").is_file()


def test_compare_makes_the_free_runs_before_waiting_for_one_in_use(world, capsys):
    """A run folder another process holds goes to the back of compare's queue: compare makes the free runs first,
    and waits only when nothing else is left."""
    t, cfg = world
    folder, last = t / "split" / "runs" / "kd-seed0", t / "split" / "runs" / "kd-seed1" / "result.json"
    holder = hold_lock_until(folder, last)  # holds kd seed 0 until compare has made kd seed 1
    assert in_use(folder) and not in_use(t / "split" / "runs" / "ce-seed0")
    assert _cli("compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "2", "--out", t / "split", "--cache",
                t / "cache", NO_PROGRESS) == 0
    holder.wait()
    assert not in_use(folder)
    out = capsys.readouterr().out
    made = [line.split()[0:3] for line in out.splitlines() if " seed " in line and "test " in line]
    assert made == [["ce", "seed", "0:"], ["ce", "seed", "1:"], ["kd", "seed", "1:"], ["kd", "seed", "0:"]]
    results = json.loads((t / "split" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("ce", 0), ("kd", 0), ("ce", 1), ("kd", 1)]


def test_a_helper_compare_makes_runs_from_the_far_end_and_the_main_one_reuses_them(world, capsys):
    """`compare --helper` makes the runs last seed and method first, leaves out one another process holds, and
    writes no results; the main compare then makes only that one and reports all four."""
    t, cfg = world
    folder, first = t / "split" / "runs" / "kd-seed1", t / "split" / "runs" / "ce-seed0" / "result.json"
    holder = hold_lock_until(folder, first)  # holds kd seed 1 until the helper has made ce seed 0
    args = ["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "2", "--out", t / "split", "--cache",
            t / "cache", NO_PROGRESS]
    assert _cli(*args, "--helper") == 0
    holder.wait()
    out = capsys.readouterr().out
    made = [line.split()[0:3] for line in out.splitlines() if "(helper)" in line]
    assert made == [["ce", "seed", "1:"], ["kd", "seed", "0:"], ["ce", "seed", "0:"]]
    assert "helper: made 3 of 4 runs" in out and not (t / "split" / "results.json").exists()
    assert not (folder / "result.json").exists()
    assert _cli(*args) == 0
    out = capsys.readouterr().out
    assert out.count("(reused ") == 3 and (folder / "result.json").is_file()
    results = json.loads((t / "split" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("ce", 0), ("kd", 0), ("ce", 1), ("kd", 1)]


def test_a_helper_that_differs_from_the_running_compare_is_refused(world, capsys):
    """A helper started with other seeds, methods or tuning budget than the compare running in its --out folder
    (which records them in its lock) stops with one line before it does anything."""
    t, cfg = world
    out = t / "planned"
    holder = hold_lock(out, seconds=60, plan={"methods": ["ce", "kd"], "seeds": [0, 1, 2], "tune_trials": 4})
    try:
        args = ["compare", "--config", cfg, "--methods", "ce,kd", "--out", out, "--cache", t / "cache", NO_PROGRESS,
                "--helper"]
        assert _cli(*args, "--seeds", "3", "--tune", "5") == 2
        err = capsys.readouterr().err
        assert f"the compare running in {out} differs from this helper: tuning budget (trials) 4 there, 5 here" in err
        assert "--helper added" in err and not (out / "runs").exists() and not (out / "tune").exists()
        assert _cli(*args, "--seeds", "4", "--tune", "4") == 2
        assert "seeds [0, 1, 2] there, [0, 1, 2, 3] here" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    from thermokd.experiments.compare import check_helper_plan
    from thermokd.files import holder_plan

    assert holder_plan(out) is None  # nobody holds it now: a helper may start first, and says it is unchecked
    said: list = []
    check_helper_plan(out, {"methods": ["x"], "seeds": [9], "tune_trials": 5}, said.append)
    assert said == [f"helper: no compare is running in {out} yet, so this helper cannot be checked against one; "
                    "start the compare with the same command (without --helper)"]


@pytest.mark.parametrize("command", ["sweep", "recommend"])
def test_sweep_and_recommend_wait_for_a_run_another_process_is_making(world, capsys, command):
    t, cfg = world
    if command == "sweep":
        folder = t / "sweep" / "cells" / "sgd-e1-kd@2-seed0"
        args = ["--taus", "2", "--optimizers", "sgd", "--budgets", "1", "--seeds", "1", "--methods", ""]
    else:
        folder = t / "recommend" / "tau-2-seed0"
        args = ["--verify", "--grid", "2", "--seeds", "1"]
    holder = hold_lock(folder, seconds=2.0)
    assert _cli(command, "--config", cfg, *args, "--out", t / command, "--cache", t / "cache", NO_PROGRESS) == 0
    holder.wait()
    assert f"waiting for {folder.resolve()}, in use by pid {holder.pid}" in capsys.readouterr().out


def test_sweep_with_another_student_is_refused_before_any_cell_runs(world, capsys):
    t, cfg = world
    args = ["sweep", "--config", cfg, "--taus", "2", "--optimizers", "sgd", "--budgets", "1", "--seeds", "1",
            "--methods", "", "--out", t / "sweep", "--cache", t / "cache", NO_PROGRESS]
    assert _cli(*args) == 0
    before = _snapshot(t / "sweep")
    assert _cli(*args, "--set", "student.model_args.hidden=[8]") == 2
    err = capsys.readouterr().err
    assert "student.model_args.hidden: [16] -> [8]" in err and _snapshot(t / "sweep") == before
    assert _cli(*args) == 0 and "(finished earlier, same config)" in capsys.readouterr().out


def test_a_changed_library_default_is_a_changed_run(tmp_path):
    """A config that leaves a knob at its default names the same run only while the default stays the same: the
    identity records the loss as built, so a run made under another default (or before this record) differs."""
    from thermokd.config import load_config
    from thermokd.engine.identity import differences, run_identity

    cfg = load_config(write_config(tmp_path / "c.yaml"), ["method.name=cist"])
    now = run_identity(cfg, "k", "d")
    assert "gamma=" in now["loss"] and differences(now, run_identity(cfg, "k", "d")) == []
    older_default = {**now, "loss": now["loss"].replace(now["loss"].split("gamma=")[1].split(",")[0], "0.123")}
    assert [line.startswith("the loss as built") and "gamma=0.123" in line
            for line in differences(older_default, now)] == [True]
    unrecorded = {k: v for k, v in now.items() if k != "loss"}
    assert "(not recorded)" in differences(unrecorded, now)[0]
