"""``thermokd recommend``: propose a fixed τ (and a CIST ``tau0``) from the teacher alone, then optionally check
the proposal against short KD students on a τ grid.

The rule is **thermokd's heuristic, not a published method**. It turns the temperature study's finding (the best
fixed τ moves with the optimiser and the training budget, and set-ups shift it through the entropy of the teacher's
tempered outputs; docs/methods.md, "The temperature study") into one number that needs no student training:

1. Take the teacher's logits on the plain (unaugmented) training inputs, the soft labels a student distils from.
2. Choose a target for the *mean normalised soft-label entropy* H/log C over those samples. The base target is
   0.5: halfway between one-hot labels (0, nothing beyond the hard label) and uniform ones (1, no information),
   and the default of the entropy-targeted strategy (docs/methods.md), so both tools aim at the same point.
3. Adjust the target for the set-up (the adjustment is part of the output, so users see why):
   - AdamW: no adjustment (the study finds AdamW comparatively insensitive to τ);
   - SGD: ``+0.05`` per doubling of the student's epochs above 20 and ``−0.05`` per halving below, capped at
     ``±0.15`` (short SGD budgets favour small τ, long ones large τ). 20 epochs is the reference because it is the
     budget of the bundled digits config and the long budget of ``thermokd sweep``'s default grid; 5 epochs gives
     0.40, 80 epochs 0.60, and 160 or more (the CIFAR protocol's 240) 0.65.
4. Solve for the fixed τ whose mean normalised entropy equals the target (bisection on log τ: the mean entropy
   increases with τ), and round it to the nearest value of a τ grid in log space.
5. CIST's ``tau0`` is that same τ: CIST's calibration puts the median teacher τ at ``tau0``, so its soft labels
   get about the proposed sharpness on average, with a more even entropy across samples.

``verify`` measures how far the proposal is from the best τ of a grid with short KD students: the honest check of a
heuristic, and the gap to report. Check it especially with AdamW: the proposal carries a caveat because AdamW
students on digits did not show the insensitivity the study reports (docs/methods.md, "The temperature study").
"""
from __future__ import annotations

import copy
import datetime
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..diagnostics import matched_fixed_tau, soft_label_report
from ..engine.run import run_distill, setup
from ..errors import ThermoKDError
from ..files import write_json, write_text
from ..functional import normalised_entropy
from ..temperature import CIST
from .diagnose import check_taus, teacher_outputs
from .stats import paired_difference

BASE_TARGET = 0.5
REFERENCE_EPOCHS = 20
SHIFT_PER_DOUBLING = 0.05
MAX_SHIFT = 0.15
TARGET_RANGE = (0.05, 0.95)
DEFAULT_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
RULE = ("thermokd heuristic (not from a paper): the fixed τ at which the teacher's mean normalised soft-label "
        "entropy H/log C on the training inputs equals a target; base target 0.5, unchanged for AdamW, "
        f"{SHIFT_PER_DOUBLING:+.2f} per doubling of SGD epochs relative to {REFERENCE_EPOCHS} (capped at "
        f"±{MAX_SHIFT:.2f}); rounded to the nearest grid value in log space; CIST tau0 = that τ.")
ADAMW_CAVEAT = ("on the bundled digits set-up AdamW students preferred τ=1 over the larger τ this rule proposes: "
                "check the proposal with verify before relying on it")


def target_adjustment(optimizer: str, epochs: int) -> dict[str, Any]:
    """The shift of the entropy target for an optimiser and a student budget, with the reason in words."""
    if epochs < 1:
        raise ThermoKDError(f"the student budget must be >= 1 epoch, got {epochs}")
    if optimizer == "adamw":
        return {"optimizer": optimizer, "epochs": epochs, "shift": 0.0,
                "reason": "AdamW is comparatively insensitive to τ (the temperature study, docs/methods.md): "
                          "no adjustment",
                "caveat": ADAMW_CAVEAT}
    if optimizer != "sgd":
        raise ThermoKDError(f"unknown optimiser {optimizer!r}; expected one of: adamw, sgd")
    doublings = math.log2(epochs / REFERENCE_EPOCHS)
    shift = max(-MAX_SHIFT, min(MAX_SHIFT, SHIFT_PER_DOUBLING * doublings))
    if abs(shift) < 1e-12:
        reason = f"SGD at the reference budget of {REFERENCE_EPOCHS} epochs: no adjustment"
    else:
        length = "short" if shift < 0 else "long"
        reason = (f"SGD with a {length} budget ({epochs} epochs = {doublings:+.2f} doublings of {REFERENCE_EPOCHS}): "
                  f"{SHIFT_PER_DOUBLING:+.2f} per doubling, capped at ±{MAX_SHIFT:.2f}, moves the target by "
                  f"{shift:+.3f} ({'smaller' if shift < 0 else 'larger'} τ)")
    return {"optimizer": optimizer, "epochs": epochs, "shift": shift, "reason": reason, "caveat": None}


