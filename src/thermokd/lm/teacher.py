"""A teacher LM trained once with cross-entropy (on the same Trainer as the students) and cached (safetensors)
under a key of everything that determines it: the content of the training windows and text, the tokenizer itself,
the model size, the optimisation (steps, seed, …) and the format. Its training checkpoints live in the cache
folder, so a killed teacher run resumes; a second process that needs the same teacher waits for the first.

The weights carry their checksum and key in their safetensors metadata and ``teacher.json`` records the key; both
are checked on load, so a damaged or foreign entry is a one-line error that says to delete it."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import ThermoKDError
from ..files import FORMAT as FILES_FORMAT
from ..files import FolderLock, digest, load_tensors, read_json, save_tensors, write_json
from ..methods import build_loss
from .batches import Windows
from .evaluate import evaluate

FORMAT = "thermokd.lm-teacher/3"  # part of the key: /3 records its key and checksum in the entry


def teacher_key(spec: dict[str, Any]) -> str:
    """The cache key of a teacher: a digest of ``spec`` (what determines it) and the formats of the entry."""
    return digest({"format": FORMAT, "files": FILES_FORMAT, **spec}, size=8)


def _tied(model: nn.Module) -> dict[str, str]:
    """Names of parameters that share storage with an earlier one (GPT-2's output layer is its input embedding)
    → that earlier name: saved once, restored into both."""
    first: dict[tuple[int, int], str] = {}
    tied = {}
    for name, value in model.state_dict(keep_vars=False).items():
        if value.numel() == 0:
            continue
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ptr in first:
            tied[name] = first[ptr]
        else:
            first[ptr] = name
    return tied


def save_weights(model: nn.Module, path: Path, key: "str | None" = None) -> None:
    """Write ``model``'s weights atomically, tied ones once, with their checksum (and ``key``) in the metadata."""
    tied = _tied(model)
    save_tensors(path, {k: v for k, v in model.state_dict().items() if k not in tied}, key=key)


def load_weights(model: nn.Module, path: Path, key: "str | None" = None,
                 remedy: str = "delete it and run again") -> None:
    """Load weights written by :func:`save_weights`, verified against their checksum (and ``key``)."""
    stored, _ = load_tensors(path, key=key, remedy=remedy)
    tied = _tied(model)
    full: dict[str, Tensor] = {**stored, **{k: stored[v] for k, v in tied.items() if v in stored}}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(full)), sorted(set(full) - set(expected))
    wrong = [k for k in expected if k in full and full[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ThermoKDError(f"teacher weights {path} do not fit the model: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}, other shapes {wrong[:3]}; {remedy}")
    model.load_state_dict(full)


def teacher_folder(spec: dict[str, Any], cache_dir: "Path | None") -> Path:
    from ..data.cache import default_cache_dir

    return (cache_dir or default_cache_dir()) / "lm-teachers" / teacher_key(spec)


def obtain_teacher(spec: dict[str, Any], build: Callable[[], nn.Module], train: Windows, val: Windows,
                   settings: Any, cache_dir: "Path | None" = None,
                   on_eval: "Callable[[dict[str, Any]], None] | None" = None,
                   echo: "Callable[[str], None] | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``spec`` (a JSON-able description of everything that determines it besides ``settings``,
    a :class:`~thermokd.lm.trainer.RunSettings`): read from ``cache_dir/lm-teachers/<key>/`` or trained there now
    with cross-entropy (continuing from its checkpoints if a previous attempt was killed; another process training
    the same teacher is waited for). Returns the model (eval mode, on ``settings.device``) and its info: key,
    folder, validation metrics, training seconds, cached or not."""
    from .trainer import train_run

    spec = {**spec, "settings": {k: v for k, v in vars(settings).items() if k != "progress_bar"}}
    folder = teacher_folder(spec, cache_dir)
    key = folder.name
    weights, info_path = folder / "teacher.safetensors", folder / "teacher.json"
    remedy = f"delete the cache entry {folder} and run again to retrain the teacher"
    model = build()
    with FolderLock(folder, "teacher cache entry", wait=True, echo=echo):  # one process trains it, others wait
        cached = weights.is_file() and info_path.is_file()
        if not cached:
            result = train_run(model, build_loss("ce"), train, val, settings, folder / "training", resume=True,
                               on_eval=on_eval, echo=echo)
            if result["trainer"].is_world_process_zero():
                save_weights(model, weights, key)
                write_json(info_path, {"key": key, "spec": spec, "train_seconds": result["seconds"],
                                       "history": result["history"]})
                shutil.rmtree(folder / "training", ignore_errors=True)  # its checkpoints served resumption only
            result["trainer"].accelerator.wait_for_everyone()
    stored = read_json(info_path, remedy)
    if not isinstance(stored, dict) or stored.get("key") != key:
        found = stored.get("key") if isinstance(stored, dict) else None
        raise ThermoKDError(f"{info_path} was made for another teacher (key {found!r}, expected {key!r}); {remedy}")
    load_weights(model, weights, key, remedy)  # also after training: every process reads the same verified file
    model = model.to(settings.device).eval()
    metrics = evaluate(model, val, settings.device)
    return model, {"key": key, "dir": str(folder), "cached": cached, "val_ppl": metrics["ppl"],
                   "val_acc": metrics["acc"], "val_ce": metrics["ce"], "train_seconds": stored.get("train_seconds"),
                   "history": stored.get("history", [])}
