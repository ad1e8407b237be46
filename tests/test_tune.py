"""`thermokd tune`: search spaces, the Optuna study (resumable, pruned on validation accuracy), its outputs, and bad
input; the trainer is replaced by a synthetic curve where the optimum must be known."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from thermokd import ThermoKDError
from thermokd.cli import main
from thermokd.config import TuneConfig, config_from_dict, resolve_method
from thermokd.experiments.tune import build_space, run_tune, start_point
from thermokd.spaces import SPACES, FloatRange, declared_space, method_space, parse_knob

from engine_helpers import TINY, env, write_config

PEAK_TAU = 5.0


def synthetic(calls: list):
    """A training run whose validation accuracy rises over 4 epochs to a peak that falls off with |log τ − log 5|."""

    def train(method, folder, on_epoch):
        tau = method.temperature["tau"]
        peak = 0.9 - 0.1 * (math.log(tau) - math.log(PEAK_TAU)) ** 2
        history = []
        for epoch in range(4):
            record = {"epoch": epoch, "val_acc": peak * (1 - 0.5 ** (epoch + 1)), "test_acc": 0.0}
            history.append(record)
            calls.append((tau, epoch))
            on_epoch(record)
        return {"best_val_acc": history[-1]["val_acc"], "best_epoch": 3}

    return train


def _cfg():
    return config_from_dict({**json.loads(json.dumps(TINY)), "train": {**TINY["train"], "epochs": 4}})


def test_every_method_declares_a_valid_space():
    from thermokd import method_names

    for name in method_names():
        space = method_space(name)
        assert set(space) == set(SPACES.get(name, {})) or name not in SPACES
        for knob in space.values():
            assert isinstance(knob, (FloatRange, list))
    assert method_space("ce") == {} and "temperature.tau" in method_space("kd")
    assert "loss.kd_weight" in method_space("kd", kd_weight=True) and method_space("ce", kd_weight=True) == {}
    assert parse_knob("tau=2:8:log") == ("tau", FloatRange(2.0, 8.0, True))
    assert parse_knob("temperature.student=ratio,teacher") == ("temperature.student", ["ratio", "teacher"])
    assert FloatRange(1, 16, log=True).grid(5) == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_a_strategy_declares_knobs_that_tune_adds_when_named(monkeypatch, tmp_path):
    from thermokd.temperature import CIST

    monkeypatch.setattr(CIST, "search_space", classmethod(lambda cls: {"student": ["ratio", "teacher"],
                                                                        "gamma": (0.0, 1.0, False)}))
    assert "temperature.student" not in method_space("cist")  # the default budget goes to the temperature knob
    declared = declared_space("cist")
    assert declared["temperature.student"] == ["ratio", "teacher"]
    assert declared["temperature.gamma"] == FloatRange(0.0, 1.0, False)
    assert parse_knob("student") == ("student", None)
    space = build_space(resolve_method(_cfg(), "cist"), TuneConfig(trials=2, space={"student": None}))
    assert space["temperature.student"] == ["ratio", "teacher"] and "temperature.tau0" in space
    with pytest.raises(ThermoKDError, match="no declared range"):
        build_space(resolve_method(_cfg(), "kd"), TuneConfig(trials=2, space={"temperature.nope": None}))


def test_tpe_finds_the_optimum_of_a_synthetic_curve(tmp_path):
    calls: list = []
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=30, seed=1), train_fn=synthetic(calls),
                      echo=lambda s: None)
    assert abs(math.log(result.params["temperature.tau"] / PEAK_TAU)) < math.log(1.25)
    assert result.summary["complete"] + result.summary["pruned"] == 30
    assert result.summary["pruned"] > 0 and len(calls) < 30 * 4  # Hyperband stopped poor settings early
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["method"]["temperature"]["tau"] == \
        result.params["temperature.tau"]
    assert (tmp_path / "tune_vs_knob.png").is_file() and "| trial | state |" in (tmp_path / "tune.md").read_text()
    assert str(tmp_path) not in (tmp_path / "tune.json").read_text()  # the default study is recorded relatively


def test_a_new_study_tries_the_method_s_own_setting_first(tmp_path):
    calls: list = []
    run_tune(_cfg(), "kd", tmp_path / "a", TuneConfig(trials=3, seed=1), train_fn=synthetic(calls),
             echo=lambda s: None)
    assert calls[0][0] == 4.0  # KD's default τ
    cfg = _cfg()
    cfg.compare.variants["kd-2"] = resolve_method(cfg, "kd")
    cfg.compare.variants["kd-2"].temperature = {"tau": 2.0}
    calls.clear()
    run_tune(cfg, "kd-2", tmp_path / "b", TuneConfig(trials=2, seed=1), train_fn=synthetic(calls), echo=lambda s: None)
    assert calls[0][0] == 2.0  # a variant's own value
    calls.clear()
    run_tune(_cfg(), "kd", tmp_path / "a", TuneConfig(trials=5, seed=1), train_fn=synthetic(calls),
             echo=lambda s: None)
    assert calls and calls[0][0] != 4.0  # a continued study is not sent back to its start


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_continued_study_does_not_draw_its_first_settings_again(tmp_path, sampler):
    """A study stopped in its random phase (TPE's first trials) and continued proposes new settings: a sampler
    seeded as at the start would replay its first draws, and the budget would pay twice for one setting."""
    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=3, seed=1, sampler=sampler), train_fn=synthetic(calls),
             echo=lambda s: None)
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=12, seed=1, sampler=sampler),
                      train_fn=synthetic(calls), echo=lambda s: None)
    taus = [t["params"]["temperature.tau"] for t in result.summary["trials"]]
    assert len(taus) == 12 and len(set(taus)) == 12
    fresh: list = []
    run_tune(_cfg(), "kd", tmp_path / "fresh", TuneConfig(trials=3, seed=1, sampler=sampler),
             train_fn=synthetic(fresh), echo=lambda s: None)
    assert [tau for tau, epoch in fresh if epoch == 0] == [tau for tau, epoch in calls[:len(fresh)] if epoch == 0]


def test_the_start_point_holds_each_method_s_defaults_inside_the_space():
    def point(name, **tune):
        from thermokd.config import MethodConfig

        method = MethodConfig(name=name)
        return start_point(method, build_space(method, TuneConfig(trials=1, **tune)))

    assert point("kd") == {"temperature.tau": 4.0}
    assert point("cist")["temperature.tau0"] == 4.0
    assert point("kd", kd_weight=True) == {"temperature.tau": 4.0, "loss.kd_weight": 0.9}
    assert point("kd", space={"tau": "1:2"}) == {}  # τ = 4 lies outside: sampled instead


def test_method_settings_layer_factory_defaults_domain_presets_and_overrides():
    from thermokd.methods import build_loss, method_settings

    assert method_settings("kd") == {"temperature": {}, "weighting": {}}
    full = method_settings("cist", domain="lm", temperature={"tau0": 2.0}, with_defaults=True)
    assert full["temperature"]["tau0"] == 2.0  # the override
    assert (full["temperature"]["student"], full["temperature"]["tau_min"]) == ("teacher", 0.05)  # the LM preset
    assert full["temperature"]["tau_max"] == 20.0 and full["weighting"]["alpha"] == 1.0  # the factories' defaults
    assert full["weighting"]["mix"] == 0.0
    loss = build_loss("cist", domain="lm", temperature={"tau0": 2.0})
    assert (loss.temperature.tau0, loss.temperature.tau_min, loss.temperature.tau_max) == (2.0, 0.05, 20.0)
    with pytest.raises(ThermoKDError, match="domain"):
        method_settings("kd", domain="vision")


@pytest.mark.parametrize("pruner", ["hyperband", "halving"])
def test_min_rounds_keeps_every_trial_until_that_round(tmp_path, pruner):
    """No trial is pruned before its `min_rounds`-th evaluation; with the default a poor one may stop at its first."""
    def last_epochs(min_rounds: int) -> dict[int, int]:
        calls: list = []
        tune = TuneConfig(trials=12, seed=1, pruner=pruner, min_rounds=min_rounds)
        run_tune(_cfg(), "kd", tmp_path / f"{pruner}-{min_rounds}", tune, train_fn=synthetic(calls),
                 echo=lambda s: None)
        ends: dict[int, int] = {}
        trial = -1
        for _, epoch in calls:
            trial += epoch == 0
            ends[trial] = epoch
        return ends

    assert min(last_epochs(1).values()) == 0  # pruned after one evaluation round
    assert min(last_epochs(3).values()) >= 2  # every trial ran at least three rounds


def test_grid_sampler_runs_each_point_once_and_picks_the_best(tmp_path):
    calls: list = []
    tune = TuneConfig(trials=50, sampler="grid", pruner="none", grid_points=5)
    result = run_tune(_cfg(), "kd", tmp_path, tune, train_fn=synthetic(calls), echo=lambda s: None)
    assert sorted({tau for tau, _ in calls}) == [1.0, 2.0, 4.0, 8.0, 16.0]  # the budget is capped at the grid
    assert result.params == {"temperature.tau": 4.0} and result.summary["budget"] == 5


def test_a_finished_study_is_continued_not_restarted(tmp_path):
    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=4), train_fn=synthetic(calls), echo=lambda s: None)
    first = json.loads((tmp_path / "tune.json").read_text())["trials"]
    calls.clear()
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=6), train_fn=synthetic(calls), echo=lambda s: None)
    again = json.loads((tmp_path / "tune.json").read_text())["trials"]
    assert again[:4] == first and len(again) == 6 and {tau for tau, _ in calls} <= {t["params"]["temperature.tau"]
                                                                                   for t in again[4:]}
    # a re-run of the finished study trains nothing and keeps its compute: the trials' summed time
    recorded = json.loads((tmp_path / "tune.json").read_text())["seconds"]
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=6), train_fn=synthetic(calls), echo=lambda s: None)
    rerun = json.loads((tmp_path / "tune.json").read_text())
    assert rerun["seconds"] == recorded == pytest.approx(sum(t["seconds"] for t in rerun["trials"]))
    with pytest.raises(ThermoKDError, match="another search space"):
        run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=6, space={"tau": "2:3"}), train_fn=synthetic(calls))


def test_a_record_without_its_study_is_not_tuned_again(tmp_path):
    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2), train_fn=synthetic(calls), echo=lambda s: None)
    record = (tmp_path / "tune.json").read_text()
    (tmp_path / "study.db").unlink()  # e.g. a results folder copied without it
    calls.clear()
    with pytest.raises(ThermoKDError, match=r"tune.json records a study of 2 trials, but the study itself .*study.db\) "
                                            r"is missing: put study.db back .* or delete tune.json"):
        run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2), train_fn=synthetic(calls), echo=lambda s: None)
    assert calls == [] and (tmp_path / "tune.json").read_text() == record and not (tmp_path / "study.db").exists()
    (tmp_path / "tune.json").unlink()  # the user's choice: tune from scratch
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2), train_fn=synthetic(calls), echo=lambda s: None)
    assert calls and (tmp_path / "study.db").exists()


def test_a_study_is_not_continued_with_other_pruning(tmp_path):
    import optuna

    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=3, min_rounds=2), train_fn=synthetic(calls),
             echo=lambda s: None)
    for other in (TuneConfig(trials=4, min_rounds=3), TuneConfig(trials=4, min_rounds=2, pruner="halving")):
        with pytest.raises(ThermoKDError, match=r"was pruned with pruner=hyperband, min_rounds=2, rounds=4, not .*"
                                                r"continue it with the pruner and min_rounds it was made with"):
            run_tune(_cfg(), "kd", tmp_path, other, train_fn=synthetic(calls), echo=lambda s: None)
    assert len(json.loads((tmp_path / "tune.json").read_text())["trials"]) == 3  # nothing ran
    # the same pruning continues it
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=4, min_rounds=2), train_fn=synthetic(calls),
             echo=lambda s: None)
    # a study from before pruning was recorded is continued, and records it from then on (min_rounds beyond the
    # trial's rounds is recorded as the rounds: no round could be pruned at either)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    study._storage.set_study_user_attr(study._study_id, "pruning", None)
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=5, min_rounds=9), train_fn=synthetic(calls),
             echo=lambda s: None)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs["pruning"] == {"pruner": "hyperband", "min_rounds": 4, "rounds": 4}


def test_a_trial_that_died_with_its_process_costs_no_budget(tmp_path):
    import optuna
    from optuna.trial import TrialState, create_trial

    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2), train_fn=synthetic(calls), echo=lambda s: None)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    first = study.trials[0]
    # what a kill leaves once its heartbeat is stale: the dead attempt failed, and a retry with the same knobs
    # (Optuna records which trial it replaces) that finished
    study.add_trial(create_trial(state=TrialState.FAIL, params=first.params, distributions=first.distributions))
    dead = study.trials[-1].number
    study.add_trial(create_trial(state=TrialState.PRUNED, params=first.params, distributions=first.distributions,
                                 intermediate_values={0: 0.1}, system_attrs={"failed_trial": dead}))
    calls.clear()
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=4), train_fn=synthetic(calls), echo=lambda s: None)
    assert len(calls) > 0  # one more trial ran: 2 + the retry count, the dead attempt does not
    states = [t["state"] for t in result.summary["trials"]]
    assert states.count("retried") == 1 and states[dead] == "retried" and len(states) == 5
    assert (result.summary["retried"], result.summary["failed"]) == (1, 0)
    assert result.summary["trials"][dead]["seconds"] is None  # found dead later: its compute is unknown
    assert "1 more died with their process and ran again" in (tmp_path / "tune.md").read_text()


def test_finished_and_running_trials_are_counted_from_one_read_of_the_study():
    """Counted from two reads, another worker's trial that finished in between was in neither count, and a worker
    started one trial too many (seen as a flaky failure of the test below on a loaded machine)."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    import thermokd.experiments.tune as tune_mod

    reads = []
    states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.RUNNING]
    trials = [SimpleNamespace(number=i, state=state, system_attrs={}) for i, state in enumerate(states)]

    def get_trials(deepcopy=False, states=None):
        reads.append(states)
        return trials

    assert tune_mod._counts(SimpleNamespace(get_trials=get_trials)) == (3, 2) and len(reads) == 1


