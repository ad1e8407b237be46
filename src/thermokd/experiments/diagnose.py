"""``thermokd diagnose``: what each temperature does to a trained teacher's soft labels, before any student exists.

For the config's teacher (trained once and cached) and a split of the data, every fixed τ of a list and every
adaptive method gets a :func:`thermokd.diagnostics.soft_label_report`: teacher τ, soft-label entropy (nats and
normalised by log C), its spread across samples (the entropy-consistency figure), the shares of over-sharp and
over-flat soft labels, and a histogram. No student exists at diagnosis time, so the teacher's logits stand in
for the student's wherever a strategy reads them (DTKD, CIST's student τ); strategies that evolve during
training (DTS, CTKD, schedules) are shown at their state at the start of training. The teacher's calibration on
the test split comes too: top-1 accuracy, expected calibration error (ECE) at τ=1 and the τ that minimises the
test NLL (temperature scaling).

Writes ``diagnose.json`` (everything, histograms included), ``diagnose.md`` and two plots.
"""
from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import RunConfig
from ..diagnostics import matched_fixed_tau, soft_label_report
from ..engine.run import setup
from ..engine.trainer import predict
from ..errors import ThermoKDError
from ..functional import normalised_entropy
from ..files import write_json, write_text
from ..methods import build_loss, method_names
from ..progress import Progress
from ..registry import normalise
from .report import figure, method_colours, save_figure

SPLITS = ("train", "test")
ECE_BINS = 15
HIST_BINS = 20
SHARP_BELOW, FLAT_ABOVE = 0.1, 0.9
HISTOGRAM_PLOT = "entropy_by_tau.png"
CURVE_PLOT = "entropy_vs_tau.png"
LINE_STYLES = ("-", "--", ":", "-.")
NO_STUDENT_NOTE = ("No student exists at diagnosis time: the teacher's logits stand in for the student's wherever "
                   "a strategy reads them (DTKD, CIST's student τ, LSKD's student side). Strategies that change "
                   "during training (dts, ctkd, schedules) are shown at their state at the start of training.")


def diagnosable_methods() -> list[str]:
    """Method names whose temperature can be diagnosed: every method that distils (all but ``ce``)."""
    return [m for m in method_names() if m != "ce"]


def check_taus(taus: "list[float]", what: str = "taus") -> list[float]:
    """Sorted, de-duplicated positive finite temperatures; a one-line ThermoKDError otherwise."""
    if not taus:
        raise ThermoKDError(f"{what} is empty; give at least one temperature, e.g. 1,2,4,8")
    bad = [t for t in taus if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0)]
    if bad:
        raise ThermoKDError(f"{what} must be positive finite numbers, got {bad}")
    return sorted({float(t) for t in taus})


def check_methods(methods: "list[str]") -> list[str]:
    """Normalised method names (``entropy_target`` → ``entropy-target``), in order, without duplicates."""
    allowed = diagnosable_methods()
    out: list[str] = []
    for m in methods:
        key = normalise(m)
        if key not in allowed:
            extra = " (ce does not distil: it has no soft labels)" if key == "ce" else ""
            raise ThermoKDError(f"unknown method {m!r} for diagnose{extra}; allowed: {', '.join(allowed)}")
        if key not in out:
            out.append(key)
    return out


def teacher_outputs(cfg: RunConfig, split: str = "train", cache_dir: "Path | None" = None,
                    progress_bar: bool = True) -> dict[str, Any]:
    """The config's teacher (trained or cached) and its logits on ``split``'s plain (unaugmented) inputs.

    Returns ``logits``, ``labels`` (of ``split``), ``test_logits``, ``test_labels`` and ``info`` (the teacher's
    key, model, test accuracy and folder)."""
    if split not in SPLITS:
        raise ThermoKDError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    accelerator, exp, (model, info) = setup(cfg, cache_dir, progress_bar)
    b = exp.bundle
    if split == "train":
        logits = predict(model, b.train.x, accelerator.device, cfg.train.eval_batch_size)
        labels = b.train.y
    else:
        logits, labels = info["test_logits"], b.test.y
    return {"logits": logits.float(), "labels": labels, "test_logits": info["test_logits"].float(),
            "test_labels": b.test.y, "info": {k: v for k, v in info.items() if k != "test_logits"},
            "num_classes": b.num_classes}


