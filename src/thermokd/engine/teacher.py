"""Teachers trained once and cached by a key of their config; their logits on the training views cached too."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.cache import default_cache_dir
from ..errors import ThermoKDError
from ..methods import build_loss
from .checkpoint import write_json_atomic
from .features import cache_frozen_features, caches_features
from .trainer import EpochData, LoopConfig, Trainer, predict


def teacher_key(cfg: RunConfig) -> str:
    """A short hash of everything that determines the trained teacher."""
    from ..data import is_text_spec

    t = cfg.teacher
    spec = {"data": cfg.data.name, "augment": cfg.data.augment, "model": t.model, "model_args": t.model_args,
            "epochs": t.epochs, "batch_size": t.batch_size, "seed": t.seed,
            "optimizer": vars(t.optimizer), "schedule": vars(t.schedule), "checkpoint": t.checkpoint,
            "validation": [cfg.data.val_fraction, cfg.data.val_seed]}  # the teacher trains without the val split
    if is_text_spec(cfg.data.name):  # only text has these; other keys stay as they were, and so do their caches
        spec["text"] = {"max_len": cfg.data.max_len, "tokenizer": cfg.data.tokenizer}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_dir(cfg: RunConfig, cache_dir: "Path | None" = None) -> Path:
    return (cache_dir or default_cache_dir()) / "teachers" / teacher_key(cfg)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into ``model``; a mismatch names the classifier's class counts or the first
    tensor that does not fit."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ThermoKDError(f"teacher checkpoint not found: {path}")
    try:
        stored = load_file(str(path))
    except Exception as exc:  # safetensors' header errors
        raise ThermoKDError(f"cannot read teacher weights {path}: {str(exc).splitlines()[0]}") from None
    expected = model.state_dict()
    head = [k for k, v in expected.items() if k.endswith("weight") and v.dim() == 2][-1:]
    if head and head[0] in stored and stored[head[0]].shape[0] != expected[head[0]].shape[0]:
        raise ThermoKDError(f"the teacher checkpoint {path} predicts {stored[head[0]].shape[0]} classes but the "
                            f"data has {expected[head[0]].shape[0]}")
    for k, v in expected.items():
        if k not in stored or stored[k].shape != v.shape:
            found = tuple(stored[k].shape) if k in stored else "nothing"
            raise ThermoKDError(f"the teacher checkpoint {path} does not fit model {type(model).__name__}: "
                                f"{k} should be {tuple(v.shape)}, found {found}")
    model.load_state_dict(stored)


def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def obtain_teacher(cfg: RunConfig, build_model, data: EpochData, accelerator, cache_dir: "Path | None" = None,
                   progress_bar: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``cfg``: loaded from ``teacher.checkpoint``, from the cache, or trained now (resumably)
    and cached. Returns the model (eval mode) and its info (key, test accuracy, directory).

    A teacher with a frozen pretrained encoder first gets that encoder's outputs on the training and test
    inputs (cached on disk), so that training its head and every later pass cost only the head."""
    directory = teacher_dir(cfg, cache_dir)
    torch.manual_seed(cfg.teacher.seed)  # the teacher's initialisation, whatever ran before in this process
    model = build_model(cfg.teacher.model, cfg.teacher.model_args)
    weights, info_path = directory / "teacher.safetensors", directory / "teacher.json"
    trained = bool(cfg.teacher.checkpoint) or (weights.is_file() and info_path.is_file())
    if trained:
        load_weights(model, Path(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else weights)
    if caches_features(model):
        splits = {"train": data.inputs_for_epoch(0), "test": data.test_x}
        cache_frozen_features(model, splits if data.val_x is None else {**splits, "val": data.val_x}, accelerator,
                              cache_dir, progress_bar)
    if not trained:
        directory.mkdir(parents=True, exist_ok=True)
        t = cfg.teacher
        loop = LoopConfig(epochs=t.epochs, batch_size=t.batch_size, seed=t.seed, optimizer=t.optimizer,
                          schedule=t.schedule, log_every=cfg.train.log_every, eval_batch_size=cfg.train.eval_batch_size,
                          progress_bar=progress_bar, description=f"teacher {t.model}")
        trainer = Trainer(model, build_loss("ce"), data, loop, accelerator, out_dir=directory / "run")
        summary = trainer.fit(resume=True)  # a killed teacher run continues where it stopped
        accelerator.free_memory()
        if accelerator.is_main_process:
            save_weights(model, weights)
            write_json_atomic(info_path, {"key": teacher_key(cfg), "model": t.model, "test_acc": summary["last_acc"],
                                          "best_acc": summary["best_acc"], "config": cfg.to_dict()["teacher"]})
        accelerator.wait_for_everyone()
        load_weights(model, weights)
    model = model.to(accelerator.device).eval()
    test_logits = predict(model, data.test_x, accelerator.device, cfg.train.eval_batch_size)
    acc = float((test_logits.argmax(-1) == data.test_y).float().mean())
    val_acc = None
    if data.val_x is not None:
        val_logits = predict(model, data.val_x, accelerator.device, cfg.train.eval_batch_size)
        val_acc = float((val_logits.argmax(-1) == data.val_y).float().mean())
    return model, {"key": teacher_key(cfg), "model": cfg.teacher.model, "test_acc": acc, "val_acc": val_acc,
                   "dir": str(directory),
                   "train_seconds": training_seconds(directory / "run" / "metrics.jsonl"), "test_logits": test_logits}


def training_seconds(metrics: Path) -> "float | None":
    """Summed per-epoch training time of a run's ``metrics.jsonl`` (None when it is absent, e.g. a teacher loaded
    from ``teacher.checkpoint``)."""
    if not metrics.is_file():
        return None
    total = 0.0
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("type") == "epoch" and isinstance(record.get("train_time"), (int, float)):
            total += record["train_time"]
    return total


def cached_view_logits(teacher: nn.Module, views: list[Tensor], path: Path, device, batch_size: int,
                       is_main: bool) -> list[Tensor]:
    """Teacher logits for each fixed training view, read from ``path`` or computed once and written there."""
    from safetensors.torch import load_file, save_file

    if path.is_file():
        stored = load_file(str(path))
        if len(stored) == len(views) and all(stored[f"view{i}"].shape[0] == v.shape[0] for i, v in enumerate(views)):
            return [stored[f"view{i}"] for i in range(len(views))]
    logits = [predict(teacher, v, device, batch_size) for v in views]
    if is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({f"view{i}": l.contiguous() for i, l in enumerate(logits)}, str(tmp))
        os.replace(tmp, path)
    return logits
