"""The report sections that make a comparison trustworthy: how each method was tuned, paired per-seed differences
with 95 % intervals against tuned KD and against cross-entropy, and the runs whose validation accuracy collapsed."""
from __future__ import annotations

from typing import Any

from ..engine.divergence import describe_collapse
from .stats import paired_difference, paired_table, paired_verdict


def tuning_lines(tuning: dict[str, Any]) -> list[str]:
    """A table of each method's tuned setting (from ``results["tuning"]``)."""
    lines = ["## Tuning (same budget for every method, chosen on validation)", "",
             "| method | chosen setting | best val acc % | trials (complete / pruned) | minutes | CPU minutes |",
             "|---|---|---:|---:|---:|---:|"]
    for label, t in tuning.items():
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        val = "—" if t.get("best_value") is None else f"{100 * t['best_value']:.2f}"
        trials = f"{t.get('complete') or 0} / {t.get('pruned') or 0}"
        cpu = "—" if t.get("cpu_seconds") is None else f"{t['cpu_seconds'] / 60:.1f}"
        lines.append(f"| {label} | {params or 'no knobs'} | {val} | {trials} | {(t.get('seconds') or 0.0) / 60:.1f} | "
                     f"{cpu} |")
    total = sum((t.get("seconds") or 0.0) for t in tuning.values())
    cpus = [t.get("cpu_seconds") for t in tuning.values()]
    cpu = "" if None in cpus else f", {sum(cpus) / 60:.1f} min of CPU time"
    return lines + ["", f"Tuning took {total / 60:.1f} min in all{cpu} (not counted in the compute line above). "
                    "Minutes are the trials' wall time, which counts waiting for a busy core; CPU minutes are the "
                    "time the trials' process computed (— for studies made before it was recorded).", ""]


def evidence_lines(results: dict[str, Any], reference: str) -> list[str]:
    """Tuning, paired differences (test accuracy at the validation-selected epoch) against ``reference`` and
    ``ce``, verdicts, and collapse flags, as Markdown lines."""
    runs = results.get("runs", [])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    refs = [reference] + (["ce"] if "ce" in methods and reference != "ce" else [])
    lines = tuning_lines(results["tuning"]) if results.get("tuning") else []
    lines += [f"## Paired differences (vs {' and vs '.join(refs)})", "",
              "Per seed, every method shares the data order and the student's initialisation, so the difference "
              "between two methods on the same seed removes that seed's luck. Δ is the mean over seeds of the test "
              "accuracy difference at each run's validation-selected epoch, with a 95 % Student-t interval.", ""]
    lines += paired_table(runs, methods, refs) + ["", "### Verdicts", ""]
    for method in methods:
        said = [paired_verdict(paired_difference(runs, method, ref), ref) for ref in refs if ref != method]
        lines.append(f"- **{method}**: " + ("; ".join(said) if said else "reference"))
    flagged = [r for r in runs if r.get("collapse")]
    if flagged:
        lines += ["", "## Flags: validation collapse", ""]
        lines += ["- " + describe_collapse(f"{r['method']} seed {r.get('seed')}", r["collapse"]) for r in flagged]
    return lines
