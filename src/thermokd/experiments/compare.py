"""``thermokd compare``: one teacher, one student per method × seed, the same data order per seed across methods."""
from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig, resolve_method
from ..engine.divergence import describe_collapse
from ..engine.identity import check_configs
from ..engine.run import run_distill, setup
from ..errors import FolderInUseError, ThermoKDError
from ..files import FolderLock, holder_plan, in_use, read_json, write_json
from ..registry import normalise

DEFAULT_METHODS = "ce,kd,cist,dts,ctkd,lskd,entropy-target"


def machine_description() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"))


def parse_methods(text: str, cfg: RunConfig) -> list[str]:
    """Comma-separated labels (method names, ``kd@TAU``, or variants of the config's ``compare`` section),
    normalised and checked against ``cfg``."""
    methods = [normalise(m) for m in text.split(",") if m.strip()]
    if not methods:
        raise ThermoKDError("--methods is empty; give a comma-separated list such as ce,kd,cist")
    if len(set(methods)) != len(methods):
        raise ThermoKDError(f"--methods lists a method twice: {text!r}")
    for m in methods:
        try:
            resolve_method(cfg, m)
        except ThermoKDError as exc:
            raise ThermoKDError(f"--methods: {exc}") from None
    return methods


def kd_grid(cfg: RunConfig, labels: list[str]) -> dict[str, float]:
    """Labels that are plain fixed-τ KD (no weighting or loss overrides) and their τ: the grid from which the
    report picks "KD at its best grid τ"."""
    from ..temperature import Fixed

    grid = {}
    for label in labels:
        method = resolve_method(cfg, label)
        extra = set(method.temperature) - {"tau"}
        if method.name == "kd" and not extra and not method.weighting and not method.loss:
            grid[label] = float(method.temperature.get("tau", Fixed().tau.item()))
    return grid


def run_compare(cfg: RunConfig, methods: list[str], seeds: list[int], out_dir: Path,
                cache_dir: "Path | None" = None, progress_bar: bool = True, echo=print,
                rerun_changed: bool = False, helper: bool = False) -> dict[str, Any]:
    """Run every method × seed into ``out_dir/runs/`` and write ``results.json``, ``report.md`` and the plots.
    Finished runs made of the same config are reused and killed ones resumed; a run made of another config stops
    the command before anything is written, unless ``rerun_changed`` re-runs it.

    ``helper``: share the work of a compare on the same ``out_dir`` that another process runs (or will run): tune
    the methods last to first (joining a study in progress), then make the runs from the last seed and method
    backward, leaving out those made or being made; write no results (the main compare writes them, reusing
    these runs). Returns ``{"made": [(label, seed), ...], "others": [...]}`` (the runs made, or being made, by other
    processes)."""
    out_dir = Path(out_dir)
    tuning = cfg.compare.tune.trials > 0
    if tuning and len(seeds) < 3:
        raise ThermoKDError(f"compare with tuning needs >= 3 seeds for its paired intervals, got {len(seeds)}")
    plan = {"methods": methods, "seeds": seeds, "tune_trials": cfg.compare.tune.trials}
    if helper:
        check_helper_plan(out_dir, plan, echo)
    with contextlib.nullcontext() if helper else FolderLock(out_dir, plan=plan):  # the main compare holds the folder
        folders = {(label, seed): out_dir / "runs" / f"{label}-seed{seed}" for seed in seeds for label in methods}
        chosen = {label: resolve_method(cfg, label) for label in methods}
        if not (rerun_changed or tuning):  # with tuning, the runs' settings are known (and checked) after it
            check_configs({k: _run_config(cfg, chosen, *k) for k in folders}, folders)
        return _run_compare(cfg, methods, seeds, out_dir, folders, chosen, tuning, cache_dir, progress_bar, echo,
                            rerun_changed, helper)


