"""``DistillationTrainer``: the Hugging Face ``transformers.Trainer`` with any thermokd ``DistillationLoss``.

    import thermokd as tk
    from transformers import TrainingArguments
    from thermokd.integrations.hf import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher_model=teacher, distillation_loss=tk.build_loss("cist"),
                                  args=TrainingArguments(output_dir="out", gradient_accumulation_steps=4),
                                  train_dataset=train, data_collator=collator)
    trainer.train()                       # later: trainer.train(resume_from_checkpoint=True)

How it fits the Trainer (docs/hf.md says the same for users):

- **Task**: ``task="causal-lm" | "sequence-classification" | "token-classification"``, or ``"auto"`` (default):
  read from the student's class (transformers' ``AutoModelFor...`` tables, then the class-name suffix).
- **Rows**: a sequence (classification) or a token counts when its label is not the loss's ``ignore_index``
  (-100) and, for token tasks, its ``attention_mask`` entry is 1; without labels the attention mask alone decides.
  A causal LM scores token t+1 at position t: labels and mask are shifted left by one and padded with
  ``ignore_index``/0, so the last position counts nowhere and the ``[B, L, V]`` logits are never sliced or copied.
- **Forward passes**: the student runs without ``labels`` (no Hugging Face loss is computed). The teacher is
  frozen (``requires_grad=False``, eval mode), moved to the training device (unless it has an ``hf_device_map``)
  and runs under ``no_grad``; ``teacher_logits_fn(teacher, inputs)`` replaces its forward pass, and a
  ``teacher_logits`` entry in the batch (precomputed logits shaped like the student's) replaces both.
  The loss's τ is the distillation temperature; a generation/sampling temperature is never read.
- **Progress**: ``Progress(step=state.global_step, total_steps=state.max_steps, epoch=int(state.epoch),
  total_epochs=state.num_train_epochs)`` for every micro-batch (DTS, CTKD, schedules, DKD warm-up).
- **Gradient accumulation**: ``get_batch_samples`` counts the valid rows N of the whole accumulation window (over
  all processes when ``average_tokens_across_devices``); each micro-batch returns ``mean × n_micro / N`` and
  ``loss_is_scaled_for_ga = True`` stops the Trainer dividing again, so the accumulated gradient is that of the
  mean over the window, as one big batch gives, with uneven padding too. Not exact where a strategy normalises
  over the batch it sees: per-sample weights (CIST's ``ConfidenceDifficulty``, ``TeacherEntropy``) have mean 1
  per micro-batch, and CIST's ``ratio="auto"`` calibrates on the first micro-batch (``prepare_loss`` avoids it).
- **observe**: once per optimiser step (callback ``on_step_end``), with the row-weighted means of the window's
  statistics gathered over processes, so DTS sees the whole batch and every rank moves the same τ.
- **Learnable strategies** (CTKD's θ): their parameters join the Trainer's optimiser as one extra parameter group
  (same learning rate, schedule and weight decay as the student); under DDP their gradients are averaged by hand,
  as DDP wraps only the student. Gradient clipping (``max_grad_norm``) covers the student only.
- **Checkpoints**: ``thermokd_loss.safetensors`` (the loss's ``state_dict``: DTS's T, CIST's ρ, CTKD's θ) goes
  into every ``checkpoint-N`` folder before the Trainer's own files; ``train(resume_from_checkpoint=...)`` loads
  it back (the optimiser state of θ comes back with the Trainer's optimiser file).
- **Logging**: the row-weighted means of ``LossOutput.stats`` over the logging window (``*_min``/``*_max``: the
  extremes) join each training log line (console, TensorBoard, W&B, ``state.log_history``) under their own names
  (``tau_teacher_mean``, ``teacher_entropy_mean``, ``weight_std``, ``ce``, ``kd``, ...); the Trainer's ``loss``
  stays the Trainer's.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.models.auto import modeling_auto
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..errors import ThermoKDError, choice_error
from ..loss import DistillationLoss, LossOutput
from ..methods import build_loss, method_names
from ..progress import Progress
from ..steps import StatWindow, loss_parameter_group
from ..temperature.base import TemperatureStrategy

TASKS = ("auto", "causal-lm", "sequence-classification", "token-classification")
LOSS_STATE_NAME = "thermokd_loss.safetensors"
TEACHER_LOGITS_KEY = "teacher_logits"
_NOT_MODEL_INPUTS = ("labels", TEACHER_LOGITS_KEY)
_TASK_TABLES = (("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                ("sequence-classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                ("token-classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"))
_TASK_SUFFIXES = (("causal-lm", ("ForCausalLM", "LMHeadModel")),
                  ("sequence-classification", ("ForSequenceClassification",)),
                  ("token-classification", ("ForTokenClassification",)))


# -- helpers -------------------------------------------------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper: its class names the task and owns the head."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def detect_task(model: nn.Module) -> str:
    """``causal-lm``, ``sequence-classification`` or ``token-classification`` from the model's class."""
    name = type(_base_model(model)).__name__
    for task, table in _TASK_TABLES:
        for entry in getattr(modeling_auto, table, {}).values():
            if name == entry or (isinstance(entry, (tuple, list)) and name in entry):
                return task
    for task, suffixes in _TASK_SUFFIXES:
        if name.endswith(suffixes):
            return task
    raise ThermoKDError(f"cannot tell the task of a {name} student; pass task= one of: {', '.join(TASKS[1:])}")


