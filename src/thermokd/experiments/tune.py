"""``thermokd tune``: a method's temperature setting chosen on the validation split within a budget of trials.

The search is Optuna's: TPE, grid or random sampling over the method's knobs (``thermokd.spaces``), Hyperband or
successive-halving pruning on each trial's per-round (per-epoch, or per-evaluation for language models) validation
score, and a study kept in SQLite (in the output folder) or any RDB URL, so a killed tune continues where it stopped
and several machines can share one study. A trial's score is its best validation accuracy, or for language models its
validation perplexity (``tune_metric``); the test split is never read. A study records its search space and the
method it tunes, and refuses to continue with either changed.
"""
from __future__ import annotations

import collections
import copy
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import MethodConfig, RunConfig, TuneConfig
from ..errors import ThermoKDError, first_line
from ..files import write_json, write_text
from ..spaces import (SECTIONS, FloatRange, Knob, check_knob, declared_space, method_space, parse_knob, resolve_knob,
                      space_to_json)
from .tune_metric import ACCURACY, Metric, metric_of

# (method section, trial folder, per-round callback) -> the run's result (``best_val_acc``, ``best_epoch``, ...)
TrainFn = Callable[[MethodConfig, Path, Callable[[dict[str, Any]], None]], dict[str, Any]]
HEARTBEAT_S, GRACE_S = 60, 180  # a trial whose process died is failed (and retried) after GRACE_S seconds
RETRIES = 2  # how often a trial whose process died is run again
POLL_S = 10.0  # how often a worker with no trial left to start looks whether the others' trials have finished


class StudyBusy(Exception):
    """Raised by ``tune_method(..., wait=False)`` when the study's own trials are done but trials that other
    processes run are not: the caller may do other work and call again. The message says which and how many."""


@dataclass
class TuneResult:
    label: str
    params: dict[str, Any]
    method: MethodConfig
    best_value: "float | None"
    summary: dict[str, Any]


def build_space(method: MethodConfig, tune: TuneConfig, domain: str = "default") -> dict[str, Knob]:
    """The knobs searched for ``method``: its declared space (of ``domain``: ``default`` or ``lm``), with
    ``tune.space`` overriding or adding knobs (``"LOW:HIGH[:log]"`` strings or lists of choices) and the knobs of
    ``tune.hold`` left out (the method keeps its own setting of them); each knob is checked by building the method
    with it."""
    space = method_space(method.name, kd_weight=tune.kd_weight, domain=domain)
    held = set()
    for name in tune.hold:  # SECTION.ARGUMENT only: a held knob need not be one of this method's
        if not isinstance(name, str) or name.count(".") != 1 or name.split(".", 1)[0] not in SECTIONS:
            raise ThermoKDError(f"tune.hold: {name!r} is not a knob; name it as SECTION.ARGUMENT with SECTION one of "
                                f"{', '.join(SECTIONS)}, e.g. temperature.student")
        if name in tune.space:
            raise ThermoKDError(f"knob {name} is both searched (tune.space) and held (tune.hold); keep one")
        held.add(name)
    for name, value in tune.space.items():
        if value is None:  # a knob named without a range: the range its method declares
            declared = declared_space(method.name, domain)
            full = resolve_knob(str(name), declared, method.name)
            if full not in declared:
                raise ThermoKDError(f"knob {full} has no declared range for {method.name}; give one as "
                                    f"{name}=LOW:HIGH[:log] or {name}=A,B,C")
            space[full] = declared[full]
            continue
        if isinstance(value, dict) and set(value) <= {"low", "high", "log"}:  # YAML: {low: 1, high: 8, log: true}
            value = FloatRange(float(value.get("low", "nan")), float(value.get("high", "nan")), bool(value.get("log")))
        knob = parse_knob(f"{name}={value}")[1] if isinstance(value, str) else value
        space[resolve_knob(str(name), space, method.name)] = knob
    space = {name: knob for name, knob in space.items() if name not in held}
    for name, knob in space.items():
        check_knob(name, knob)
        probe = apply_params(method, {name: knob.low if isinstance(knob, FloatRange) else knob[0]})
        try:
            probe.build(domain)
        except ThermoKDError as exc:
            raise ThermoKDError(f"knob {name} does not fit method {method.name}: {exc}") from None
    return space


