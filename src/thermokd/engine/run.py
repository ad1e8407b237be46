"""One student run end to end (``thermokd distill``) and teacher training (``thermokd train-teacher``)."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..diagnostics import soft_label_report
from ..errors import ThermoKDError
from ..files import FolderLock, digest, read_json, write_json
from ..progress import Progress
from ..teacher_cache import save_weights
from .identity import check_same_run, data_digest, method_loss, run_identity
from .teacher import cached_view_logits, obtain_teacher, teacher_dir, teacher_key
from .trainer import EpochData, LoopConfig, Trainer, predict

FINAL_KEYS = ("tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "tau_student_mean",
              "teacher_entropy_mean", "teacher_entropy_std", "weight_std")


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator`` (devices, DDP under ``accelerate launch``/``torchrun``, mixed precision)."""
    from accelerate import Accelerator

    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ThermoKDError("mixed_precision='fp16' needs a CUDA device; use 'bf16' or 'no' on the CPU")
    # cpu=True when there is no GPU: Accelerate then runs multi-process CPU training (gloo) under torchrun
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


class Experiment:
    """Data, model factory and augmentation for a config, shared by the teacher and every student run."""

    def __init__(self, cfg: RunConfig, cache_dir: "Path | None" = None) -> None:
        from ..data import IMAGE_AUGMENTATIONS, TOKEN_AUGMENTATIONS, load_data, make_augment, student_subset
        from ..data.text import token_masking

        self.cfg = cfg
        self.bundle = load_data(cfg.data.name, seed=cfg.teacher.seed, max_len=cfg.data.max_len,
                                tokenizer=cfg.data.tokenizer, cache_dir=cache_dir,
                                val_fraction=cfg.data.val_fraction, val_seed=cfg.data.val_seed)
        # the training examples a student sees (None: all); the teacher always trains on every one
        self.student_index = student_subset(self.bundle.train.y, cfg.data.student_train_size, cfg.data.val_seed)
        name = self.bundle.default_augment if cfg.data.augment == "default" else cfg.data.augment
        allowed = TOKEN_AUGMENTATIONS if self.bundle.is_text else IMAGE_AUGMENTATIONS
        if name not in allowed:
            raise ThermoKDError(f"data.augment={cfg.data.augment!r} does not apply to "
                                f"{'token ids' if self.bundle.is_text else 'images or feature vectors'}; "
                                f"use one of: default, {', '.join(allowed)}")
        self.augment_name = name
        # what names the augmentation in cache keys: the masking rate is part of it
        self.augment_tag = f"mask-{cfg.data.mask_rate!r}" if name == "mask" else name
        self._augment = make_augment(name, self.bundle.input_shape,
                                     masking=token_masking(cfg.data.tokenizer, cfg.data.mask_rate, self.bundle.pad_id)
                                     if name == "mask" else None)
        self.data_digest = data_digest(self.bundle)  # what caches and resumed runs are keyed by, not the path

    def build_model(self, name: str, model_args: dict[str, Any]) -> nn.Module:
        from ..models import build_model

        b, shape = self.bundle, self.bundle.input_shape
        if b.is_text:
            model = build_model(name, num_classes=b.num_classes, vocab_size=b.vocab_size, pad_id=b.pad_id,
                                max_len=shape[0], **model_args)
        else:
            model = build_model(name, num_classes=b.num_classes, in_channels=shape[0],
                                input_size=shape[-1] if len(shape) == 3 else 1, **model_args)
        if len(shape) == 3 and name != "mlp":  # faster for convolutions on the CPU (docs/data.md)
            model = model.to(memory_format=torch.channels_last)
        return model

    def augmented(self, seed: int, index: int) -> Tensor:
        """The training inputs under augmentation draw ``(seed, index)``; the raw inputs without augmentation."""
        x = self.bundle.train.x
        if self.augment_name == "none":
            return x
        return self._augment(x, torch.Generator().manual_seed(seed * 7_919 + index))

    def _epoch_data(self, inputs_for_epoch, logits_for_epoch=None, student: bool = True) -> EpochData:
        """The data of a run; a student's is restricted to its training subset, when one is set."""
        b, index = self.bundle, self.student_index if student else None

        def take(tensor: "Tensor | None") -> "Tensor | None":
            return tensor if index is None or tensor is None else tensor[index]

        data = EpochData(train_y=take(b.train.y), test_x=b.test.x, test_y=b.test.y, val_x=b.val.x, val_y=b.val.y,
                         inputs_for_epoch=lambda epoch: take(inputs_for_epoch(epoch)))
        if logits_for_epoch is not None:
            data.teacher_logits_for_epoch = lambda epoch: take(logits_for_epoch(epoch))
        return data

    def fresh_data(self, seed: int, student: bool = True) -> EpochData:
        """A new augmentation draw every epoch (teacher training, online-teacher students)."""
        return self._epoch_data(lambda epoch: self.augmented(seed, epoch), student=student)

    def cached_data(self, teacher: nn.Module, tdir: Path, device, is_main: bool) -> EpochData:
        """Fixed augmented views of the training set (one if no augmentation), with the teacher's logits on each
        computed once and cached; epoch ``e`` uses view ``e mod K``, so a KD epoch costs about a CE epoch."""
        k = 1 if self.augment_name == "none" else self.cfg.data.augment_views
        view_seed = self.cfg.teacher.seed + 1
        views = [self.augmented(view_seed, v) for v in range(k)]
        tag = hashlib.sha256(f"{self.augment_tag}-{k}-{view_seed}".encode()).hexdigest()[:10]
        key = digest("logits", teacher_key(self.cfg, self.data_digest), self.augment_tag, str(k), str(view_seed))
        logits = cached_view_logits(teacher, views, tdir / f"logits-{tag}.safetensors", key, device,
                                    self.cfg.train.eval_batch_size, is_main)
        return self._epoch_data(lambda epoch: views[epoch % k], lambda epoch: logits[epoch % k])

    def teacher(self, accelerator, cache_dir: "Path | None", progress_bar: bool = True,
                echo: "Callable[[str], None] | None" = None) -> tuple[nn.Module, dict]:
        data = self.fresh_data(self.cfg.teacher.seed, student=False)
        teacher, info = obtain_teacher(self.cfg, self.build_model, data, accelerator, self.data_digest, cache_dir,
                                       progress_bar, echo)
        if info["test_logits"].shape[-1] != self.bundle.num_classes:
            raise ThermoKDError(f"the teacher predicts {info['test_logits'].shape[-1]} classes but the data "
                                f"{self.cfg.data.name!r} has {self.bundle.num_classes}")
        return teacher, info


