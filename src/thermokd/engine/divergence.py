"""Divergence is never silent: a non-finite loss stops the run, a collapse of validation accuracy is flagged."""
from __future__ import annotations

import math
import sys
from typing import Any

from ..errors import ThermoKDError

TAU_KEYS = ("tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "tau_student_mean")


def tau_summary(stats: dict[str, Any]) -> str:
    """The temperature statistics of a step as ``key=value`` pairs ("no τ statistics" for plain CE)."""
    found = [f"{k}={stats[k]:.4g}" for k in TAU_KEYS if isinstance(stats.get(k), (int, float))]
    return ", ".join(found) or "no τ statistics"


def check_finite_loss(stats: dict[str, Any], when: str, run: str) -> None:
    """Stop a run whose loss has become NaN or infinite, naming when (``"at step 40 (epoch 1)"``), the run (method
    and seed) and the temperature statistics: training on from there only produces garbage. The engine checks the
    statistics where it reads them anyway (every ``log_every`` steps and at the end of each epoch), so a training
    step never waits for the device."""
    loss = stats.get("loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        raise ThermoKDError(f"non-finite loss ({loss}) {when} of {run}; last τ statistics: {tau_summary(stats)}")


def collapse(history: list[dict[str, Any]], chance: float) -> "dict[str, Any] | None":
    """The first epoch whose validation accuracy fell more than half the way from the best before it to chance,
    or None: e.g. from a best of 73 % with 10 classes, anything under 41.5 %."""
    best, best_epoch = -math.inf, -1
    for record in history:
        acc = record.get("val_acc")
        if acc is None:
            continue
        if best > chance and acc < best - 0.5 * (best - chance):
            return {"epoch": record["epoch"], "val_acc": acc, "best_val_acc": best, "best_epoch": best_epoch,
                    "chance": chance}
        if acc > best:
            best, best_epoch = acc, record["epoch"]
    return None


def describe_collapse(run: str, event: dict[str, Any]) -> str:
    return (f"{run}: validation accuracy fell to {100 * event['val_acc']:.2f} % at epoch {event['epoch']}, more than "
            f"half way from its best {100 * event['best_val_acc']:.2f} % (epoch {event['best_epoch']}) to chance "
            f"{100 * event['chance']:.2f} %")


def warn_collapse(run: str, event: dict[str, Any]) -> None:
    print(f"thermokd: warning: {describe_collapse(run, event)}", file=sys.stderr, flush=True)