def apply_params(method: MethodConfig, params: dict[str, Any]) -> MethodConfig:
    """A copy of ``method`` with each ``section.argument`` knob set."""
    method = copy.deepcopy(method)
    for name, value in params.items():
        section, argument = name.split(".", 1)
        getattr(method, section)[argument] = value
    return method


def _sampler(tune: TuneConfig, space: dict[str, Knob], history: int = 0):
    """The study's sampler, seeded by ``tune.seed`` and the number of trials the study already has (``history``):
    seeded as at its start, a continued study would draw its first random settings again (the first trials of
    a TPE study are random), so a restart would repeat a setting and waste a trial of the budget."""
    import optuna

    if tune.sampler == "grid":
        grid = {k: (v.grid(tune.grid_points) if isinstance(v, FloatRange) else list(v)) for k, v in space.items()}
        return optuna.samplers.GridSampler(grid, seed=tune.seed + history)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed + history)
    # constant liar: trials other workers on the study are running count as bad ones, so that two workers do not
    # propose the same region at once (with one worker nothing else is running: the same proposals as without)
    return optuna.samplers.TPESampler(seed=tune.seed + history, n_startup_trials=min(10, max(tune.trials // 3, 2)),
                                      constant_liar=True)


def _pruner(tune: TuneConfig, rounds: int):
    import optuna

    first = min(tune.min_rounds, rounds)  # no trial is pruned before it has been evaluated `first` times
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=rounds, reduction_factor=3)
    if tune.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _retry_callback() -> tuple[str, Any]:
    """The storage's keyword for the hook that retries a trial whose process died, and the hook: Optuna's retry
    callback (stateless: :func:`_fail_stale` calls one of its own). Optuna >= 4.9 renamed it."""
    from optuna import storages

    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        return "heartbeat_stale_trial_callback", storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)
    return "failed_trial_callback", storages.RetryFailedTrialCallback(max_retry=RETRIES)


def open_study(url: str, name: str, sampler, pruner):
    """Create or load (``load_if_exists``) a maximising study; a bad URL is a one-line error."""
    import optuna
    from optuna import storages

    try:
        with warnings.catch_warnings():  # Optuna marks heartbeats "experimental"; they have been stable since v2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            hook, retry = _retry_callback()  # a trial whose process died is retried
            storage = storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **{hook: retry})
        return optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                   direction="maximize", load_if_exists=True)
    except Exception as exc:  # SQLAlchemy raises many kinds (bad URL, missing driver, refused connection)
        raise ThermoKDError(f"cannot open the study storage {redact(url)!r}: {first_line(exc)}") from None


def check_study_file(out_dir: Path) -> None:
    """Refuse to start a new study where ``tune.json`` records trials but the study they came from (``study.db``) is
    missing, e.g. a results folder copied without it: tuning again would spend the budget anew and overwrite the
    record."""
    record = out_dir / "tune.json"
    if (out_dir / "study.db").exists() or not record.is_file():
        return
    try:
        trials = len(json.loads(record.read_text(encoding="utf-8")).get("trials") or [])
    except (OSError, ValueError, AttributeError):
        trials = 0  # an unreadable record: nothing to protect
    if trials:
        raise ThermoKDError(f"{record} records a study of {trials} trials, but the study itself "
                            f"({out_dir / 'study.db'}) is missing: put study.db back to continue it, or delete "
                            "tune.json to tune from scratch")


