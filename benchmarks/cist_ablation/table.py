"""The CIST ablation tables of docs/cist-ablation.md, from the `thermokd compare` results of each set-up.

Selection is on validation only: a label's score is its mean best-validation accuracy over seeds at its tuned
setting, averaged over the set-ups; test accuracy and the paired differences are reported, never used to choose.

    python benchmarks/cist_ablation/table.py benchmarks/results/cist-ablation-2k benchmarks/results/cist-ablation-1k
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from thermokd.experiments.stats import paired_difference, per_seed, t_interval

REFERENCE = "cist-ref"

# what each label changes from the reference `cist-ref` (the labels of benchmarks/cist_ablation/fashion_mnist_mlp.yaml)
CHANGES = {
    "ce": "no distillation",
    "kd": "Hinton KD, τ tuned",
    "cist-spec": "first specification: student `ratio`, weights unbounded (λ = 1, no R)",
    "cist-ref": "reference: `interpolate` γ = 0.5, centred max, τ^t·τ^s, λ = 0.5, R = 4",
    "t-teacher": "student τ = τ^t (γ = 0)",
    "t-ratio": "student `ratio` (γ = 1)",
    "t-own-ratio": "student `own-ratio`",
    "t-gamma-0.25": "γ = 0.25",
    "t-gamma-0.75": "γ = 0.75",
    "t-ratio-floor": "student `ratio`, floor 0.5·τ^t",
    "m-max-min": "max − min",
    "m-raw": "raw max",
    "w-off": "w ≡ 1 (λ = 0)",
    "w-mix": "λ = 0.5, no bound",
    "w-bound": "R = 4, no blend (λ = 1)",
    "w-running": "running-mean normalisation, λ = 1, no bound",
    "s-teacher-sq": "scale (τ^t)²",
    "s-none": "no scale",
}


def _load(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _vals(results: dict, label: str, key: str) -> list[float]:
    return [100 * r[key] for r in results["runs"] if r["method"] == label and r.get(key) is not None]


def _ci(results: dict, label: str, ref: str) -> str:
    if label == ref:
        return "reference"
    d = paired_difference(results["runs"], label, ref)
    if d is None or d["lo"] is None:
        return "—"
    return f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def _tau0(results: dict, label: str) -> str:
    params = (results.get("tuning", {}).get(label) or {}).get("params") or {}
    value = next(iter(params.values()), None)
    return "—" if value is None else f"{value:.2f}"


def _val_vs_reference(setups: dict[str, dict], label: str) -> str:
    """Paired Δ of best validation accuracy vs the reference, pooled over every (set-up, seed) pair."""
    if label == REFERENCE:
        return "reference"
    diffs = []
    for r in setups.values():
        a, b = per_seed(r["runs"], label, "best_val_acc"), per_seed(r["runs"], REFERENCE, "best_val_acc")
        diffs += [100 * (a[s] - b[s]) for s in sorted(set(a) & set(b), key=str)]
    ci = t_interval(diffs)
    return "—" if ci is None else f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"


def selection_table(setups: dict[str, dict]) -> list[str]:
    """One row per label, ranked by mean validation accuracy over the set-ups (best first)."""
    names = list(setups)
    labels = next(iter(setups.values()))["methods"]
    score = {lab: statistics.fmean(statistics.fmean(_vals(r, lab, "best_val_acc")) for r in setups.values())
             for lab in labels}
    lines = ["| rank | label | what changes | tuned tau0 / τ (" + " / ".join(names) + ") | "
             + " | ".join(f"val %, {n}" for n in names) + f" | mean val % | Δ val vs {REFERENCE} (pp, 95 % CI) |",
             "|---:|---|---|---|" + "---:|" * len(names) + "---:|---|"]
    for rank, lab in enumerate(sorted(labels, key=lambda k: -score[k]), 1):
        vals = [statistics.fmean(_vals(r, lab, "best_val_acc")) for r in setups.values()]
        knobs = " / ".join(_tau0(r, lab) for r in setups.values())
        lines.append(f"| {rank} | {lab} | {CHANGES.get(lab, '')} | {knobs} | " + " | ".join(f"{v:.2f}" for v in vals)
                     + f" | {score[lab]:.2f} | {_val_vs_reference(setups, lab)} |")
    return lines


def test_table(results: dict) -> list[str]:
    """Test accuracy at each run's validation-selected epoch, and the paired Δ vs tuned KD and vs CE."""
    lines = ["| label | test % (mean ± std) | Δ vs tuned KD (pp, 95 % CI) | Δ vs CE (pp, 95 % CI) | seeds |",
             "|---|---:|---|---|---:|"]
    for lab in results["methods"]:
        test = _vals(results, lab, "best_acc")
        lines.append(f"| {lab} | {statistics.fmean(test):.2f} ± {statistics.stdev(test):.2f} | "
                     f"{_ci(results, lab, 'kd')} | {_ci(results, lab, 'ce')} | {len(test)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="compare output folders (each with results.json)")
    args = parser.parse_args()
    setups = {f.name.rsplit("-", 1)[-1]: _load(f) for f in args.folders}
    print("## Selection on validation (mean over seeds, then over set-ups)\n")
    print("\n".join(selection_table(setups)))
    for name, results in setups.items():
        print(f"\n## Test, {name} ({results['config']['data']['student_train_size']} student images)\n")
        print("\n".join(test_table(results)))


if __name__ == "__main__":
    main()