def nearest_in_log(value: float, grid: "list[float]") -> float:
    """The grid value closest to ``value`` on a log scale (the smaller one on a tie)."""
    return min(grid, key=lambda g: (abs(math.log(g) - math.log(value)), g))


def recommend(cfg: RunConfig, cache_dir: "Path | None" = None, target: float = BASE_TARGET, *,
              grid: "list[float] | tuple[float, ...]" = DEFAULT_GRID, adjust: bool = True,
              progress_bar: bool = True) -> dict[str, Any]:
    """Propose a fixed τ and a CIST ``tau0`` for ``cfg`` from its teacher's training-set entropy (see the module
    docstring for the rule). ``target``: the base mean normalised entropy in (0, 1); ``adjust=False`` uses it as
    is; ``grid``: the τ values the proposal is rounded to (pass the grid you will verify on). No student is
    trained; the teacher is trained once if it is not cached yet."""
    if not (isinstance(target, (int, float)) and 0.0 < target < 1.0):
        raise ThermoKDError(f"target must be a mean normalised entropy strictly between 0 and 1, got {target!r}")
    grid = check_taus(list(grid), "grid")
    adjustment = (target_adjustment(cfg.train.optimizer.name, cfg.train.epochs) if adjust else
                  {"optimizer": cfg.train.optimizer.name, "epochs": cfg.train.epochs, "shift": 0.0,
                   "reason": "adjustment turned off (adjust=False)", "caveat": None})
    final_target = min(max(target + adjustment["shift"], TARGET_RANGE[0]), TARGET_RANGE[1])
    t = teacher_outputs(cfg, "train", cache_dir, progress_bar)
    logits = t["logits"]
    c = logits.shape[-1]
    if c < 2:
        raise ThermoKDError(f"soft-label entropy needs at least 2 classes, got {c}")
    tau_exact = matched_fixed_tau(logits, final_target * math.log(c))
    tau = nearest_in_log(tau_exact, grid)
    cist_strategy = CIST(tau0=tau)
    cist_strategy.prepare(logits)  # ρ from the whole training set, as the engine does before training
    cist = soft_label_report(cist_strategy, logits, labels=t["labels"])
    at_tau = normalised_entropy(logits, tau)
    curve = [{"tau": g, "mean": float(normalised_entropy(logits, g).mean())} for g in grid]
    return {
        "rule": RULE, "data": cfg.data.name,
        "teacher": {k: v for k, v in t["info"].items() if k != "dir"},
        "num_rows": int(logits.shape[0]), "num_classes": int(c),
        "base_target": float(target), "adjustment": adjustment, "target": final_target,
        "tau_exact": tau_exact, "tau": tau, "grid": grid,
        "clamped": not grid[0] <= tau_exact <= grid[-1],
        "entropy_at_tau": float(at_tau.mean()),
        "cist_tau0": tau, "cist_entropy_mean": cist.normalised_entropy["mean"],
        "cist_entropy_std": cist.normalised_entropy["std"],
        "fixed_entropy_std": float(at_tau.std(correction=0)),
        "entropy_curve": curve,
    }


def _kd_config(cfg: RunConfig, tau: float, epochs: int, seed: int) -> RunConfig:
    run_cfg = copy.deepcopy(cfg)
    if cfg.method.name != "kd":  # the config's loss options belong to its own method only
        run_cfg.method.loss = {}
    run_cfg.method.name, run_cfg.method.temperature, run_cfg.method.weighting = "kd", {"tau": tau}, {}
    run_cfg.train.epochs, run_cfg.train.seed = epochs, seed
    return run_cfg