def redact(url: str) -> str:
    """A storage URL without its password, fit to print and to store."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def _finished(study) -> int:
    """The trials that count against the budget: complete, pruned, and failed ones that nobody retried. A trial
    whose process died (killed, machine gone) fails by heartbeat and is retried with the same knobs: the retry
    counts, the dead attempt does not, so a kill costs a method none of its budget."""
    return _counts(study)[0]


def _counts(study) -> tuple[int, int]:
    """(finished, running): :func:`_finished`'s count and the trials running now, here or in other workers (a dead
    worker's until they fail by heartbeat), from one read of the study: two reads could see another worker's trial
    finish in between, counted in neither, and one trial too many would start."""
    states = _states(study.get_trials(deepcopy=False))
    return sum(state in ("complete", "pruned", "fail") for state in states), states.count("running")


def _fail_stale(study) -> None:
    """Fail the running trials whose worker is gone, and queue their retries: at once for a worker on this machine
    whose process no longer exists (a killed ``tune`` started again), else when its heartbeat goes stale (Optuna
    does that when a trial starts; a worker waiting for others' trials must do it itself)."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():  # "experimental" since 2.9, like the heartbeats it reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") != os.getpid() and not _alive(worker.get("pid")):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another worker failed it first
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                _retry_callback()[1](study, study.trials[trial.number])  # as the storage's hook would


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def _states(trials) -> list[str]:
    """Each trial's state as the summaries name it: Optuna's, except ``retried`` for a failed trial that Optuna ran
    again (the retry records the trial it replaces)."""
    retried = {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}
    return ["retried" if t.number in retried else t.state.name.lower() for t in trials]


def knob_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def method_base(method: MethodConfig, domain: str = "default") -> dict[str, Any]:
    """What a study tunes from: the method section and every setting of its loss as built (the library's defaults and
    the domain's presets included), so that a study is never continued from another starting point."""
    import dataclasses

    from ..engine.identity import loss_settings

    loss = method.build(domain)
    return {"method": json.loads(json.dumps(dataclasses.asdict(method))), "loss": loss_settings(loss)}


def pruning_of(tune: TuneConfig, rounds: int) -> dict[str, Any]:
    """How a study's trials are measured and stopped: the pruner, the first round it may prune at and the most rounds
    a trial runs. A study continued with other values would mix trials cut at different points."""
    return {"pruner": tune.pruner, "min_rounds": min(tune.min_rounds, rounds), "rounds": rounds}


def check_study(study, url: str, space: dict[str, Knob], base: dict[str, Any], pruning: dict[str, Any]) -> None:
    """Refuse to continue a study made with another search space, from another method or with other pruning
    (:func:`pruning_of`); record them otherwise (a study made before pruning was recorded gets today's)."""
    where = f"study {study.study_name!r} in {redact(url)}"
    stored = study.user_attrs.get("space")
    if stored is not None and stored != space_to_json(space):
        raise ThermoKDError(f"{where} was made with another search space ({stored}); use another --study or --out")
    recorded = study.user_attrs.get("base")
    if recorded is not None and recorded != base:
        raise ThermoKDError(f"{where} tunes another method ({recorded['method']} {recorded['loss']}), not "
                            f"{base['method']} {base['loss']}; use another --study or --out")
    recorded = study.user_attrs.get("pruning")
    if recorded is not None and recorded != pruning:
        raise ThermoKDError(f"{where} was pruned with {knob_text(recorded)}, not {knob_text(pruning)}: its trials "
                            "would be cut at different points; continue it with the pruner and min_rounds it was made "
                            "with (the tune section of the config, or --set), or use another --study or --out")
    study.set_user_attr("space", space_to_json(space))
    study.set_user_attr("base", base)
    study.set_user_attr("pruning", pruning)


def start_point(method: MethodConfig, space: dict[str, Knob], domain: str = "default") -> dict[str, Any]:
    """The knobs of ``space`` at ``method``'s own setting (the domain's preset, a variant's values, else the
    factories' defaults) where that lies inside the space: the first trial of a new study, so that the chosen
    setting scores at least as well in the study (seed 0, validation) as the setting it is reported beside."""
    from ..methods import method_settings

    sections = method_settings(method.name, domain=domain, temperature=method.temperature,
                               weighting=method.weighting, with_defaults=True)
    loss = method.build(domain)
    point = {}
    for knob, rng in space.items():
        section, argument = knob.split(".", 1)
        value = getattr(loss, argument, None) if section == "loss" else sections.get(section, {}).get(argument)
        inside = (isinstance(value, (int, float)) and not isinstance(value, bool) and rng.low <= value <= rng.high
                  if isinstance(rng, FloatRange) else value in rng)
        if inside:
            point[knob] = float(value) if isinstance(rng, FloatRange) else value
    return point


def tune_method(cfg: Any, method: MethodConfig, label: str, out_dir: Path, tune: TuneConfig,
                train_fn: TrainFn, echo: Callable[[str], None] = print, *, metric: Metric = ACCURACY,
                rounds: "int | None" = None, domain: str = "default",
                config_for: "Callable[[MethodConfig], dict] | None" = None,
                set_prefix: str = "method", start: "dict[str, Any] | None" = None, wait: bool = True) -> TuneResult:
    """Run (or continue) the study of ``method`` in ``out_dir`` until ``tune.trials`` trials have finished, then
    write ``tune.json``, ``tune.md``, the plot and the chosen setting (``best.yaml``, ``best_config.yaml``).

    ``metric``: what a trial is scored by (validation accuracy by default); ``rounds``: the most per-round reports a
    trial makes, the pruner's resource (default ``cfg.train.epochs``); ``domain``: whose search spaces and presets
    (``default`` or ``lm``); ``config_for``: the whole config at a chosen method section, for ``best_config.yaml``
    (default: ``cfg`` with its ``method`` replaced); ``set_prefix``: where the ``--set`` lines put the knobs;
    ``start``: knob values a new study tries first (default: :func:`start_point`, the method's own setting; not with
    the grid sampler); ``wait``: when the budget is spent but other workers' trials are still running, wait for them
    (default) or raise :class:`StudyBusy` at once."""
    import optuna
    from optuna.trial import TrialState

    if tune.trials < 1:
        raise ThermoKDError(f"the tuning budget must be >= 1 trial, got {tune.trials}")
    space = build_space(method, tune, domain)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not space:  # e.g. cross-entropy: nothing to choose
        result = TuneResult(label, {}, copy.deepcopy(method), None, {"label": label, "params": {}, "space": {},
                                                                      "trials": [], "seconds": 0.0,
                                                                      "cpu_seconds": 0.0})
        write_outputs(cfg, result, out_dir, config_for, set_prefix)
        return result
    rounds = rounds or cfg.train.epochs
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the default study lives in out_dir as given now, so a folder moved or merged elsewhere brings its study along
    url = tune.storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if not tune.storage:
        check_study_file(out_dir)
    study = open_study(url, tune.study or label, _sampler(tune, space), _pruner(tune, rounds))
    check_study(study, url, space, method_base(method, domain), pruning_of(tune, rounds))
    if study.trials:
        study.sampler = _sampler(tune, space, len(study.trials))
    if start is None:
        start = start_point(method, space, domain)
    if start and not study.trials and tune.sampler != "grid":
        study.enqueue_trial(start)  # counts against the budget like any trial
    budget = tune.trials
    if tune.sampler == "grid":
        budget = min(budget, _grid_size(space, tune.grid_points))

    def objective(trial) -> float:
        params = {k: (trial.suggest_float(k, v.low, v.high, log=v.log) if isinstance(v, FloatRange)
                      else trial.suggest_categorical(k, v)) for k, v in space.items()}

        done = [0]  # evaluation rounds so far: a trial starts afresh, so this is epochs (or evaluations) trained

        def on_epoch(record: dict[str, Any]) -> None:
            done[0] += 1
            trial.report(metric.score(record[metric.record_key]), done[0])  # resource = rounds trained
            if done[0] < rounds and trial.should_prune():  # a finished run is scored, not pruned
                raise optuna.TrialPruned(f"pruned after round {done[0]}")

        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})  # see _fail_stale
        folder = out_dir / "trials" / f"trial-{trial.number:04d}"
        if folder.exists():  # left by a killed process: this trial starts afresh
            shutil.rmtree(folder)
        cpu = time.process_time()
        try:
            result = train_fn(apply_params(method, params), folder, on_epoch)
        finally:  # pruned and failed trials spent it too
            trial.set_user_attr("cpu_seconds", time.process_time() - cpu)
        trial.set_user_attr("best_epoch", result.get("best_epoch"))
        return metric.score(result[metric.result_key])

    def progress(study, trial) -> None:
        done = _finished(study)
        state = trial.state.name.lower()
        score = trial.value if trial.state == TrialState.COMPLETE else max(trial.intermediate_values.values(),
                                                                           default=None)
        what = "" if score is None else f" {metric.short} {metric.text(score)}"
        try:
            best = f"; best {metric.text(study.best_value)} (trial {study.best_trial.number})"
        except ValueError:
            best = ""
        echo(f"  {label} trial {trial.number} [{done}/{budget}] {state}: {knob_text(trial.params)}{what}{best}")

    def at_budget(study, trial) -> None:  # other workers on the study may have finished or started trials meanwhile
        if sum(_counts(study)) >= budget:
            study.stop()

    announced = waited = False
    while True:
        _fail_stale(study)  # a dead worker's trial fails here, and its retry is queued
        finished, running = _counts(study)
        remaining = budget - finished - running
        if remaining > 0:
            if not announced:
                echo(f"tuning {label}: {remaining} of {budget} trials to go ({tune.sampler} sampler, {tune.pruner} "
                     f"pruning, {rounds} rounds max, study {study.study_name!r} in {redact(url)})")
                announced = True
            # ThermoKDError in a trial (e.g. a diverging setting) fails that trial, not the study
            study.optimize(objective, n_trials=remaining, catch=(ThermoKDError,), callbacks=[at_budget, progress])
        elif finished >= budget:
            break
        else:  # the rest of the budget is other workers' running trials: choose from the study once they finish
            if not wait:
                raise StudyBusy(f"{label}: {running} trial(s) still running in other processes")
            if not waited:
                echo(f"  {label}: waiting for {running} trial(s) that other processes are running")
                waited = True
            time.sleep(POLL_S)
    # the default study lives beside tune.json: record it relative to the folder, not this machine's absolute path
    shown = redact(url) if tune.storage else "sqlite:///study.db (in this folder)"
    result = summarize_study(study, label, method, space, tune, budget, shown, metric)
    write_outputs(cfg, result, out_dir, config_for, set_prefix)
    return result


