"""Token-level distillation of causal LMs: one short training loop for teacher (CE) and students (any method).

One path for the data, as everywhere in thermokd: windows → teacher logits (precomputed once, or online) →
student logits → causal shift → ``DistillationLoss(student [B, L-1, V], teacher [B, L-1, V], labels [B, L-1],
progress=...)`` (labels ``-100`` on padding and prompt tokens count nowhere) → backward / step →
``loss.observe(output)``. The loop never looks at which strategy it runs. Evaluation reports the student's own
next-token cross-entropy at τ = 1 (perplexity) and accuracy, never the distillation loss.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from ..loss import DistillationLoss
from ..progress import Progress
from .batches import IGNORE, Windows, epoch_order, next_token
from .models import lm_logits

# statistics kept per evaluation interval (means over its steps; *_min/*_max are the extremes)
TRACKED = ("loss", "ce", "kd", "tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "tau_student_mean",
           "teacher_entropy_mean", "teacher_entropy_std", "weight_std")


@dataclass
class TrainSettings:
    """Optimisation of one run: AdamW, linear warm-up then cosine decay to 10 % of ``lr``."""

    steps: int
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05  # fraction of the steps
    grad_clip: float = 1.0
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ThermoKDError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ThermoKDError(f"lr must be > 0, got {self.lr!r}")

    def learning_rate(self, step: int) -> float:
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            return self.lr * (step + 1) / warm
        done = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done)))


class TeacherLogits:
    """The teacher's logits ``[b, L, V]`` for training windows by index: computed once for the whole set when it
    fits in ``max_bytes`` (so a KD step costs about a CE step), else run online batch by batch."""

    def __init__(self, teacher: nn.Module, windows: Windows, device: "torch.device | str", batch_size: int = 32,
                 max_bytes: int = 2 << 30) -> None:
        self.teacher, self.windows, self.device = teacher.to(device).eval(), windows, torch.device(device)
        self.batch_size = batch_size
        self.table: "Tensor | None" = None
        vocab = int(self._online(torch.arange(1)).shape[-1])
        if len(windows) * windows.input_ids.shape[1] * vocab * 4 <= max_bytes:
            self.table = torch.cat([self._online(torch.arange(i, min(i + batch_size, len(windows))))
                                    for i in range(0, len(windows), batch_size)])

    @torch.no_grad()
    def _online(self, index: Tensor) -> Tensor:
        batch = self.windows.select(index).to(self.device)
        return lm_logits(self.teacher, batch.input_ids, batch.attention_mask).float()

    @property
    def precomputed(self) -> bool:
        return self.table is not None

    def __call__(self, index: Tensor) -> Tensor:
        return self.table[index.to(self.table.device)] if self.table is not None else self._online(index)

    def calibration_rows(self, max_windows: int = 64) -> Tensor:
        """Teacher logits ``[N, V]`` at the scored positions of up to ``max_windows`` evenly spaced windows: what
        :meth:`DistillationLoss.prepare` sees (CIST calibrates ρ on them rather than on the first batch)."""
        index = torch.linspace(0, len(self.windows) - 1, min(max_windows, len(self.windows))).round().long()
        logits, labels = next_token(self(index), self.windows.labels[index].to(self.device))
        return logits[labels != IGNORE]


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows, device: "torch.device | str", batch_size: int = 32
             ) -> dict[str, float]:
    """The model's next-token cross-entropy (nats), perplexity ``exp(CE)`` and accuracy (argmax = next token)
    over every scored position of ``windows``; ``tokens`` is their count."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows.select(torch.arange(start, min(start + batch_size, len(windows)))).to(device)
        logits, labels = next_token(lm_logits(model, batch.input_ids, batch.attention_mask), batch.labels)
        keep = labels != IGNORE
        logits, labels = logits[keep].float(), labels[keep]
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    model.train(was_training)
    if count == 0:
        raise ThermoKDError("the evaluation windows hold no scored token")
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "acc": correct / count, "tokens": float(count)}


def _interval_stats(records: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in TRACKED:
        values = [r[key] for r in records if key in r]
        if values:
            out[key] = min(values) if key.endswith("_min") else max(values) if key.endswith("_max") \
                else sum(values) / len(values)
    return out


def train_lm(model: nn.Module, loss_fn: DistillationLoss, train: Windows, val: Windows, settings: TrainSettings,
             device: "torch.device | str" = "cpu", teacher: "TeacherLogits | None" = None,
             on_eval: "Callable[[dict[str, Any]], None] | None" = None) -> dict[str, Any]:
    """Train ``model`` on ``train`` with ``loss_fn`` for ``settings.steps`` optimiser steps; evaluate on ``val``
    every ``settings.eval_every`` steps and at the end.

    The window order is a pure function of ``settings.seed`` (the same for every method), and so is dropout.
    Returns the final validation ``ppl``/``acc``, ``best_ppl``, ``history`` (one record per evaluation: step,
    validation metrics, the interval's mean loss terms and temperature statistics), ``final`` (those statistics
    over the last interval) and ``seconds`` (training only, evaluations excluded)."""
    if loss_fn.kd_weight and teacher is None:
        raise ThermoKDError("this loss distils (kd_weight > 0) but no teacher logits were given")
    device = torch.device(device)
    model.to(device).train()
    loss_fn.to(device)
    # a learnable temperature (CTKD) trains with the student's optimiser, without weight decay
    groups = [{"params": list(model.parameters()), "weight_decay": settings.weight_decay}]
    if list(loss_fn.parameters()):
        groups.append({"params": list(loss_fn.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))
    per_epoch = max(1, len(train) // settings.batch_size)  # the last partial batch of an epoch is dropped
    total_epochs = math.ceil(settings.steps / per_epoch)
    torch.manual_seed(settings.seed)
    history: list[dict[str, Any]] = []
    interval: list[dict[str, float]] = []
    seconds, started = 0.0, time.perf_counter()
    order = torch.empty(0, dtype=torch.long)
    for step in range(settings.steps):
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            order = epoch_order(len(train), settings.seed, epoch)
        index = order[position * settings.batch_size:(position + 1) * settings.batch_size]
        batch = train.select(index).to(device)
        student, labels = next_token(lm_logits(model, batch.input_ids, batch.attention_mask), batch.labels)
        teacher_logits = next_token(teacher(index), batch.labels)[0] if loss_fn.kd_weight else None
        out = loss_fn(student, teacher_logits, labels,
                      progress=Progress(step=step, total_steps=settings.steps, epoch=epoch, total_epochs=total_epochs))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate(step)
        optimizer.step()
        loss_fn.observe(out)
        interval.append(out.stats)
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            seconds += time.perf_counter() - started
            metrics = evaluate(model, val, device)
            record = {"step": step + 1, "epoch": epoch, "val_ppl": metrics["ppl"], "val_acc": metrics["acc"],
                      "val_ce": metrics["ce"], **_interval_stats(interval)}
            history.append(record)
            interval = []
            if on_eval is not None:
                on_eval(record)
            started = time.perf_counter()
    model.eval()
    last = history[-1]
    final = {k: v for k, v in last.items() if k in TRACKED}
    return {"ppl": last["val_ppl"], "acc": last["val_acc"], "ce": last["val_ce"],
            "best_ppl": min(h["val_ppl"] for h in history), "steps": settings.steps, "epochs": total_epochs,
            "history": history, "final": final, "seconds": seconds}