def mean_std(values: "list[float]") -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verify(cfg: RunConfig, proposal: dict, grid: "list[float]", epochs: "int | None", seeds: "list[int]",
           out_dir: Path, cache_dir: "Path | None" = None, progress_bar: bool = True,
           echo: Callable[[str], None] = print, rerun_changed: bool = False,
           tune_trials: int = 0) -> dict[str, Any]:
    """Train KD students (``epochs`` each, ``None``: the config's budget) at every grid τ and at the proposal's τ
    for every seed, into ``out_dir/tau-{τ}-seed{s}`` (finished cells are reused); report the grid's best τ, its
    accuracy, the proposal's, and the gap in percentage points. With ``tune_trials``, ``thermokd tune`` also
    picks KD's τ on validation (``out_dir/tune``) and the regret of the proposal against that pick is measured
    per seed, with a 95 % interval. Writes ``recommend.json`` and ``recommend.md``."""
    if not isinstance(proposal, dict) or not isinstance(proposal.get("tau"), (int, float)) or not proposal["tau"] > 0:
        raise ThermoKDError("proposal must be the dict returned by recommend(), with a positive 'tau'")
    grid = check_taus(list(grid), "grid")
    if not seeds:
        raise ThermoKDError("seeds is empty; give at least one seed, e.g. [0]")
    epochs = cfg.train.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ThermoKDError(f"epochs must be >= 1, got {epochs}")
    proposed = float(proposal["tau"])
    taus = grid + ([] if proposed in grid else [proposed])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator, experiment, teacher = setup(cfg, cache_dir, progress_bar)
    tuned = None
    if tune_trials > 0:
        tuned = _tuned_tau(_kd_config(cfg, proposed, epochs, seeds[0]), tune_trials, out_dir / "tune",
                           (accelerator, experiment, teacher), cache_dir, progress_bar, echo)
        taus += [] if tuned in taus else [tuned]
    cells = []
    for tau in taus:
        for seed in seeds:
            folder = out_dir / f"tau-{tau:g}-seed{seed}"
            done = (folder / "result.json").is_file()
            result = run_distill(_kd_config(cfg, tau, epochs, seed), folder, resume=True, cache_dir=cache_dir,
                                 accelerator=accelerator, experiment=experiment, teacher=teacher,
                                 progress_bar=progress_bar, rerun_changed=rerun_changed, wait_for=echo)
            echo(f"  KD τ={tau:<5g} seed {seed}: best {result['best_acc']:.4f}"
                 + ("  (finished earlier, same config)" if done and result.get("reused") else ""))
            cells.append({"tau": tau, "seed": seed, "dir": folder.name, "best_acc": result["best_acc"],
                          "last_acc": result["last_acc"], "best_val_acc": result.get("best_val_acc")})
    by_tau = {}
    for tau in taus:
        best = [c["best_acc"] for c in cells if c["tau"] == tau]
        last = [c["last_acc"] for c in cells if c["tau"] == tau and c["last_acc"] is not None]
        val = [c["best_val_acc"] or 0.0 for c in cells if c["tau"] == tau]
        by_tau[tau] = {"tau": tau, "best_mean": mean_std(best)[0], "best_std": mean_std(best)[1],
                       "val_mean": mean_std(val)[0],
                       "last_mean": mean_std(last)[0] if last else None, "n": len(best)}
    # the grid's best τ is chosen on validation; the gap below is then measured on test
    best_tau = max(grid, key=lambda t: (by_tau[t]["val_mean"], -abs(math.log(t / proposed))))
    best, prop = by_tau[best_tau], by_tau[proposed]
    gap = 100.0 * (best["best_mean"] - prop["best_mean"])
    noise = 100.0 * max(best["best_std"], prop["best_std"])
    if best_tau == proposed:
        verdict = "the proposal is the grid's best τ"
    elif gap <= 0:
        verdict = f"the proposal (off the grid) matches or beats the grid's best by {-gap:.2f} pp"
    elif len(seeds) < 2:
        verdict = f"{gap:.2f} pp below the grid's best (single seed: no noise estimate)"
    elif gap <= noise:
        verdict = f"within noise of the grid's best ({gap:.2f} pp ≤ 1 std = {noise:.2f} pp)"
    else:
        verdict = f"{gap:.2f} pp below the grid's best (> 1 std = {noise:.2f} pp)"
    verification = {
        "grid": grid, "epochs": epochs, "seeds": list(seeds), "optimizer": cfg.train.optimizer.name,
        "cells": cells, "by_tau": [by_tau[t] for t in sorted(by_tau)],
        "best_tau": best_tau, "best_acc": best["best_mean"], "best_std": best["best_std"],
        "proposal_tau": proposed, "proposal_acc": prop["best_mean"], "proposal_std": prop["best_std"],
        "gap_pp": gap, "proposal_in_grid": proposed in grid, "verdict": verdict,
        "budget_note": None if proposal.get("adjustment", {}).get("epochs") in (None, epochs) else
        (f"the proposal was made for {proposal['adjustment']['epochs']} epochs but verified with {epochs}; "
         "the best τ may move with the budget"),
    }
    if tuned is not None:
        runs = [{"method": c["tau"], "seed": c["seed"], "best_acc": c["best_acc"]} for c in cells]
        verification["tuned_tau"], verification["tuned_acc"] = tuned, by_tau[tuned]["best_mean"]
        verification["regret"] = paired_difference(runs, tuned, proposed) if tuned != proposed else \
            {"n": len(seeds), "mean": 0.0, "lo": 0.0, "hi": 0.0, "seeds": list(seeds)}
    result = {"proposal": proposal, "verification": verification}
    write_recommendation(result, out_dir)
    return result