def tune_in_turn(labels: list[str], tune_one: "Callable[[str, bool], TuneResult]", echo: Callable[[str], None] = print
                 ) -> dict[str, TuneResult]:
    """Tune every label with ``tune_one(label, wait)`` (a :func:`tune_method` call), in order, except that a study
    whose own trials are done while other processes still run some (:class:`StudyBusy`) is set aside, and the labels
    after it are tuned meanwhile; the last study left waits. Returns the results in the labels' order."""
    results: dict[str, TuneResult] = {}
    queue, busy, said = collections.deque(labels), 0, set()
    while queue:
        label = queue.popleft()
        try:
            results[label] = tune_one(label, not queue)
        except StudyBusy as exc:
            if label not in said:
                echo(f"  {exc}: tuning the other methods meanwhile")
                said.add(label)
            queue.append(label)
            busy += 1
            if busy >= len(queue):  # every study left is other processes' to finish: look again in a while
                time.sleep(POLL_S)
                busy = 0
            continue
        busy = 0
    return {label: results[label] for label in labels}


def _grid_size(space: dict[str, Knob], points: int) -> int:
    size = 1
    for knob in space.values():
        size *= points if isinstance(knob, FloatRange) else len(knob)
    return size


def summarize_study(study, label: str, method: MethodConfig, space: dict[str, Knob], tune: TuneConfig, budget: int,
                    storage: str, metric: Metric = ACCURACY) -> TuneResult:
    """The trials table and the chosen setting (the best complete trial by ``metric``'s score)."""
    from optuna.trial import TrialState

    trials = [{"number": t.number, "state": state, "params": t.params, "value": t.value,
               "epochs": len(t.intermediate_values), "best_epoch": t.user_attrs.get("best_epoch"),
               "val_by_epoch": {int(k): v for k, v in t.intermediate_values.items()},
               # a retried trial "completed" when a later process found its heartbeat stale, maybe hours after it
               # died: its compute is unknown, and not counted
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete and t.datetime_start and state != "retried" else None,
               # the CPU time of the process that ran it (its threads; not the waits for a busy core): comparable
               # across trials that shared a machine with other work. None for trials made before it was recorded
               "cpu_seconds": t.user_attrs.get("cpu_seconds") if state != "retried" else None}
              for t, state in zip(study.trials, _states(study.trials))]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ThermoKDError(f"tuning {label}: none of {len(trials)} trials completed (see the failures above)")
    best = max(complete, key=lambda t: (t.value, -t.number))
    summary = {"label": label, "method": method.name, "metric": metric.name, "study": study.study_name,
               "storage": storage,
               "sampler": tune.sampler, "pruner": tune.pruner, "min_rounds": tune.min_rounds, "budget": budget,
               "space": space_to_json(space),
               "trials": trials, "best_trial": best.number, "best_value": best.value, "params": best.params,
               "complete": len(complete), "pruned": sum(t["state"] == "pruned" for t in trials),
               "failed": sum(t["state"] == "fail" for t in trials),
               "retried": sum(t["state"] == "retried" for t in trials),
               # the study's compute: its trials' time summed over every invocation (and worker) that ran them; a
               # re-run of a finished study adds nothing and rewrites the same summary
               "seconds": sum(t["seconds"] or 0.0 for t in trials),
               "cpu_seconds": _cpu_total(trials)}
    return TuneResult(label, dict(best.params), apply_params(method, best.params), best.value, summary)


