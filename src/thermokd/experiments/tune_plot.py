"""The plot of a study: validation accuracy against each knob, complete trials filled, pruned ones hollow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import figure, save_figure
from .tune_metric import metric_of


def plot_trials(summary: dict[str, Any], path: Path) -> Path:
    """One panel per knob: each trial's validation score (accuracy in %, or perplexity) at its value; log axes for
    log ranges."""
    metric = metric_of(summary)
    knobs = list(summary["space"])
    fig = figure(3.6 * len(knobs) + 0.6, 3.4)
    axes = fig.subplots(1, len(knobs), squeeze=False)[0]
    for ax, knob in zip(axes, knobs):
        for state, style in (("complete", {"color": "tab:blue"}),
                             ("pruned", {"facecolors": "none", "edgecolors": "tab:grey"})):
            points = [(t["params"][knob], t["value"] if state == "complete" else max(t["val_by_epoch"].values()))
                      for t in summary["trials"] if t["state"] == state and knob in t["params"] and
                      (t["value"] is not None or t["val_by_epoch"])]
            if points:
                xs, ys = zip(*points)
                ax.scatter([str(x) if isinstance(x, str) else x for x in xs], [metric.from_score(y) for y in ys],
                           label=state, **style)
        chosen = summary["params"].get(knob)
        if chosen is not None and not isinstance(chosen, str):
            ax.axvline(chosen, color="tab:red", linestyle="--", linewidth=1, label="chosen")
        spec = summary["space"][knob]
        if isinstance(spec, dict) and spec.get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(knob)
        if metric.log_axis:
            ax.set_yscale("log")
        ax.set_ylabel(metric.axis)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"thermokd tune: {summary['label']} ({len(summary['trials'])} trials)")
    return save_figure(fig, path)
