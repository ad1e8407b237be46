"""LM runs you can trust: the teacher cache is keyed by content and checked on load, teacher logits and top-k files
record what they were made for and a checksum, a damaged HF checkpoint is passed over (said) or refused, and every
damaged or foreign file ends `thermokd lm` in one line on stderr, exit 2, with nothing overwritten."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from thermokd import ThermoKDError
from thermokd.cli import main
from thermokd.lm import build_lm, load_corpus, make_windows

from test_trust import _flip_last_byte as _flip  # noqa: E402
from test_trust import _one, _snapshot, _truncate, hold_lock  # noqa: E402


TINY = ["--teacher", "1x32x2", "--student", "1x16x2", "--vocab-size", "300", "--context", "32",
        "--teacher-steps", "8", "--max-train-tokens", "2048", "--no-progress", "--methods", "kd", "--seeds", "1",
        "--steps", "2", "--batch-size", "4", "--eval-every", "2"]


def _lm(corpus: Path, cache: Path, out: Path, *extra) -> list[str]:
    return ["lm", "--corpus", str(corpus), "--cache", str(cache), "--out", str(out), *TINY, *map(str, extra)]


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A corpus and a cache holding one teacher with its logits file and its top-k file (two finished runs)."""
    root = tmp_path_factory.mktemp("lmtrust")
    corpus = root / "tales.txt"
    corpus.write_text("\n\n".join(d.text[:2500] for d in load_corpus("grimm-tales")[:8]), encoding="utf-8")
    for source in ("logits", "topk"):
        assert main(_lm(corpus, root / "cache", root / source, "--set", f"teacher.source={source}",
                        "--set", "teacher.k=8")) == 0
    return root, corpus


@pytest.fixture
def world(base, tmp_path):
    root, corpus = base
    shutil.copytree(root / "cache", tmp_path / "cache")
    return tmp_path, corpus


def _cache_row(pattern: str, damage, source: str = "logits"):
    def row(t: Path, corpus: Path):
        damage(_one(t / "cache", pattern))
        return _lm(corpus, t / "cache", t / "new", "--set", f"teacher.source={source}", "--set", "teacher.k=8")
    return row


def _foreign_topk(t: Path, corpus: Path):
    """A top-k file given by the user, made for other windows (more training tokens)."""
    file = _one(t / "cache", "lm-teachers/*/*-top8-*.safetensors")
    return _lm(corpus, t / "elsewhere", t / "new", "--max-train-tokens", "1024", "--set", "teacher.source=topk",
               "--set", f"teacher.file={file}")


def _renamed_topk(t: Path, corpus: Path):
    """The cache's top-8 file renamed to the name a top-4 capture would have: its recorded k is checked."""
    file = _one(t / "cache", "lm-teachers/*/*-top8-*.safetensors")
    file.rename(file.with_name(file.name.replace("-top8-", "-top4-")))
    return _lm(corpus, t / "cache", t / "new", "--set", "teacher.source=topk", "--set", "teacher.k=4")


TABLE = [
    ("flipped teacher weights", _cache_row("lm-teachers/*/teacher.safetensors", _flip), "checksum"),
    ("truncated teacher weights", _cache_row("lm-teachers/*/teacher.safetensors", _truncate), "damaged"),
    ("teacher.json of another key", _cache_row("lm-teachers/*/teacher.json", lambda p: _edit_json(p, key="0ld")),
     "another teacher"),
    ("garbage teacher.json", _cache_row("lm-teachers/*/teacher.json", lambda p: p.write_bytes(b"\x00{")),
     "not valid JSON"),
    ("flipped logits file", _cache_row("lm-teachers/*/*.npy", _flip), "checksum"),
    ("truncated logits file", _cache_row("lm-teachers/*/*.npy", _truncate), "checksum"),
    ("logits sidecar for other windows", _cache_row("lm-teachers/*/*.npy.json", lambda p: _edit_json(p, windows="x")),
     "other training windows"),
    ("logits sidecar of another key", _cache_row("lm-teachers/*/*.npy.json", lambda p: _edit_json(p, key="x")),
     "another input"),
    ("garbage logits sidecar", _cache_row("lm-teachers/*/*.npy.json", lambda p: p.write_bytes(b"{")),
     "not valid JSON"),
    ("flipped top-k file", _cache_row("lm-teachers/*/*-top8-*.safetensors", _flip, "topk"), "checksum"),
    ("truncated top-k file", _cache_row("lm-teachers/*/*-top8-*.safetensors", _truncate, "topk"), "damaged"),
    ("top-k file for other windows", _foreign_topk, "other training windows"),
    ("top-k file of another k", _renamed_topk, "k=8"),
    ("damaged cached tokenizer", _cache_row("tokenizers/*.json", lambda p: p.write_text("{")), "tokenizers"),
    ("edited cached tokenizer", _cache_row("tokenizers/*.json", lambda p: _edit_json(
        p, tokenizer=json.loads(p.read_text())["tokenizer"].replace('"a"', '"b"', 1))), "checksum"),
]


