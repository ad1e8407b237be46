"""``DistillationLoss``: a temperature strategy + a divergence family + an optional per-sample weighting + CE.

One call per batch, one extra call (``observe``) after the optimiser step; usable in any training loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import temperature as temperature_mod
from . import weighting as weighting_mod
from .closed_form import ClosedFormKL
from .checks import check_finite_sum, check_finite_value, check_rows, explain_labels
from .chunked import LinearRows, LogitRows, Plan, attach, sweep, tau_columns, temperatures_by_chunk
from .errors import ThermoKDError, choice_error
from .functional import DIVERGENCES
from .fused import HeadLike, default_chunk, head_parts, teacher_source
from .objective import RowObjective
from .progress import Progress, require_progress
from .rows import Rows, stand_in
from .stats import LazyStats, masked_row_statistics, row_statistics
from .temperature import (CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, InstanceCTKD, LogitStandardization, Scheduled,
                          TemperatureStrategy)
from .weighting import ConfidenceDifficulty, TeacherEntropy, Weighting

FAMILIES = ("kd", "dkd")
SCALES = ("product", "none")
_NO_LABEL = -(2**62)  # F.nll_loss's ignore_index; ignored rows never reach it
# strategies and weightings whose forward changes no state (CIST: once calibrated; see _late_check)
_STATELESS_STRATEGIES = (Fixed, CIST, DTS, DTKD, Scheduled)
_STATELESS_WEIGHTINGS = (type(None), ConfidenceDifficulty, TeacherEntropy)
# built-in parts whose τ, scale and weights never read the student's graph: their rows may be handed over detached
_DETACHED_STRATEGIES = _STATELESS_STRATEGIES + (EntropyTarget,)
_DETACHED_WEIGHTINGS = _STATELESS_WEIGHTINGS
# built-in strategies whose τ reads each row alone and whose batch statistics, if any (CIST's, DTS's), are means
# through Rows.mean: rows weighted by zero (sync_free_rows) then count nowhere
_ROW_WEIGHABLE = _DETACHED_STRATEGIES + (CTKD, InstanceCTKD, LogitStandardization)


class _Kept(NamedTuple):
    """Rows weighted by zero (``sync_free_rows``): which count (``[N]`` bool), how many (a float32 tensor), and
    each row's share of a mean over them (``[N]``)."""

    keep: Tensor
    count: Tensor
    shares: Tensor


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # torch.is_autocast_enabled raises for other types


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate. ``terms``: named loss tensors (``ce``, ``kd``, and DKD's ``tckd``,
    ``nckd``). ``stats``: floats over the valid rows (temperatures, teacher soft-label entropy in nats at the
    teacher's τ, weights, ...): a :class:`~thermokd.stats.LazyStats` that stays on the device until a value is
    read (then all of them come over in one transfer). ``progress``: the progress the batch was computed at."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: Mapping[str, float] = field(default_factory=dict)
    progress: "Progress | None" = None


def _as_strategy(temperature) -> TemperatureStrategy:
    if isinstance(temperature, TemperatureStrategy):
        return temperature
    if isinstance(temperature, str):
        return temperature_mod.build(temperature)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        return Fixed(float(temperature))
    raise ThermoKDError(f"temperature must be a number, a strategy name or a TemperatureStrategy, got {temperature!r}")


def _float32_region(device_type: str):
    """Trainers call the loss inside their mixed-precision region; its maths is float32 by contract, and autocast
    would run any matmul-like op in it (the fused path's heads) in 16 bits."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _flat(logits: Tensor, num_classes: int) -> Tensor:
    """``[..., C]`` as ``[M, C]``; a 2-d tensor as it is (no view for autograd to go through)."""
    return logits if logits.dim() == 2 else logits.reshape(-1, num_classes)


class DistillationLoss(nn.Module):
    """``L = ce_weight·CE(z^s, y) + kd_weight·mean_i w_i·s_i·D(p(z^t_i; τ^t_i) ‖ p(z^s_i; τ^s_i))``.

    - ``temperature``: a strategy (``thermokd.temperature.*``), a strategy name, or a number (fixed τ).
    - ``family``: ``"kd"`` with ``divergence`` in ``kl`` (default), ``reverse_kl``, ``js``, ``tvd``; or ``"dkd"``
      (``dkd_alpha``·TCKD + ``dkd_beta``·NCKD, ramped in over ``dkd_warmup`` epochs).
    - ``weighting``: None, a :class:`~thermokd.weighting.Weighting`, or its name; weights have mean 1.
    - ``scale``: ``"product"`` multiplies each row by ``τ^t_i·τ^s_i`` (τ² for a shared τ; strategies may override,
      e.g. logit standardisation uses τ_b²); ``"none"`` turns it off.
    - Logits ``[..., C]`` of any float dtype; rows with ``labels == ignore_index`` or ``mask == False`` count
      nowhere. Gathering the other rows needs their count on the host (a host-device sync); ``ignore_index=None``
      (no label is ignored) with no ``mask`` has nothing to gather. ``sync_free_rows`` (default None: on
      accelerators) weights those rows by zero instead, with no sync, for built-in strategies and weightings (on
      the plain, chunked and fused paths); the same value, gradients and statistics. The maths runs in float32.
    - ``chunk_size``: evaluate at most this many rows at a time (``thermokd.chunked``): the same value and
      gradients without float32 intermediates for the whole ``[B·L, V]`` block. For language models with large
      vocabularies; ``terms`` are then detached values (only ``loss`` is differentiable).
    """

    def __init__(self, temperature: "TemperatureStrategy | float | str" = 4.0, family: str = "kd",
                 divergence: str = "kl", weighting: "Weighting | str | None" = None, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, scale: str = "product", dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
                 dkd_warmup: int = 20, ignore_index: "int | None" = -100, check_inputs: bool = True,
                 chunk_size: "int | None" = None, sync_free_rows: "bool | None" = None) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise choice_error("loss family", family, FAMILIES)
        if divergence not in DIVERGENCES:
            raise choice_error("divergence", divergence, DIVERGENCES)
        if family == "dkd" and divergence != "kl":
            raise ThermoKDError(f"family 'dkd' is defined with KL only, got divergence={divergence!r}")
        if scale not in SCALES:
            raise choice_error("scale", scale, SCALES)
        for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("dkd_alpha", dkd_alpha),
                            ("dkd_beta", dkd_beta), ("dkd_warmup", dkd_warmup)):
            if not value >= 0:
                raise ThermoKDError(f"{name} must be >= 0, got {value!r}")
        self.temperature = _as_strategy(temperature)
        self.weighting = weighting_mod.build(weighting) if isinstance(weighting, str) else weighting
        self.family, self.divergence, self.scale = family, divergence, scale
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.dkd_alpha, self.dkd_beta, self.dkd_warmup = float(dkd_alpha), float(dkd_beta), int(dkd_warmup)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.check_inputs = bool(check_inputs)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ThermoKDError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if sync_free_rows not in (None, True, False):
            raise ThermoKDError(f"sync_free_rows must be None (on accelerators), True or False, got {sync_free_rows!r}")
        self.sync_free_rows = sync_free_rows
        self._objective: "tuple[tuple, RowObjective] | None" = None

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        self.__dict__["_route"] = None  # any change (a new strategy, weighting, weight) re-decides the fast path

    def _routes(self) -> tuple[bool, bool, bool]:
        """(Hinton: a fixed τ, forward KL, τ² scale, no weighting; late check: forward KL with a strategy and a
        weighting whose forward changes no state, so the finiteness check may come after it, on the KD sum;
        closed form: forward KL on checked inputs with a built-in strategy without a learnable τ and a built-in
        weighting, so the plain path is one :class:`~thermokd.closed_form.ClosedFormKL` node).
        Decided once per change of the loss's attributes, not per call."""
        route = self.__dict__.get("_route")
        if route is None:
            kl = self.family == "kd" and self.divergence == "kl" and self.kd_weight > 0
            route = self.__dict__["_route"] = (
                kl and type(self.temperature) is Fixed and self.weighting is None and self.scale == "product",
                kl and type(self.temperature) in _STATELESS_STRATEGIES
                and type(self.weighting) in _STATELESS_WEIGHTINGS,
                kl and self.check_inputs and type(self.temperature) in _DETACHED_STRATEGIES
                and type(self.weighting) in _DETACHED_WEIGHTINGS)
        return route

    def _fixed_tau_kl(self) -> bool:
        return self._routes()[0]

    def _late_check(self) -> bool:
        """Whether this call may check its inputs on the KD sum after the strategy and the weighting have run:
        they change no state then (CIST's first-batch calibration and running weight means do: checked first)."""
        return (self._routes()[1] and not self.temperature.needs_batch_preparation
                and (self._active_weighting() is None or not self.weighting.normalisation.stateful))

    @property
    def objective(self) -> RowObjective:
        """The per-row maths this loss evaluates (immutable; shared by the plain, chunked and fused paths)."""
        key = (self.family, self.divergence, self.scale, self.dkd_alpha, self.dkd_beta, self.temperature.learnable,
               self.check_inputs)
        if self._objective is None or self._objective[0] != key:
            self._objective = (key, RowObjective(*key))
        return self._objective[1]

    # -- input handling -------------------------------------------------------------------------------
    def _valid(self, lead: torch.Size, labels: "Tensor | None", mask: "Tensor | None", shortcut: bool = True
               ) -> tuple["Tensor | None", "Tensor | None"]:
        """The flat labels and which rows count (``[N]`` bool; None: every row), checked against the logits' leading
        shape. ``shortcut``: on the CPU with no mask, one reduction shows that no label is the (negative)
        ``ignore_index``, and then every row counts."""
        keep = None
        if mask is not None:
            if mask.shape != lead:
                raise ThermoKDError(f"mask {tuple(mask.shape)} must match the logits' leading shape {tuple(lead)}")
            keep = mask.reshape(-1).to(torch.bool)
        if labels is not None:
            if labels.shape != lead:
                raise ThermoKDError(f"labels {tuple(labels.shape)} must match the logits' leading shape {tuple(lead)}")
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise ThermoKDError(f"labels must be integer class ids, got dtype {labels.dtype}; convert them "
                                    "with .long() once you know they are whole numbers")
            labels = labels if labels.dim() == 1 else labels.reshape(-1)
            labels = labels if labels.dtype == torch.int64 else labels.long()
            if (shortcut and keep is None and self.ignore_index is not None and self.ignore_index < 0
                    and labels.numel() and labels.device.type == "cpu" and labels.min().item() >= 0):
                return labels, None
            if self.ignore_index is not None:
                labelled = labels != self.ignore_index
                keep = labelled if keep is None else keep & labelled
        return labels, keep

    def _select(self, lead: torch.Size, labels: "Tensor | None", mask: "Tensor | None"
                ) -> tuple["Tensor | None", "Tensor | None"]:
        """The valid rows' flat labels and their positions (None: every row). Finding them is the one read of a
        device value a step may need (how many rows are valid); with no mask and ``ignore_index=None`` there is
        nothing to find."""
        labels, keep = self._valid(lead, labels, mask)
        if keep is None:
            return labels, None
        index = keep.nonzero().squeeze(1)
        if index.shape[0] == keep.shape[0]:
            return labels, None
        return (None if labels is None else labels.index_select(0, index)), index

    def _keeps_rows(self, device: torch.device) -> bool:
        """Whether masked and ignored rows are weighted by zero instead of dropped (:meth:`_kept`), so that the step
        never reads how many rows are valid: on an accelerator (``sync_free_rows=None``, the default), for a loss
        (plain, chunked or fused, any family and divergence) with a built-in strategy whose τ reads each row alone
        (its batch statistics, DTS's CE means or CIST's own-ratio scale, are means over the rows that count) and a
        built-in weighting. Elsewhere (a strategy or weighting of the user's, CIST's first batch, which calibrates
        ρ on every valid row) the valid rows are gathered: one read of their count."""
        policy = self.sync_free_rows
        if policy is False or (policy is None and device.type == "cpu"):
            return False
        strategy = self.temperature
        return (type(strategy) in _ROW_WEIGHABLE and strategy.row_local and not strategy.needs_batch_preparation
                and type(self._active_weighting()) in _STATELESS_WEIGHTINGS)

    # -- the loss -------------------------------------------------------------------------------------
    def forward(self, student_logits: Tensor, teacher_logits: "Tensor | None", labels: "Tensor | None" = None, *,
                mask: "Tensor | None" = None, progress: "Progress | None" = None) -> LossOutput:
        with _float32_region(student_logits.device.type):
            return self._forward(student_logits, teacher_logits, labels, mask, progress)

    def _forward(self, student_logits: Tensor, teacher_logits: "Tensor | None", labels: "Tensor | None",
                 mask: "Tensor | None", progress: "Progress | None") -> LossOutput:
        if teacher_logits is None:
            if self.kd_weight:
                raise ThermoKDError("teacher_logits is None, but this loss distils (kd_weight > 0)")
            teacher_logits = student_logits.detach()  # a cross-entropy-only loss never reads it
        if student_logits.shape != teacher_logits.shape:
            raise ThermoKDError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                                f"{tuple(teacher_logits.shape)} must have the same shape")
        if student_logits.dim() < 2:
            raise ThermoKDError(f"logits need a class axis: expected [..., C], got shape {tuple(student_logits.shape)}")
        num_classes = student_logits.shape[-1]
        if (mask is not None or (labels is not None and self.ignore_index is not None)) and \
                self._keeps_rows(student_logits.device):
            flat_labels, keep = self._valid(student_logits.shape[:-1], labels, mask, shortcut=False)
            if keep is not None:
                s, t = _flat(student_logits, num_classes), _flat(teacher_logits.detach(), num_classes)
                if self.chunk_size is not None and s.shape[0] > self.chunk_size:
                    return self._chunked(self._kept_plan(LogitRows(s), LogitRows(t), flat_labels, keep,
                                                         self.chunk_size, progress, num_classes))
                if self._fixed_tau_kl() or self._routes()[2]:
                    return self._kept(s, t, flat_labels, keep, progress)
                return self._kept_by_autograd(s, t, flat_labels, keep, progress)
        labels, index = self._select(student_logits.shape[:-1], labels, mask)
        s, t = _flat(student_logits, num_classes), _flat(teacher_logits.detach() if teacher_logits.requires_grad
                                                         else teacher_logits, num_classes)
        n = s.shape[0] if index is None else index.shape[0]
        if self.chunk_size is not None and n > self.chunk_size:
            if self.check_inputs:  # the logits are checked chunk by chunk
                check_rows(None, None, labels, num_classes)
            return self._chunked(Plan(LogitRows(s, index), LogitRows(t, index), labels, n, self.chunk_size, progress))
        if index is not None:
            s, t = s.index_select(0, index), t.index_select(0, index)
        if n == 0:  # nothing to learn from; keep the graph so backward() still works
            zero = s.float().sum()  # 0 over no rows, in float32; masked garbage (inf, NaN, fp16 overflow) never enters
            return LossOutput(zero, {"ce": zero, "kd": zero}, LazyStats(floats={"rows": 0.0}), progress)
        if self._fixed_tau_kl():
            return self._hinton(s, t, labels, progress)
        late = self.check_inputs and self._late_check()
        if self.check_inputs and not late:  # labels: the cross-entropy kernel refuses out-of-range ones itself
            check_finite_sum(s, t)
        if self._routes()[2]:
            return self._closed_form(s, t, labels, progress, late)
        return self._plain(s, t, labels, progress, late)

    def forward_hidden(self, student_hidden: Tensor, student_head: "HeadLike", teacher_hidden: "Tensor | None" = None,
                       teacher_head: "HeadLike | None" = None, labels: "Tensor | None" = None, *,
                       teacher_topk=None, mask: "Tensor | None" = None, progress: "Progress | None" = None,
                       chunk_size: "int | None" = None) -> LossOutput:
        """The fused linear-layer loss: ``forward(h_s·W_sᵀ + b_s, h_t·W_tᵀ + b_t, labels)`` without building either
        model's ``[N, V]`` logits. At most ``chunk_size`` rows of logits per model (default: the loss's
        ``chunk_size``, else ``thermokd.fused.default_chunk``: 256 rows on the CPU, more on a GPU for moderate
        vocabularies) are alive at a time; the gradients reach the student's hidden states and its head's weight and
        bias. Same value and gradients as the plain path, for every strategy and weighting.

        - ``student_hidden`` ``[..., H]``; a head is an ``nn.Linear``, a ``(weight, bias)`` pair or a weight
          ``[V, H]``.
        - the teacher: ``teacher_hidden`` ``[..., H_t]`` with ``teacher_head``, or ``teacher_topk`` (a top-k cache,
          e.g. ``thermokd.lm.TopK``: cached classes at ``τ_c·log p``, the missing ones equally likely).
        - ``labels``/``mask`` have the hidden states' leading shape (for a causal LM: already shifted).
        """
        with _float32_region(student_hidden.device.type):
            return self._forward_hidden(student_hidden, student_head, teacher_hidden, teacher_head, labels,
                                        teacher_topk, mask, progress, chunk_size)

    def _forward_hidden(self, student_hidden: Tensor, student_head: "HeadLike", teacher_hidden: "Tensor | None",
                        teacher_head: "HeadLike | None", labels: "Tensor | None", teacher_topk, mask: "Tensor | None",
                        progress: "Progress | None", chunk_size: "int | None") -> LossOutput:
        weight, bias = head_parts(student_head, "student_head")
        if student_hidden.dim() < 2 or student_hidden.shape[-1] != weight.shape[1]:
            raise ThermoKDError(f"student_hidden {tuple(student_hidden.shape)} must be [..., H] with H = the head's "
                                f"input size {weight.shape[1]}")
        lead, vocab = student_hidden.shape[:-1], weight.shape[0]
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        chunk = chunk_size if chunk_size is not None else (self.chunk_size or default_chunk(vocab, hidden.device))
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ThermoKDError(f"chunk_size must be a positive integer or None, got {chunk!r}")
        if (mask is not None or (labels is not None and self.ignore_index is not None)) and \
                self._keeps_rows(hidden.device):
            flat_labels, keep = self._valid(lead, labels, mask, shortcut=False)
            if keep is not None:
                teacher = teacher_source(lead, vocab, teacher_hidden, teacher_head, teacher_topk, None,
                                         hidden.device, distils=bool(self.kd_weight), keep=keep)
                return self._chunked(self._kept_plan(LinearRows(hidden, weight, bias, keep=keep), teacher,
                                                     flat_labels, keep, chunk, progress, vocab))
        labels, index = self._select(lead, labels, mask)
        if self.check_inputs:
            check_rows(None, None, labels, vocab)
        teacher = teacher_source(lead, vocab, teacher_hidden, teacher_head, teacher_topk, index,
                                 student_hidden.device, distils=bool(self.kd_weight))
        n = hidden.shape[0] if index is None else index.shape[0]
        if n == 0:  # nothing to learn from; keep the graph so backward() still works
            zero = hidden[:0].float().sum() + weight[:0].float().sum()
            if bias is not None:  # a zero gradient for every parameter the plain path's logits touch
                zero = zero + bias[:0].float().sum()
            return LossOutput(zero, {"ce": zero, "kd": zero}, LazyStats(floats={"rows": 0.0}), progress)
        student = LinearRows(hidden, weight, bias, index)
        return self._chunked(Plan(student, teacher, labels, n, chunk, progress))

    def _kept_plan(self, student: "LogitRows | LinearRows", teacher, labels: "Tensor | None", keep: Tensor,
                   chunk: int, progress: "Progress | None", num_classes: int) -> Plan:
        """A chunked evaluation of every row, those outside ``keep`` weighted by zero (see :meth:`_kept`); their
        labels become class 0, and the labels are checked on the device."""
        safe = None if labels is None else torch.where(keep, labels, 0)
        if self.check_inputs:  # the logits are checked chunk by chunk
            check_rows(None, None, safe, num_classes)
        return Plan(student, teacher, safe, keep.shape[0], chunk, progress, keep, keep.sum(dtype=torch.float32))

    def _plain(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", progress: "Progress | None",
               late_check: bool = False, kept: "_Kept | None" = None) -> LossOutput:
        """The loss by autograd. ``kept``: every row is given (see :meth:`_stand_ins`), and means are taken over the
        rows that count (``Rows.mean``)."""
        rows = Rows(student.float(), teacher.float(), labels, progress, None if kept is None else kept.shares)
        terms: dict[str, Tensor] = {}
        total = None
        if labels is not None:
            try:  # no label is ignored here (ignored rows were dropped): a label nobody uses as the sentinel
                terms["ce"] = (F.nll_loss(rows.student_log_probs, labels, ignore_index=_NO_LABEL) if kept is None
                               else rows.mean(rows.student_log_probs.gather(-1, rows.label_column)).neg())
            except (IndexError, RuntimeError):
                explain_labels(labels, rows.num_classes)
                raise
            total = self.ce_weight * terms["ce"]
        elif self.ce_weight and self.kd_weight == 0:
            raise ThermoKDError("a cross-entropy-only loss needs labels")
        tensors: dict[str, Tensor] = {}
        pending = None
        if self.kd_weight:
            objective = self.objective
            temps = self.temperature(rows)
            tau_t, tau_s = tau_columns(self.temperature, temps, rows.num_rows)
            shares = self._weight_shares(rows, kept) if self._active_weighting() is not None else None
            factor = objective.factor(objective.row_scale(tau_t, tau_s, temps.scale), shares)
            dkd = None
            # the teacher's entropy (a statistic) is computed only if a statistic is read
            if objective.family == "kd" and (factor is None or factor.dim() == 0) and kept is None:  # one factor
                kd, _ = objective.mean(rows.student, rows.teacher, labels, tau_t, tau_s, entropy=False)
                kd = kd if factor is None else kd * factor
            else:
                per_row, dkd, _ = objective.rows(rows.student, rows.teacher, labels, tau_t, tau_s, entropy=False)
                if shares is not None:  # Σ_i (w_i/N)·s_i·D_i = mean_i w_i·s_i·D_i, in one kernel
                    kd = torch.dot(per_row, factor)
                else:
                    kd = rows.mean(per_row if factor is None else per_row * factor)
            if late_check:  # forward KL ≥ 0 with factors ≥ 0: finite iff every logit was (NaN fails "< inf")
                check_finite_value(kd < math.inf, rows.student, rows.teacher)
            if dkd is not None:
                scale = objective.dkd_scale(tau_t, tau_s)
                terms["tckd"], terms["nckd"] = rows.mean(dkd[0] * scale), rows.mean(dkd[1] * scale)
            terms["kd"] = kd
            weighted = (self.kd_weight * self._warmup(progress)) * kd
            total = weighted if total is None else total + weighted
            tensors.update(temps.stats)
            n = rows.num_rows

            taus, teacher_rows = (tau_t.detach(), tau_s.detach()), rows.teacher  # no graph is kept for them

            def pending() -> dict[str, Tensor]:  # only when someone reads the statistics
                entropy = RowObjective.teacher_entropy(teacher_rows, taus[0])
                if kept is None:
                    return row_statistics(*taus, entropy, None if shares is None else shares.detach() * n)
                return masked_row_statistics(*taus, entropy, kept.keep, kept.count,
                                             None if shares is None else shares.detach() * kept.count.clamp_min(1.0))
        if total is None:  # neither term: a zero that still has a graph
            total = rows.student.sum() * 0.0
        tensors["loss"] = total
        tensors.update(terms)
        if kept is not None:
            return LossOutput(total, terms, LazyStats({**tensors, "rows": kept.count}, pending), progress)
        return LossOutput(total, terms, LazyStats(tensors, pending, {"rows": float(rows.num_rows)}), progress)

    def _closed_form(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", progress: "Progress | None",
                     late_check: bool) -> LossOutput:
        """The plain path's value and gradients for forward KL with τ and weights that carry no gradient, as one
        autograd node (:class:`~thermokd.closed_form.ClosedFormKL`). The strategy and the weighting see the rows
        detached; the τ=1 log-probabilities they may read (``Rows.student_log_probs``) are the CE's too."""
        rows = Rows(student.detach().float(), teacher.float(), labels, progress)
        n = rows.num_rows
        try:
            temps = self.temperature(rows)
            tau_t, tau_s = tau_columns(self.temperature, temps, n)
            shares = self._weight_shares(rows) if self._active_weighting() is not None else None
            scale = self.objective.row_scale(tau_t, tau_s, temps.scale)
            row_coef = RowObjective.factor(scale, shares) if shares is not None else \
                (1.0 / n if scale is None else scale / n)
            total, kd, ce = ClosedFormKL.apply(
                student, rows.student, rows.teacher, None if labels is None else rows.student_log_probs, labels,
                tau_t, tau_s, row_coef, self.kd_weight, self.ce_weight, _NO_LABEL)
        except (IndexError, RuntimeError):
            if labels is not None:  # a label out of range (a gather or the CE kernel refused it): say which
                explain_labels(labels, rows.num_classes)
            raise
        if late_check:  # forward KL ≥ 0 with factors ≥ 0: finite iff every logit was (NaN fails "< inf")
            check_finite_value(kd < math.inf, rows.student, rows.teacher)
        terms = {"kd": kd} if ce is None else {"ce": ce, "kd": kd}
        tensors = {**temps.stats, "loss": total, **terms}
        taus, teacher_rows = (tau_t, tau_s), rows.teacher

        def pending() -> dict[str, Tensor]:  # only when someone reads the statistics
            entropy = RowObjective.teacher_entropy(teacher_rows, taus[0])
            return row_statistics(*taus, entropy, None if shares is None else shares * n)

        return LossOutput(total, terms, LazyStats(tensors, pending, {"rows": float(n)}), progress)

    @staticmethod
    def _stand_ins(student: Tensor, teacher: Tensor, labels: "Tensor | None", keep: Tensor, detach: bool
                   ) -> tuple["_Kept", Tensor, Tensor, "Tensor | None"]:
        """Every row of float32 logits, those outside ``keep`` replaced by stand-in logits (``rows.stand_in``) and
        their labels by class 0; with the count of rows that count (a tensor: nothing reads it) and each row's share
        of a mean over them."""
        count = keep.sum(dtype=torch.float32)
        kept = _Kept(keep, count, keep.float().div_(count.clamp_min(1.0)))
        s32 = stand_in((student.detach() if detach else student).float(), keep)
        return kept, s32, stand_in(teacher.float(), keep), None if labels is None else torch.where(keep, labels, 0)

    def _kept_by_autograd(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", keep: Tensor,
                          progress: "Progress | None") -> LossOutput:
        """:meth:`_kept` for the losses the closed form does not cover (DKD, other divergences, a learnable τ):
        the plain autograd path over every row, the others weighted by zero."""
        kept, s32, t32, safe = self._stand_ins(student, teacher, labels, keep, detach=False)
        late = self.check_inputs and self._late_check()
        if self.check_inputs and not late:  # the stand-in rows are finite: only the valid rows can fail
            check_finite_sum(s32, t32)
        return self._plain(s32, t32, safe, progress, late, kept)

    def _kept(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", keep: Tensor,
              progress: "Progress | None") -> LossOutput:
        """The loss over the rows of ``keep`` without reading how many there are: every row is evaluated, the
        others with stand-in logits (:meth:`_stand_ins`) and a weight of zero; means divide by the count as a device
        tensor. Same value, gradients and statistics as gathering the valid rows. Forward KL in closed form."""
        n, num_classes = student.shape
        kept, s32, t32, safe = self._stand_ins(student, teacher, labels, keep, detach=True)
        count, shares = kept.count, kept.shares
        if self.check_inputs and not self._fixed_tau_kl() and not self._late_check():
            check_finite_sum(s32, t32)  # as when gathering: before a strategy or weighting with state sees a NaN
        if self._fixed_tau_kl():
            tau = self.temperature.value()
            tau_t = tau_s = torch.full((), tau, dtype=torch.float32, device=student.device)
            row_coef = shares * (tau * tau)
            log_sigma = None if labels is None else torch.log_softmax(s32, dim=-1)
            strategy_stats: dict[str, Tensor] = {}
            weights = None
        else:
            rows = Rows(s32, t32, safe, progress, shares)
            temps = self.temperature(rows)
            tau_t, tau_s = tau_columns(self.temperature, temps, n)
            scale = self.objective.row_scale(tau_t, tau_s, temps.scale)
            weights = None
            if self._active_weighting() is not None:  # w_i/count on the valid rows, 0 elsewhere
                weights = self._weight_shares(rows, kept)
            row_coef = RowObjective.factor(scale, weights if weights is not None else shares)
            log_sigma = None if labels is None else rows.student_log_probs
            strategy_stats = temps.stats
        try:
            total, kd, ce = ClosedFormKL.apply(student, s32, t32, log_sigma, safe, tau_t, tau_s, row_coef,
                                               self.kd_weight, self.ce_weight, _NO_LABEL, shares)
        except (IndexError, RuntimeError):
            if labels is not None:  # a label out of range (the gather refused it): say which
                explain_labels(labels[keep] if keep.device.type == "cpu" else labels, num_classes)
            raise
        if self.check_inputs:  # the stand-in rows are finite: the sum is finite iff every valid logit is
            check_finite_value(kd < math.inf, s32, t32)
        terms = {"kd": kd} if ce is None else {"ce": ce, "kd": kd}
        taus, teacher_rows = (tau_t, tau_s), t32

        def pending() -> dict[str, Tensor]:  # only when someone reads the statistics
            entropy = RowObjective.teacher_entropy(teacher_rows, taus[0])
            return masked_row_statistics(*taus, entropy, keep, count,
                                         None if weights is None else weights * count.clamp_min(1.0))

        return LossOutput(total, terms, LazyStats({**strategy_stats, "loss": total, **terms, "rows": count}, pending),
                          progress)

    def _hinton(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", progress: "Progress | None"
                ) -> LossOutput:
        """The closed-form path for a fixed τ without weights, with nothing per call but the loss itself: τ, τ² and
        1/N are host floats, the input check rides on the KL sum (finite only if every logit is), and the teacher's
        entropy is computed only if a statistic is read."""
        tau = self.temperature.value()
        n = student.shape[0]
        s32, t32 = student.detach().float(), teacher.float()
        try:
            total, kd, ce = ClosedFormKL.apply(
                student, s32, t32, None if labels is None else torch.log_softmax(s32, dim=-1), labels,
                tau, tau, tau * tau / n, self.kd_weight, self.ce_weight, _NO_LABEL)
        except (IndexError, RuntimeError):
            if labels is not None:  # the CE kernel refused a label: say which
                explain_labels(labels, student.shape[-1])
            raise
        if self.check_inputs:  # KL ≥ 0 is never −inf: below +inf (one comparison, NaN fails it) means finite
            check_finite_value(kd < math.inf, student, teacher)
        terms = {"kd": kd} if ce is None else {"ce": ce, "kd": kd}

        def pending() -> dict[str, Tensor]:  # only when someone reads the statistics
            tau_t = torch.full((), tau, dtype=torch.float32, device=teacher.device)
            return row_statistics(tau_t, tau_t, RowObjective.teacher_entropy(t32, tau_t), None)

        return LossOutput(total, terms, LazyStats({"loss": total, **terms}, pending, {"rows": float(n)}), progress)

    def _active_weighting(self) -> "Weighting | None":
        """The weighting, or None when its weights are all 1 (``Weighting.uniform``): then none of it runs."""
        weighting = self.weighting
        return None if weighting is None or weighting.uniform else weighting

    def _weight_shares(self, rows: Rows, kept: "_Kept | None" = None) -> Tensor:
        """The weights divided by the number of rows, ``[N]``: the weighting's one hook, then its declared
        normalisation (``thermokd.normalisation``); no ×N then ÷N. ``kept``: over the rows that count, 0 elsewhere."""
        keep, count = (None, None) if kept is None else (kept.keep, kept.count)
        return self.weighting.shares_of(self.weighting.log_unnormalised(rows), keep, count)

    def _chunked(self, plan: Plan) -> LossOutput:
        """The loss of ``forward`` evaluated ``plan.chunk_size`` rows at a time (see ``thermokd.chunked``)."""
        if plan.labels is None and self.ce_weight and self.kd_weight == 0:
            raise ThermoKDError("a cross-entropy-only loss needs labels")
        if self.kd_weight and self.family == "dkd" and plan.labels is None:
            raise ThermoKDError("family 'dkd' needs labels: it splits the target class from the others")
        strategy, kd_coef = self.temperature, 0.0
        temps = None
        if self.kd_weight:
            kd_coef = self.kd_weight * self._warmup(plan.progress)
            weighting = self._active_weighting()
            one_visit = (weighting is None and not strategy.learnable and not strategy.needs_batch_preparation
                         and strategy.row_local)
            if not one_visit:
                temps = temperatures_by_chunk(strategy, weighting, plan, self.check_inputs)
        result = sweep(dataclasses.replace(self.objective, precise=True), plan, kd_coef, self.ce_weight,
                       self.check_inputs, temps, strategy)
        extras: tuple = (None, None, None)
        if temps is not None:
            factor = RowObjective.factor(self.objective.row_scale(temps.tau_t, temps.tau_s, temps.scale),
                                         temps.weights)
            extras = (temps.tau_t, temps.tau_s, factor)
        total = attach(result, plan, extras)
        terms: dict[str, Tensor] = {}
        if plan.labels is not None:
            terms["ce"] = result.ce
        tensors: dict[str, Tensor] = {}
        pending = None
        if self.kd_weight:
            terms["kd"] = result.kd
            if result.tckd is not None:
                terms["tckd"], terms["nckd"] = result.tckd, result.nckd
            tensors.update(temps.stats if temps is not None else result.stats)
            tau_t = temps.tau_t if temps is not None else result.tau_t
            tau_s = temps.tau_s if temps is not None else result.tau_s
            weights = temps.weights if temps is not None else None

            def pending() -> dict[str, Tensor]:
                if plan.keep is None:
                    return row_statistics(tau_t, tau_s, result.entropy, weights)
                return masked_row_statistics(tau_t, tau_s, result.entropy, plan.keep, plan.count, weights)
        tensors["loss"] = total
        tensors.update(terms)
        if plan.keep is not None:
            tensors["rows"] = plan.count
            return LossOutput(total, terms, LazyStats(tensors, pending), plan.progress)
        return LossOutput(total, terms, LazyStats(tensors, pending, {"rows": float(plan.num_rows)}), plan.progress)

    def _warmup(self, progress: "Progress | None") -> float:
        """DKD's ramp ``min(e/warmup, 1)`` with the 1-based epoch e; 1 for the KD family."""
        if self.family != "dkd" or self.dkd_warmup == 0:
            return 1.0
        p = require_progress(progress, f"DKD's {self.dkd_warmup}-epoch warm-up (dkd_warmup=0 turns it off)")
        return min((p.epoch + 1) / self.dkd_warmup, 1.0)

    @torch.no_grad()
    def prepare(self, teacher_logits: Tensor) -> None:
        """Optional, before training: let the strategy see the teacher's logits on the training set (CIST with
        ``ratio="auto"`` calibrates ρ on all of them rather than on the first batch)."""
        self.temperature.prepare(teacher_logits)

    def observe(self, output: LossOutput) -> None:
        """Call after the optimiser step: stateful strategies (DTS) and weightings update from this batch's output."""
        if self._fixed_tau_kl():  # a fixed τ and no weighting: nothing to update
            return
        self.temperature.observe(output)
        if self._active_weighting() is not None:
            self.weighting.observe(output)

    def extra_repr(self) -> str:
        return (f"family={self.family}, divergence={self.divergence}, ce_weight={self.ce_weight:g}, "
                f"kd_weight={self.kd_weight:g}, scale={self.scale}"
                + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else ""))
