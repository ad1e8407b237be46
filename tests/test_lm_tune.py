"""`thermokd lm` with a `tune` section, end to end on a tiny corpus: a study per tuned label on validation
perplexity, `LABEL-tuned` rows in results.json and report.md, resumption (a longer study, a changed space refused),
folders made by separate processes merged without training anything, and bad labels as one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from thermokd.cli import main
from thermokd.lm import load_corpus

TINY = ["--teacher", "1x32x2", "--student", "1x16x2", "--vocab-size", "300", "--context", "32",
        "--teacher-steps", "8", "--max-train-tokens", "2048", "--no-progress", "--seeds", "1",
        "--steps", "4", "--batch-size", "4", "--eval-every", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A corpus, a cache holding the tiny teacher, and a folder tuned with 2 trials (ce, kd and kd-tuned)."""
    root = tmp_path_factory.mktemp("lmtune")
    corpus = root / "tales.txt"
    corpus.write_text("\n\n".join(d.text[:2500] for d in load_corpus("grimm-tales")[:8]), encoding="utf-8")
    assert main(_lm(root, corpus, root / "tuned", "ce,kd", "--set", "tune.methods=[kd]",
                    "--set", "tune.trials=2")) == 0
    return root, corpus


def _lm(root: Path, corpus: Path, out: Path, methods: str, *extra) -> list[str]:
    return ["lm", "--corpus", str(corpus), "--cache", str(root / "cache"), "--out", str(out), *TINY,
            "--methods", methods, *extra]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_a_tuned_method_gets_a_study_and_a_tuned_row(base):
    root, _ = base
    out = root / "tuned"
    results = _results(out)
    assert [r["method"] for r in results["runs"]] == ["ce", "kd", "kd-tuned"]
    study = json.loads((out / "tune" / "kd" / "tune.json").read_text())
    assert study["metric"] == "val_ppl" and study["complete"] + study["pruned"] == 2
    assert all(t["epochs"] <= 2 for t in study["trials"])  # the resource: 4 steps / eval every 2 = 2 rounds
    assert all(0.25 <= t["params"]["temperature.tau"] <= 4.0 for t in study["trials"])  # the LM range
    assert study["trials"][0]["params"] == {"temperature.tau": 0.5}  # the LM preset is tried first
    tuned = next(r for r in results["runs"] if r["method"] == "kd-tuned")
    assert tuned["setting"]["temperature"] == {"tau": study["params"]["temperature.tau"]}
    best = next(t for t in study["trials"] if t["number"] == study["best_trial"])
    trial = json.loads((out / "tune" / "kd" / "trials" / f"trial-{best['number']:04d}" / "result.json").read_text())
    assert trial["val_ppl"] == pytest.approx(results["tuning"]["kd"]["best_val_ppl"])  # scored on validation
    assert "test" not in json.dumps(study)  # a study never holds test numbers
    assert not list((out / "tune").rglob("checkpoint-*"))  # a trial's checkpoints go when it ends
    report = (out / "report.md").read_text()
    assert "## Tuning (on the validation documents)" in report and "| kd-tuned | temperature.tau=" in report
    assert "## Verdicts (against kd-tuned)" in report and "| evaluations | val ppl |" in \
        (out / "tune" / "kd" / "tune.md").read_text()


