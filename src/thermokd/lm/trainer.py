"""One LM training run on the Hugging Face Trainer (``integrations.hf.DistillationTrainer``, on Accelerate):
the teacher's cross-entropy training and every student run go through :func:`train_run`.

What the LM path adds to the generic trainer (:class:`LMTrainer`): teacher logits from a file
(:mod:`thermokd.lm.sources`) looked up by window index, on-policy batches (:mod:`thermokd.lm.onpolicy`), and an
evaluation of validation perplexity every ``eval_every`` steps that goes into the Trainer's log history (so it is
checkpointed and survives ``--resume``). Resume, DDP (``torchrun``/``accelerate launch``), bf16, exact gradient
accumulation and the strategy state in checkpoints are the Trainer's and ``DistillationTrainer``'s.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import ThermoKDError
from ..files import path_digest, read_json, write_json
from ..integrations.hf import TEACHER_LOGITS_KEY, DistillationTrainer, save_loss_state
from ..loss import DistillationLoss
from .batches import Windows
from .config import LMTrainConfig
from .data import INDEX_KEY, WindowDataset
from .evaluate import evaluate
from .onpolicy import OnPolicy, on_policy_batch

@dataclass
class RunSettings(LMTrainConfig):
    """Optimisation of one run: the fields of the ``train`` section (AdamW (β 0.9, 0.95), linear warm-up over
    ``warmup`` of the steps, cosine decay to 10 % of ``lr``; ``batch_size`` is global: processes × per-device batch
    × ``grad_accum``) with its choices made (``mixed_precision``, ``device``), plus the seed."""

    mixed_precision: str = "no"   # "no" or "bf16"
    device: str = "cpu"
    seed: int = 0
    progress_bar: bool = False

    def arguments(self, output_dir: Path, world_size: int) -> TrainingArguments:
        per_device, left = divmod(self.batch_size, world_size * self.grad_accum)
        if left or per_device < 1:
            raise ThermoKDError(f"batch_size {self.batch_size} must be a multiple of processes × grad_accum = "
                                f"{world_size} × {self.grad_accum}")
        return TrainingArguments(
            output_dir=str(output_dir), max_steps=self.steps, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=self.grad_accum, learning_rate=self.lr, weight_decay=self.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=self.grad_clip,
            warmup_steps=max(1, round(self.warmup * self.steps)) if self.warmup else 0,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            save_strategy="steps", save_steps=self.save_every, save_total_limit=2, logging_steps=self.eval_every,
            seed=self.seed, data_seed=self.seed, report_to=[], disable_tqdm=not self.progress_bar,
            use_cpu=self.device == "cpu", bf16=self.mixed_precision == "bf16", remove_unused_columns=False,
            dataloader_drop_last=True, eval_strategy="no", save_only_model=False)


def check_device(device: str, what: str = "device") -> None:
    """Raise a one-line error unless a tensor can be made on ``device`` here (``what`` names the setting)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ThermoKDError(f"{what}: device {device!r} is not usable here: {str(exc).splitlines()[0]}") from None


class LMTrainer(DistillationTrainer):
    """``DistillationTrainer`` for causal LMs on windows: ``teacher_source`` (an object with
    ``logits(index, device)``, e.g. :class:`~thermokd.lm.sources.TopKFile`) replaces the teacher's forward pass;
    ``on_policy`` replaces a fraction λ of the micro-batches by the student's own continuations."""

    def __init__(self, *args: Any, teacher_source: Any = None, on_policy: "OnPolicy | None" = None,
                 **kwargs: Any) -> None:
        self.teacher_source, self.on_policy = teacher_source, on_policy
        super().__init__(*args, task="causal-lm", **kwargs)

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in super()._model_inputs(batch).items() if k != INDEX_KEY}

    def teacher_logits(self, batch: dict[str, Any], model_inputs: dict[str, Any]) -> "Tensor | None":
        if self.teacher_source is not None and TEACHER_LOGITS_KEY not in batch:
            return self.teacher_source.logits(batch[INDEX_KEY], batch["input_ids"].device)
        return super().teacher_logits(batch, model_inputs)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        if self.on_policy is None or self.on_policy.fraction == 0.0:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step
        batches = (self._maybe_on_policy(batch, step, micro) for micro, batch in enumerate(epoch_iterator))
        return super().get_batch_samples(batches, num_batches, device)

    def _maybe_on_policy(self, batch: dict[str, Any], step: int, micro: int) -> dict[str, Any]:
        """The micro-batch itself, or with probability λ the student's continuations of its prompts."""
        policy = self.on_policy
        generator = policy.generator(step, micro, self.args.process_index, batch["input_ids"].device)
        if not policy.chooses(generator):
            return batch
        student = self.accelerator.unwrap_model(self.model)
        return on_policy_batch(student, batch, policy, generator)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every process has written its files (its own RNG state) by now
        if self.args.should_save:  # after every file of the checkpoint: its manifest marks it complete
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if folder.is_dir():
                write_manifest(folder)


class _Evaluate(TrainerCallback):
    """Validation perplexity and accuracy every ``every`` steps and at the end, into the log history."""

    def __init__(self, val: Windows, every: int, on_eval: "Callable[[dict[str, Any]], None] | None") -> None:
        self.val, self.every, self.on_eval = val, every, on_eval
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        started = time.perf_counter()
        metrics = evaluate(model, self.val, args.device)
        self.seconds += time.perf_counter() - started
        record = {"step": state.global_step, "val_ppl": metrics["ppl"], "val_acc": metrics["acc"],
                  "val_ce": metrics["ce"]}
        state.log_history.append(record)
        if self.on_eval is not None and state.is_world_process_zero:
            self.on_eval(record)


