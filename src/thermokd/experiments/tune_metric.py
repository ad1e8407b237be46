"""What a ``thermokd tune`` study scores: validation accuracy (classification) or validation perplexity (language
models). Optuna always maximises a *score*; a metric says how a run's result and its per-round evaluations become
that score and how a score is shown (as a percentage, or back as a perplexity)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """``name``: recorded in ``tune.json``; ``record_key``: the per-round evaluation's field reported for pruning;
    ``result_key``: the finished run's field a trial is scored by; ``to_score``: value → maximised score;
    ``from_score``: score → the value shown; ``what``: words for the text, ``column``/``unit``/``digits``: for the
    table, ``axis``/``log_axis``: for the plot; ``rounds``: what
    one pruning round is; ``short``: the score's name in progress lines."""

    name: str
    record_key: str
    result_key: str
    to_score: Callable[[float], float]
    from_score: Callable[[float], float]
    what: str
    column: str
    unit: str
    digits: int
    axis: str
    log_axis: bool = False
    rounds: str = "epochs"  # what one pruning round is
    short: str = "val"  # the score's name in progress lines

    def score(self, value: float) -> float:
        return float(self.to_score(float(value)))

    def cell(self, score: "float | None") -> str:
        """A score shown in the metric's own unit (``91.23`` for accuracy, ``45.67`` for perplexity)."""
        return "—" if score is None else f"{self.from_score(score):.{self.digits}f}"

    def text(self, score: float) -> str:
        return f"{self.cell(score)}{self.unit}"


# a trial's score is its accuracy as a fraction, shown as a percentage
ACCURACY = Metric("val_acc", "val_acc", "best_val_acc", lambda v: v, lambda s: 100 * s, "validation accuracy",
                  "val acc %", " %", 2, "validation accuracy (%)")
# maximising −log(perplexity) is minimising the mean validation cross-entropy; shown back as a perplexity
PERPLEXITY = Metric("val_ppl", "val_ppl", "val_ppl", lambda v: -math.log(v), lambda s: math.exp(-s),
                    "validation perplexity", "val ppl", "", 2, "validation perplexity", log_axis=True,
                    rounds="evaluations", short="val ppl")
METRICS = {m.name: m for m in (ACCURACY, PERPLEXITY)}


def metric_of(summary: dict[str, Any]) -> Metric:
    """The metric a ``tune.json`` summary was scored by (accuracy for one written before metrics were recorded)."""
    return METRICS[summary.get("metric", ACCURACY.name)]
