"""Teachers trained once and cached by a key of their config; their logits on the training views cached too."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.cache import default_cache_dir
from ..errors import ThermoKDError
from ..files import FORMAT, cached_tensors, digest, path_digest, save_tensors
from ..methods import build_loss
from ..teacher_cache import TeacherEntry, cache_key, load_weights
from .features import cache_frozen_features, caches_features
from .trainer import EpochData, LoopConfig, Trainer, predict


def teacher_spec(cfg: RunConfig, data_digest: str) -> dict[str, Any]:
    """Everything that determines the trained teacher, what its cache key digests: its config section, the content
    of the data (``data_digest``, not the path it was read from), the teacher file it is loaded from, the format."""
    from ..data import is_text_spec

    t = cfg.teacher
    spec = {"format": FORMAT, "data": data_digest, "augment": cfg.data.augment, "model": t.model,
            "model_args": t.model_args, "epochs": t.epochs, "batch_size": t.batch_size, "seed": t.seed,
            "optimizer": vars(t.optimizer), "schedule": vars(t.schedule),
            "checkpoint": path_digest(t.checkpoint) if t.checkpoint and Path(t.checkpoint).is_file() else t.checkpoint,
            "validation": [cfg.data.val_fraction, cfg.data.val_seed]}  # the teacher trains without the val split
    if is_text_spec(cfg.data.name):
        spec["text"] = {"max_len": cfg.data.max_len, "tokenizer": cfg.data.tokenizer}
    if cfg.data.augment == "mask":  # absent otherwise, so existing keys stay valid
        spec["mask_rate"] = cfg.data.mask_rate
    return spec


def teacher_entry(cfg: RunConfig, data_digest: str, cache_dir: "Path | None" = None) -> TeacherEntry:
    return TeacherEntry(cache_dir or default_cache_dir(), "teachers", teacher_spec(cfg, data_digest))


def teacher_key(cfg: RunConfig, data_digest: str) -> str:
    return cache_key(teacher_spec(cfg, data_digest))


def teacher_dir(cfg: RunConfig, data_digest: str, cache_dir: "Path | None" = None) -> Path:
    return teacher_entry(cfg, data_digest, cache_dir).folder


def seeded_build(build_model, name: str, model_args: dict[str, Any], seed: int) -> nn.Module:
    """Build a model whose initialisation is a function of ``seed`` alone (the same weights on every machine with
    the same torch build), leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, model_args)


def obtain_teacher(cfg: RunConfig, build_model, data: EpochData, accelerator, data_digest: str,
                   cache_dir: "Path | None" = None, progress_bar: bool = True,
                   echo: "Callable[[str], None] | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher for ``cfg``: loaded from ``teacher.checkpoint``, from the cache, or trained now (resumably)
    and cached. Returns the model (eval mode) and its info (key, test accuracy, directory, ``source``: checkpoint,
    cache or trained, ``fingerprint``: a digest of its test logits, ``trained_on``: the device type and CPU thread
    count it was trained with, None for a teacher cached before that was recorded or given as a checkpoint). Two
    runs that need the same uncached teacher take turns: the second waits, then reads it.

    A teacher with a frozen pretrained encoder first gets that encoder's outputs on the training and test
    inputs (cached on disk), so that training its head and every later pass cost only the head."""
    entry = teacher_entry(cfg, data_digest, cache_dir)
    key, directory = entry.key, entry.folder
    t = cfg.teacher
    model = seeded_build(build_model, t.model, t.model_args, t.seed)
    source = "checkpoint" if t.checkpoint else "cache"
    if t.checkpoint:
        load_weights(model, Path(t.checkpoint), checksum=False)
    if caches_features(model):
        splits = {"train": data.inputs_for_epoch(0), "test": data.test_x}
        cache_frozen_features(model, splits if data.val_x is None else {**splits, "val": data.val_x}, accelerator,
                              cache_dir, progress_bar)
    trained_on = None
    if not t.checkpoint:
        with entry.lock(echo):
            accelerator.wait_for_everyone()  # every rank decides after rank 0 holds the lock, so all decide alike
            if not entry.exists():
                source = "trained"
                _train_teacher(cfg, model, data, accelerator, entry, progress_bar)
        trained_on = entry.load(model).get("trained_on")
    model = model.to(accelerator.device).eval()
    test_logits = predict(model, data.test_x, accelerator.device, cfg.train.eval_batch_size)
    acc = float((test_logits.argmax(-1) == data.test_y).float().mean())
    val_acc = None
    if data.val_x is not None:
        val_logits = predict(model, data.val_x, accelerator.device, cfg.train.eval_batch_size)
        val_acc = float((val_logits.argmax(-1) == data.val_y).float().mean())
    # the same key can still give another teacher (trained on another machine, or run on another device): what it
    # computes is told by its test logits
    return model, {"key": key, "model": t.model, "test_acc": acc, "val_acc": val_acc, "dir": str(directory),
                   "source": source, "fingerprint": digest(test_logits), "trained_on": trained_on,
                   "train_seconds": training_seconds(directory / "run" / "metrics.jsonl"), "test_logits": test_logits}


def _train_teacher(cfg: RunConfig, model: nn.Module, data: EpochData, accelerator, entry: TeacherEntry,
                   progress_bar: bool) -> None:
    t = cfg.teacher
    loop = LoopConfig(epochs=t.epochs, batch_size=t.batch_size, seed=t.seed, optimizer=t.optimizer,
                      schedule=t.schedule, log_every=cfg.train.log_every, eval_batch_size=cfg.train.eval_batch_size,
                      progress_bar=progress_bar, description=f"teacher {t.model}")
    trainer = Trainer(model, build_loss("ce", ignore_index=None), data, loop, accelerator, out_dir=entry.folder / "run")
    summary = trainer.fit(resume=True)  # a killed teacher run continues where it stopped
    accelerator.free_memory()
    if accelerator.is_main_process:
        # the same key trains another teacher with another CPU thread count (float reductions in another order):
        # 20 Newsgroups' MLP head reached 79.60 % with 1 thread and 79.77 % with 2, on bit-identical features
        trained_on = {"device": accelerator.device.type, "threads": torch.get_num_threads()}
        entry.store(model, {"model": t.model, "test_acc": summary["last_acc"], "best_acc": summary["best_acc"],
                            "config": cfg.to_dict()["teacher"], "trained_on": trained_on})
    accelerator.wait_for_everyone()


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


def cached_view_logits(teacher: nn.Module, views: list[Tensor], path: Path, key: str, device, batch_size: int,
                       is_main: bool) -> list[Tensor]:
    """Teacher logits for each fixed training view, read from ``path`` (checked against its checksum and ``key``)
    or computed once and written there."""
    stored = cached_tensors(path, key)
    if stored is not None:
        tensors = stored[0]
        if len(tensors) == len(views) and all(f"view{i}" in tensors and tensors[f"view{i}"].shape[0] == v.shape[0]
                                              for i, v in enumerate(views)):
            return [tensors[f"view{i}"] for i in range(len(views))]
        raise ThermoKDError(f"the teacher-logit cache {path} does not fit the training views; delete it and run "
                            "again to recompute it")
    logits = [predict(teacher, v, device, batch_size) for v in views]
    if is_main:
        save_tensors(path, {f"view{i}": view for i, view in enumerate(logits)}, key=key)
    return logits