def test_a_worker_counts_and_waits_for_the_trials_other_workers_run(tmp_path, monkeypatch):
    """Several processes on one study: a trial another worker is running counts against the budget (no worker
    starts one too many), and a worker whose own trials are done waits for it, so that every worker chooses its
    setting from the finished study."""
    import optuna

    import thermokd.experiments.tune as tune_mod

    monkeypatch.setattr(tune_mod, "POLL_S", 0.05)
    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2, seed=1), train_fn=synthetic(calls), echo=lambda s: None)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    other = study.ask()  # another worker's trial, still running
    other.suggest_float("temperature.tau", 1.0, 16.0, log=True)
    lines: list = []
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=run_tune(
        _cfg(), "kd", tmp_path, TuneConfig(trials=5, seed=1), train_fn=synthetic(calls), echo=lines.append)))
    worker.start()
    deadline = time.time() + 60
    while not any("waiting for 1 trial" in line for line in lines) and time.time() < deadline:
        time.sleep(0.05)
    assert any("waiting for 1 trial" in line for line in lines) and worker.is_alive()
    assert len([t for t in study.get_trials() if t.state.is_finished()]) == 4  # 2 + 2: the running one is counted
    study.tell(other, 0.99)  # the other worker's trial finishes, best of all
    worker.join(60)
    result = outcome["result"]
    assert result.summary["complete"] + result.summary["pruned"] == 5
    assert result.params == other.params  # chosen from the finished study, the other worker's trial included