# ---------------------------------------------------------------------------------------------------- calibration


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = ECE_BINS, tau: float = 1.0) -> float:
    """ECE of ``softmax(logits/τ)``: Σ_b (n_b/N)·|accuracy_b − mean confidence_b| over ``bins`` equal-width
    confidence bins ``(lo, hi]`` of [0, 1] (Guo et al. 2017)."""
    probs = torch.softmax(logits.float() / tau, dim=-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur after a softmax
    index = (torch.ceil(conf * bins).long() - 1).clamp_(0, bins - 1)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    conf_sum = torch.bincount(index, weights=conf, minlength=bins)
    return float((acc_sum - conf_sum).abs().sum() / max(labels.numel(), 1))


def nll(logits: Tensor, labels: Tensor, tau: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits/τ)``."""
    return float(torch.nn.functional.cross_entropy(logits.float() / tau, labels.long()))


def nll_optimal_tau(logits: Tensor, labels: Tensor, tau_min: float = 0.05, tau_max: float = 100.0,
                    iters: int = 80) -> float:
    """Temperature scaling: the τ minimising the mean NLL, by golden-section search on log τ.

    The NLL is convex in 1/τ, hence unimodal in log τ, so the search finds the minimum inside the bounds (or the
    bound itself when the minimum lies beyond it)."""
    lo, hi = math.log(tau_min), math.log(tau_max)
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - inv_phi * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + inv_phi * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return math.exp(0.5 * (lo + hi))


def calibration(test_logits: Tensor, test_labels: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """Teacher test accuracy, ECE and NLL at τ=1, and the NLL-optimal τ with its NLL and ECE."""
    tau = nll_optimal_tau(test_logits, test_labels)
    return {"test_acc": float((test_logits.argmax(-1) == test_labels).float().mean()), "ece_bins": bins,
            "ece": expected_calibration_error(test_logits, test_labels, bins),
            "nll": nll(test_logits, test_labels), "nll_optimal_tau": tau,
            "nll_at_optimal_tau": nll(test_logits, test_labels, tau),
            "ece_at_optimal_tau": expected_calibration_error(test_logits, test_labels, bins, tau)}


# ---------------------------------------------------------------------------------------------------- diagnosis


def entropy_curve(logits: Tensor, taus: "list[float]") -> list[dict[str, float]]:
    """Mean and std (population) of the normalised soft-label entropy of ``logits`` at each fixed τ."""
    out = []
    with torch.no_grad():
        for t in taus:
            h = normalised_entropy(logits, t)
            out.append({"tau": float(t), "mean": float(h.mean()), "std": float(h.std(correction=0))})
    return out


def _strategy(method: str, cfg: RunConfig):
    """The method's temperature strategy with its paper defaults, or with the config's own options when the
    config's method is this one."""
    options = dict(cfg.method.temperature) if cfg.method.name == method else {}
    return build_loss(method, temperature=options).temperature, options


def diagnose_logits(logits: Tensor, labels: "Tensor | None", taus: "list[float]", methods: "list[str]",
                    cfg: "RunConfig | None" = None) -> list[dict[str, Any]]:
    """One entry per fixed τ, then one per adaptive method: ``label``, ``kind``, ``tau`` / ``method``, ``report``
    (a :class:`~thermokd.diagnostics.SoftLabelReport` as a dict); adaptive entries add the fixed τ of matched
    mean entropy and that τ's normalised-entropy std, so their consistency can be compared at equal sharpness."""
    from ..temperature import Fixed

    cfg = cfg or RunConfig()
    taus, methods = check_taus(taus), check_methods(methods)
    if logits.shape[-1] < 2:
        raise ThermoKDError(f"soft-label entropy needs at least 2 classes, got {logits.shape[-1]}")
    entries: list[dict[str, Any]] = []
    for t in taus:
        report = soft_label_report(Fixed(t), logits, labels=labels, bins=HIST_BINS, sharp_below=SHARP_BELOW,
                                   flat_above=FLAT_ABOVE, name=f"τ={t:g}")
        entries.append({"label": f"τ={t:g}", "kind": "fixed", "tau": t, "method": "kd", "report": report.to_dict()})
    for m in methods:
        strategy, options = _strategy(m, cfg)
        strategy.prepare(logits)  # CIST calibrates ρ on these logits (the training split's, by default)
        report = soft_label_report(strategy, logits, labels=labels, progress=Progress(), bins=HIST_BINS,
                                   sharp_below=SHARP_BELOW, flat_above=FLAT_ABOVE, name=m)
        matched = matched_fixed_tau(logits, report.entropy["mean"])
        entry = {"label": m, "kind": "adaptive", "tau": None, "method": m, "options": options,
                 "report": report.to_dict(), "matched_fixed_tau": matched,
                 "matched_fixed_normalised_entropy_std": entropy_curve(logits, [matched])[0]["std"]}
        if m == "cist":
            entry["cist_ratio"] = float(strategy.ratio)
        entries.append(entry)
    return entries


def run_diagnose(cfg: RunConfig, out_dir: Path, taus: "list[float]", methods: "list[str]",
                 cache_dir: "Path | None" = None, split: str = "train", progress_bar: bool = True) -> dict[str, Any]:
    """Diagnose the soft labels of ``cfg``'s teacher on ``split`` under each fixed τ of ``taus`` and each method
    of ``methods``; write ``diagnose.json``, ``diagnose.md``, ``entropy_by_tau.png`` and ``entropy_vs_tau.png``
    into ``out_dir`` and return the JSON's content."""
    taus, methods = check_taus(taus), check_methods(methods)
    if split not in SPLITS:
        raise ThermoKDError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = teacher_outputs(cfg, split, cache_dir, progress_bar)
    logits, labels = t["logits"], t["labels"]
    entries = diagnose_logits(logits, labels, taus, methods, cfg)
    adaptive_taus = [e["report"]["tau_teacher"]["mean"] for e in entries if e["kind"] == "adaptive"]
    lo, hi = min(taus + adaptive_taus) / 2, max(taus + adaptive_taus) * 2
    dense = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / 47) for i in range(48)]
    results = {
        "data": cfg.data.name, "split": split, "num_rows": int(logits.shape[0]), "num_classes": int(logits.shape[-1]),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "teacher": {**{k: v for k, v in t["info"].items() if k != "dir"}, "calibration":
                    calibration(t["test_logits"], t["test_labels"])},
        "note": NO_STUDENT_NOTE,
        "thresholds": {"over_sharp_below": SHARP_BELOW, "over_flat_above": FLAT_ABOVE, "histogram_bins": HIST_BINS},
        "taus": taus, "methods": methods, "strategies": entries, "entropy_curve": entropy_curve(logits, dense),
        "config": cfg.to_dict(),
    }
    write_json(out_dir / "diagnose.json", results)
    plot_entropy_histograms(results, out_dir / HISTOGRAM_PLOT)
    plot_entropy_vs_tau(results, out_dir / CURVE_PLOT)
    write_text(out_dir / "diagnose.md", markdown(results))
    return results


