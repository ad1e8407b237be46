"""``report.md`` for a ``thermokd lm`` run: perplexity and token accuracy per method (mean ± std over seeds),
the teacher's, each tuned method's study, and one verdict per method against KD (tuned when it was, else ``kd``).

Spread is the sample std over seeds (ddof=1; 0.0 for one seed). A difference counts as a win or a loss only when
it exceeds one std of both methods; with one seed the gap is reported without a claim.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..experiments.report import mean_std
from ..files import write_text


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method label, in order of first appearance: test ``ppl``/``acc`` and validation ``val_ppl`` means and
    stds, the final mean teacher τ (None for ``ce``), mean training seconds and the number of runs."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["method"], []).append(run)
    summary = {}
    for method, group in groups.items():
        ppl, ppl_std = mean_std(r["ppl"] for r in group)
        acc, acc_std = mean_std(r["acc"] for r in group)
        summary[method] = {
            "ppl_mean": ppl, "ppl_std": ppl_std, "acc_mean": acc, "acc_std": acc_std,
            "val_ppl_mean": mean_std(r["val_ppl"] for r in group)[0],
            "tau_teacher_mean": mean_std((r.get("final") or {}).get("tau_teacher_mean") for r in group)[0],
            "seconds": mean_std(r.get("seconds") for r in group)[0], "n": len(group)}
    return summary


def _spread(mean: float, std: "float | None", digits: int, scale: float = 1.0) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * (std or 0.0):.{digits}f}"


def _compare(name: str, gap: float, noise: float, single: bool, unit: str, lower_is_better: bool) -> str:
    if single:
        return f"{name} {gap:+.2f}{unit} (single seed: no noise estimate)"
    better = gap < 0 if lower_is_better else gap > 0
    if abs(gap) <= noise:
        return f"{name} within noise ({gap:+.2f}{unit}, std {noise:.2f}{unit})"
    return f"{name} {'better' if better else 'worse'} by {abs(gap):.2f}{unit} (> 1 std of both)"


def verdicts(summary: dict[str, dict[str, Any]], reference: str = "kd") -> dict[str, str]:
    """One line per method: its perplexity and token accuracy against ``reference``'s."""
    ref = summary[reference]
    out = {}
    for method, s in summary.items():
        if method == reference:
            out[method] = "reference"
            continue
        single = min(s["n"], ref["n"]) < 2
        ppl = _compare("perplexity", s["ppl_mean"] - ref["ppl_mean"], max(s["ppl_std"], ref["ppl_std"]), single,
                       "", lower_is_better=True)
        acc = _compare("token accuracy", 100 * (s["acc_mean"] - ref["acc_mean"]),
                       100 * max(s["acc_std"], ref["acc_std"]), single, " pp", lower_is_better=False)
        out[method] = f"{ppl}; {acc}"
    return out


def best_fixed_kd(summary: dict[str, dict[str, Any]]) -> "str | None":
    """The fixed-τ KD label (``kd``, ``kd@TAU``) with the lowest mean *validation* perplexity, when at least two
    ran: "KD at its best grid τ", the baseline every adaptive method must beat; never chosen on test."""
    grid = [m for m in summary if m == "kd" or m.startswith("kd@")]
    return min(grid, key=lambda m: summary[m]["val_ppl_mean"]) if len(grid) >= 2 else None


def kd_reference(summary: dict[str, dict[str, Any]]) -> "str | None":
    """What every method is measured against: KD at its tuned setting when it was tuned, else KD at its LM preset,
    else the first method (None when only one ran)."""
    from .config import tuned_label

    for label in (tuned_label("kd"), "kd"):
        if label in summary:
            return label
    return next(iter(summary)) if len(summary) > 1 else None


def run_devices(results: dict[str, Any]) -> str:
    """Where the students ran: the device and precision each run recorded (runs of one folder may come from
    several machines, e.g. assembled after a parallel run), else the invocation's own."""
    fallback = (results.get("device", "cpu"), results.get("mixed_precision", "no"))
    counts: dict[tuple[str, str], int] = {}
    for run in results["runs"]:
        where = (run.get("device", fallback[0]), run.get("mixed_precision", fallback[1]))
        counts[where] = counts.get(where, 0) + 1
    if len(counts) <= 1:
        device, precision = next(iter(counts), fallback)
        return f"{device} (mixed precision: {precision})"
    return "; ".join(f"{device} (mixed precision: {precision}) for {n} run{'s' * (n > 1)}"
                     for (device, precision), n in sorted(counts.items(), key=lambda kv: -kv[1]))


