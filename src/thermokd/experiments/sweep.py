"""``thermokd sweep``: fixed-τ KD over a grid of τ × optimiser × budget × seeds, plus adaptive methods, with
one teacher and its logit cache; each adaptive method is judged against KD at its *best* grid τ under the same
optimiser, budget and seeds (docs/methods.md, "The temperature study"). Resumable: a finished cell is never re-run."""
from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

from ..config import MethodConfig, OptimizerConfig, RunConfig, resolve_method
from ..engine.identity import check_configs
from ..engine.run import run_distill, setup
from ..errors import ThermoKDError
from ..files import FolderLock, write_json, write_text
from .compare import machine_description
from .report import figure, save_figure, summarize, verdicts

# optimiser settings used when the config's own optimiser is of another kind
OPTIMIZERS = {"sgd": OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
              "adamw": OptimizerConfig(name="adamw", lr=1e-3, weight_decay=1e-4)}


def kd_label(tau: float) -> str:
    return f"kd@{tau:g}"


def parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ThermoKDError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ThermoKDError(f"{what} must be a non-empty list of positive numbers, got {text!r}")
    return values


def _cells(cfg: RunConfig, taus, optimizers, budgets, seeds, methods):
    for opt in optimizers:
        for epochs in budgets:
            for seed in seeds:
                for label, method in ([(kd_label(t), MethodConfig(name="kd", temperature={"tau": t})) for t in taus]
                                      + [(m, resolve_method(cfg, m)) for m in methods]):
                    yield opt, epochs, seed, label, method


def run_sweep(cfg: RunConfig, out_dir: Path, taus: list[float], optimizers: list[str], budgets: list[int],
              seeds: list[int], methods: list[str], cache_dir: "Path | None" = None, progress_bar: bool = True,
              echo=print, rerun_changed: bool = False) -> dict[str, Any]:
    """Run every cell into ``out_dir/cells/`` (reusing finished ones made of the same config; a cell made of
    another config stops the command before anything is written, unless ``rerun_changed``) and write
    ``sweep.json``, ``sweep.md`` and the plots."""
    for opt in optimizers:
        if opt not in OPTIMIZERS:
            raise ThermoKDError(f"unknown optimiser {opt!r} in --optimizers; allowed: {', '.join(OPTIMIZERS)}")
    if not budgets or any(b < 1 for b in budgets):
        raise ThermoKDError(f"--budgets must be positive epoch counts, got {budgets}")
    out_dir = Path(out_dir)
    with FolderLock(out_dir):
        plan = {}
        for opt, epochs, seed, label, method in _cells(cfg, taus, optimizers, budgets, seeds, methods):
            run_cfg = copy.deepcopy(cfg)
            run_cfg.method = method
            run_cfg.train.epochs, run_cfg.train.seed = epochs, seed
            if run_cfg.train.optimizer.name != opt:
                run_cfg.train.optimizer = copy.deepcopy(OPTIMIZERS[opt])
            plan[opt, epochs, seed, label] = run_cfg
        folders = {k: out_dir / "cells" / f"{k[0]}-e{k[1]}-{k[3]}-seed{k[2]}" for k in plan}
        if not rerun_changed:
            check_configs(plan, folders)
        return _run_sweep(cfg, out_dir, plan, folders, taus, optimizers, budgets, seeds, methods, cache_dir,
                          progress_bar, echo, rerun_changed)


def _run_sweep(cfg: RunConfig, out_dir: Path, plan: dict, folders: dict, taus, optimizers, budgets, seeds, methods,
               cache_dir, progress_bar, echo, rerun_changed) -> dict[str, Any]:
    accelerator, experiment, teacher = setup(cfg, cache_dir, progress_bar, echo)
    cells = []
    for (opt, epochs, seed, label), run_cfg in plan.items():
        method = run_cfg.method
        result = run_distill(run_cfg, folders[opt, epochs, seed, label], resume=True,
                             cache_dir=cache_dir, accelerator=accelerator, experiment=experiment, teacher=teacher,
                             progress_bar=progress_bar, rerun_changed=rerun_changed, wait_for=echo)
        echo(f"  {opt:5s} {epochs:3d} epochs  {label:15s} seed {seed}: best {result['best_acc']:.4f}"
             + ("  (finished earlier, same config)" if result.get("reused") else ""))
        cells.append({"optimizer": opt, "epochs": epochs, "seed": seed, "label": label, "method": method.name,
                      "tau": method.temperature.get("tau") if label.startswith("kd@") else None,
                      "best_acc": result["best_acc"], "last_acc": result["last_acc"],
                      "best_val_acc": result.get("best_val_acc"),
                      "final": result["final"], "teacher_entropy": result["teacher_entropy"],
                      "wall_time_per_epoch": result["wall_time_per_epoch"]})
    results = {"data": cfg.data.name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_description(),
               "teacher": {k: v for k, v in teacher[1].items() if k not in ("test_logits", "dir")},
               "student": {"model": cfg.student.model}, "taus": taus, "optimizers": optimizers, "budgets": budgets,
               "seeds": seeds, "methods": methods, "config": cfg.to_dict(), "cells": cells,
               "groups": summarize_sweep(cells, taus)}
    write_json(out_dir / "sweep.json", results)
    write_sweep_report(results, out_dir)
    return results


