"""Paired comparisons over seeds: every method runs with the same data order and initialisation per seed, so the
per-seed difference of two methods removes the seed's own luck; a 95 % Student-t interval on the mean difference
says whether a gap is resolved."""
from __future__ import annotations

import math
import statistics
from typing import Any


def t_interval(values: list[float], level: float = 0.95) -> "tuple[float, float, float] | None":
    """Mean and two-sided ``level`` Student-t interval of ``values`` (None for fewer than two)."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def per_seed(runs: list[dict], method: str, key: str = "best_acc") -> dict[Any, float]:
    return {r.get("seed"): r[key] for r in runs if r.get("method") == method and r.get(key) is not None}


def paired_difference(runs: list[dict], method: str, reference: str, key: str = "best_acc") -> "dict[str, Any] | None":
    """``method − reference`` on ``key`` over the seeds both ran: ``n``, ``mean``, ``lo``, ``hi``, ``se`` (the
    mean's standard error; fractions; the interval and ``se`` are None with fewer than two shared seeds), or None
    when they share no seed."""
    a, b = per_seed(runs, method, key), per_seed(runs, reference, key)
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    ci = t_interval(diffs)
    return {"n": len(seeds), "mean": statistics.fmean(diffs), "lo": ci[1] if ci else None,
            "hi": ci[2] if ci else None, "se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if ci else None,
            "seeds": seeds}


def paired_verdict(diff: "dict[str, Any] | None", reference: str) -> str:
    """One line: a win or a loss only when the 95 % interval of the paired difference excludes 0."""
    if diff is None:
        return f"no seed in common with {reference}"
    gap = 100 * diff["mean"]
    if diff["lo"] is None:
        return f"Δ {gap:+.2f} pp vs {reference} on one seed: no interval"
    interval = f"Δ {gap:+.2f} pp, 95 % CI [{100 * diff['lo']:+.2f}, {100 * diff['hi']:+.2f}], {diff['n']} seeds"
    if diff["lo"] > 0:
        return f"beats {reference} ({interval})"
    if diff["hi"] < 0:
        return f"loses to {reference} ({interval})"
    return f"not resolved from {reference} ({interval})"


def paired_table(runs: list[dict], methods: list[str], references: list[str]) -> list[str]:
    """Markdown lines: one row per method, one column per reference with the paired Δ (pp) and its 95 % CI."""
    header = ["method"] + [f"Δ vs {ref} (pp, 95 % CI)" for ref in references]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for method in methods:
        cells = [method]
        for ref in references:
            d = None if method == ref else paired_difference(runs, method, ref)
            if method == ref:
                cells.append("reference")
            elif d is None:
                cells.append("—")
            elif d["lo"] is None:
                cells.append(f"{100 * d['mean']:+.2f} (1 seed)")
            else:
                cells.append(f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