def test_a_longer_study_continues_and_a_changed_space_is_refused(base, tmp_path, capsys):
    root, corpus = base
    out = tmp_path / "t"
    shutil.copytree(root / "tuned", out)
    first = json.loads((out / "tune" / "kd" / "tune.json").read_text())["trials"]
    capsys.readouterr()
    # more trials, another tuned method, another method: all may grow
    assert main(_lm(root, corpus, out, "ce,kd,entropy-target", "--set", "tune.methods=[kd, entropy-target]",
                    "--set", "tune.trials=3", "--resume")) == 0
    printed = capsys.readouterr().out
    assert "tuning kd: 1 of 3 trials to go" in printed and "ce               seed 0: finished earlier" in printed
    again = json.loads((out / "tune" / "kd" / "tune.json").read_text())
    assert again["trials"][:2] == first and len(again["trials"]) == 3
    results = _results(out)
    assert [r["method"] for r in results["runs"]] == ["ce", "kd", "kd-tuned", "entropy-target",
                                                      "entropy-target-tuned"]
    tuned = next(r for r in results["runs"] if r["method"] == "kd-tuned")
    assert tuned["setting"]["temperature"] == {"tau": again["params"]["temperature.tau"]}  # the current choice
    assert main(_lm(root, corpus, out, "ce,kd", "--set", "tune.methods=[kd]", "--set", "tune.trials=3",
                    "--set", "tune.space={tau: '0.5:2:log'}", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tune.space" in err[0]


def test_folders_of_separate_processes_merge_without_training(base, tmp_path, capsys):
    root, corpus = base
    assert main(_lm(root, corpus, tmp_path / "w-ce", "ce")) == 0
    assert main(_lm(root, corpus, tmp_path / "w-kd", "kd", "--set", "tune.methods=[kd]", "--set",
                    "tune.trials=2")) == 0
    merged = tmp_path / "merged"
    for part in ("w-ce", "w-kd"):
        for section in ("runs", "tune"):
            if (tmp_path / part / section).is_dir():
                shutil.copytree(tmp_path / part / section, merged / section, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "w-kd")  # the study is opened where it lies now, not where it was made
    capsys.readouterr()
    elsewhere = tmp_path / "fresh-cache"  # e.g. merged on another machine: the teacher is neither there nor needed
    args = _lm(root, corpus, merged, "ce,kd", "--set", "tune.methods=[kd]", "--set", "tune.trials=2", "--resume")
    args[args.index("--cache") + 1] = str(elsewhere)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier (kept)") == 3 and "trials to go" not in printed
    assert "the teacher is not needed" in printed and not list(elsewhere.glob("lm-teachers/*"))
    teacher = _results(merged)["teacher"]
    assert teacher["test_ppl"] == _results(tmp_path / "w-ce")["teacher"]["test_ppl"]
    runs = _results(merged)["runs"]
    assert [r["method"] for r in runs] == ["ce", "kd", "kd-tuned"]
    assert runs[0]["val_ppl"] == _results(tmp_path / "w-ce")["runs"][0]["val_ppl"]
    assert "| kd-tuned | temperature.tau=" in (merged / "report.md").read_text()


@pytest.mark.parametrize("extra, words", [
    (["--set", "tune.methods=[magic]"], "tune.methods: unknown method 'magic'"),
    (["--set", "tune.methods=[ce]"], "ce has nothing to tune"),
    (["--set", "tune.methods=[kd@2]"], "kd@2 is KD at a fixed"),
    (["--set", "tune.methods=[kd]", "--set", "tune.trials=0"], "tune.trials"),
])
def test_bad_tune_labels_are_one_line_errors(base, tmp_path, capsys, extra, words):
    root, corpus = base
    assert main(_lm(root, corpus, tmp_path / "bad", "kd", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not (tmp_path / "bad" / "lm_config.json").exists()


def test_a_folder_recorded_before_teacher_device_existed_still_resumes(base, tmp_path, capsys):
    root, corpus = base
    old = tmp_path / "old"
    shutil.copytree(root / "tuned", old)
    recorded = json.loads((old / "lm_config.json").read_text())
    for name in ("device", "mixed_precision"):  # what a folder from before these fields records
        del recorded["teacher"][name]
    (old / "lm_config.json").write_text(json.dumps(recorded))
    extra = ("--set", "tune.methods=[kd]", "--set", "tune.trials=2", "--resume")
    assert main(_lm(root, corpus, old, "ce,kd", *extra)) == 0  # the defaults do what the folder did
    capsys.readouterr()
    assert main(_lm(root, corpus, old, "ce,kd", *extra, "--set", "teacher.device=cpu")) == 2
    assert "teacher.device: '(absent)' -> 'cpu'" in capsys.readouterr().err


def test_a_run_made_under_another_preset_is_trained_again(base, tmp_path, capsys, monkeypatch):
    """A run records its loss as built: a changed LM preset (or library default) is not kept on --resume."""
    from thermokd import methods

    root, corpus = base
    out = tmp_path / "again"
    shutil.copytree(root / "tuned", out)
    kept = json.loads((out / "runs" / "kd" / "seed0" / "result.json").read_text())
    assert "tau=0.5" in kept["loss"]  # KD's LM preset, as built
    capsys.readouterr()
    assert main(_lm(root, corpus, out, "ce,kd", "--resume")) == 0
    assert "kd               seed 0: finished earlier (kept)" in capsys.readouterr().out
    monkeypatch.setitem(methods.LM_PRESETS, "kd", {"temperature": {"tau": 0.75}})
    assert main(_lm(root, corpus, out, "ce,kd", "--resume")) == 0
    said = capsys.readouterr().out
    assert "kd               seed 0: its loss as built changed" in said and "ce               seed 0: finished" in said
    assert "tau=0.75" in json.loads((out / "runs" / "kd" / "seed0" / "result.json").read_text())["loss"]


def test_tuned_labels_alone_are_a_run_and_nothing_at_all_is_refused():
    from thermokd.config import ConfigError
    from thermokd.lm.config import load_lm_config

    cfg = load_lm_config("grimm", ["methods=[]", "tune.methods=[kd, cist]"])
    assert cfg.run_labels() == ["kd-tuned", "cist-tuned"]
    with pytest.raises(ConfigError, match="at least one method"):
        load_lm_config("grimm", ["methods=[]", "tune.methods=[]"])
    assert load_lm_config("grimm", ["tune.methods=[kd]", "tune.min_rounds=3"]).tune.min_rounds == 3
    with pytest.raises(ConfigError, match="tune.min_rounds must be >= 1"):
        load_lm_config("grimm", ["tune.methods=[kd]", "tune.min_rounds=0"])


def test_a_study_starts_at_the_method_s_own_setting_where_the_space_holds_it():
    from thermokd.config import MethodConfig, TuneConfig
    from thermokd.experiments.tune import build_space, start_point

    def point(method, **tune):
        return start_point(method, build_space(method, TuneConfig(trials=1, **tune), domain="lm"), domain="lm")

    assert point(MethodConfig(name="cist")) == {"temperature.tau0": 1.0, "temperature.student": "teacher"}
    assert point(MethodConfig(name="dts")) == {"temperature.t_init": 3.0, "temperature.t_min": 1.0,
                                               "temperature.t_max": 3.0}
    assert point(MethodConfig(name="kd", temperature={"tau": 2.0}), kd_weight=True) == {
        "temperature.tau": 2.0, "loss.kd_weight": 0.9}  # a variant's own values, the loss's default weight
    assert point(MethodConfig(name="ctkd")) == {"temperature.init": 4.0, "temperature.t_start": 1.0}  # t_end 20: out
    assert point(MethodConfig(name="kd"), space={"tau": "1:2"}) == {}  # the preset 0.5 is outside: sampled instead


def test_under_torchrun_only_a_finished_study_is_accepted(base, tmp_path, monkeypatch):
    from thermokd import ThermoKDError
    from thermokd.lm.tuning import _check_one_process

    root, _ = base
    monkeypatch.setenv("WORLD_SIZE", "2")
    _check_one_process(root / "tuned" / "tune" / "kd", "kd", 2)  # finished: summarised by every process
    with pytest.raises(ThermoKDError, match="trials to go"):
        _check_one_process(root / "tuned" / "tune" / "kd", "kd", 3)
    with pytest.raises(ThermoKDError, match="without torchrun"):
        _check_one_process(tmp_path / "none", "kd", 2)