def test_a_trial_whose_process_is_gone_is_retried_at_once(tmp_path):
    """A killed `tune` started again on the same machine fails its dead trial at once (the process that ran it no
    longer exists), rather than waiting minutes for the heartbeat to go stale, and runs it again."""
    import socket

    import optuna

    calls: list = []
    run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=2, seed=1), train_fn=synthetic(calls), echo=lambda s: None)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = study.ask()
    tau = dead.suggest_float("temperature.tau", 1.0, 16.0, log=True)
    dead.set_user_attr("worker", {"host": socket.gethostname(), "pid": gone.pid})
    started = time.time()
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=4, seed=1), train_fn=synthetic(calls),
                      echo=lambda s: None)
    assert time.time() - started < 60
    trials = result.summary["trials"]
    assert trials[dead.number]["state"] == "retried" and result.summary["retried"] == 1
    assert [t["params"]["temperature.tau"] for t in trials[dead.number + 1:]][0] == tau  # its knobs ran again
    assert result.summary["complete"] + result.summary["pruned"] == 4


def test_tiny_tune_on_digits_in_seconds_and_its_setting_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml"))
    start = time.time()
    assert main(["tune", "--config", cfg, "--method", "kd", "--trials", "3", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    assert time.time() - start < 60  # teacher included; a few seconds on an idle core
    out = capsys.readouterr().out
    assert "chose temperature.tau=" in out and "trial 2 [3/3]" in out
    assert "| trial | state | temperature.tau | epochs | val acc % |" in out  # the table of trials
    summary = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert summary["complete"] + summary["pruned"] == 3 and (tmp_path / "t" / "study.db").is_file()
    assert all("test" not in key for t in summary["trials"] for key in t)  # the study never holds test numbers
    sets = [a for line in summary["set"] for a in ("--set", line)]
    assert main(["distill", "--config", cfg, *sets, "--out", str(tmp_path / "d1"), "--no-progress"]) == 0
    tau = json.loads((tmp_path / "d1" / "config.json").read_text())["method"]["temperature"]["tau"]
    assert tau == pytest.approx(summary["params"]["temperature.tau"])
    best_config = str(tmp_path / "t" / "best_config.yaml")
    assert main(["distill", "--config", best_config, "--out", str(tmp_path / "d2"), "--no-progress"]) == 0


def test_compare_takes_a_study_that_tune_ran_in_its_folder(tmp_path, monkeypatch, capsys):
    """A compare's tuning split over processes: ``tune --out OUT/tune/LABEL`` with the config's budget makes the
    study ``compare --out OUT`` would make, and compare uses it as it is (even without its trial folders)."""
    import shutil

    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml"))
    budget = ["--set", "compare.tune.trials=2"]
    assert main(["tune", "--config", cfg, "--method", "kd", *budget, "--out", str(tmp_path / "cmp" / "tune" / "kd"),
                 "--no-progress"]) == 0
    made = json.loads((tmp_path / "cmp" / "tune" / "kd" / "tune.json").read_text())
    shutil.rmtree(tmp_path / "cmp" / "tune" / "kd" / "trials")
    capsys.readouterr()
    assert main(["compare", "--config", cfg, "--methods", "ce,kd", "--seeds", "3", *budget, "--out",
                 str(tmp_path / "cmp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kd: tuned to temperature.tau=" in out and "kd trial" not in out  # no trial ran again
    again = json.loads((tmp_path / "cmp" / "tune" / "kd" / "tune.json").read_text())
    assert again["trials"] == made["trials"] and again["params"] == made["params"]


def test_a_killed_tune_continues_its_study(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("THERMOKD_CACHE", str(cache))
    cfg = write_config(tmp_path / "c.yaml", train={"epochs": 3})
    args = ["tune", "--config", str(cfg), "--trials", "5", "--pruner", "none", "--out", str(tmp_path / "t"),
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "thermokd.cli", *args], env=env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = threading.Event()

    def watch():
        for line in proc.stdout:
            if "[2/5]" in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(180), "the tune finished no trial in time"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "of 5 trials to go" in out and "5 of 5" not in out
    summary = json.loads((tmp_path / "t" / "tune.json").read_text())
    finished = [t for t in summary["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) == 5 and [t["number"] for t in finished][:2] == [0, 1]


def _stderr_line(argv, capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("thermokd: error:"), lines
    return lines[0]


def test_the_tuning_budget_is_checked_in_one_place_under_each_name():
    from thermokd.config import ConfigError

    for tune, message in (({"trials": -1}, r"compare.tune.trials must be >= 0 \(the tuning budget\), got -1"),
                          ({"grid_points": 0}, "compare.tune.grid_points must be >= 1"),
                          ({"min_rounds": 0}, "compare.tune.min_rounds must be >= 1 .the first round")):
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"compare": {"tune": tune}}).validate()
    with pytest.raises(ConfigError, match="--trials must be >= 1"):
        TuneConfig(trials=0).validate(lambda field: "--" + field.replace("_", "-"), min_trials=1)
    TuneConfig().validate(str)  # no tuning (0 trials) is allowed where the caller allows it


def test_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("THERMOKD_CACHE", str(tmp_path / "cache"))
    cfg = str(write_config(tmp_path / "c.yaml"))
    base = ["tune", "--config", cfg, "--method", "kd", "--out", str(tmp_path / "t")]
    assert "magic" in _stderr_line(base + ["--space", "magic=1:2"], capsys)
    assert "temperature.tau" in _stderr_line(base + ["--space", "magic=1:2"], capsys)  # lists the knobs
    assert "empty" in _stderr_line(base + ["--space", "tau=8:2"], capsys)
    assert "--space" in _stderr_line(base + ["--space", "tau="], capsys)
    assert "--trials" in _stderr_line(base + ["--trials", "0"], capsys)
    assert "--min-rounds" in _stderr_line(base + ["--min-rounds", "0"], capsys)
    assert "--grid-points must be >= 1 (values per float knob), got 0" in \
        _stderr_line(base + ["--grid-points", "0"], capsys)
    assert "storage" in _stderr_line(base + ["--storage", "nosuchdb://x/y"], capsys)
    assert "unknown method" in _stderr_line(["tune", "--config", cfg, "--method", "magic", "--out",
                                             str(tmp_path / "t")], capsys)
    assert "does not fit" in _stderr_line(base + ["--space", "temperature.nope=1:2"], capsys)
    assert "SECTION.ARGUMENT" in _stderr_line(base + ["--hold", "tau"], capsys)
    assert "both searched" in _stderr_line(base + ["--hold", "temperature.tau", "--space", "temperature.tau=1:2"],
                                           capsys)


def test_compare_tunes_the_other_methods_while_a_study_waits_for_other_processes(tmp_path, monkeypatch):
    """compare's tuning sets aside a study whose last trials other processes are running, tunes the next methods
    meanwhile, and comes back to it (waiting only when nothing else is left); the results keep the methods' order."""
    import copy

    import optuna

    import thermokd.experiments.tune as tune_mod
    from thermokd.experiments.compare import tune_all

    monkeypatch.setattr(tune_mod, "POLL_S", 0.05)
    calls: list = []
    order: list = []

    class Runner:  # the synthetic curve in place of training; records which method each trial tuned
        def __init__(self, *args, **kwargs) -> None:
            self.train = synthetic(calls)

        def __call__(self, method, folder, on_epoch):
            order.append(method.name)
            return self.train(method, folder, on_epoch)

    monkeypatch.setattr(tune_mod, "DistillRunner", Runner)
    cfg = _cfg()
    cfg.compare.tune.trials = 2
    options = copy.deepcopy(cfg.compare.tune)
    options.trials = 1
    run_tune(cfg, "kd", tmp_path / "kd", options, train_fn=synthetic(calls), echo=lambda s: None)
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'kd' / 'study.db'}")
    other = study.ask()  # the last trial of kd's budget, which another process is running
    other.suggest_float("temperature.tau", 1.0, 16.0, log=True)
    lines: list = []
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=tune_all(
        cfg, ["kd", "dtkd"], tmp_path, (None, None, None), None, False, lines.append)))
    worker.start()
    deadline = time.time() + 60
    while not any("waiting for 1 trial" in line for line in lines) and time.time() < deadline:
        time.sleep(0.05)
    assert worker.is_alive() and any("waiting for 1 trial" in line for line in lines)
    assert "kd: 1 trial(s) still running in other processes: tuning the other methods meanwhile" in "\n".join(lines)
    assert order == ["dtkd", "dtkd"]  # dtkd's whole budget ran while kd's last trial was elsewhere
    study.tell(other, 0.99)
    worker.join(60)
    chosen, tuned = outcome["result"]
    assert list(chosen) == list(tuned) == ["kd", "dtkd"]
    assert tuned["kd"]["params"] == other.params and tuned["kd"]["complete"] == 2


def test_each_trial_records_the_cpu_time_it_spent(tmp_path):
    """Trials record their process's CPU time (pruned ones too), comparable on a machine shared with other work
    where the wall clock is not; a study with a trial from before it was recorded has no CPU total."""
    import optuna
    from optuna.trial import TrialState, create_trial

    def busy(calls):
        train = synthetic(calls)

        def run(method, folder, on_epoch):
            def spin(record):
                until = time.process_time() + 0.01  # 10 ms of computing per epoch
                while time.process_time() < until:
                    pass
                on_epoch(record)
            return train(method, folder, spin)

        return run

    calls: list = []
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=4, seed=3), train_fn=busy(calls), echo=lambda s: None)
    trials = result.summary["trials"]
    assert all(t["cpu_seconds"] >= 0.01 * t["epochs"] for t in trials)
    assert result.summary["cpu_seconds"] == pytest.approx(sum(t["cpu_seconds"] for t in trials))
    assert f"({result.summary['cpu_seconds'] / 60:.1f} CPU min)" in (tmp_path / "tune.md").read_text()
    study = optuna.load_study(study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    first = study.trials[0]
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.1, params=first.params,
                                 distributions=first.distributions))  # as an older version recorded it
    result = run_tune(_cfg(), "kd", tmp_path, TuneConfig(trials=5, seed=3), train_fn=busy(calls), echo=lambda s: None)
    assert result.summary["trials"][-1]["cpu_seconds"] is None and result.summary["cpu_seconds"] is None
    assert "CPU min" not in (tmp_path / "tune.md").read_text()


def test_tpe_steers_away_from_a_setting_another_worker_is_running(tmp_path):
    """With several workers on a study, TPE counts the trials others are running (as bad ones) when it proposes,
    so that two workers do not try the same region at once; a trial running elsewhere changes the proposal."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from thermokd.experiments.tune import _sampler

    tune = TuneConfig(trials=6, seed=0)
    space = {"temperature.tau": FloatRange(1.0, 16.0, True)}
    dist = {"temperature.tau": FloatDistribution(1.0, 16.0, log=True)}

    def proposal(running: bool) -> float:
        study = optuna.create_study(direction="maximize", sampler=_sampler(tune, space))
        for tau, value in ((1.5, 0.5), (3.0, 0.7), (6.0, 0.8), (12.0, 0.6)):
            study.add_trial(create_trial(value=value, params={"temperature.tau": tau}, distributions=dist))
        if running:  # another worker's trial, near the best so far
            study.add_trial(create_trial(state=TrialState.RUNNING, params={"temperature.tau": 6.5},
                                         distributions=dist))
        study.sampler = _sampler(tune, space, 4)
        return study.ask().suggest_float("temperature.tau", 1.0, 16.0, log=True)

    assert proposal(True) != proposal(False)


def test_a_helper_compare_seeds_its_sampler_apart(tmp_path, monkeypatch):
    """compare --helper adds its process id to the sampler's seed (tune_all's ``sampler_offset``): a helper and the
    compare opening a study at the same moment would otherwise propose the same settings."""
    import os

    import thermokd.experiments.compare as compare_mod
    import thermokd.experiments.tune as tune_mod

    seeds: list = []

    def record(cfg, method, label, out_dir, options, *args, **kwargs):
        seeds.append(options.seed)
        raise ThermoKDError("stop here")

    monkeypatch.setattr(tune_mod, "tune_method", record)
    cfg = _cfg()
    cfg.compare.tune.trials, cfg.compare.tune.seed = 2, 5
    for offset in (0, 7):
        with pytest.raises(ThermoKDError, match="stop here"):
            compare_mod.tune_all(cfg, ["kd"], tmp_path, (None, None, None), None, False, print, sampler_offset=offset)
    assert seeds == [5, 12] and cfg.compare.tune.seed == 5
    offsets: list = []
    monkeypatch.setattr(compare_mod, "setup", lambda *a: (None, None, (None, {})))
    monkeypatch.setattr(compare_mod, "tune_all", lambda *a, **k: offsets.append(k["sampler_offset"]) or ({}, {}))
    monkeypatch.setattr(compare_mod, "_help", lambda *a: {"made": [], "others": []})
    compare_mod._run_compare(cfg, ["kd"], [0, 1, 2], tmp_path, {}, {}, True, None, False, print, True, helper=True)
    assert offsets == [os.getpid()]


def test_tune_in_turn_sets_a_busy_study_aside_and_returns_results_in_order(monkeypatch):
    """The loop compare and the LM command share: a study raising StudyBusy goes to the back (said once), the last
    one left is asked to wait, and the results come back in the labels' order."""
    import thermokd.experiments.tune as tune_mod
    from thermokd.experiments.tune import StudyBusy, tune_in_turn

    monkeypatch.setattr(tune_mod, "POLL_S", 0.0)
    busy_left = {"a": 3, "b": 0, "c": 1}
    calls: list = []

    def tune_one(label, wait):
        calls.append((label, wait))
        if busy_left[label] and not wait:
            busy_left[label] -= 1
            raise StudyBusy(f"{label}: 1 trial(s) still running in other processes")
        return label.upper()

    lines: list = []
    assert tune_in_turn(["a", "b", "c"], tune_one, lines.append) == {"a": "A", "b": "B", "c": "C"}
    assert calls == [("a", False), ("b", False), ("c", False), ("a", False), ("c", False), ("a", True)]
    assert lines == ["  a: 1 trial(s) still running in other processes: tuning the other methods meanwhile",
                     "  c: 1 trial(s) still running in other processes: tuning the other methods meanwhile"]