def _output_size(model: nn.Module, task: str) -> "int | None":
    """Vocabulary size (causal LM head) or class count (``config.num_labels``); None when it cannot be read."""
    model = _base_model(model)
    if task == "causal-lm":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        return None if weight is None else int(weight.shape[0])
    return getattr(getattr(model, "config", None), "num_labels", None)


def _logits(outputs: Any) -> Tensor:
    """The logits of a model output: ``.logits``, the first entry of a tuple, or the tensor itself."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
    if logits is None and isinstance(outputs, (tuple, list)) and outputs:
        logits = outputs[0]
    if not isinstance(logits, Tensor):
        raise ThermoKDError(f"cannot find logits in a model output of type {type(outputs).__name__}: return a "
                            "tensor, a tuple starting with the logits, or an output with a .logits field")
    return logits


def _shift_left(x: Tensor, fill: int) -> Tensor:
    """``x[:, 1:]`` padded back to length L with ``fill``: position t is scored against token t+1."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def _check_same_shape(student: Tensor, teacher: "Tensor | None", task: str) -> None:
    if teacher is None or teacher.shape == student.shape:
        return
    what = "vocabulary size" if task == "causal-lm" else "class count"
    raise ThermoKDError(f"teacher logits {tuple(teacher.shape)} and student logits {tuple(student.shape)} must have "
                        f"the same shape: the teacher's {what} is {teacher.shape[-1]}, the student's "
                        f"{student.shape[-1]}; map the teacher's logits with teacher_logits_fn if they differ")


def _as_loss(loss: "DistillationLoss | str | None") -> DistillationLoss:
    if isinstance(loss, DistillationLoss):
        return loss
    if isinstance(loss, str):
        return build_loss(loss)
    raise ThermoKDError(f"distillation_loss must be a thermokd.DistillationLoss or a method name "
                        f"({', '.join(method_names())}), got {loss!r}")


def save_loss_state(loss: DistillationLoss, folder: str) -> str:
    """Write the loss's ``state_dict`` to ``folder/thermokd_loss.safetensors`` atomically; returns the path."""
    from ..files import save_tensors

    path = os.path.join(folder, LOSS_STATE_NAME)
    save_tensors(path, loss.state_dict(), {"format": "pt", "library": "thermokd"})  # atomic, with its checksum
    return path