# ---------------------------------------------------------------------------------------------------- report


def strategy_table(entries: "list[dict]") -> str:
    """A Markdown table: one row per strategy with τ^t mean/min/max, entropy mean/std (nats), normalised-entropy
    std, and the shares of over-sharp and over-flat soft labels."""
    lines = ["| strategy | τ^t mean | τ^t min | τ^t max | entropy mean (nats) | entropy std (nats) | "
             "normalised entropy mean | normalised entropy std | over-sharp | over-flat |",
             "|---|" + "---:|" * 9]
    for e in entries:
        r = e["report"]
        tt, h, hn = r["tau_teacher"], r["entropy"], r["normalised_entropy"]
        lines.append(f"| {e['label']} | {tt['mean']:.3g} | {tt['min']:.3g} | {tt['max']:.3g} | {h['mean']:.3f} | "
                     f"{h['std']:.3f} | {hn['mean']:.3f} | {hn['std']:.3f} | {100 * r['over_sharp']:.1f} % | "
                     f"{100 * r['over_flat']:.1f} % |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    cal = results["teacher"]["calibration"]
    c = results["num_classes"]
    lines = [f"# thermokd diagnose: {results['data']} ({results['split']} split)", "",
             f"- teacher: `{results['teacher'].get('model', '?')}` (cache key `{results['teacher'].get('key', '?')}`)",
             f"- rows: {results['num_rows']}, classes: {c} (log C = {math.log(c):.3f} nats)",
             f"- {results['note']}", "",
             "## Teacher calibration (test split)", "",
             "| test accuracy | ECE (τ=1) | NLL (τ=1) | NLL-optimal τ | NLL at that τ | ECE at that τ |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {100 * cal['test_acc']:.2f} % | {cal['ece']:.4f} | {cal['nll']:.4f} | {cal['nll_optimal_tau']:.3f} | "
             f"{cal['nll_at_optimal_tau']:.4f} | {cal['ece_at_optimal_tau']:.4f} |", "",
             f"ECE over {cal['ece_bins']} equal-width confidence bins. An NLL-optimal τ above 1 means the teacher is "
             "over-confident on held-out data.", "",
             "## Soft labels per strategy", "",
             strategy_table(results["strategies"]), "",
             "Entropy of the teacher's soft labels at the strategy's teacher τ; *normalised* = H / log C. The std of "
             "the normalised entropy across samples is the entropy-consistency figure (lower: more uniformly "
             f"informative soft labels). Over-sharp: normalised entropy < {results['thresholds']['over_sharp_below']}; "
             f"over-flat: > {results['thresholds']['over_flat_above']}.", ""]
    adaptive = [e for e in results["strategies"] if e["kind"] == "adaptive"]
    if adaptive:
        lines += ["## Adaptive methods against a fixed τ of the same mean entropy", "",
                  "| method | matched fixed τ | normalised entropy std (method) | normalised entropy std (fixed τ) |",
                  "|---|---:|---:|---:|"]
        for e in adaptive:
            lines.append(f"| {e['label']} | {e['matched_fixed_tau']:.3g} | "
                         f"{e['report']['normalised_entropy']['std']:.3f} "
                         f"| {e['matched_fixed_normalised_entropy_std']:.3f} |")
        lines.append("")
    lines += [f"![normalised entropy histograms]({HISTOGRAM_PLOT})", "", f"![entropy against tau]({CURVE_PLOT})", ""]
    return "\n".join(lines)


def plot_entropy_histograms(results: dict, path: Path) -> Path:
    """Normalised-entropy histograms: fixed τ values (left, sequential colours) and adaptive methods (right)."""
    from matplotlib import colormaps

    groups = [("fixed τ", [e for e in results["strategies"] if e["kind"] == "fixed"]),
              ("adaptive methods", [e for e in results["strategies"] if e["kind"] == "adaptive"])]
    groups = [g for g in groups if g[1]]
    fig = figure(5.2 * len(groups), 4.2)
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for ax, (title, entries) in zip(axes, groups):
        if title == "fixed τ":
            cmap = colormaps["viridis"]
            colours = {e["label"]: cmap(i / max(len(entries) - 1, 1) * 0.9) for i, e in enumerate(entries)}
        else:
            colours = method_colours([e["label"] for e in entries])
        for i, e in enumerate(entries):
            r = e["report"]
            total = sum(r["histogram_counts"]) or 1
            # methods that coincide (dts, dtkd and ctkd at the start of training) stay visible by line style
            style = "-" if title == "fixed τ" else LINE_STYLES[i % len(LINE_STYLES)]
            ax.stairs([n / total for n in r["histogram_counts"]], r["histogram_edges"], color=colours[e["label"]],
                      linewidth=1.6, linestyle=style, label=f"{e['label']} (std {r['normalised_entropy']['std']:.2f})")
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("normalised teacher entropy H / log C")
        ax.set_ylabel(f"fraction of {results['split']} samples")
        ax.set_title(title)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Teacher soft-label entropy on {results['data']} ({results['split']} split)")
    return save_figure(fig, path)


def _clipped_std(stats: "list[dict]") -> list[list[float]]:
    """Asymmetric error bars of ± std, cut at the [0, 1] range of a normalised entropy."""
    return [[s["mean"] - max(s["mean"] - s["std"], 0.0) for s in stats],
            [min(s["mean"] + s["std"], 1.0) - s["mean"] for s in stats]]


def plot_entropy_vs_tau(results: dict, path: Path) -> Path:
    """Mean ± std of the normalised entropy against a fixed τ (log axis); each adaptive method is a marker at its
    mean teacher τ (± its entropy std) with a dashed horizontal line at its mean entropy."""
    curve = results["entropy_curve"]
    fig = figure(9.5, 4.8)
    ax = fig.add_subplot()
    xs = [p["tau"] for p in curve]
    ax.plot(xs, [p["mean"] for p in curve], color="black", label="fixed τ: mean")
    ax.fill_between(xs, [max(p["mean"] - p["std"], 0.0) for p in curve],
                    [min(p["mean"] + p["std"], 1.0) for p in curve], color="grey", alpha=0.25, linewidth=0,
                    label="fixed τ: ± 1 std across samples")
    fixed = [e for e in results["strategies"] if e["kind"] == "fixed"]
    ax.errorbar([e["tau"] for e in fixed], [e["report"]["normalised_entropy"]["mean"] for e in fixed],
                yerr=_clipped_std([e["report"]["normalised_entropy"] for e in fixed]), fmt="o", color="black",
                capsize=3, label="diagnosed fixed τ values")
    adaptive = [e for e in results["strategies"] if e["kind"] == "adaptive"]
    colours = method_colours([e["label"] for e in adaptive])
    for i, e in enumerate(adaptive):
        r = e["report"]
        h = r["normalised_entropy"]
        ax.axhline(h["mean"], color=colours[e["label"]], linestyle=LINE_STYLES[1 + i % 3], linewidth=1)
        ax.errorbar([r["tau_teacher"]["mean"]], [h["mean"]], yerr=_clipped_std([h]), fmt="s",
                    color=colours[e["label"]], capsize=3,
                    label=f"{e['label']}: mean teacher τ {r['tau_teacher']['mean']:.3g}, entropy std {h['std']:.2f}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("temperature τ (log scale)")
    ax.set_ylabel("normalised teacher entropy H / log C")
    ax.set_title(f"Soft-label entropy against temperature ({results['data']}, {results['split']} split)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