def _cpu_total(trials: list[dict[str, Any]]) -> "float | None":
    """The trials' CPU seconds summed, or None when a counted trial has none recorded (made by an older version)."""
    counted = [t for t in trials if t["state"] != "retried"]
    if not counted or any(t["cpu_seconds"] is None for t in counted):
        return None
    return sum(t["cpu_seconds"] for t in counted)


def set_lines(method: MethodConfig, params: dict[str, Any], prefix: str = "method") -> list[str]:
    """The ``--set`` arguments that select the tuned setting in ``distill`` or ``compare`` (``prefix``: the config
    section that holds the method, e.g. ``variants.kd-tuned`` in an LM config)."""
    return [f"{prefix}.name={method.name}"] + [f"{prefix}.{k}={json.dumps(v)}" for k, v in params.items()]


def write_outputs(cfg: Any, result: TuneResult, out_dir: Path,
                  config_for: "Callable[[MethodConfig], dict] | None" = None, set_prefix: str = "method") -> None:
    """``tune.json`` (the study's trials), ``tune.md``, ``best.yaml`` (the method section), ``best_config.yaml``
    (the whole config at the chosen setting) and, when there are trials, ``tune_vs_knob.png``."""
    import dataclasses

    import yaml


    method = dataclasses.asdict(result.method)
    result.summary.update(chosen_method=method, set=set_lines(result.method, result.params, set_prefix))
    summary = result.summary
    write_json(out_dir / "tune.json", summary)
    write_text(out_dir / "best.yaml", yaml.safe_dump({"method": method}, sort_keys=False))
    if config_for is None:
        full = copy.deepcopy(cfg)
        full.method = copy.deepcopy(result.method)
        whole = full.to_dict()
    else:
        whole = config_for(copy.deepcopy(result.method))
    write_text(out_dir / "best_config.yaml", yaml.safe_dump(whole, sort_keys=False))
    write_text(out_dir / "tune.md", "\n".join(markdown(summary)) + "\n")
    if summary["trials"]:
        from .tune_plot import plot_trials

        plot_trials(summary, out_dir / "tune_vs_knob.png")