@pytest.mark.parametrize("row", TABLE, ids=[r[0] for r in TABLE])
def test_damaged_or_foreign_lm_file_is_one_line_exit_2_nothing_overwritten(world, capsys, row):
    t, corpus = world
    _, setup, expected = row
    argv = setup(t, corpus)
    before = _snapshot(t / "cache", t / "new")
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("thermokd: error:") and "Traceback" not in err
    assert expected in err
    assert "delete" in err or "capture it again" in err  # says what to do
    assert _snapshot(t / "cache", t / "new") == before  # no lm_config.json either: a later run is not blocked


def test_the_teacher_key_covers_what_determines_the_teacher():
    from thermokd.lm.config import load_lm_config
    from thermokd.lm.experiment import _settings, _teacher_spec
    from thermokd.lm.teacher import keyed_settings, teacher_key

    def key(overrides=(), tokenizer="tok", text="text", docs=((1, 2, 3, 4),)):
        cfg = load_lm_config(None, list(overrides))
        data = SimpleNamespace(train_key=text, tokenizer_key=tokenizer,
                               train=make_windows([list(d) for d in docs], cfg.data.context, pad_id=0))
        spec = _teacher_spec(cfg, data)
        return teacher_key({**spec, "settings": keyed_settings(_settings(cfg, "cpu", "no", 0, False, teacher=True))})

    base = key()
    others = [key(tokenizer="tok2"), key(text="text2"), key(docs=((1, 2, 3, 5),)), key(["teacher.size=2x64"]),
              key(["teacher.steps=7"]), key(["teacher.seed=1"]), key(["teacher.lr=0.01"]),
              key(["data.prompt_tokens=2"]), key(["train.weight_decay=0.5"])]
    assert base == key() and len({base, *others}) == len(others) + 1
    # how often the runs evaluate and save is not what the teacher learns: the same teacher
    assert key(["train.eval_every=7", "train.save_every=9"]) == base


def test_a_teacher_cached_under_the_key_that_held_the_cadence_is_still_used(tmp_path):
    import dataclasses

    from thermokd.lm.teacher import obtain_teacher, teacher_entry
    from thermokd.lm.trainer import RunSettings

    windows = make_windows([list(range(1, 30)), list(range(5, 40))] * 3, 12, pad_id=0)
    settings = RunSettings(steps=2, batch_size=2, eval_every=2, save_every=2)
    spec = {"what": "a test teacher"}
    build = lambda: build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)  # noqa: E731
    model, made = obtain_teacher(spec, build, windows, windows, settings, tmp_path)
    # move it to where an earlier version stored it: a key of every setting but progress_bar
    old = teacher_entry({**spec, "settings": {k: v for k, v in vars(settings).items() if k != "progress_bar"}},
                        tmp_path)
    old.store(model, {"spec": spec, "train_seconds": 1.0, "history": []})
    shutil.rmtree(made["dir"])
    _, found = obtain_teacher(spec, build, windows, windows, settings, tmp_path)
    assert found["cached"] and found["key"] == old.key != made["key"] and found["val_ppl"] == made["val_ppl"]
    # another cadence: the old key held the old cadence, so that entry is not this one's; today's key is shared
    _, other = obtain_teacher(spec, build, windows, windows, dataclasses.replace(settings, eval_every=1), tmp_path)
    assert not other["cached"] and other["key"] == made["key"]


def test_changed_corpus_at_the_same_path_trains_a_new_teacher_and_refuses_resume(base, tmp_path, capsys):
    root, corpus = base
    mine = tmp_path / "tales.txt"
    shutil.copy(corpus, mine)
    shutil.copytree(root / "cache", tmp_path / "cache")
    capsys.readouterr()
    assert main(_lm(mine, tmp_path / "cache", tmp_path / "a")) == 0
    assert "from the cache" in capsys.readouterr().out
    mine.write_text(mine.read_text(encoding="utf-8").replace("king", "queen"), encoding="utf-8")
    before = _snapshot(tmp_path / "a")
    assert main(_lm(mine, tmp_path / "cache", tmp_path / "a", "--resume")) == 2  # same path, other content
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data content: digest" in err and _snapshot(tmp_path / "a") == before
    assert main(_lm(mine, tmp_path / "cache", tmp_path / "b")) == 0
    assert "trained in" in capsys.readouterr().out
    keys = [json.loads((tmp_path / run / "results.json").read_text())["teacher"]["key"] for run in "ab"]
    assert keys[0] != keys[1]


