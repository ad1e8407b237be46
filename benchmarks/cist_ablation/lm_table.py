"""The language-model CIST ablation table of docs/cist-ablation.md, from a `thermokd lm` results folder.

Selection is on validation only: a label's score is its mean validation perplexity over seeds at its tuned setting
(lower is better); test perplexity and the paired differences are reported, never used to choose.

    python benchmarks/cist_ablation/lm_table.py benchmarks/results/cist-ablation-lm
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from thermokd.experiments.stats import paired_difference

REFERENCE = "f-cist-lm-tuned"  # the floor-0.05 preset: what the other f- labels change one thing from

# what each label changes (the labels of benchmarks/cist_ablation/lm_grimm.yaml; the floor is CIST's tau_min)
CHANGES = {
    "ce": "no distillation",
    "kd-tuned": "Hinton KD, τ tuned",
    "cist-lm-tuned": "the earlier LM preset: student τ = τ^t, floor 0.5, λ = 0.5",
    "t-interpolate-tuned": "`interpolate` γ = 0.75, floor 0.5",
    "t-ratio-tuned": "`ratio`, floor 0.5",
    "f-cist-lm-tuned": "floor 0.05 (the earlier preset otherwise)",
    "f-t-interpolate-tuned": "`interpolate` γ = 0.75",
    "f-t-ratio-tuned": "`ratio`",
    "f-m-max-min-tuned": "max − min",
    "f-w-off-tuned": "w ≡ 1 (λ = 0)",
    "f-w-bound-tuned": "R = 4, no blend (λ = 1)",
    "f-s-none-tuned": "no scale",
}


def _values(results: dict, label: str, key: str) -> "list[float]":
    return [r[key] for r in results["runs"] if r["method"] == label and r.get(key) is not None]


def _delta(results: dict, label: str, reference: str, key: str) -> str:
    if label == reference:
        return "reference"
    d = paired_difference(results["runs"], label, reference, key)
    if d is None or d["lo"] is None:
        return "—"
    text = f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
    return f"**{text}**" if d["lo"] > 0 or d["hi"] < 0 else text


def _knob(results: dict, label: str) -> str:
    base = label[: -len("-tuned")] if label.endswith("-tuned") else label
    params = (results.get("tuning", {}).get(base) or {}).get("params") or {}
    return ", ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                     for k, v in params.items()) or "—"


def table(results: dict) -> list[str]:
    labels = [label for label in CHANGES if _values(results, label, "val_ppl")]
    labels.sort(key=lambda label: statistics.fmean(_values(results, label, "val_ppl")))
    lines = ["| label | changes | tuned | mean val ppl | Δ val ppl vs `f-cist-lm` | test ppl | "
             "Δ test ppl vs tuned KD | Δ test ppl vs CE |", "|" + "---|" * 8]
    for label in labels:
        val, test = _values(results, label, "val_ppl"), _values(results, label, "ppl")
        spread = f" ± {statistics.stdev(test):.2f}" if len(test) > 1 else ""
        lines.append(f"| `{label}` | {CHANGES[label]} | {_knob(results, label)} | {statistics.fmean(val):.2f} | "
                     f"{_delta(results, label, REFERENCE, 'val_ppl')} | {statistics.fmean(test):.2f}{spread} | "
                     f"{_delta(results, label, 'kd-tuned', 'ppl')} | {_delta(results, label, 'ce', 'ppl')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a `thermokd lm` output folder (results.json)")
    args = parser.parse_args()
    results = json.loads((args.folder / "results.json").read_text())
    print("\n".join(table(results)))
    print("\nPerplexity: lower is better; Δ is the paired difference per seed with its 95 % t-interval "
          "(bold: it excludes 0).")


if __name__ == "__main__":
    main()