def compute_text(summary: dict[str, Any]) -> str:
    """A study's compute: its trials' wall time, and their CPU time where every trial recorded it."""
    cpu = summary.get("cpu_seconds")
    return (f"{(summary.get('seconds') or 0.0) / 60:.1f} min of trials"
            + ("" if cpu is None else f" ({cpu / 60:.1f} CPU min)"))


def markdown(summary: dict[str, Any]) -> list[str]:
    metric = metric_of(summary)
    lines = [f"# thermokd tune: {summary['label']}", ""]
    if not summary["trials"]:
        return lines + ["This method has no knobs to tune: it runs as configured.", ""]
    lines += [f"- study `{summary['study']}` in `{summary['storage']}`; {summary['sampler']} sampler, "
              f"{summary['pruner']} pruning; budget {summary['budget']} trials "
              f"({summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed"
              + (f"; {summary['retried']} more died with their process and ran again" if summary.get("retried")
                 else "") + ")",
              f"- chosen (best {metric.what}, trial {summary['best_trial']}): "
              f"{knob_text(summary['params'])} → {metric.text(summary['best_value'])}",
              f"- use it: `--set {' --set '.join(summary['set'])}`, or `--config best_config.yaml`",
              f"- compute: {compute_text(summary)}", "",
              "| trial | state | " + " | ".join(summary["space"]) + f" | {metric.rounds} | {metric.column} |",
              "|---:|---|" + "---:|" * len(summary["space"]) + "---:|---:|"]
    for t in summary["trials"]:
        values = [(f"{t['params'][k]:.4g}" if isinstance(t["params"].get(k), float) else str(t["params"].get(k, "—")))
                  for k in summary["space"]]
        score = t["value"] if t["value"] is not None else max(t["val_by_epoch"].values(), default=None)
        lines.append(f"| {t['number']} | {t['state']} | " + " | ".join(values) +
                     f" | {t['epochs']} | {metric.cell(score)} |")
    if metric is ACCURACY:
        note = ("Validation accuracy is a trial's best epoch (for a pruned trial, its best epoch before it was "
                "stopped). The test split is not used.")
    else:
        note = (f"The {metric.what} is a trial's at its last step (for a pruned trial, its best evaluation before it "
                "was stopped); the search maximises −log of it. The test split is not used.")
    return lines + ["", note, ""]