def check_helper_plan(out_dir: Path, plan: dict[str, Any], echo=print) -> None:
    """Refuse a helper whose methods, seeds or tuning budget differ from those of the compare running in ``out_dir``
    (if one is): it would tune studies past the compare's budget, or make runs the compare never uses."""
    running = holder_plan(out_dir)
    if running is None:
        echo(f"helper: no compare is running in {out_dir} yet, so this helper cannot be checked against one; start "
             "the compare with the same command (without --helper)")
        return
    if running == plan:
        return
    names = {"methods": "methods", "seeds": "seeds", "tune_trials": "tuning budget (trials)"}
    differ = [f"{names.get(k, k)} {running.get(k)} there, {plan.get(k)} here" for k in sorted(set(running) | set(plan))
              if running.get(k) != plan.get(k)]
    raise ThermoKDError(f"the compare running in {out_dir} differs from this helper: {'; '.join(differ)}. Start the "
                        "helper with the compare's own command and --helper added")


def check_teacher(out_dir: Path, info: dict[str, Any], echo) -> None:
    """Refuse to continue a compare whose ``results.json`` was made with a teacher of the same key that scores
    otherwise on test: rebuilt elsewhere (a teacher trained on another machine may differ, and the cache that held
    the first one is not in the folder), its studies and runs belong to the old one. The same test accuracy with
    other test logits (float rounding of another machine or device) is said, not refused."""
    path = out_dir / "results.json"
    if not path.is_file():
        return
    recorded = read_json(path, f"delete {path} or choose another --out").get("teacher") or {}
    if recorded.get("key") != info.get("key"):
        return  # another teacher config: each run's identity tells what changed
    old_acc, new_acc = recorded.get("test_acc"), info.get("test_acc")
    if old_acc is not None and new_acc is not None and old_acc != new_acc:
        raise ThermoKDError(
            f"{out_dir} was made with another teacher under the same key {info['key']}: test accuracy "
            f"{100 * old_acc:.2f} % there{_trained_on(recorded)}, {100 * new_acc:.2f} % now{_trained_on(info)}. It "
            "was trained again differently (another machine or CPU thread count: its cache is not part of the "
            "folder), and the folder's studies and runs belong to the old one. Choose another --out, or bring the "
            "old teacher's cache (--cache / THERMOKD_CACHE)")
    if recorded.get("fingerprint") not in (None, info.get("fingerprint")):
        echo(f"  note: the teacher (key {info['key']}) gives other test logits than when {path.name} was written, "
             "at the same test accuracy (float rounding of another machine or device): runs made before and after "
             "are close, not identical")


def _trained_on(info: dict[str, Any]) -> str:
    how = info.get("trained_on")
    return f" (trained on {how['device']} with {how['threads']} thread(s))" if isinstance(how, dict) else ""


def _run_config(cfg: RunConfig, chosen: dict[str, Any], label: str, seed: int) -> RunConfig:
    run_cfg = copy.deepcopy(cfg)
    run_cfg.method, run_cfg.train.seed = copy.deepcopy(chosen[label]), seed
    return run_cfg


def _run_compare(cfg: RunConfig, methods: list[str], seeds: list[int], out_dir: Path, folders: dict,
                 chosen: dict[str, Any], tuning: bool, cache_dir: "Path | None", progress_bar: bool, echo,
                 rerun_changed: bool, helper: bool = False) -> dict[str, Any]:
    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator, experiment, teacher = setup(cfg, cache_dir, progress_bar, echo)
    check_teacher(out_dir, teacher[1], echo)
    tuned: dict[str, Any] = {}
    if tuning:
        # a helper seeds its sampler apart from the compare's: two workers that open a study at the same moment
        # with the same seed would propose the same settings
        chosen, tuned = tune_all(cfg, methods[::-1] if helper else methods, out_dir / "tune",
                                 (accelerator, experiment, teacher), cache_dir, progress_bar, echo,
                                 sampler_offset=os.getpid() if helper else 0)
        if not rerun_changed:
            check_configs({k: _run_config(cfg, chosen, *k) for k in folders}, folders)

    def make(label: str, seed: int, **how) -> dict[str, Any]:
        return run_distill(_run_config(cfg, chosen, label, seed), folders[label, seed], resume=True,
                           cache_dir=cache_dir, accelerator=accelerator, experiment=experiment, teacher=teacher,
                           progress_bar=progress_bar, rerun_changed=rerun_changed, **how)

    if helper:
        return _help(make, [(label, seed) for seed in seeds[::-1] for label in methods[::-1]], folders, echo)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for label, seed in run_order([(label, seed) for seed in seeds for label in methods], folders):
        # a run another process is still making is waited for (run_order leaves those for last)
        result = make(label, seed, wait_for=echo)
        reused = result.pop("reused", False)
        # the report groups by label; the run's own method name stays in "base_method"
        result = {**result, "method": label, "base_method": chosen[label].name,
                  "method_config": copy.deepcopy(chosen[label]).__dict__}
        echo(_run_line(label, seed, result, f"  (reused {folders[label, seed]})" if reused else ""))
        if result.get("collapse"):
            echo(f"  warning: {describe_collapse(f'{label} seed {seed}', result['collapse'])}")
        done[label, seed] = result
    runs = [done[label, seed] for seed in seeds for label in methods]
    info = {k: v for k, v in teacher[1].items() if k not in ("test_logits", "dir")}
    results = {"data": cfg.data.name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_description(), "teacher": info, "student": {"model": cfg.student.model},
               "epochs": cfg.train.epochs, "seeds": seeds, "methods": methods, "kd_grid": kd_grid(cfg, methods),
               "config": cfg.to_dict(), "runs": runs, "tuning": tuned}
    write_json(out_dir / "results.json", results)
    write_report(results, out_dir)
    return results


