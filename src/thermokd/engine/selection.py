"""What a run reports from its per-epoch records: the epoch that validation picks, and test accuracy there and at
the end. The test split is read only to report, never to choose."""
from __future__ import annotations

from typing import Any


def epoch_summary(history: list[dict[str, Any]], best_epoch: int,
                  collapse: "dict[str, Any] | None" = None) -> dict[str, Any]:
    """``best_epoch`` (the validation-selected epoch), ``best_acc`` (test accuracy at that epoch), ``best_val_acc``,
    ``last_acc``/``last_val_acc`` (the final epoch), ``wall_time_per_epoch``, ``history`` and ``collapse`` (a
    validation collapse event, or None)."""
    by_epoch = {h["epoch"]: h for h in history}
    best, last = by_epoch.get(best_epoch, {}), (history[-1] if history else {})
    times = [h["train_time"] for h in history if h.get("train_time") is not None]
    return {"best_acc": best.get("test_acc"), "best_val_acc": best.get("val_acc"), "best_epoch": best_epoch,
            "last_acc": last.get("test_acc"), "last_val_acc": last.get("val_acc"),
            "wall_time_per_epoch": sum(times) / len(times) if times else None, "history": history,
            "collapse": collapse}