def setup(cfg: RunConfig, cache_dir: "Path | None" = None, progress_bar: bool = True,
          echo: "Callable[[str], None] | None" = None) -> tuple[Any, Experiment, tuple[nn.Module, dict]]:
    """What every multi-run command starts with: the accelerator, the experiment (data and models) and the teacher
    (trained now or taken from the cache)."""
    accelerator = make_accelerator(cfg.train.mixed_precision)
    experiment = Experiment(cfg, cache_dir)
    teacher = experiment.teacher(accelerator, cache_dir, progress_bar, echo)
    if echo is not None:
        echo(teacher_line(teacher[1]))
    return accelerator, experiment, teacher


def teacher_line(info: dict[str, Any]) -> str:
    """Where the teacher came from, in one line."""
    source = {"cache": "from the cache", "trained": "trained now", "checkpoint": "from teacher.checkpoint"}
    return (f"teacher {info['model']} {source.get(info.get('source'), '')}: test accuracy {info['test_acc']:.4f} "
            f"(cache key {info['key']})")


def train_teacher(cfg: RunConfig, cache_dir: "Path | None" = None, accelerator=None,
                  progress_bar: bool = True) -> dict[str, Any]:
    """Train (or find in the cache) the teacher of ``cfg``; returns its info (key, accuracy, directory)."""
    accelerator = accelerator or make_accelerator(cfg.train.mixed_precision)
    _, info = Experiment(cfg, cache_dir).teacher(accelerator, cache_dir, progress_bar)
    return {k: v for k, v in info.items() if k != "test_logits"}


def run_distill(cfg: RunConfig, out_dir: Path, resume: bool = False, cache_dir: "Path | None" = None,
                accelerator=None, experiment: "Experiment | None" = None, teacher: "tuple | None" = None,
                progress_bar: bool = True, rerun_changed: bool = False,
                on_epoch: "Callable[[dict[str, Any]], None] | None" = None,
                wait_for: "Callable[[str], None] | None" = None) -> dict[str, Any]:
    """Train one student for ``cfg`` into ``out_dir``; returns (and writes) ``result.json``'s content.

    ``resume`` continues a killed run or returns a finished one (``"reused": True``), but only when the folder's
    run was made of the same config, teacher and data; otherwise it stops with one line naming the differences
    before writing anything, or with ``rerun_changed`` starts that run afresh. One process writes a folder at a
    time (a lock held for the whole run). ``on_epoch``: called with each epoch's record (validation and test
    accuracy), e.g. by a tuner. ``wait_for``: when another process holds the folder, say so through it and wait
    for that process to finish (then its run is reused like any other), instead of stopping with an error."""
    out_dir = Path(out_dir)
    with FolderLock(out_dir, wait=wait_for is not None, echo=wait_for):
        return _run_distill(cfg, out_dir, resume, cache_dir, accelerator, experiment, teacher, progress_bar,
                            rerun_changed, on_epoch)