def test_a_second_process_waits_for_the_teacher_being_trained(tmp_path):
    from thermokd.lm.teacher import keyed_settings, obtain_teacher, teacher_folder
    from thermokd.lm.trainer import RunSettings

    windows = make_windows([list(range(1, 30)), list(range(5, 40))] * 3, 12, pad_id=0)
    settings = RunSettings(steps=2, batch_size=2, eval_every=2, save_every=2)
    spec = {"what": "a test teacher"}
    folder = teacher_folder({**spec, "settings": keyed_settings(settings)}, tmp_path)
    holder = hold_lock(folder)  # another process training this teacher
    said: list[str] = []
    build = lambda: build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)  # noqa: E731
    started = time.monotonic()
    _, info = obtain_teacher(spec, build, windows, windows, settings, tmp_path, echo=said.append)
    holder.wait()
    assert time.monotonic() - started > 0.5 and said[0].startswith("waiting for") and not info["cached"]
    _, again = obtain_teacher(spec, build, windows, windows, settings, tmp_path)
    assert again["cached"] and again["key"] == info["key"] == folder.name


def test_a_teacher_trained_on_another_device_is_loaded_where_the_students_run(tmp_path, monkeypatch):
    """teacher.device/mixed_precision key the teacher by where it was trained; a cached one is loaded on the run's
    device (here a stand-in for a GPU-trained teacher: stored under the cuda/bf16 key, trained on the CPU)."""
    import dataclasses

    import thermokd.lm.trainer as trainer
    from thermokd.lm.teacher import obtain_teacher

    windows = make_windows([list(range(1, 30)), list(range(5, 40))] * 3, 12, pad_id=0)
    gpu = trainer.RunSettings(steps=2, batch_size=2, eval_every=2, save_every=2, device="cuda",
                              mixed_precision="bf16")
    spec = {"what": "a test teacher"}
    build = lambda: build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)  # noqa: E731
    if not torch.cuda.is_available():  # nothing cached: it would be trained on cuda, which is not here
        with pytest.raises(ThermoKDError, match=r"^teacher.device \(cuda: no teacher trained there is cached"):
            obtain_teacher(spec, build, windows, windows, gpu, tmp_path, run_device="cpu")
    train_here = trainer.train_run
    monkeypatch.setattr(trainer, "check_device", lambda *args: None)
    monkeypatch.setattr(trainer, "train_run", lambda model, loss, train, val, settings, *a, **k: train_here(
        model, loss, train, val, dataclasses.replace(settings, device="cpu", mixed_precision="no"), *a, **k))
    _, made = obtain_teacher(spec, build, windows, windows, gpu, tmp_path, run_device="cpu")
    monkeypatch.undo()
    model, loaded = obtain_teacher(spec, build, windows, windows, gpu, tmp_path, run_device="cpu")
    assert loaded["cached"] and loaded["key"] == made["key"] and loaded["val_ppl"] == made["val_ppl"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _, here = obtain_teacher(spec, build, windows, windows, dataclasses.replace(gpu, device="cpu",
                                                                                mixed_precision="no"), tmp_path)
    assert not here["cached"] and here["key"] != made["key"]  # trained elsewhere or here: two teachers


def test_sources_refuse_damaged_and_foreign_files(tmp_path):
    from thermokd.lm.sources import LogitsFile, TopKFile, capture_topk_file, write_logits_file

    windows = make_windows([list(range(1, 30)), list(range(5, 40))], 12, pad_id=0)
    teacher = build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)
    npy = write_logits_file(teacher, windows, tmp_path / "t.npy", "tok", "win")
    LogitsFile(npy, "tok", "win")
    _flip(npy)
    with pytest.raises(ThermoKDError, match="checksum"):
        LogitsFile(npy, "tok", "win")
    topk = capture_topk_file(teacher, windows, tmp_path / "t.safetensors", 4, "tok", "win", capture_tau=2.0)
    TopKFile(topk, "tok", "win", k=4, capture_tau=2.0)
    with pytest.raises(ThermoKDError, match="capture_tau=2.0"):
        TopKFile(topk, "tok", "win", k=4, capture_tau=1.0)
    with pytest.raises(ThermoKDError, match="k=4"):
        TopKFile(topk, "tok", "win", k=8)
    _flip(topk)
    with pytest.raises(ThermoKDError, match="checksum"):
        TopKFile(topk, "tok", "win")


