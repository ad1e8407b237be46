"""A teacher LM trained once with cross-entropy (on the same Trainer as the students) and cached (safetensors)
under a key of everything that determines it: the content of the training windows and text, the tokenizer itself,
the model size, the optimisation (steps, seed, …) and the format. Its training checkpoints live in the cache
folder, so a killed teacher run resumes; a second process that needs the same teacher waits for the first.

The entry is one of :mod:`thermokd.teacher_cache` (shared with the classifiers' teachers): the weights carry their
checksum and key, ``teacher.json`` records the key; both are checked on load."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..files import FORMAT as FILES_FORMAT
from ..methods import build_loss
from ..teacher_cache import TeacherEntry, cache_key
from .batches import Windows
from .evaluate import evaluate

FORMAT = "thermokd.lm-teacher/3"  # part of the key: /3 records its key and checksum in the entry


def teacher_key(spec: dict[str, Any]) -> str:
    """The cache key of a teacher: a digest of ``spec`` (what determines it) and the formats of the entry."""
    return cache_key(_full_spec(spec))


def _full_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "files": FILES_FORMAT, **spec}


# how often a run logs, evaluates and saves, not what it learns: a teacher trained at another cadence is the same one
CADENCE = ("progress_bar", "eval_every", "save_every")


def keyed_settings(settings: Any) -> dict[str, Any]:
    """The fields of a teacher's :class:`~thermokd.lm.trainer.RunSettings` that key it (all but :data:`CADENCE`)."""
    return {k: v for k, v in vars(settings).items() if k not in CADENCE}


def _legacy_entry(spec: dict[str, Any], settings: Any, cache_dir: "Path | None") -> TeacherEntry:
    """Where a teacher cached before the cadence left the key lies (its key also held ``eval_every`` and
    ``save_every``): still used when the entry under today's key does not exist."""
    return teacher_entry({**spec, "settings": {k: v for k, v in vars(settings).items() if k != "progress_bar"}},
                         cache_dir)


def teacher_entry(spec: dict[str, Any], cache_dir: "Path | None") -> TeacherEntry:
    from ..data.cache import default_cache_dir

    return TeacherEntry(cache_dir or default_cache_dir(), "lm-teachers", _full_spec(spec))


def teacher_folder(spec: dict[str, Any], cache_dir: "Path | None") -> Path:
    return teacher_entry(spec, cache_dir).folder


def obtain_teacher(spec: dict[str, Any], build: Callable[[], nn.Module], train: Windows, val: Windows,
                   settings: Any, cache_dir: "Path | None" = None,
                   on_eval: "Callable[[dict[str, Any]], None] | None" = None,
                   echo: "Callable[[str], None] | None" = None, run_device: "str | None" = None
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``spec`` (a JSON-able description of everything that determines it besides ``settings``,
    a :class:`~thermokd.lm.trainer.RunSettings`): read from ``cache_dir/lm-teachers/<key>/`` or trained there now
    with cross-entropy (continuing from its checkpoints if a previous attempt was killed; another process training
    the same teacher is waited for). Returns the model (eval mode, on ``run_device``, default ``settings.device``:
    a teacher trained elsewhere is loaded where the students run) and its info: key, folder, validation metrics,
    training seconds, cached or not."""
    from .trainer import check_device, train_run

    keyed = {**spec, "settings": keyed_settings(settings)}
    entry = teacher_entry(keyed, cache_dir)
    if not entry.exists():
        legacy = _legacy_entry(spec, settings, cache_dir)
        entry = legacy if legacy.exists() else entry
    key, folder = entry.key, entry.folder
    model = build()
    with entry.lock(echo):  # one process trains it, others wait
        cached = entry.exists()
        if not cached:
            check_device(settings.device, f"teacher.device ({settings.device}: no teacher trained there is cached, "
                                          "so it would be trained now)")
            result = train_run(model, build_loss("ce"), train, val, settings, folder / "training", resume=True,
                               on_eval=on_eval, echo=echo)
            if result["trainer"].is_world_process_zero():
                entry.store(model, {"spec": keyed, "train_seconds": result["seconds"], "history": result["history"]})
                shutil.rmtree(folder / "training", ignore_errors=True)  # its checkpoints served resumption only
            result["trainer"].accelerator.wait_for_everyone()
    stored = entry.load(model)  # also after training: every process reads the same verified file
    device = run_device or settings.device
    model = model.to(device).eval()
    metrics = evaluate(model, val, device)
    return model, {"key": key, "dir": str(folder), "cached": cached, "val_ppl": metrics["ppl"],
                   "val_acc": metrics["acc"], "val_ce": metrics["ce"], "train_seconds": stored.get("train_seconds"),
                   "history": stored.get("history", [])}