def paired_lines(runs: list[dict[str, Any]], methods: list[str], references: list[str]) -> list[str]:
    """The paired differences (method − reference, per seed: same window order and initialisation) of test
    perplexity and token accuracy, with 95 % Student-t intervals; a gap is resolved when its interval excludes 0."""
    from ..experiments.stats import paired_difference

    if not references or len({r.get("seed") for r in runs}) < 2:
        return []
    header = ["method"] + [f"{what} vs {ref}" for ref in references for what in ("Δ test ppl", "Δ acc (pp)")]
    lines = ["## Paired differences (per seed, 95 % CI)", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method in methods:
        cells = [method]
        for ref in references:
            for key, scale in (("ppl", 1.0), ("acc", 100.0)):
                d = None if method == ref else paired_difference(runs, method, ref, key)
                if method == ref:
                    cells.append("reference")
                elif d is None or d["lo"] is None:
                    cells.append("—" if d is None else f"{scale * d['mean']:+.2f} (1 seed)")
                else:
                    mark = "**" if d["lo"] > 0 or d["hi"] < 0 else ""
                    cells.append(f"{mark}{scale * d['mean']:+.2f}{mark} [{scale * d['lo']:+.2f}, "
                                 f"{scale * d['hi']:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Bold: the interval excludes 0 (lower perplexity and higher accuracy are better).", ""]


def tuning_lines(tuning: dict[str, dict[str, Any]]) -> list[str]:
    """The report's section on the studies: each tuned label's chosen setting, its validation perplexity, the trials
    and their compute."""
    from ..experiments.tune import knob_text
    from .config import tuned_label

    if not tuning:
        return []
    first = next(iter(tuning.values()))
    lines = ["## Tuning (on the validation documents)", "",
             f"Each tuned method had the same budget: an Optuna study of {first['budget']} trials "
             f"({first['sampler']} sampler, {first['pruner']} pruning per evaluation round), every trial a seed-0 "
             "student scored by its validation perplexity after the last step; `LABEL-tuned` runs every seed at the "
             "chosen setting. The test documents are never read. Compute is the trials' summed wall time, and their "
             "CPU time (— for studies made before it was recorded).", "",
             "| tuned label | chosen setting | best val perplexity (trial) | trials complete / pruned / failed | "
             "tuning compute (s) | CPU (s) |", "|---|---|---:|---:|---:|---:|"]
    for label, t in tuning.items():
        cpu = "—" if t.get("cpu_seconds") is None else f"{t['cpu_seconds']:.0f}"
        lines.append(f"| {tuned_label(label)} | {knob_text(t['params']) or '—'} | {t['best_val_ppl']:.2f} "
                     f"({t['best_trial']}) | {t['complete']} / {t['pruned']} / {t['failed']} of {t['budget']} | "
                     f"{t['seconds']:.0f} | {cpu} |")
    return lines + ["", "Studies, trial tables and plots: `tune/LABEL/` (`tune.md`, `tune.json`, "
                    "`tune_vs_knob.png`).", ""]


def markdown_table(summary: dict[str, dict[str, Any]], teacher: dict[str, Any], reference: "str | None") -> str:
    header = ["model / method", "val perplexity", "test perplexity", "test token accuracy %"]
    if reference:
        header += [f"Δ ppl vs {reference}", f"Δ acc vs {reference} (pp)"]
    header += ["final τ^t mean", "s/run", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    if "test_ppl" in teacher:
        row = [f"teacher {teacher.get('size', '?')}", f"{teacher['val_ppl']:.2f}", f"{teacher['test_ppl']:.2f}",
               f"{100 * teacher['test_acc']:.2f}"]
    else:  # distilled from a top-k file: the teacher model was not here
        row = [f"teacher {teacher.get('size', '?')} (file)", "—", "—", "—"]
    row += ["", ""] if reference else []
    row += ["—", f"{teacher['train_seconds']:.0f}" if teacher.get("train_seconds") else "—", "1 (fixed)"]
    lines.append("| " + " | ".join(row) + " |")
    for method, s in summary.items():
        row = [f"student: {method}", f"{s['val_ppl_mean']:.2f}", _spread(s["ppl_mean"], s["ppl_std"], 2),
               _spread(s["acc_mean"], s["acc_std"], 2, 100)]
        if reference:
            ref = summary[reference]
            row += (["reference", "reference"] if method == reference else
                    [f"{s['ppl_mean'] - ref['ppl_mean']:+.2f}", f"{100 * (s['acc_mean'] - ref['acc_mean']):+.2f}"])
        tau = s["tau_teacher_mean"]
        row += ["—" if tau is None else f"{tau:.2f}", f"{s['seconds']:.0f}", str(s["n"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` from a ``thermokd lm`` results dict and return its path."""
    summary = summarize(results["runs"])
    reference = kd_reference(summary)
    cfg, teacher, data = results["config"], results["teacher"], results["data"]
    d, t, tr, op = cfg["data"], cfg["teacher"], cfg["train"], cfg["on_policy"]
    origin = (f"read from the file {teacher['file']} (the model was not here)" if "file" in teacher else
              f"{teacher.get('parameters', 0):,} parameters, {t['steps']} steps of cross-entropy, lr {t['lr']:g}, "
              f"dropout {t['dropout']:g} (cache key `{teacher.get('key')}`; "
              f"{'from the cache' if teacher.get('cached') else 'trained in this run'})")
    lines = [f"# thermokd lm on {results['corpus']}", "",
             f"- data: {data['train_documents']} training / {data['val_documents']} validation / "
             f"{data['test_documents']} test documents (seeded split by document), {data['train_tokens']:,} / "
             f"{data['val_tokens']:,} / {data['test_tokens']:,} scored tokens, byte-level BPE vocabulary "
             f"{results['vocab_size']}, windows of {d['context']} tokens"
             + (f", first {d['prompt_tokens']} tokens of each window masked as prompt" if d["prompt_tokens"] else ""),
             f"- teacher: GPT-2 {teacher.get('size', '?')} (layers x width x heads), {origin}; the loss reads it "
             f"{'online' if t['source'] == 'online' else 'from a ' + t['source'] + ' file'}",
             f"- students: GPT-2 {results['student']['size']}, {results['student']['parameters']:,} parameters, "
             f"{tr['steps']} steps, batch {tr['batch_size']}, lr {tr['lr']:g}, the same window order per seed, on "
             f"{run_devices(results)}"
             + (f"; on-policy fraction λ = {op['fraction']:g} (prompts of {op['prompt_tokens']}, {op['new_tokens']} "
                f"sampled tokens at sampling temperature {op['sampling_temperature']:g}, top-p {op['top_p']:g})"
                if op["fraction"] else ""),
             f"- methods at their language-model presets (`kd@TAU`: KD at a fixed τ = TAU; `LABEL-tuned`: LABEL at "
             f"the setting its study chose, see Tuning): "
             f"{', '.join(results['methods'])}; seeds {', '.join(str(s) for s in results['seeds'])}",
             f"- machine (of the invocation that wrote this report): {results['machine']}",
             f"- created: {results['created']}",
             f"- wall time: {results['wall_seconds'] / 60:.1f} min for this invocation", "",
             "## Results", "", markdown_table(summary, teacher, reference), "",
             "Perplexity is exp of the mean next-token cross-entropy of the model itself (τ = 1, never the "
             "distillation loss) over every scored token of the validation or test documents; token accuracy is how "
             "often its most likely next token is the right one. Test: mean ± sample std (ddof=1) over seeds, after "
             "the last step; validation: the mean. τ^t is the mean teacher temperature over the last logging "
             "interval.", ""]
    if "ce" in summary and "test_ppl" in teacher:
        gap = summary["ce"]["ppl_mean"] - teacher["test_ppl"]
        lines += [f"The teacher's test perplexity is {gap:.2f} below that of the cross-entropy student: "
                  + ("there is something to distil." if gap > 0 else "the teacher is no better, so distillation "
                     "has nothing to give here."), ""]
    lines += tuning_lines(results.get("tuning") or {})
    if reference:
        lines += [f"## Verdicts (against {reference})", ""]
        lines += [f"- **{m}**: {v}" for m, v in verdicts(summary, reference).items()]
        lines.append("")
    lines += paired_lines(results["runs"], list(summary), [r for r in (reference, "ce") if r in summary])
    tuned = best_fixed_kd(summary)
    if tuned is not None and tuned != reference:
        lines += [f"## Verdicts (against KD at its best grid τ, {tuned})", "",
                  "Its τ is picked on the validation documents (never on test).", ""]
        lines += [f"- **{m}**: {v}" for m, v in verdicts(summary, tuned).items() if m != reference]
        lines.append("")
    samples = [("teacher", teacher.get("sample"))] + [(r["method"], r.get("sample")) for r in results["runs"]]
    samples = [(who, text) for who, text in samples if text]
    if samples:
        lines += [f"## Samples (seed {results['seeds'][0]}; sampling temperature 0.8, top-40: a generation setting, "
                  "unrelated to the loss τ)", ""]
        lines += [f"- **{who}**: {' '.join(text.split())!r}" for who, text in samples]
        lines.append("")
    path = Path(out_dir) / "report.md"
    write_text(path, "\n".join(lines))
    return path