class DistillRunner:
    """The real :data:`TrainFn`: one student run per trial, sharing one teacher (set up on first use, or given)."""

    def __init__(self, cfg: RunConfig, cache_dir: "Path | None" = None, progress_bar: bool = True,
                 echo: Callable[[str], None] = print, shared: "tuple | None" = None) -> None:
        self.cfg, self.cache_dir, self.progress_bar, self.echo, self.shared = cfg, cache_dir, progress_bar, echo, shared

    def __call__(self, method: MethodConfig, folder: Path, on_epoch: Callable[[dict[str, Any]], None]) -> dict:
        from ..engine.run import run_distill, setup

        if self.shared is None:
            self.shared = setup(self.cfg, self.cache_dir, self.progress_bar, self.echo)
        accelerator, experiment, teacher = self.shared
        cfg = copy.deepcopy(self.cfg)
        cfg.method = method
        return run_distill(cfg, folder, cache_dir=self.cache_dir, accelerator=accelerator, experiment=experiment,
                           teacher=teacher, progress_bar=self.progress_bar, on_epoch=on_epoch)


def run_tune(cfg: RunConfig, label: str, out_dir: Path, tune: TuneConfig, cache_dir: "Path | None" = None,
             progress_bar: bool = True, echo: Callable[[str], None] = print,
             train_fn: "TrainFn | None" = None) -> TuneResult:
    """Tune the method ``label`` (a method name or a variant of the config's ``compare`` section) of ``cfg`` into
    ``out_dir``; ``train_fn`` replaces the real training (e.g. by a synthetic curve in tests)."""
    from ..config import resolve_method

    method = resolve_method(cfg, label)
    return tune_method(cfg, method, label, Path(out_dir), tune,
                       train_fn or DistillRunner(cfg, cache_dir, progress_bar, echo), echo)
