"""The training loop, shared by teachers (cross-entropy) and students (any method), on HF Accelerate.

One path for the data: batch → teacher logits (cached or online) → student logits → DistillationLoss → backward /
step → ``loss.observe`` → metrics. The loop never looks at which strategy it runs. Data order and augmentation
are pure functions of (seed, epoch), the learning rate of the fractional epoch, so a checkpoint holds only the
position, the model/optimiser/strategy state and the RNG state, and a resumed run is bit-identical on CPU.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import OptimizerConfig, ScheduleConfig
from ..errors import ThermoKDError
from ..loss import DistillationLoss, LossOutput
from ..progress import Progress
from ..steps import StatWindow, loss_parameter_group
from .checkpoint import load_latest, save_checkpoint
from .divergence import check_finite_loss, collapse, warn_collapse
from .metrics import MetricLogger
from .schedule import learning_rate
from .selection import epoch_summary


@dataclass
class LoopConfig:
    """What the loop needs to know; built from the ``train`` (or ``teacher``) section of a config."""

    epochs: int
    batch_size: int
    seed: int
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    grad_accum: int = 1
    checkpoint_every: int = 0
    log_every: int = 10
    eval_batch_size: int = 512
    progress_bar: bool = True
    description: str = "train"


@dataclass
class EpochData:
    """In-memory data. ``inputs_for_epoch(e)`` gives the (possibly augmented) training inputs of epoch ``e``;
    ``teacher_logits_for_epoch(e)`` the cached teacher logits for exactly those inputs, or None (then the
    teacher, if any, runs online). ``val_x``/``val_y``: the validation split that picks the best epoch (without
    one, the best epoch is the last: the test split never chooses anything)."""

    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    inputs_for_epoch: Callable[[int], Tensor]
    teacher_logits_for_epoch: Callable[[int], "Tensor | None"] = lambda epoch: None
    val_x: "Tensor | None" = None
    val_y: "Tensor | None" = None

    @property
    def num_train(self) -> int:
        return self.train_y.shape[0]


class DistillModule(nn.Module):
    """Student and loss in one module, so DDP synchronises the gradients of both (CTKD's θ lives in the loss)."""

    def __init__(self, student: nn.Module, loss_fn: DistillationLoss) -> None:
        super().__init__()
        self.student, self.loss_fn = student, loss_fn

    def forward(self, x: Tensor, teacher_logits: "Tensor | None", labels: Tensor,
                progress: Progress) -> tuple[Tensor, LossOutput]:
        logits = self.student(x)
        out = self.loss_fn(logits, teacher_logits, labels, progress=progress)
        return out.loss, out


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def epoch_permutation(num: int, seed: int, epoch: int) -> Tensor:
    """The training order of an epoch: the same for every method run with this seed."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: torch.device, batch_size: int = 512) -> Tensor:
    """Logits of ``model`` (in eval mode) for ``x``, on the CPU."""
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)


@dataclass
class _Position:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_acc: float = -1.0  # the validation accuracy of the best epoch
    best_epoch: int = -1
    collapse: "dict[str, Any] | None" = None
    history: list[dict[str, Any]] = field(default_factory=list)
    tau_trace: list[list[float]] = field(default_factory=list)
    epoch_stats: dict[str, Any] = field(default_factory=dict)  # StatWindow.state() of the epoch so far
    epoch_steps: int = 0
    epoch_train_time: float = 0.0
    metrics_offset: int = 0


class Trainer:
    """Trains ``student`` with ``loss_fn`` (and ``teacher``, when the loss distils) on ``data``.

    ``out_dir`` receives ``metrics.jsonl`` and ``checkpoints/``; ``fit(resume=True)`` continues from the latest
    checkpoint there. ``on_epoch(record)`` is called after each epoch's evaluation (e.g. to report validation
    accuracy to a tuner, which may stop the run by raising)."""

    def __init__(self, student: nn.Module, loss_fn: DistillationLoss, data: EpochData, loop: LoopConfig,
                 accelerator, out_dir: "Path | None" = None, teacher: "nn.Module | None" = None,
                 keep_checkpoints: int = 1, run_key: "dict[str, Any] | None" = None,
                 on_epoch: "Callable[[dict[str, Any]], None] | None" = None) -> None:
        self.acc, self.loop, self.data, self.out_dir = accelerator, loop, data, out_dir
        self.run_key = run_key  # what the run is made of, recorded in every checkpoint so a resume can check it
        self.on_epoch = on_epoch
        self.teacher = teacher
        self.distils = loss_fn.kd_weight > 0
        if self.distils and teacher is None and data.teacher_logits_for_epoch(0) is None:
            raise ThermoKDError("this method distils, but there is neither a teacher nor cached teacher logits")
        world = accelerator.num_processes
        per_step = loop.grad_accum * world
        if loop.batch_size % per_step:
            raise ThermoKDError(f"batch_size={loop.batch_size} must be divisible by grad_accum x processes "
                                f"= {loop.grad_accum} x {world}")
        self.micro = loop.batch_size // per_step
        self.steps_per_epoch = data.num_train // loop.batch_size
        if self.steps_per_epoch == 0:
            raise ThermoKDError(f"batch_size={loop.batch_size} is larger than the training set "
                                f"({data.num_train} samples)")
        self.total_steps = self.steps_per_epoch * loop.epochs
        self.keep = keep_checkpoints
        module = DistillModule(student, loss_fn)
        groups = [{"params": list(student.parameters())}]
        learnable = loss_parameter_group(loss_fn, loop.optimizer.weight_decay)  # CTKD's θ
        optimizer = make_optimizer(groups + ([learnable] if learnable else []), loop.optimizer)
        self.module, self.optimizer = accelerator.prepare(module, optimizer)
        if teacher is not None:
            self.teacher = teacher.to(accelerator.device).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if out_dir is not None and accelerator.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        self.logger = MetricLogger(out_dir / "metrics.jsonl",
                                   enabled=out_dir is not None and accelerator.is_main_process)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def inner(self) -> DistillModule:
        return self.acc.unwrap_model(self.module)

    def _save(self, pos: _Position) -> None:
        if self.out_dir is None:
            return
        if self.acc.is_main_process:
            tensors = {f"model.{k}": v for k, v in self.inner.state_dict().items()}
            tensors["rng.torch"] = torch.get_rng_state()
            self._epoch_window = self._epoch_window.on_host()  # as a resumed run continues: from floats
            pos.epoch_stats = self._epoch_window.state()
            pos.metrics_offset = self.logger.offset()
            save_checkpoint(self.out_dir / "checkpoints", f"step-{pos.global_step:09d}", tensors,
                            self.optimizer.state_dict(), vars(pos), keep=self.keep, meta=self.run_key)
        self.acc.wait_for_everyone()

    def _restore(self) -> "_Position | None":
        ckpt = load_latest(self.out_dir / "checkpoints") if self.out_dir is not None else None
        if ckpt is None:
            return None
        model_state = {k[len("model."):]: v for k, v in ckpt.tensors.items() if k.startswith("model.")}
        try:
            self.inner.load_state_dict(model_state)
            self.optimizer.load_state_dict(ckpt.optimizer)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ThermoKDError(f"checkpoint {ckpt.path} does not match this run's model or method: "
                                f"{' '.join(str(exc).split())[:400]}") from None  # whole, on one line
        torch.set_rng_state(ckpt.tensors["rng.torch"])
        pos = _Position(**ckpt.state)
        self._epoch_window = StatWindow.from_state(pos.epoch_stats)
        if self.acc.is_main_process:
            self.logger.truncate(pos.metrics_offset)
        return pos

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        pos = self._restore() if resume else None
        if pos is None:
            pos, self._epoch_window = _Position(), StatWindow()
        loss_fn = self.inner.loss_fn
        if self.distils and pos.global_step == 0:
            cached = self.data.teacher_logits_for_epoch(0)
            if cached is not None:
                loss_fn.prepare(cached)  # e.g. CIST calibrates ρ on the whole training set, not one batch
        bar = self._progress_bar(pos)
        try:
            while pos.epoch < self.loop.epochs:
                self._run_epoch(pos, loss_fn, bar)
        finally:
            if bar is not None:
                bar.close()
            self.logger.close()
        return self._summary(pos)

    def _progress_bar(self, pos: _Position):
        if not (self.loop.progress_bar and self.acc.is_main_process):
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.total_steps, initial=pos.global_step, desc=self.loop.description,
                    unit="step", leave=False, dynamic_ncols=True)

    def _batch(self, inputs: Tensor, cached: "Tensor | None", index: Tensor) -> tuple[Tensor, "Tensor | None", Tensor]:
        device = self.acc.device
        x = inputs[index].to(device, non_blocking=True)
        y = self.data.train_y[index].to(device, non_blocking=True)
        if not self.distils:
            return x, None, y
        if cached is not None:
            return x, cached[index].to(device, non_blocking=True), y
        with torch.no_grad(), self.acc.autocast():
            return x, self.teacher(x).float(), y

    def _run_epoch(self, pos: _Position, loss_fn: DistillationLoss, bar) -> None:
        loop, e = self.loop, pos.epoch
        inputs = self.data.inputs_for_epoch(e)
        cached = self.data.teacher_logits_for_epoch(e) if self.distils else None
        order = epoch_permutation(self.data.num_train, loop.seed, e)
        rank, chunk = self.acc.process_index, loop.batch_size // loop.grad_accum
        self.module.train()
        start = time.perf_counter()
        for step in range(pos.step_in_epoch, self.steps_per_epoch):
            progress = Progress(step=pos.global_step, total_steps=self.total_steps, epoch=e, total_epochs=loop.epochs)
            lr = learning_rate(loop.schedule, loop.optimizer.lr, e + step / self.steps_per_epoch, loop.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = order[step * loop.batch_size:(step + 1) * loop.batch_size]
            window = StatWindow()
            for a in range(loop.grad_accum):
                local = batch[a * chunk:(a + 1) * chunk][rank * self.micro:(rank + 1) * self.micro]
                x, t, y = self._batch(inputs, cached, local)
                sync = contextlib.nullcontext() if a == loop.grad_accum - 1 else self.acc.no_sync(self.module)
                with sync:
                    loss, out = self.module(x, t, y, progress)
                    self.acc.backward(loss / loop.grad_accum)
                window.add(out.stats, progress)  # on the device: a step reads no value back
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            window = window.reduced(self.acc)
            loss_fn.observe(window)  # once per optimiser step, from the step's statistics
            pos.global_step += 1
            pos.step_in_epoch = step + 1
            pos.epoch_steps += 1
            self._epoch_window.merge(window)
            if pos.global_step % loop.log_every == 0:  # the statistics are read only here
                values = {k: v for k, v in window.means().items() if k != "rows"}
                check_finite_loss(values, f"at step {pos.global_step} (epoch {e})", loop.description)
                if "tau_teacher_mean" in values:
                    pos.tau_trace.append([pos.global_step, values["tau_teacher_mean"], values["tau_student_mean"]])
                self.logger.log({"type": "step", "step": pos.global_step, "epoch": e, "lr": lr, **values})
                if bar is not None:
                    bar.set_postfix(epoch=e, loss=f"{values.get('loss', math.nan):.3f}", refresh=False)
            if bar is not None:
                bar.update(1)
            if (loop.checkpoint_every and pos.global_step % loop.checkpoint_every == 0
                    and pos.step_in_epoch < self.steps_per_epoch):
                pos.epoch_train_time += time.perf_counter() - start
                start = time.perf_counter()
                self._save(pos)
        pos.epoch_train_time += time.perf_counter() - start
        self._end_epoch(pos, lr)

    def _end_epoch(self, pos: _Position, lr: float) -> None:
        test_acc, num_classes = self.evaluate(self.data.test_x, self.data.test_y)
        has_val = self.data.val_x is not None
        val_acc = self.evaluate(self.data.val_x, self.data.val_y)[0] if has_val else None
        means = {k: v for k, v in self._epoch_window.means().items() if k != "rows"}
        check_finite_loss(means, f"in epoch {pos.epoch} (by step {pos.global_step})", self.loop.description)
        record = {"epoch": pos.epoch, "val_acc": val_acc, "test_acc": test_acc, "train_loss": means.get("loss"),
                  "lr": lr, "train_time": pos.epoch_train_time, **{k: v for k, v in means.items() if k != "loss"}}
        pos.history.append(record)
        # the validation split picks the best epoch; without one, the last epoch stands (never the test split)
        score = val_acc if has_val else float(pos.epoch)
        if score > pos.best_acc:
            pos.best_acc, pos.best_epoch = score, pos.epoch
        if has_val and pos.collapse is None:
            pos.collapse = collapse(pos.history, 1.0 / num_classes)
            if pos.collapse is not None and self.acc.is_main_process:
                warn_collapse(self.loop.description, pos.collapse)
        self.logger.log({"type": "epoch", **record})
        pos.epoch += 1
        pos.step_in_epoch, pos.epoch_steps, pos.epoch_train_time = 0, 0, 0.0
        self._epoch_window = StatWindow()
        self._save(pos)
        if self.on_epoch is not None:
            self.on_epoch(record)

    def evaluate(self, x: "Tensor | None" = None, y: "Tensor | None" = None) -> tuple[float, int]:
        """Top-1 accuracy of the student on ``x``/``y`` (default: the test split) and the number of classes it
        predicts; every process evaluates the whole split."""
        x, y = (self.data.test_x, self.data.test_y) if x is None else (x, y)
        logits = predict(self.inner.student, x, self.acc.device, self.loop.eval_batch_size)
        return float((logits.argmax(-1) == y).float().mean()), logits.shape[-1]

    def _summary(self, pos: _Position) -> dict[str, Any]:
        return epoch_summary(pos.history, pos.best_epoch, pos.collapse) | {
            "epochs": self.loop.epochs, "steps": pos.global_step, "tau_trace": pos.tau_trace}