def _run_distill(cfg: RunConfig, out_dir: Path, resume: bool, cache_dir: "Path | None", accelerator,
                 experiment: "Experiment | None", teacher: "tuple | None", progress_bar: bool,
                 rerun_changed: bool, on_epoch: "Callable[[dict[str, Any]], None] | None") -> dict[str, Any]:
    result_path = out_dir / "result.json"
    existing = (out_dir / "checkpoints").exists() or result_path.exists()
    if existing and not (resume or rerun_changed):
        raise ThermoKDError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    accelerator = accelerator or make_accelerator(cfg.train.mixed_precision)
    exp = experiment or Experiment(cfg, cache_dir)
    loss_fn = method_loss(cfg)
    distils = loss_fn.kd_weight > 0
    identity = run_identity(cfg, teacher_key(cfg, exp.data_digest) if distils else None, exp.data_digest,
                            loss_fn)
    if existing:
        if check_same_run(out_dir, identity, rerun_changed, "reuse" if result_path.is_file() else "resume"):
            existing = False  # cleared: the changed run starts afresh
        elif result_path.is_file():
            return {**read_json(result_path, f"delete {out_dir} to run it again"), "reused": True}
    teacher_model, tinfo = (teacher or exp.teacher(accelerator, cache_dir, progress_bar)) if distils else (None, None)
    if distils and cfg.train.teacher_cache:
        data = exp.cached_data(teacher_model, teacher_dir(cfg, exp.data_digest, cache_dir), accelerator.device,
                               accelerator.is_main_process)
        online = None
    else:
        data, online = exp.fresh_data(cfg.train.seed), teacher_model
    torch.manual_seed(cfg.train.seed)  # the student's initialisation
    student = exp.build_model(cfg.student.model, cfg.student.model_args)
    t = cfg.train
    loop = LoopConfig(epochs=t.epochs, batch_size=t.batch_size, seed=t.seed, optimizer=t.optimizer,
                      schedule=t.schedule, grad_accum=t.grad_accum, checkpoint_every=t.checkpoint_every,
                      log_every=t.log_every, eval_batch_size=t.eval_batch_size,
                      progress_bar=progress_bar and t.progress_bar,
                      description=f"{cfg.method.name} seed {t.seed}")
    if accelerator.is_main_process and not existing:
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)  # a log left by a run killed before its first checkpoint
        write_json(out_dir / "config.json", cfg.to_dict())
    started = time.time()
    trainer = Trainer(student, loss_fn, data, loop, accelerator, out_dir=out_dir, teacher=online, run_key=identity,
                      on_epoch=on_epoch)
    summary = trainer.fit(resume=existing)
    student = trainer.inner.student
    result: dict[str, Any] = {"method": cfg.method.name, "seed": t.seed, "data": cfg.data.name,
                              "student": {"model": cfg.student.model}, **summary,
                              "final": {k: summary["history"][-1][k] for k in FINAL_KEYS
                                        if summary["history"] and k in summary["history"][-1]},
                              "teacher": None, "teacher_entropy": None, "wall_time": time.time() - started,
                              "identity": identity}
    if distils:
        result["teacher"] = {k: v for k, v in tinfo.items() if k != "test_logits"}
        student_logits = predict(student, exp.bundle.test.x, accelerator.device, t.eval_batch_size)
        final = Progress(step=max(summary["steps"] - 1, 0), total_steps=max(summary["steps"], 1),
                         epoch=t.epochs - 1, total_epochs=t.epochs)
        report = soft_label_report(trainer.inner.loss_fn.temperature, tinfo["test_logits"], student_logits,
                                   exp.bundle.test.y, progress=final)
        result["teacher_entropy"] = {"mean": report.normalised_entropy["mean"],
                                     "std": report.normalised_entropy["std"], "nats_std": report.entropy["std"],
                                     "histogram_edges": report.histogram_edges,
                                     "histogram_counts": report.histogram_counts}
    if accelerator.is_main_process:
        save_weights(student, out_dir / "student.safetensors")
        write_json(result_path, result)
    accelerator.free_memory()
    return result