def load_loss_state(loss: DistillationLoss, folder: str) -> None:
    """Restore the loss's state from a checkpoint folder written by :func:`save_loss_state` (no code is executed)."""
    from ..files import load_tensors

    path = os.path.join(folder, LOSS_STATE_NAME)
    expected = loss.state_dict()
    if not os.path.isfile(path):
        if expected:
            raise ThermoKDError(f"checkpoint {folder} has no {LOSS_STATE_NAME}, so the strategy state "
                                f"({', '.join(expected)}) cannot be restored; resume from a checkpoint written by "
                                "DistillationTrainer")
        return
    state, _ = load_tensors(path, remedy=f"resume from an earlier checkpoint than {folder}")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ThermoKDError(f"{path} does not match this loss (missing {missing}, unexpected {unexpected}): resume "
                            "with the same temperature strategy and weighting")
    try:
        loss.load_state_dict(state)
    except RuntimeError as exc:  # e.g. an InstanceCTKD built for another class count
        raise ThermoKDError(f"cannot restore {path}: {exc}") from None


class _OptimizerStepHooks(TrainerCallback):
    """Connects the trainer to the moments around each optimiser step (micro-batches never reach these)."""

    def __init__(self, trainer: "DistillationTrainer") -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._average_loss_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._finish_optimizer_step()