def _help(make, keys: list, folders: dict, echo) -> dict[str, Any]:
    """A helper compare's runs: ``keys`` in order, leaving out those made (``result.json``) or held by another
    process (their lock refuses at once); writes nothing else."""
    made, others = [], []
    for label, seed in keys:
        if (folders[label, seed] / "result.json").is_file():
            others.append((label, seed))
            continue
        try:
            result = make(label, seed)
        except FolderInUseError:
            others.append((label, seed))
            continue
        echo(_run_line(label, seed, result, "  (helper)"))
        made.append((label, seed))
    return {"made": made, "others": others}


def _run_line(label: str, seed: int, result: dict[str, Any], note: str = "") -> str:
    return (f"  {label:18s} seed {seed}: test {result['best_acc']:.4f} at the best val epoch {result['best_epoch']}, "
            f"last {result['last_acc']:.4f}{note}")


def run_order(keys: list, folders: dict) -> Iterator:
    """``keys`` in order, except that a run another process is making now (``thermokd distill`` or a helper
    ``compare`` splitting the runs) goes to the back of the queue while a free one is left: this process makes
    the free runs meanwhile instead of waiting. Asked afresh before each run, since the other process moves on."""
    queue = collections.deque(keys)
    while queue:
        key = queue.popleft()
        if in_use(folders[key]) and any(not in_use(folders[other]) for other in queue):
            queue.append(key)
            continue
        yield key


def tune_all(cfg: RunConfig, methods: list[str], out_dir: Path, shared: tuple, cache_dir: "Path | None",
             progress_bar: bool, echo, sampler_offset: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method gets the same budget (``compare.tune``) on the validation split; ``kd@TAU`` labels are fixed
    grid points and keep their τ. Returns each label's chosen method section and its tuning summary.
    ``sampler_offset``: added to the sampler's seed."""
    from .tune import DistillRunner, knob_text, tune_in_turn, tune_method

    runner = DistillRunner(cfg, cache_dir, progress_bar, echo, shared=shared)

    def tune_one(label: str, wait: bool):
        result = tune_method(cfg, resolve_method(cfg, label), label, out_dir / label,
                             cfg.compare.tune.for_method(label, sampler_offset), runner, echo, wait=wait)
        if result.params:
            echo(f"  {label}: tuned to {knob_text(result.params)} (validation {100 * result.best_value:.2f} %)")
        return result

    results = tune_in_turn([label for label in methods if not label.startswith("kd@")], tune_one, echo)
    chosen = {label: results[label].method if label in results else resolve_method(cfg, label) for label in methods}
    keys = ("params", "best_value", "best_trial", "budget", "complete", "pruned", "failed", "seconds", "cpu_seconds",
            "sampler", "pruner")
    tuned = {label: {k: result.summary.get(k) for k in keys} for label, result in results.items()}
    return chosen, tuned