def history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per evaluation: its validation metrics and the training log line of the same step (loss terms,
    τ and entropy statistics, learning rate)."""
    logs = {e["step"]: e for e in log_history if "loss" in e and "step" in e}
    out = []
    for e in log_history:
        if "val_ppl" in e:
            extra = {k: v for k, v in logs.get(e["step"], {}).items() if k not in ("step", "epoch")}
            out.append({**extra, **e})
    return out


MANIFEST_NAME = "thermokd_manifest.json"  # written last into a checkpoint: the digest of every file in it


def write_manifest(checkpoint: Path) -> Path:
    """Record the content digest of every file of a finished checkpoint (model, optimizer, scheduler, RNG, trainer
    and loss state) in ``thermokd_manifest.json``, written last: its presence marks the checkpoint complete."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return write_json(checkpoint / MANIFEST_NAME,
                      {"files": {str(f.relative_to(checkpoint)): path_digest(f) for f in files}})


def checkpoint_damage(checkpoint: Path) -> "str | None":
    """Why a checkpoint with a manifest cannot be resumed from (a file missing, or not matching its digest), or
    None when every file is as it was written."""
    try:
        files = read_json(checkpoint / MANIFEST_NAME)["files"]
    except (ThermoKDError, KeyError, TypeError, IndexError):
        files = None
    if not isinstance(files, dict) or TRAINER_STATE_NAME not in files:
        return f"{MANIFEST_NAME} is damaged"
    for name, expected in files.items():
        path = checkpoint / str(name)
        if not path.is_file() or not path.resolve().is_relative_to(checkpoint.resolve()):
            return f"{name} is missing"
        try:
            if path_digest(path) != expected:
                return f"{name} does not match its checksum"
        except ThermoKDError:
            return f"{name} cannot be read"
    return None


def last_complete_checkpoint(folder: Path, echo: "Callable[[str], None] | None" = None) -> "str | None":
    """The newest ``checkpoint-N`` that is complete and undamaged. One without a manifest (the last file written) is
    the remains of a process killed while writing it and is passed over; one whose files do not match their
    digests is passed over with a message saying so, and when no good checkpoint is left the run stops with a
    one-line error rather than starting over."""
    if not folder.is_dir():
        return None
    steps = {}
    for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        try:
            steps[p] = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
    damaged: list[str] = []
    for checkpoint in sorted(steps, key=steps.get, reverse=True):
        if not (checkpoint / MANIFEST_NAME).is_file():
            continue  # never finished: the process was killed while writing it
        why = checkpoint_damage(checkpoint)
        if why is None:
            if damaged and echo is not None:
                echo(f"  resuming from {checkpoint.name} (the newer {'; '.join(damaged)})")
            return str(checkpoint)
        damaged.append(f"{checkpoint.name} is damaged: {why}")
    if damaged:
        raise ThermoKDError(f"no undamaged checkpoint to resume in {folder} ({'; '.join(damaged)}); delete {folder} "
                            "to start this run over")
    return None


def train_run(model: nn.Module, loss_fn: DistillationLoss, train: Windows, val: Windows, settings: RunSettings,
              output_dir: Path, *, teacher: "nn.Module | None" = None, teacher_source: Any = None,
              on_policy: "OnPolicy | None" = None, resume: bool = False,
              calibrate: bool = True, on_eval: "Callable[[dict[str, Any]], None] | None" = None,
              echo: "Callable[[str], None] | None" = None) -> dict[str, Any]:
    """Train ``model`` with ``loss_fn`` for ``settings.steps`` optimiser steps in ``output_dir`` (checkpoints every
    ``save_every`` steps). ``resume``: continue from the latest undamaged checkpoint there, if any (``echo`` says
    when a damaged newer one is passed over). Returns the final
    validation metrics, the evaluation ``history``, the last interval's statistics (``final``) and ``seconds``."""
    output_dir = Path(output_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoint = last_complete_checkpoint(output_dir, echo) if resume else None
    if checkpoint is None and output_dir.is_dir() and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(output_dir)  # a fresh run never mixes with an older (or half-written) one's checkpoints
    evaluation = _Evaluate(val, settings.eval_every, on_eval)
    trainer = LMTrainer(model=model, args=settings.arguments(output_dir, world), teacher_model=teacher,
                        distillation_loss=loss_fn, train_dataset=WindowDataset(train), teacher_source=teacher_source,
                        on_policy=on_policy, callbacks=[evaluation])
    if not settings.progress_bar:  # quiet: no per-log dict lines, no shard-writing bars
        from transformers import PrinterCallback
        from transformers.utils import logging as hf_logging

        trainer.remove_callback(PrinterCallback)
        hf_logging.disable_progress_bar()
    if calibrate and loss_fn.kd_weight and checkpoint is None:
        trainer.prepare_loss(max_batches=max(1, 64 // trainer.args.per_device_train_batch_size))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started - evaluation.seconds
    if trainer.is_world_process_zero():
        save_loss_state(loss_fn, str(output_dir))  # the final strategy state (DTS's T, CIST's ρ, CTKD's θ)
    records = history(trainer.state.log_history)
    last = records[-1]
    final = {k: v for k, v in last.items() if k not in ("step", "val_ppl", "val_acc", "val_ce", "learning_rate",
                                                       "grad_norm")}
    return {"val_ppl": last["val_ppl"], "val_acc": last["val_acc"], "val_ce": last["val_ce"],
            "best_val_ppl": min(r["val_ppl"] for r in records), "steps": settings.steps, "history": records,
            "final": final, "seconds": seconds, "resumed_from": checkpoint, "trainer": trainer}
