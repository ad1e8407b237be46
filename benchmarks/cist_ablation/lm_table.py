"""The language-model CIST ablation tables of docs/cist-ablation.md, from a `thermokd lm` results folder of
``lm_grimm.yaml`` (the `make demo-lm` set-up) or ``lm_friends.yaml`` (the LM benchmark's), told apart by its corpus.

Selection is on validation only: a label's score is its mean validation perplexity over seeds at its tuned setting
(lower is better); test perplexity and the paired differences are reported, never used to choose.

    python benchmarks/cist_ablation/lm_table.py benchmarks/results/cist-ablation-lm
    python benchmarks/cist_ablation/lm_table.py benchmarks/results/cist-ablation-lm-friends
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from thermokd.experiments.stats import paired_difference

# per study: the label the others change one thing from, and what each label changes (the floor is CIST's tau_min)
GRIMM = ("f-cist-lm-tuned", {  # benchmarks/cist_ablation/lm_grimm.yaml
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
})
FRIENDS = ("cist-lm-tuned", {  # benchmarks/cist_ablation/lm_friends.yaml
    "ce": "no distillation",
    "kd-tuned": "Hinton KD, τ tuned",
    "cist-lm-tuned": "the LM preset: student τ = τ^t, floor 0.05, R = 4 without a blend (λ = 1)",
    "t-ratio-tuned": "`ratio`",
    "t-interpolate-tuned": "`interpolate` γ = 0.75",
    "t-own-ratio-tuned": "`own-ratio`",
    "m-max-min-tuned": "max − min",
    "w-off-tuned": "w ≡ 1 (λ = 0)",
    "w-blend-tuned": "λ = 0.5 (the earlier preset's blend)",
    "s-none-tuned": "no scale",
    "floor-0.5-tuned": "floor 0.5 (the image floor)",
})
STUDIES = {"grimm-tales": GRIMM, "friends-transcripts": FRIENDS}


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


def table(results: dict, reference: str, changes: "dict[str, str]") -> list[str]:
    labels = [label for label in changes if _values(results, label, "val_ppl")]
    labels.sort(key=lambda label: statistics.fmean(_values(results, label, "val_ppl")))
    name = reference.removesuffix("-tuned")
    lines = [f"| label | changes | tuned | mean val ppl | Δ val ppl vs `{name}` | test ppl | "
             "Δ test ppl vs tuned KD | Δ test ppl vs CE |", "|" + "---|" * 8]
    for label in labels:
        val, test = _values(results, label, "val_ppl"), _values(results, label, "ppl")
        spread = f" ± {statistics.stdev(test):.2f}" if len(test) > 1 else ""
        lines.append(f"| `{label}` | {changes[label]} | {_knob(results, label)} | {statistics.fmean(val):.2f} | "
                     f"{_delta(results, label, reference, 'val_ppl')} | {statistics.fmean(test):.2f}{spread} | "
                     f"{_delta(results, label, 'kd-tuned', 'ppl')} | {_delta(results, label, 'ce', 'ppl')} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a `thermokd lm` output folder (results.json)")
    args = parser.parse_args()
    results = json.loads((args.folder / "results.json").read_text())
    corpus = json.loads((args.folder / "lm_config.json").read_text())["data"]["corpus"]
    if corpus not in STUDIES:
        parser.error(f"{args.folder} is a study of {corpus!r}; this table knows {', '.join(STUDIES)}")
    print("\n".join(table(results, *STUDIES[corpus])))
    print("\nPerplexity: lower is better; Δ is the paired difference per seed with its 95 % t-interval "
          "(bold: it excludes 0).")


if __name__ == "__main__":
    main()
