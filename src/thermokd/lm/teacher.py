"""A teacher LM trained once with cross-entropy (on the same Trainer as the students) and cached (safetensors)
under a hash of everything that determines it: the training text, the tokenizer, the windows, the model size and
the optimisation. Its training checkpoints live in the cache folder, so a killed teacher run resumes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ThermoKDError
from ..methods import build_loss
from .batches import Windows
from .evaluate import evaluate

FORMAT = "thermokd.lm-teacher/2"  # part of the key: /2 trains on the HF Trainer


def teacher_key(spec: dict[str, Any]) -> str:
    text = json.dumps({"format": FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    try:
        # load_model (not load_file) restores tied weights such as GPT-2's shared input/output embedding
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # noqa: BLE001 - safetensors' header errors, or a shape mismatch
        raise ThermoKDError(f"cannot load teacher weights {path}: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise ThermoKDError(f"teacher weights {path} do not fit the model: missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")


def _save(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def teacher_folder(spec: dict[str, Any], cache_dir: "Path | None") -> Path:
    from ..data.cache import default_cache_dir

    return (cache_dir or default_cache_dir()) / "lm-teachers" / teacher_key(spec)


def obtain_teacher(spec: dict[str, Any], build: Callable[[], nn.Module], train: Windows, val: Windows,
                   settings: Any, cache_dir: "Path | None" = None,
                   on_eval: "Callable[[dict[str, Any]], None] | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``spec`` (a JSON-able description of everything that determines it besides ``settings``,
    a :class:`~thermokd.lm.trainer.RunSettings`): read from ``cache_dir/lm-teachers/<key>/`` or trained there now
    with cross-entropy (continuing from its checkpoints if a previous attempt was killed). Returns the model (eval
    mode, on ``settings.device``) and its info: key, folder, validation metrics, training seconds, cached or not."""
    from ..engine.checkpoint import write_json_atomic
    from .trainer import train_run

    spec = {**spec, "settings": {k: v for k, v in vars(settings).items() if k != "progress_bar"}}
    folder = teacher_folder(spec, cache_dir)
    weights, info_path = folder / "teacher.safetensors", folder / "teacher.json"
    model = build()
    cached = weights.is_file() and info_path.is_file()
    if cached:
        load_weights(model, weights)
        stored = json.loads(info_path.read_text())
        seconds, history = stored.get("train_seconds"), stored.get("history", [])
    else:
        result = train_run(model, build_loss("ce"), train, val, settings, folder / "training", resume=True,
                           on_eval=on_eval)
        seconds, history = result["seconds"], result["history"]
        if result["trainer"].is_world_process_zero():
            _save(model, weights)
            write_json_atomic(info_path, {"key": folder.name, "spec": spec, "train_seconds": seconds,
                                          "history": history})
            shutil.rmtree(folder / "training", ignore_errors=True)  # its checkpoints served resumption only
        result["trainer"].accelerator.wait_for_everyone()
    model = model.to(settings.device).eval()
    metrics = evaluate(model, val, settings.device)
    return model, {"key": folder.name, "dir": str(folder), "cached": cached, "val_ppl": metrics["ppl"],
                   "val_acc": metrics["acc"], "val_ce": metrics["ce"], "train_seconds": seconds, "history": history}
