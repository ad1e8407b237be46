"""``thermokd lm``'s ``tune`` section: one Optuna study per tuned label (``OUT/tune/LABEL``), each trial a seed-0
student scored by its validation perplexity and pruned per evaluation round (``train.steps / train.eval_every``
rounds). A study is continued where it stopped (a finished one is only summarised), and its SQLite file is opened
in the current output folder, so a folder copied or merged elsewhere keeps its study."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import MethodConfig
from ..errors import ThermoKDError
from ..experiments.tune import TrainFn, knob_text, tune_in_turn, tune_method
from ..experiments.tune_metric import PERPLEXITY
from .config import LMRunConfig, tuned_label

# what the report and results.json keep of a study
SUMMARY_KEYS = ("params", "best_value", "best_trial", "budget", "complete", "pruned", "failed", "seconds",
                "cpu_seconds", "sampler", "pruner", "study")


def evaluation_rounds(cfg: LMRunConfig) -> int:
    """How many times a student is evaluated: every ``eval_every`` steps and after the last step."""
    return math.ceil(cfg.train.steps / min(cfg.train.eval_every, cfg.train.steps))


def tuned_config(cfg: LMRunConfig, label: str, method: MethodConfig) -> dict[str, Any]:
    """The LM config that runs ``LABEL-tuned`` at ``method`` (a study's ``best_config.yaml``)."""
    whole = cfg.to_dict()
    whole["variants"][tuned_label(label)] = dataclasses.asdict(method)
    whole["methods"] = [tuned_label(label)]
    whole["tune"]["methods"] = []
    return whole


def finished_study(folder: Path, trials: int) -> "dict[str, Any] | None":
    """The summary (``tune.json``) of the study in ``folder`` when it has finished ``trials`` trials (or its whole
    grid), else None."""
    try:
        summary = json.loads((folder / "tune.json").read_text())
        done = summary["complete"] + summary["pruned"] + summary["failed"]
        # a grid study's budget is capped at the grid's size
        finished = done >= trials or (summary["sampler"] == "grid" and done >= summary["budget"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary if finished else None


def _check_one_process(folder: Path, label: str, trials: int) -> None:
    """Trials run in one process (a trial pruned on rank 0 cannot stop the others): under torchrun, only a finished
    study (summarised, not continued) is accepted."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and finished_study(folder, trials) is None:
        raise ThermoKDError(f"tune.methods: the study of {label} has trials to go, and studies run in one process; "
                            "run it without torchrun first, then --resume under torchrun")


def tune_methods(cfg: LMRunConfig, out_dir: Path, train_fn: TrainFn, echo: Callable[[str], None] = print
                 ) -> tuple[dict[str, MethodConfig], dict[str, dict[str, Any]]]:
    """Run or continue the study of every label of ``cfg.tune.methods`` in ``out_dir/tune/LABEL``. Returns each
    tuned label's (``LABEL-tuned``) method section at the chosen setting, and each study's summary (with
    ``best_val_ppl``, the chosen trial's validation perplexity)."""
    def tune_one(label: str, wait: bool):
        _check_one_process(Path(out_dir) / "tune" / label, label, cfg.tune.trials)
        return tune_method(cfg, cfg.method(label), label, Path(out_dir) / "tune" / label, cfg.tune.for_method(label),
                           train_fn, echo,
                           metric=PERPLEXITY, rounds=evaluation_rounds(cfg), domain="lm",
                           config_for=lambda method: tuned_config(cfg, label, method),
                           set_prefix=f"variants.{tuned_label(label)}", wait=wait)

    chosen, summaries = {}, {}
    # a study shared with another process (tune.storage) is set aside while that process finishes its trials
    for label, result in tune_in_turn(list(cfg.tune.methods), tune_one, echo).items():
        chosen[tuned_label(label)] = result.method
        summary = {k: result.summary.get(k) for k in SUMMARY_KEYS}
        summary["best_val_ppl"] = PERPLEXITY.from_score(result.best_value)
        summary["chosen_method"] = dataclasses.asdict(result.method)
        summaries[label] = summary
        echo(f"  {label}: tuned to {knob_text(result.params)} (validation perplexity "
             f"{summary['best_val_ppl']:.2f}; {summary['complete']} complete, {summary['pruned']} pruned of "
             f"{summary['budget']}, {summary['seconds']:.0f} s of trials)")
    return chosen, summaries
