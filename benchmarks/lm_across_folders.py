"""Paired differences between two `thermokd lm` folders made with the same data, teacher and seeds, e.g. the same
benchmark run on two devices: each method of FOLDER against one label of OTHER, seed by seed, on test perplexity
and token accuracy, with 95 % t-intervals (the statistics of the folders' own reports).

    python benchmarks/lm_across_folders.py FOLDER OTHER [--reference kd-tuned]

Example (the README's device check): ``benchmarks/results/lm-kd-cpu benchmarks/results/lm`` gives tuned KD on the
CPU against tuned KD on the GPU; ``benchmarks/results/lm benchmarks/results/lm-kd-cpu`` gives every method of the
benchmark (CIST's rows included) against tuned KD run on the CPU.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from thermokd.experiments.stats import paired_difference

REFERENCE = "\0reference"  # OTHER's reference label, renamed so that it cannot clash with FOLDER's labels


def differences(folder: Path, other: Path, reference: str) -> list[str]:
    runs = json.loads((folder / "results.json").read_text())["runs"]
    theirs = [{**r, "method": REFERENCE} for r in json.loads((other / "results.json").read_text())["runs"]
              if r["method"] == reference]
    if not theirs:
        raise SystemExit(f"{other} has no runs of {reference!r}")
    lines = [f"{'method':22s} {'Δ test ppl':>24s} {'Δ token acc (pp)':>24s}   (vs {reference} of {other})"]
    for method in dict.fromkeys(r["method"] for r in runs):
        cells = []
        for key, scale in (("ppl", 1.0), ("acc", 100.0)):
            d = paired_difference(runs + theirs, method, REFERENCE, key)
            cells.append("—" if d is None or d["lo"] is None else
                         f"{scale * d['mean']:+.2f} [{scale * d['lo']:+.2f}, {scale * d['hi']:+.2f}]")
        lines.append(f"{method:22s} {cells[0]:>24s} {cells[1]:>24s}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--reference", default="kd-tuned", help="the label of OTHER to compare against")
    args = parser.parse_args()
    print("\n".join(differences(args.folder, args.other, args.reference)))


if __name__ == "__main__":
    main()