# -- the trainer ---------------------------------------------------------------------------------------------------
class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) with a thermokd ``DistillationLoss``.

    - ``teacher_model``: the teacher (frozen, eval mode, moved to the training device, run under ``no_grad``);
      may be None when every batch carries ``teacher_logits`` or ``teacher_logits_fn`` needs no model.
    - ``distillation_loss``: a :class:`thermokd.DistillationLoss` or a method name (``"kd"``, ``"cist"``, ...).
    - ``task``: ``"auto"`` (from the student's class), ``"causal-lm"``, ``"sequence-classification"`` or
      ``"token-classification"``.
    - ``teacher_logits_fn(teacher, inputs) -> logits``: replaces the teacher's forward pass (``inputs``: the batch
      without ``labels``); its logits must be shaped like the student's.
    - ``fused_head``: causal LMs, one process: compute the loss from both models' last hidden states and output
      heads (``DistillationLoss.forward_hidden``) instead of their ``[B, L, V]`` logits; the same loss and
      gradients with a fraction of the memory at large vocabularies.
    - every other keyword (``train_dataset``, ``data_collator``, ``callbacks``, ...) goes to ``Trainer``.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the accumulation window's row count itself

    def __init__(self, model: "nn.Module | None" = None, args: "transformers.TrainingArguments | None" = None, *,
                 teacher_model: "nn.Module | None" = None, distillation_loss: "DistillationLoss | str | None" = None,
                 task: str = "auto", teacher_logits_fn: "Callable[[nn.Module | None, dict], Tensor] | None" = None,
                 fused_head: bool = False, **trainer_kwargs: Any) -> None:
        if "loss_is_scaled_for_ga" not in vars(Trainer):
            raise ThermoKDError(f"DistillationTrainer needs a transformers Trainer with loss_is_scaled_for_ga "
                                f"(transformers 5); found transformers {transformers.__version__}")
        if task not in TASKS:
            raise choice_error("task", task, TASKS)
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ThermoKDError("compute_loss_func cannot be combined with DistillationTrainer: the distillation "
                                "loss is the training loss")
        if teacher_model is not None and not isinstance(teacher_model, nn.Module):
            raise ThermoKDError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        self.distillation_loss = _as_loss(distillation_loss)
        super().__init__(model=model, args=args, **trainer_kwargs)
        if self.args.label_smoothing_factor:
            raise ThermoKDError(f"label_smoothing_factor={self.args.label_smoothing_factor} is not supported: the "
                                "teacher's soft labels replace label smoothing; set it to 0")
        self.task = detect_task(self.model) if task == "auto" else task
        self.teacher_model = self._freeze(teacher_model)
        self.teacher_logits_fn = teacher_logits_fn
        self.fused_head = bool(fused_head)
        if self.fused_head and (self.task != "causal-lm" or teacher_logits_fn is not None or self.args.world_size > 1):
            raise ThermoKDError("fused_head=True needs task='causal-lm', a teacher_model (no teacher_logits_fn) and "
                                "one process: it runs both models' base and output head itself")
        self.distillation_loss.to(self.args.device)
        self._check_output_sizes()
        self._check_given_optimizer()
        self._step_window, self._log_window = StatWindow(), StatWindow()
        self._host_floats_shared = False
        self.add_callback(_OptimizerStepHooks(self))

    # -- set-up checks ---------------------------------------------------------------------------------------------
    def _freeze(self, teacher: "nn.Module | None") -> "nn.Module | None":
        if teacher is None:
            return None
        teacher.eval()
        teacher.requires_grad_(False)
        if getattr(teacher, "hf_device_map", None) is None:  # a dispatched (device_map) teacher stays where it is
            teacher.to(self.args.device)
        return teacher

    def _check_output_sizes(self) -> None:
        if self.teacher_model is None or self.teacher_logits_fn is not None:
            return
        student, teacher = _output_size(self.model, self.task), _output_size(self.teacher_model, self.task)
        if student is not None and teacher is not None and student != teacher:
            what = "vocabulary size" if self.task == "causal-lm" else "class count (num_labels)"
            raise ThermoKDError(f"the teacher's {what} is {teacher}, the student's {student}: the loss compares the "
                                f"two distributions class by class; use models with the same {what}, or map the "
                                "teacher's logits with teacher_logits_fn")

    def _check_given_optimizer(self) -> None:
        if self.optimizer is None:
            return
        given = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in self.distillation_loss.named_parameters() if p.requires_grad and id(p) not in given]
        if missing:
            raise ThermoKDError(f"the optimizer passed in optimizers= does not train the loss's parameters {missing} "
                                "(e.g. CTKD's θ): add distillation_loss.parameters() to it")

    # -- optimiser: learnable strategies train with the student --------------------------------------------------
    def create_optimizer(self, model: "nn.Module | None" = None) -> torch.optim.Optimizer:
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        learnable = loss_parameter_group(self.distillation_loss, self.args.weight_decay)  # CTKD's θ
        if created and learnable:
            optimizer.add_param_group(learnable)
        return optimizer

    # -- the loss --------------------------------------------------------------------------------------------------
    def progress(self) -> Progress:
        """Where training stands, in thermokd's terms (step and epoch count from 0)."""
        state = self.state
        total_epochs = max(1, int(state.num_train_epochs or 0) or math.ceil(self.args.num_train_epochs))
        return Progress(step=state.global_step, total_steps=max(1, state.max_steps),
                        epoch=min(int(state.epoch or 0), total_epochs - 1), total_epochs=total_epochs)

    def loss_targets(self, batch: Mapping[str, Any]) -> "tuple[Tensor | None, Tensor | None]":
        """The labels and row mask the loss sees for this batch, aligned with the student's logits."""
        labels = batch.get("labels")
        if self.task == "sequence-classification":
            return labels, None  # the attention mask is per token; rows are sequences
        mask = batch.get("attention_mask")
        if self.task == "causal-lm":
            if mask is None:
                ref = labels if labels is not None else batch.get("input_ids")
                if ref is None:
                    raise ThermoKDError("a causal-LM batch needs input_ids, attention_mask or labels to tell which "
                                        "positions have a next token")
                mask = torch.ones_like(ref)
            labels = None if labels is None else _shift_left(labels, self.distillation_loss.ignore_index)
            mask = _shift_left(mask, 0)
        return labels, mask

    def valid_rows(self, batch: Mapping[str, Any]) -> "Tensor | None":
        """Boolean filter of the rows that count (the loss's rule); None when every row counts."""
        labels, mask = self.loss_targets(batch)
        valid = None if labels is None else labels != self.distillation_loss.ignore_index
        if mask is not None:
            valid = mask.bool() if valid is None else valid & mask.bool()
        return valid

    def _count_rows(self, batch: Mapping[str, Any]) -> Tensor:
        valid = self.valid_rows(batch)
        if valid is not None:
            return valid.sum()
        first = next(v for v in batch.values() if isinstance(v, Tensor))  # one row per sequence
        return torch.tensor(first.shape[0], device=first.device)

    def _model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}

    def teacher_logits(self, batch: Mapping[str, Any], model_inputs: Mapping[str, Any]) -> "Tensor | None":
        """The batch's ``teacher_logits``, else ``teacher_logits_fn``, else the teacher's forward pass."""
        if TEACHER_LOGITS_KEY in batch:
            return batch[TEACHER_LOGITS_KEY]
        if self.teacher_model is None and self.teacher_logits_fn is None:
            if self.distillation_loss.kd_weight:
                raise ThermoKDError(f"no teacher: pass teacher_model= or teacher_logits_fn=, or put "
                                    f"'{TEACHER_LOGITS_KEY}' in every batch")
            return None  # a cross-entropy-only loss
        with torch.no_grad(), self.accelerator.autocast():
            if self.teacher_logits_fn is not None:
                return self.teacher_logits_fn(self.teacher_model, dict(model_inputs))
            return _logits(self.teacher_model(**model_inputs))

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: "Tensor | int | None" = None) -> "Tensor | tuple[Tensor, Any]":
        model_inputs = self._model_inputs(inputs)
        labels, mask = self.loss_targets(inputs)
        progress = self.progress()
        if self.fused_head:
            outputs, out = self._fused_loss(model, model_inputs, labels, mask, progress)
        else:
            outputs = model(**model_inputs)  # without labels: no Hugging Face loss
            student = _logits(outputs)
            teacher = self.teacher_logits(inputs, model_inputs)
            _check_same_shape(student, teacher, self.task)
            out = self.distillation_loss(student, teacher, labels, mask=mask, progress=progress)
        loss = out.loss
        if model.training:  # evaluation reports the plain batch mean and leaves the statistics alone
            self._step_window.add(out.stats, progress)
            loss = self._scale_for_accumulation(loss, out.stats.device_values().get("rows", 0.0), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _fused_loss(self, model: nn.Module, model_inputs: Mapping[str, Any], labels: "Tensor | None",
                    mask: "Tensor | None", progress: Progress) -> tuple[Any, LossOutput]:
        """``fused_head=True``: the last hidden states of both models' base (``model.base_model``) and their output
        heads go to :meth:`DistillationLoss.forward_hidden`, so no ``[B, L, V]`` logits are built."""
        outputs = model.base_model(**model_inputs)
        teacher_head = None
        if self.teacher_model is not None:
            with torch.no_grad(), self.accelerator.autocast():
                teacher_hidden = self.teacher_model.base_model(**model_inputs)[0]
            teacher_head = self.teacher_model.get_output_embeddings()
        elif self.distillation_loss.kd_weight:
            raise ThermoKDError("fused_head=True needs teacher_model")
        out = self.distillation_loss.forward_hidden(
            outputs[0], model.get_output_embeddings(), teacher_hidden if teacher_head is not None else None,
            teacher_head, labels, mask=mask, progress=progress)
        return outputs, out

    def _counts_all_processes(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def _scale_for_accumulation(self, loss: Tensor, rows: float, num_items: "Tensor | int | None") -> Tensor:
        """``mean × n_micro / N_window``: the micro-batch's share of the window's mean (see the module docstring)."""
        if num_items is None:  # a batch that bypassed get_batch_samples: the Trainer's own per-micro-batch rule
            return loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        total = torch.as_tensor(num_items, device=loss.device).float().clamp_min(1.0)
        scale = rows / total
        if self._counts_all_processes():  # DDP averages gradients over processes; N counts all of their rows
            scale = scale * self.accelerator.num_processes
        return loss * scale

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """The Trainer's batches of one optimiser step, with the number of rows the loss will count in them."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        count = torch.stack([self._count_rows(b).to(device) for b in batches]).sum()
        if self._counts_all_processes():
            count = self.accelerator.gather(count.reshape(1)).sum()
        return batches, count

    # -- once per optimiser step -----------------------------------------------------------------------------------
    def _average_loss_gradients(self) -> None:
        """DDP wraps the student only: average the loss's own gradients (CTKD's θ) over processes here."""
        if self.accelerator.num_processes == 1:
            return
        for p in self.distillation_loss.parameters():
            if p.requires_grad:
                if p.grad is None:  # a process whose micro-batches had no valid rows still joins the reduction
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.accelerator.num_processes)

    def _finish_optimizer_step(self) -> None:
        """After the optimiser step: stateful strategies (DTS) update once, from the whole step's statistics."""
        self.distillation_loss.zero_grad(set_to_none=True)  # the Trainer zeroes the student's gradients only
        window, self._step_window = self._step_window.gathered(self.accelerator), StatWindow()
        self._log_window.merge(window)
        if window.progress is None:  # no training micro-batch in this step
            return
        self.distillation_loss.observe(window)
        self._share_rank0_state()

    def _share_rank0_state(self) -> None:
        """Every process keeps rank 0's strategy state (CIST's ρ is calibrated on each process's first batch),
        broadcast in place where it lives: on a GPU that is a collective on the stream, not a copy to the host that
        would wait for the device every step. The strategies' host floats (CIST's ρ, a fixed τ) are read again once,
        after the first step's broadcast: they never change after calibration."""
        if self.accelerator.num_processes == 1:
            return
        for tensor in self.distillation_loss.state_dict(keep_vars=True).values():
            torch.distributed.broadcast(tensor.data, src=0)
        if not self._host_floats_shared:
            self._host_floats_shared = True
            for module in self.distillation_loss.modules():
                if isinstance(module, TemperatureStrategy):
                    module.refresh_host_floats()

    # -- logging ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: "float | None" = None) -> None:
        if "loss" in logs and self._log_window.rows:  # a training log line: add the window's loss statistics
            extra = {k: v for k, v in self._log_window.means().items() if k not in ("loss", "rows")}
            logs = {**logs, **extra}
            self._log_window = StatWindow()
        super().log(logs, start_time)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        if self.args.should_save:  # before the Trainer's files, so a complete-looking checkpoint has it too
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"  # the folder the Trainer is about to write
            save_loss_state(self.distillation_loss, os.path.join(self._get_output_dir(trial=trial), name))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: "str | bool | None" = None, trial: Any = None,
              ignore_keys_for_eval: "list[str] | None" = None) -> Any:
        """``Trainer.train``; resuming also restores the loss's state from the checkpoint folder."""
        if resume_from_checkpoint is True and os.path.isdir(self.args.output_dir):
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the Trainer reports it
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            load_loss_state(self.distillation_loss, os.fspath(resume_from_checkpoint))
        self._step_window, self._log_window = StatWindow(), StatWindow()
        self._host_floats_shared = False  # read once more after this run's first step
        self.distillation_loss.zero_grad(set_to_none=True)  # the Trainer's model.zero_grad() misses θ
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if TEACHER_LOGITS_KEY not in self._signature_columns:  # keep precomputed teacher logits in the batches
            self._signature_columns.append(TEACHER_LOGITS_KEY)

    # -- optional set-up -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare_loss(self, max_batches: "int | None" = None) -> None:
        """Before ``train()``: show the strategy the teacher's logits on the training set's valid rows (CIST with
        ``ratio="auto"`` then calibrates ρ on all of them, not on the first micro-batch). The rows are kept on the
        CPU (``[N, V]`` floats for a language model): ``max_batches`` (per process) bounds that."""
        rows = []
        for i, batch in enumerate(self.get_test_dataloader(self.train_dataset)):
            if max_batches is not None and i >= max_batches:
                break
            batch = self._prepare_inputs(batch)
            teacher = self.teacher_logits(batch, self._model_inputs(batch))
            if teacher is None:
                return
            flat = teacher.reshape(-1, teacher.shape[-1])
            valid = self.valid_rows(batch)
            kept = (flat if valid is None else flat[valid.reshape(-1)]).float()
            rows.append(kept if self.accelerator.num_processes > 1 else kept.cpu())  # gathered on the device
        if rows:
            self.distillation_loss.prepare(self._rows_of_all_processes(torch.cat(rows)).cpu())

    def _rows_of_all_processes(self, rows: Tensor) -> Tensor:
        """Every process's ``[N_p, C]`` rows, concatenated (processes hold different numbers of rows)."""
        if self.accelerator.num_processes == 1:
            return rows
        padded = self.accelerator.pad_across_processes(rows, dim=0, pad_index=math.nan)
        gathered = self.accelerator.gather(padded)
        return gathered[~torch.isnan(gathered).any(-1)]
