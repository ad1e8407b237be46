"""A teacher LM trained once with cross-entropy and cached (safetensors) under a hash of everything that
determines it: the training text, the tokenizer, the windows, the model size and the optimisation."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ThermoKDError
from ..methods import build_loss
from .batches import Windows
from .distill import TrainSettings, evaluate, train_lm

FORMAT = "thermokd.lm-teacher/1"  # part of the key: bump it when training changes in a way the spec misses


def teacher_key(spec: dict[str, Any]) -> str:
    text = json.dumps({"format": FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load(model: nn.Module, path: Path) -> None:
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


def obtain_teacher(spec: dict[str, Any], build: Callable[[], nn.Module], train: Windows, val: Windows,
                   settings: TrainSettings, device: "torch.device | str" = "cpu", cache_dir: "Path | None" = None,
                   on_eval: "Callable[[dict[str, Any]], None] | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``spec`` (a JSON-able description of everything that determines it): read from
    ``cache_dir/lm-teachers/<key>/`` or trained now with cross-entropy and written there. Returns the model (eval
    mode, on ``device``) and its info: key, folder, validation perplexity/accuracy, training seconds, and whether
    it came from the cache."""
    from ..engine.checkpoint import write_json_atomic
    from ..data.cache import default_cache_dir

    key = teacher_key({**spec, "settings": vars(settings)})
    folder = (cache_dir or default_cache_dir()) / "lm-teachers" / key
    weights, info_path = folder / "teacher.safetensors", folder / "teacher.json"
    model = build()
    cached = weights.is_file() and info_path.is_file()
    if cached:
        _load(model, weights)
        stored = json.loads(info_path.read_text())
        seconds, history = stored.get("train_seconds"), stored.get("history", [])
    else:
        result = train_lm(model, build_loss("ce"), train, val, settings, device, on_eval=on_eval)
        seconds, history = result["seconds"], result["history"]
        folder.mkdir(parents=True, exist_ok=True)
        _save(model, weights)
        write_json_atomic(info_path, {"key": key, "spec": spec, "settings": vars(settings),
                                      "train_seconds": seconds, "history": history})
    model = model.to(device).eval()
    metrics = evaluate(model, val, device)
    return model, {"key": key, "dir": str(folder), "cached": cached, "val_ppl": metrics["ppl"],
                   "val_acc": metrics["acc"], "val_ce": metrics["ce"], "train_seconds": seconds, "history": history}
