"""Tables, verdicts and plots for a ``thermokd compare`` run: ``results.json`` → ``report.md`` and three PNGs.

Spread over seeds is the *sample* standard deviation (ddof=1), the "mean ± std" of the KD literature; with one
seed it is 0.0, and the verdicts then say that there is no noise estimate instead of claiming a win.
Plots draw on matplotlib's Agg canvas directly (no pyplot state), imported inside the functions so that
``import thermokd`` stays light.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ThermoKDError
from ..files import atomic_write, write_text
from .evidence import evidence_lines

ACCURACY_PLOT = "accuracy_curves.png"
TAU_PLOT = "tau_traces.png"
ENTROPY_PLOT = "entropy_histograms.png"
DPI = 120


def mean_std(values: Iterable[Any]) -> "tuple[float | None, float | None]":
    """Mean and sample std (ddof=1; 0.0 for one value) of the non-None values; (None, None) when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _by_method(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    return groups


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method (in the order methods first appear in ``runs``): ``best_mean``, ``best_std`` (test accuracy at the
    validation-selected epoch), ``val_mean``, ``val_std`` (validation accuracy there), ``last_mean``, ``last_std``
    (the final epoch; fractions; std over seeds with ddof=1, 0.0 for a single seed), ``n`` (runs), ``seeds``,
    ``collapsed`` (runs whose validation accuracy collapsed),
    ``tau_teacher_mean`` (mean over seeds of the final epoch's mean teacher τ), ``teacher_entropy_std`` (mean over
    seeds of the std of the teacher's *normalised* test-set entropy at the final temperature), and
    ``wall_time_per_epoch`` (mean, seconds). Values a method does not have (τ for ``ce``) are None."""
    summary: dict[str, dict] = {}
    for method, group in _by_method(runs).items():
        best_mean, best_std = mean_std(r.get("best_acc") for r in group)
        last_mean, last_std = mean_std(r.get("last_acc") for r in group)
        val_mean, val_std = mean_std(r.get("best_val_acc") for r in group)
        summary[method] = {
            "best_mean": best_mean, "best_std": best_std, "val_mean": val_mean, "val_std": val_std,
            "last_mean": last_mean, "last_std": last_std, "n": len(group), "seeds": [r.get("seed") for r in group],
            "collapsed": sum(1 for r in group if r.get("collapse")),
            "tau_teacher_mean": mean_std((r.get("final") or {}).get("tau_teacher_mean") for r in group)[0],
            "teacher_entropy_std": mean_std((r.get("teacher_entropy") or {}).get("std") for r in group)[0],
            "wall_time_per_epoch": mean_std(r.get("wall_time_per_epoch") for r in group)[0],
        }
    return summary


def _pct(mean: "float | None", std: "float | None") -> str:
    return "—" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


def _num(value: "float | None", digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _check_reference(summary: dict, reference: "str | None") -> None:
    if reference is not None and reference not in summary:
        raise ThermoKDError(f"reference method {reference!r} has no runs; methods with runs: "
                            f"{', '.join(summary) or 'none'}")


def markdown_table(summary: dict, reference: "str | None" = "kd") -> str:
    """A Markdown table of :func:`summarize`'s output: accuracies in % (mean ± std over seeds), the difference of
    the mean best accuracy to ``reference`` in percentage points (column left out when ``reference`` is None),
    final teacher τ, teacher-entropy std, seconds per epoch and number of seeds."""
    _check_reference(summary, reference)
    header = ["method", "test acc % at best val epoch", "last-epoch test acc %", "best val acc %"]
    if reference is not None:
        header.append(f"Δ best vs {reference} (pp)")
    header += ["final τ^t mean", "teacher entropy std", "s/epoch", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    ref_best = summary[reference]["best_mean"] if reference is not None else None
    for method, s in summary.items():
        row = [method, _pct(s["best_mean"], s["best_std"]), _pct(s["last_mean"], s["last_std"]),
               _pct(s.get("val_mean"), s.get("val_std"))]
        if reference is not None:
            if method == reference:
                row.append("reference")
            elif s["best_mean"] is None or ref_best is None:
                row.append("—")
            else:
                row.append(f"{100 * (s['best_mean'] - ref_best):+.2f}")
        row += [_num(s["tau_teacher_mean"], 2), _num(s["teacher_entropy_std"], 3),
                _num(s["wall_time_per_epoch"], 2), str(s["n"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdicts(summary: dict, reference: str = "kd") -> dict[str, str]:
    """One honest line per method comparing its mean best accuracy with ``reference``'s: a win or a loss only when
    the gap exceeds one std of both methods; with a single seed the gap is reported without a noise claim."""
    _check_reference(summary, reference)
    ref = summary[reference]
    out: dict[str, str] = {}
    for method, s in summary.items():
        if method == reference:
            out[method] = "reference"
            continue
        if s["best_mean"] is None or ref["best_mean"] is None:
            out[method] = "no accuracy recorded"
            continue
        gap = 100 * (s["best_mean"] - ref["best_mean"])
        if min(s["n"], ref["n"]) < 2:
            side = "above" if gap >= 0 else "below"
            out[method] = f"{abs(gap):.2f} pp {side} {reference} (single seed: no noise estimate)"
            continue
        noise = 100 * max(s["best_std"], ref["best_std"])
        if gap > noise:
            out[method] = f"beats {reference} by {gap:.2f} pp (> 1 std of both)"
        elif gap < -noise:
            out[method] = f"loses to {reference} by {-gap:.2f} pp (> 1 std of both)"
        else:
            out[method] = (f"within noise of {reference} (Δ {gap:+.2f} pp; std {100 * s['best_std']:.2f} vs "
                           f"{100 * ref['best_std']:.2f} pp)")
    return out


def tuned_kd(summary: dict, grid: "dict[str, float] | None") -> "str | None":
    """The label of KD at its best grid τ (highest mean *validation* accuracy among ``grid``'s labels that ran), or
    None when fewer than two grid points ran with a validation accuracy: the test split never picks τ."""
    ran = [label for label in (grid or {}) if label in summary and summary[label].get("val_mean") is not None]
    if len(ran) < 2:
        return None
    return max(ran, key=lambda label: summary[label]["val_mean"])


def total_training_seconds(results: dict) -> dict[str, "float | None"]:
    """Compute spent: student epochs summed over runs (from each run's seconds per epoch) and the teacher's
    training time (None when unknown)."""
    students = sum((r.get("wall_time_per_epoch") or 0.0) * (r.get("epochs") or len(r.get("history") or []))
                   for r in results.get("runs", []))
    return {"students": students, "teacher": (results.get("teacher") or {}).get("train_seconds")}


# ---------------------------------------------------------------------------------------------------- plots


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png"))


def method_colours(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="grey")


def plot_accuracy_curves(results: dict, path: Path) -> Path:
    """Test accuracy (%) against epochs trained: per method the mean over seeds, with a shaded ±1 std band."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    groups = _by_method(results.get("runs", []))
    colours = method_colours(list(groups))
    fig = figure(7.0, 4.5)
    ax = fig.add_subplot()
    drawn = False
    for method, runs in groups.items():
        curves = [[h["test_acc"] for h in (r.get("history") or []) if h.get("test_acc") is not None] for r in runs]
        length = min(len(c) for c in curves)  # a run still in progress may have fewer epochs
        if length == 0:
            continue
        acc = 100 * np.array([c[:length] for c in curves], dtype=float)
        mean = acc.mean(0)
        std = acc.std(0, ddof=1) if len(acc) > 1 else np.zeros(length)
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, mean, color=colours[method], label=f"{method} (n={len(acc)})",
                marker="." if length < 30 else None)
        ax.fill_between(epochs, mean - std, mean + std, color=colours[method], alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.legend(fontsize="small")
    else:
        _empty(ax, "no epochs recorded")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Student test accuracy on {results.get('data', '?')} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_tau_traces(results: dict, path: Path) -> Path:
    """Mean teacher τ (solid) and student τ (dashed) against optimiser step, per method, for its first seed."""
    from matplotlib.lines import Line2D

    groups = _by_method(results.get("runs", []))
    colours = method_colours(list(groups))
    fig = figure(7.0, 4.5)
    ax = fig.add_subplot()
    handles, values = [], []
    for method, runs in groups.items():
        run = min(runs, key=lambda r: (r.get("seed") is None, r.get("seed")))
        trace = run.get("tau_trace") or []
        if not trace:
            continue
        steps = [row[0] for row in trace]
        tau_t = [math.nan if row[1] is None else row[1] for row in trace]
        tau_s = [math.nan if len(row) < 3 or row[2] is None else row[2] for row in trace]
        (line,) = ax.plot(steps, tau_t, color=colours[method], label=f"{method} (seed {run.get('seed')})")
        ax.plot(steps, tau_s, color=colours[method], linestyle="--")
        handles.append(line)
        values += [v for v in tau_t + tau_s if v == v]
    if handles:
        handles += [Line2D([], [], color="black", label="teacher τ"),
                    Line2D([], [], color="black", linestyle="--", label="student τ")]
        ax.legend(handles=handles, fontsize="small")
        if min(values) > 0 and max(values) / min(values) > 20:  # e.g. logit standardisation next to fixed τ
            ax.set_yscale("log")
    else:
        _empty(ax, "no temperature traces (no distillation runs)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean temperature τ")
    ax.set_title("Temperature during training (batch means)")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_entropy_histograms(results: dict, path: Path) -> Path:
    """Per method (small multiples) the distribution of the teacher's normalised entropy H/log C on the test set
    at the run's final temperature, counts summed over seeds."""
    groups = _by_method(results.get("runs", []))
    colours = method_colours(list(groups))
    panels = []
    for method, runs in groups.items():
        hists = [r["teacher_entropy"] for r in runs if r.get("teacher_entropy")
                 and r["teacher_entropy"].get("histogram_counts")]
        if hists:
            counts = [sum(col) for col in zip(*(h["histogram_counts"] for h in hists))]
            panels.append((method, hists[0]["histogram_edges"], counts,
                           mean_std(h.get("mean") for h in hists)[0], mean_std(h.get("std") for h in hists)[0]))
    cols = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = figure(3.3 * cols + 0.5, 2.7 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            if panels:
                ax.set_visible(False)
            else:
                _empty(ax, "no teacher soft labels (no distillation runs)")
                ax.set_title("teacher entropy")
            ax.set_xlabel("normalised teacher entropy H/log C")
            ax.set_ylabel("fraction of test samples")
            continue
        method, edges, counts, mean, std = panels[i]
        total = sum(counts) or 1
        ax.stairs([c / total for c in counts], edges, fill=True, alpha=0.35, color=colours[method])
        ax.stairs([c / total for c in counts], edges, color=colours[method], label=method)
        title = method if mean is None else f"{method}: mean {mean:.2f}, std {std:.2f}"
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("normalised teacher entropy H/log C", fontsize="small")
        ax.set_ylabel("fraction of test samples", fontsize="small")
        ax.legend(fontsize="small", loc="upper right")
        ax.grid(alpha=0.3)
    ax0 = axes.flat[0]
    ax0.set_xlim(0.0, 1.0)
    fig.suptitle("Teacher soft-label entropy at the final temperature")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------- report


def write_report(results: dict, out_dir: Path, title: "str | None" = None) -> Path:
    """Write ``report.md`` (setup, table, the tuning, paired per-seed differences with 95 % intervals and one verdict
    per method against KD at its best grid τ when a KD τ grid ran, else against ``kd`` — or the first method when
    no ``kd`` ran — and against ``ce``, flagged collapses, and links to the plots) and the three PNG
    plots into ``out_dir``; return the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = results.get("runs", [])
    summary = summarize(runs)
    grid = results.get("kd_grid") or {}
    best_kd = tuned_kd(summary, grid)
    reference = best_kd or ("kd" if "kd" in summary else next(iter(summary), None))
    plot_accuracy_curves(results, out_dir / ACCURACY_PLOT)
    plot_tau_traces(results, out_dir / TAU_PLOT)
    plot_entropy_histograms(results, out_dir / ENTROPY_PLOT)

    teacher = results.get("teacher") or {}
    teacher_line = f"- teacher: `{teacher.get('model', '?')}`"
    if teacher.get("test_acc") is not None:
        teacher_line += f", test accuracy {100 * teacher['test_acc']:.2f} %"
    if teacher.get("key"):
        teacher_line += f" (cache key `{teacher['key']}`)"
    seeds = results.get("seeds") or sorted({r.get("seed") for r in runs}, key=str)
    lines = [f"# {title or 'thermokd compare on ' + str(results.get('data', '?'))}", "",
             f"- data: `{results.get('data', '?')}`", teacher_line,
             f"- student: `{(results.get('student') or {}).get('model', '?')}`",
             f"- epochs: {results.get('epochs', '?')}",
             f"- seeds: {', '.join(str(s) for s in seeds)} ({len(seeds)})"]
    if results.get("machine"):
        lines.append(f"- machine: {results['machine']}")
    if results.get("created"):
        lines.append(f"- created: {results['created']}")
    spent = total_training_seconds(results)
    lines.append(f"- compute: {spent['students'] / 60:.1f} min of student training summed over runs"
                 + (f", teacher {spent['teacher'] / 60:.1f} min" if spent["teacher"] else ""))
    if runs and all(r.get("best_val_acc") is None for r in runs):
        lines.append("- **these runs predate validation selection: their 'best' epoch was chosen on the test split**")
    lines += ["", "## Results", "", markdown_table(summary, reference), "",
              "Accuracies are top-1, mean ± sample std (ddof=1) over seeds. Each run's epoch is chosen on the "
              "validation split (carved from the training data; the test split chooses nothing): the first column "
              "is the test accuracy at that epoch, the second at the final epoch. τ^t is the mean teacher temperature "
              "of the last epoch; the entropy std is that of the teacher's normalised test-set entropy at the final "
              "temperature.", ""]
    if best_kd is not None:
        lines += ["## KD's temperature grid", "", "| τ | run | val acc % | test acc % |", "|---:|---|---:|---:|"]
        for label, tau in sorted(((k, t) for k, t in grid.items() if k in summary), key=lambda kt: kt[1]):
            mark = " **(best)**" if label == best_kd else ""
            s = summary[label]
            lines.append(f"| {tau:g} | {label}{mark} | {_pct(s.get('val_mean'), s.get('val_std'))} | "
                         f"{_pct(s['best_mean'], s['best_std'])} |")
        lines += ["", f"KD at its best grid τ is `{best_kd}` (τ = {grid[best_kd]:g}), picked on the validation "
                  "split.", ""]
    lines += evidence_lines(results, reference) if reference is not None else ["No runs to compare."]
    lines += ["", "## Plots", "",
              f"- [test accuracy per epoch]({ACCURACY_PLOT})", f"- [temperature traces]({TAU_PLOT})",
              f"- [teacher entropy histograms]({ENTROPY_PLOT})", "",
              f"![test accuracy]({ACCURACY_PLOT})", "", f"![temperature traces]({TAU_PLOT})", "",
              f"![teacher entropy]({ENTROPY_PLOT})", ""]
    path = out_dir / "report.md"
    write_text(path, "\n".join(lines))
    return path