def _teacher():
    return build_lm("1x32x2", 40, 12, dropout=0.0, seed=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An unfinished-looking run folder with two complete checkpoints (4 and 8 of 8 steps), and its result."""
    import thermokd as tk
    from thermokd.lm.trainer import RunSettings, train_run

    root = tmp_path_factory.mktemp("ckpt")
    windows = make_windows([list(range(1, 30)), list(range(5, 40)), list(range(2, 33))] * 2, 12, pad_id=0)
    settings = RunSettings(steps=8, batch_size=2, eval_every=4, save_every=4, warmup=0.0)
    model = build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)
    result = train_run(model, tk.build_loss("dts"), windows, windows, settings, root / "run", teacher=_teacher())
    return root / "run", windows, settings, result["val_ppl"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(checkpoints, tmp_path):
    import thermokd as tk
    from thermokd.lm.trainer import train_run

    run, windows, settings, val_ppl = checkpoints
    for name in ("model.safetensors", "thermokd_loss.safetensors"):
        folder = tmp_path / name
        shutil.copytree(run, folder)
        _flip(folder / "checkpoint-8" / name)
        said: list[str] = []
        model = build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)
        result = train_run(model, tk.build_loss("dts"), windows, windows, settings, folder, resume=True,
                           echo=said.append, teacher=_teacher())
        assert result["resumed_from"].endswith("checkpoint-4")
        assert said == [f"  resuming from checkpoint-4 (the newer checkpoint-8 is damaged: {name} does not match "
                        "its checksum)"]
        assert result["val_ppl"] == val_ppl  # steps 5-8 again from checkpoint-4 end where the first run ended


def test_no_undamaged_checkpoint_left_is_one_line_and_a_killed_write_is_passed_over(checkpoints, tmp_path):
    import thermokd as tk
    from thermokd.lm.trainer import MANIFEST_NAME, last_complete_checkpoint, train_run

    run, windows, settings, _ = checkpoints
    folder = tmp_path / "run"
    shutil.copytree(run, folder)
    (folder / "checkpoint-8" / MANIFEST_NAME).unlink()  # killed before the checkpoint was complete: not named
    assert last_complete_checkpoint(folder).endswith("checkpoint-4")
    _truncate(folder / "checkpoint-4" / "model.safetensors")
    (folder / "checkpoint-4" / "optimizer.pt").unlink()
    before = _snapshot(folder)
    model = build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)
    with pytest.raises(ThermoKDError) as err:
        train_run(model, tk.build_loss("dts"), windows, windows, settings, folder, resume=True, teacher=_teacher())
    message = str(err.value)
    assert "\n" not in message and "checkpoint-4 is damaged" in message and f"delete {folder}" in message
    assert _snapshot(folder) == before  # not started over: the checkpoints are kept


# -- random damage to valid LM files: the loaders succeed (bytes unchanged) or raise ThermoKDError, nothing else ----
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    from thermokd.lm.sources import capture_topk_file, write_logits_file

    root = tmp_path_factory.mktemp("lmfiles")
    windows = make_windows([list(range(1, 30)), list(range(5, 40))], 12, pad_id=0)
    teacher = build_lm("1x16x2", 40, 12, dropout=0.0, seed=0)
    npy = write_logits_file(teacher, windows, root / "t.npy", "tok", "win")
    topk = capture_topk_file(teacher, windows, root / "t.safetensors", 4, "tok", "win")
    return {p.name: p.read_bytes() for p in (npy, npy.with_suffix(".npy.json"), topk)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["t.npy", "t.npy.json", "t.safetensors"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
       cut=st.none() | st.floats(0, 1))
def test_damaged_lm_files_never_escape_the_loaders(lm_files, tmp_path, name, edits, cut):
    from thermokd.lm.sources import LogitsFile, TopKFile

    for file, data in lm_files.items():
        (tmp_path / file).write_bytes(data)
    data = bytearray(lm_files[name])
    for where, xor in edits:
        data[int(where * len(data))] ^= xor
    if cut is not None:
        data = data[: int(cut * len(data))]
    (tmp_path / name).write_bytes(bytes(data))
    load = (lambda: TopKFile(tmp_path / name, "tok", "win")) if name.endswith("safetensors") else \
        (lambda: LogitsFile(tmp_path / "t.npy", "tok", "win"))
    if bytes(data) == lm_files[name]:
        load()
    else:
        try:
            load()
        except ThermoKDError as exc:
            assert "\n" not in str(exc)
        else:  # only a change the checksum cannot see may pass: in the JSON sidecar, a field it does not cover
            assert name == "t.npy.json"


def test_damaged_result_of_a_finished_run_is_one_line_under_resume(base, tmp_path, capsys):
    root, corpus = base
    shutil.copytree(root / "cache", tmp_path / "cache")
    shutil.copytree(root / "logits", tmp_path / "out")
    result = _one(tmp_path / "out", "runs/kd/seed0/result.json")
    result.write_bytes(b"{\"method\": ")  # cut short by hand
    before = _snapshot(tmp_path / "out")
    capsys.readouterr()
    argv = _lm(corpus, tmp_path / "cache", tmp_path / "out", "--set", "teacher.source=logits", "--set", "teacher.k=8",
               "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{result} is damaged" in err and f"delete {result}" in err
    assert _snapshot(tmp_path / "out") == before
