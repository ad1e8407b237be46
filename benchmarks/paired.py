"""The paired per-seed difference between two methods of one ``thermokd compare`` results.json (Δ in pp, with its
95 % t-interval; bold where the interval excludes zero), for pairs the report does not show (it compares every
method with tuned KD and with CE only).

    python benchmarks/paired.py RESULTS_JSON METHOD REFERENCE [--on test|val]

``--on test`` (default): test accuracy at each run's validation-chosen epoch, as the reports use. ``--on val``: each
run's best validation accuracy (the selection criterion itself, e.g. for choosing a default on validation).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evidence_overview import cell


def difference(results: Path, method: str, reference: str, on: str = "test") -> str:
    runs = json.loads(Path(results).read_text())["runs"]
    if on == "val":
        runs = [{**r, "best_acc": r["best_val_acc"]} for r in runs]
    return cell(runs, method, reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("method")
    parser.add_argument("reference")
    parser.add_argument("--on", choices=("test", "val"), default="test")
    args = parser.parse_args()
    print(f"{args.method} vs {args.reference} ({args.on}): "
          f"{difference(args.results, args.method, args.reference, args.on)}")


if __name__ == "__main__":
    main()