def summarize_sweep(cells: list[dict], taus: list[float]) -> dict[str, Any]:
    """Per optimiser/budget: KD's accuracy by τ, its best grid τ, and every adaptive method against KD there."""
    groups: dict[str, Any] = {}
    for key in dict.fromkeys((c["optimizer"], c["epochs"]) for c in cells):
        runs = [{**c, "method": c["label"]} for c in cells if (c["optimizer"], c["epochs"]) == key]
        summary = summarize(runs)
        kd = {t: summary[kd_label(t)] for t in taus if kd_label(t) in summary}
        best = max(kd, key=lambda t: kd[t]["val_mean"] or 0.0)  # chosen on validation, never on test
        groups[f"{key[0]}-e{key[1]}"] = {
            "optimizer": key[0], "epochs": key[1], "summary": summary, "best_tau": best,
            "verdicts": verdicts(summary, reference=kd_label(best))}
    return groups


def write_sweep_report(results: dict, out_dir: Path) -> Path:
    lines = [f"# thermokd sweep on {results['data']}", "",
             f"- teacher: `{results['teacher']['model']}`, test accuracy {100 * results['teacher']['test_acc']:.2f} %",
             f"- student: `{results['student']['model']}`; seeds {results['seeds']}; machine: {results['machine']}",
             f"- grid: τ ∈ {results['taus']} × optimisers {results['optimizers']} × budgets {results['budgets']} "
             "epochs", "",
             "Best-epoch top-1 accuracy, mean ± std over seeds. Each adaptive method is compared with KD at its best "
             "grid τ under the same optimiser and budget.", ""]
    for group in results["groups"].values():
        s = group["summary"]
        lines += [f"## {group['optimizer']}, {group['epochs']} epochs: best KD τ = {group['best_tau']:g}", "",
                  "| method | test acc % at best val epoch | last acc % |", "|---|---:|---:|"]
        for label, row in s.items():
            mark = " **(best τ)**" if label == kd_label(group["best_tau"]) else ""
            lines.append(f"| {label}{mark} | {100 * row['best_mean']:.2f} ± {100 * row['best_std']:.2f} | "
                         f"{100 * row['last_mean']:.2f} ± {100 * row['last_std']:.2f} |")
        lines += [""] + [f"- **{m}**: {v}" for m, v in group["verdicts"].items() if not m.startswith("kd@")] + [""]
    lines += ["![accuracy vs tau](accuracy_vs_tau.png)", "", "![heatmap](heatmap.png)", ""]
    plot_accuracy_vs_tau(results, out_dir / "accuracy_vs_tau.png")
    plot_heatmap(results, out_dir / "heatmap.png")
    path = out_dir / "sweep.md"
    write_text(path, "\n".join(lines))
    return path


def plot_accuracy_vs_tau(results: dict, path: Path) -> Path:
    """KD's best-epoch accuracy against τ (log axis), one line per optimiser/budget, ±1 std error bars."""
    fig = figure(7.5, 4.5)
    ax = fig.add_subplot()
    taus = results["taus"]
    for group in results["groups"].values():
        rows = [group["summary"].get(kd_label(t)) for t in taus]
        xs = [t for t, r in zip(taus, rows) if r]
        ax.errorbar(xs, [100 * r["best_mean"] for r in rows if r], yerr=[100 * r["best_std"] for r in rows if r],
                    marker="o", capsize=3, label=f"KD, {group['optimizer']}, {group['epochs']} epochs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("temperature τ (log scale)")
    ax.set_ylabel("test accuracy at the best validation epoch (%)")
    ax.set_title("Fixed-τ KD across the grid")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_heatmap(results: dict, path: Path) -> Path:
    """Mean best accuracy of KD for every (optimiser, budget) × τ."""
    import numpy as np

    groups = list(results["groups"].values())
    taus = results["taus"]
    grid = np.array([[100 * g["summary"][kd_label(t)]["best_mean"] if kd_label(t) in g["summary"] else np.nan
                      for t in taus] for g in groups])
    fig = figure(1.2 * len(taus) + 3, 0.6 * len(groups) + 2)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_yticks(range(len(groups)), [f"{g['optimizer']}, {g['epochs']} ep" for g in groups])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("temperature τ")
    ax.set_ylabel("optimiser, budget")
    ax.set_title("KD test accuracy at the best validation epoch (%)")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    return save_figure(fig, path)