def write_recommendation(result: dict, out_dir: Path) -> Path:
    """Write ``recommend.json`` and ``recommend.md`` for ``{"proposal": ..., "verification": ... or None}``; a
    proposal alone (without verification) is accepted too. Returns the Markdown file's path."""
    if "proposal" not in result:
        result = {"proposal": result, "verification": None}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {**result, "created": datetime.datetime.now().isoformat(timespec="seconds")}
    write_json(out_dir / "recommend.json", result)
    p, v = result["proposal"], result.get("verification")
    adj = p["adjustment"]
    lines = [f"# thermokd recommend: {p['data']}", "",
             f"- teacher: `{p['teacher'].get('model', '?')}`, test accuracy {100 * p['teacher']['test_acc']:.2f} %",
             f"- **fixed τ = {p['tau']:g}** (exact solution {p['tau_exact']:.3g}, rounded to the grid "
             f"{', '.join(f'{g:g}' for g in p['grid'])}{'; outside the grid range, clamped' if p['clamped'] else ''})",
             f"- **CIST tau0 = {p['cist_tau0']:g}** (mean normalised entropy {p['cist_entropy_mean']:.3f}, std "
             f"{p['cist_entropy_std']:.3f}; fixed τ: {p['entropy_at_tau']:.3f}, std {p['fixed_entropy_std']:.3f})",
             f"- target mean normalised entropy {p['target']:.3f} = base {p['base_target']:.3f} "
             f"{adj['shift']:+.3f} ({adj['reason']})"]
    if adj.get("caveat"):
        lines.append(f"- caveat: {adj['caveat']}")
    lines += ["",
             f"Rule: {p['rule']}", ""]
    if v:
        lines += [f"## Check against KD students ({v['optimizer']}, {v['epochs']} epochs, seeds {v['seeds']})", "",
                  "| τ | test acc % at best val epoch (mean ± std) | last acc % | seeds |", "|---:|---:|---:|---:|"]
        for row in v["by_tau"]:
            mark = (" **best**" if row["tau"] == v["best_tau"] else "") + \
                   (" **proposed**" if row["tau"] == v["proposal_tau"] else "")
            last = "—" if row["last_mean"] is None else f"{100 * row['last_mean']:.2f}"
            lines.append(f"| {row['tau']:g}{mark} | {100 * row['best_mean']:.2f} ± {100 * row['best_std']:.2f} | "
                         f"{last} | {row['n']} |")
        lines += ["", f"Grid's best τ = {v['best_tau']:g} ({100 * v['best_acc']:.2f} %); proposal τ = "
                  f"{v['proposal_tau']:g} ({100 * v['proposal_acc']:.2f} %); gap {v['gap_pp']:.2f} pp: {v['verdict']}."]
        if v.get("regret"):
            r = v["regret"]
            interval = "" if r["lo"] is None else f", 95 % CI [{100 * r['lo']:+.2f}, {100 * r['hi']:+.2f}]"
            lines += ["", f"`thermokd tune` picked τ = {v['tuned_tau']:.3g} on validation "
                      f"({100 * v['tuned_acc']:.2f} % test); the proposal's regret against it is "
                      f"{100 * r['mean']:+.2f} pp over {r['n']} seeds{interval} (positive: the tuned τ is better)."]
        if v.get("budget_note"):
            lines += ["", f"Note: {v['budget_note']}."]
        lines.append("")
    path = out_dir / "recommend.md"
    write_text(path, "\n".join(lines))
    return path


def _tuned_tau(cfg: RunConfig, trials: int, out_dir: Path, shared: tuple, cache_dir: "Path | None",
               progress_bar: bool, echo: Callable[[str], None]) -> float:
    """KD's τ as ``thermokd tune`` picks it on validation, with ``trials`` trials."""
    from ..config import TuneConfig
    from .tune import DistillRunner, tune_method

    runner = DistillRunner(cfg, cache_dir, progress_bar, echo, shared=shared)
    result = tune_method(cfg, cfg.method, "kd", out_dir, TuneConfig(trials=trials), runner, echo)
    return float(f"{result.params['temperature.tau']:.4g}")  # a readable τ, as a user would set it
