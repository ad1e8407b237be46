"""One Markdown table over the tuned classification benchmarks: tuned KD against CE, and every other method against
tuned KD (paired per-seed differences of test accuracy at the validation-chosen epoch, 95 % t-intervals).

    python benchmarks/evidence_overview.py [--results benchmarks/results]

Reads each set-up's ``results.json`` as ``thermokd compare`` wrote it; a method a set-up did not run shows "—".
An interval that excludes zero is in bold. The language-model benchmark reports perplexity and has its own table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from thermokd.experiments.stats import paired_difference

SETUPS = [  # folder under --results, and how the table names it
    ("fashion-mnist-mlp", "Fashion-MNIST, MLP student on 2,000 images"),
    ("fashion-mnist-mlp-1k", "Fashion-MNIST, MLP student on 1,000 images"),
    ("fashion-mnist-few", "Fashion-MNIST, small CNN on 3,000 images"),
    ("fashion-mnist-tuned", "Fashion-MNIST, ResNet20 to ResNet8 on every image"),  # make bench-vision-tuned
    ("trec", "TREC questions, fine-tuned MiniLM teacher"),
    ("20newsgroups-hybrid", "20 Newsgroups, 2,000 posts"),
    ("20newsgroups-tuned", "20 Newsgroups, every post"),
    ("digits-tuned", "digits (the demo's data)"),
]
METHODS = ["cist", "dtkd", "dts", "entropy-target", "ctkd", "lskd", "dkd"]


def cell(runs: list[dict], method: str, reference: str) -> str:
    diff = paired_difference(runs, method, reference)
    if diff is None or diff["lo"] is None:
        return "—"
    text = f"{100 * diff['mean']:+.2f} [{100 * diff['lo']:+.2f}, {100 * diff['hi']:+.2f}]"
    text = text.replace("-", "\u2212")  # a typographic minus, as the README writes numbers
    return f"**{text}**" if diff["lo"] > 0 or diff["hi"] < 0 else text


def table(results_dir: Path) -> list[str]:
    lines = ["| set-up | seeds | tuned KD vs CE | " + " | ".join(f"{m} vs KD" for m in METHODS) + " |",
             "|---|---:|---|" + "---|" * len(METHODS)]
    for folder, name in SETUPS:
        path = results_dir / folder / "results.json"
        if not path.is_file():
            continue
        runs = json.loads(path.read_text())["runs"]
        seeds = len({r["seed"] for r in runs})
        lines.append(f"| {name} | {seeds} | {cell(runs, 'kd', 'ce')} | "
                     + " | ".join(cell(runs, m, "kd") for m in METHODS) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    print("\n".join(table(parser.parse_args().results)))


if __name__ == "__main__":
    main()
