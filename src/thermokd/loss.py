"""``DistillationLoss``: a temperature strategy + a divergence family + an optional per-sample weighting + CE.

One call per batch, one extra call (``observe``) after the optimiser step; usable in any training loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import temperature as temperature_mod
from . import weighting as weighting_mod
from .chunked import check_finite
from .dkd import dkd_terms
from .errors import ThermoKDError, choice_error
from .functional import DIVERGENCES, divergence
from .progress import Progress, require_progress
from .rows import Rows
from .temperature import Fixed, TemperatureStrategy
from .temperature.base import check_tau_shape
from .weighting import Weighting

FAMILIES = ("kd", "dkd")
SCALES = ("product", "none")
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")  # torch.is_autocast_enabled raises for other types


@dataclass
class LossOutput:
    """``loss``: the scalar to backpropagate. ``terms``: named loss tensors (``ce``, ``kd``, and DKD's ``tckd``,
    ``nckd``). ``stats``: floats over the valid rows (temperatures, teacher soft-label entropy in nats at the
    teacher's τ, weights, ...). ``progress``: the progress the batch was computed at."""

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    progress: "Progress | None" = None


def _as_strategy(temperature) -> TemperatureStrategy:
    if isinstance(temperature, TemperatureStrategy):
        return temperature
    if isinstance(temperature, str):
        return temperature_mod.build(temperature)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        return Fixed(float(temperature))
    raise ThermoKDError(f"temperature must be a number, a strategy name or a TemperatureStrategy, got {temperature!r}")


def _row_column(tau: Tensor, rows: "int | None" = None, who: str = "τ") -> Tensor:
    """A strategy's τ as a scalar or ``[N, 1]`` float32; with ``rows``, a τ of any other shape is refused."""
    if rows is not None:
        check_tau_shape(tau, rows, who)
    tau = tau.float()
    return tau if tau.dim() == 0 or (tau.dim() == 2 and tau.shape[1] == 1) else tau.reshape(-1, 1)


class DistillationLoss(nn.Module):
    """``L = ce_weight·CE(z^s, y) + kd_weight·mean_i w_i·s_i·D(p(z^t_i; τ^t_i) ‖ p(z^s_i; τ^s_i))``.

    - ``temperature``: a strategy (``thermokd.temperature.*``), a strategy name, or a number (fixed τ).
    - ``family``: ``"kd"`` with ``divergence`` in ``kl`` (default), ``reverse_kl``, ``js``, ``tvd``; or ``"dkd"``
      (``dkd_alpha``·TCKD + ``dkd_beta``·NCKD, ramped in over ``dkd_warmup`` epochs).
    - ``weighting``: None, a :class:`~thermokd.weighting.Weighting`, or its name; weights have mean 1.
    - ``scale``: ``"product"`` multiplies each row by ``τ^t_i·τ^s_i`` (τ² for a shared τ; strategies may override,
      e.g. logit standardisation uses τ_b²); ``"none"`` turns it off.
    - Logits ``[..., C]`` of any float dtype; rows with ``labels == ignore_index`` or ``mask == False`` count
      nowhere. The maths runs in float32.
    - ``chunk_size``: evaluate at most this many rows at a time (``thermokd.chunked``): the same value and
      gradients without float32 intermediates for the whole ``[B·L, V]`` block. For language models with large
      vocabularies; ``terms`` are then detached values (only ``loss`` is differentiable).
    """

    def __init__(self, temperature: "TemperatureStrategy | float | str" = 4.0, family: str = "kd",
                 divergence: str = "kl", weighting: "Weighting | str | None" = None, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, scale: str = "product", dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
                 dkd_warmup: int = 20, ignore_index: int = -100, check_inputs: bool = True,
                 chunk_size: "int | None" = None) -> None:
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
        self.ignore_index, self.check_inputs = int(ignore_index), bool(check_inputs)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ThermoKDError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    # -- input handling -------------------------------------------------------------------------------
    def _flatten(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", mask: "Tensor | None"
                 ) -> tuple[Tensor, Tensor, "Tensor | None", "Tensor | None"]:
        """``[M, C]`` views of both logits, flat labels, and the boolean row filter (None: keep every row)."""
        if student.shape != teacher.shape:
            raise ThermoKDError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                                "must have the same shape")
        if student.dim() < 2:
            raise ThermoKDError(f"logits need a class axis: expected [..., C], got shape {tuple(student.shape)}")
        num_classes, lead = student.shape[-1], student.shape[:-1]
        s, t = student.reshape(-1, num_classes), teacher.detach().reshape(-1, num_classes)
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
            labels = labels.reshape(-1).long()
            labelled = labels != self.ignore_index
            keep = labelled if keep is None else keep & labelled
        if keep is not None and bool(keep.all()):
            keep = None
        return s, t, labels, keep

    def _check_labels(self, labels: "Tensor | None", num_classes: int) -> None:
        if self.check_inputs and labels is not None and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise ThermoKDError(f"label {bad} is out of range for {num_classes} classes "
                                f"(allowed: 0..{num_classes - 1}, or {self.ignore_index} to ignore a row)")

    def _valid_rows(self, student: Tensor, teacher: Tensor, labels: "Tensor | None",
                    mask: "Tensor | None") -> tuple[Tensor, Tensor, "Tensor | None"]:
        s, t, labels, keep = self._flatten(student, teacher, labels, mask)
        if keep is not None:
            s, t = s[keep], t[keep]
            labels = labels[keep] if labels is not None else None
        self._check_labels(labels, s.shape[-1])
        if self.check_inputs and s.numel():
            check_finite(s, t)
        return s.float(), t.float(), labels

    # -- the loss -------------------------------------------------------------------------------------
    def forward(self, student_logits: Tensor, teacher_logits: "Tensor | None", labels: "Tensor | None" = None, *,
                mask: "Tensor | None" = None, progress: "Progress | None" = None) -> LossOutput:
        device_type = student_logits.device.type
        if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
            # trainers call the loss inside their mixed-precision region; its maths is float32 by contract, and
            # autocast would run any matmul-like op in it (the chunked path's row dot products) in 16 bits
            with torch.autocast(device_type, enabled=False):
                return self._forward(student_logits, teacher_logits, labels, mask, progress)
        return self._forward(student_logits, teacher_logits, labels, mask, progress)

    def _forward(self, student_logits: Tensor, teacher_logits: "Tensor | None", labels: "Tensor | None",
                 mask: "Tensor | None", progress: "Progress | None") -> LossOutput:
        if teacher_logits is None:
            if self.kd_weight:
                raise ThermoKDError("teacher_logits is None, but this loss distils (kd_weight > 0)")
            teacher_logits = student_logits.detach()  # a cross-entropy-only loss never reads it
        if self.chunk_size is not None:
            s, t, flat_labels, keep = self._flatten(student_logits, teacher_logits, labels, mask)
            valid = s.shape[0] if keep is None else int(keep.sum())
            if valid > self.chunk_size:
                return self._chunked(s, t, flat_labels, keep, valid, progress)
        s, t, labels = self._valid_rows(student_logits, teacher_logits, labels, mask)
        if s.shape[0] == 0:  # nothing to learn from; keep the graph so backward() still works
            zero = s.sum()  # 0 over no rows, in float32; masked garbage (inf, NaN, fp16 overflow) never enters
            return LossOutput(zero, {"ce": zero, "kd": zero}, {"rows": 0.0}, progress)
        rows = Rows(s, t, labels, progress)
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        total = s.new_zeros(())
        if labels is not None:
            terms["ce"] = -rows.student_label_log_prob_graph.mean()
            total = total + self.ce_weight * terms["ce"]
        elif self.ce_weight and self.kd_weight == 0:
            raise ThermoKDError("a cross-entropy-only loss needs labels")
        packed: tuple[list[str], Tensor] = ([], s.new_zeros(0))
        if self.kd_weight:
            kd, packed, strategy_stats = self._distillation(rows, terms)
            terms["kd"] = kd
            stats.update(strategy_stats)
            total = total + self.kd_weight * self._warmup(progress) * kd
        stats["loss"] = total
        stats.update(terms)
        return LossOutput(total, terms, self._to_floats(stats, packed, rows.num_rows), progress)

    def _distillation(self, rows: Rows, terms: dict[str, Tensor]
                      ) -> tuple[Tensor, tuple[list[str], Tensor], dict[str, Tensor]]:
        """The distillation term, its per-row statistics packed as (names, values), and the strategy's stats."""
        temps = self.temperature(rows)
        tau_t, tau_s = self.temperature_columns(temps, rows.num_rows)
        shares = self._weight_shares(rows) if self.weighting is not None else None
        factor = self.row_factor(temps, tau_t, tau_s, shares)
        per_row, entropy, dkd = self.per_row_divergence(rows.student, rows.teacher, rows.labels, tau_t, tau_s)
        if shares is not None:  # Σ_i (w_i/N)·s_i·D_i = mean_i w_i·s_i·D_i, in one kernel
            kd = torch.dot(per_row, factor)
        else:
            kd = (per_row * factor).mean() if factor is not None else per_row.mean()
        if dkd is not None:
            scale = (tau_t * tau_s).reshape(-1) if self.scale == "product" else 1.0
            terms["tckd"] = (dkd[0] * scale).mean()
            terms["nckd"] = (dkd[1] * scale).mean()
        return kd, self.pack_row_stats(tau_t, tau_s, entropy, shares, weights_are_shares=True), temps.stats

    def _weight_shares(self, rows: Rows) -> Tensor:
        """The weights divided by the number of rows, ``[N]`` (see :meth:`Weighting.shares`)."""
        w, kind = self.weighting, type(self.weighting)
        # the usual two-step weighting: no module call, no ×N then ÷N. A subclass that changes ``forward``, or
        # ``finish`` without a matching ``shares``, is used through its own ``forward``
        if kind.forward is Weighting.forward and (kind.finish is Weighting.finish or kind.shares is not Weighting.shares):
            return w.shares(w.log_unnormalised(rows))
        return w(rows).reshape(-1) / rows.num_rows

    def temperature_columns(self, temps, rows: "int | None" = None) -> tuple[Tensor, Tensor]:
        """A strategy's τ^t, τ^s as float32 scalars or ``[N, 1]`` (checked against ``rows`` when given), detached
        unless the strategy is learnable."""
        tau_t, tau_s = _row_column(temps.teacher, rows, "τ^t"), _row_column(temps.student, rows, "τ^s")
        if not self.temperature.learnable:
            tau_t = tau_t.detach() if tau_t.requires_grad else tau_t
            tau_s = tau_s.detach() if tau_s.requires_grad else tau_s
        return tau_t, tau_s

    def row_factor(self, temps, tau_t: Tensor, tau_s: Tensor, weights: "Tensor | None") -> "Tensor | None":
        """What multiplies each row's divergence: the τ^t·τ^s scale (or the strategy's own) times the weights."""
        factor = None
        if self.scale == "product":
            factor = temps.scale if temps.scale is not None else tau_t * tau_s
            factor = factor.reshape(-1) if factor.dim() else factor
        if weights is not None:
            factor = weights if factor is None else factor * weights
        return factor

    def per_row_divergence(self, student: Tensor, teacher: Tensor, labels: "Tensor | None", tau_t: Tensor,
                           tau_s: Tensor) -> tuple[Tensor, Tensor, "tuple[Tensor, Tensor] | None"]:
        """Per-row divergence ``[N]`` before scale and weights, the teacher's soft-label entropy ``[N, 1]`` (no
        gradient) and, for DKD, its unscaled (TCKD, NCKD) rows."""
        if self.temperature.learnable:
            # the value is unchanged (softmax ignores a per-row shift), but the gradient loses the uniform
            # component that float noise in q − p picks up when divided by a τ carrying its own gradient
            # (a constant student row gives logit standardisation a τ of ~1e-7)
            student = student - student.mean(-1, keepdim=True)
        log_p_t = torch.log_softmax(teacher / tau_t, dim=-1)
        p_t = log_p_t.exp()
        dkd = None
        if self.family == "dkd":
            if labels is None:
                raise ThermoKDError("family 'dkd' needs labels: it splits the target class from the others")
            dkd = dkd_terms(student, teacher, labels, tau_t, tau_s)
            per_row = self.dkd_alpha * dkd[0] + self.dkd_beta * dkd[1]
        elif self.divergence == "kl" and self.check_inputs:
            # inputs are finite, so log p_t is finite and p_t·(…) needs no underflow guard; p_t is shared
            # with the entropy statistic below
            per_row = (p_t * (log_p_t - torch.log_softmax(student / tau_s, dim=-1))).sum(-1)
        else:
            per_row = divergence(log_p_t, torch.log_softmax(student / tau_s, dim=-1), self.divergence)
        with torch.no_grad():
            entropy = -(p_t * log_p_t).sum(-1, keepdim=True)
        return per_row, entropy, dkd

    @staticmethod
    @torch.no_grad()
    def pack_row_stats(tau_t: Tensor, tau_s: Tensor, entropy: Tensor, weights: "Tensor | None",
                       weights_are_shares: bool = False) -> tuple[list[str], Tensor]:
        """Every per-row statistic in one table: two reductions instead of a dozen. ``weights_are_shares``: the
        weights are divided by the number of rows (their std is scaled back in :meth:`_to_floats`)."""
        n = entropy.shape[0]  # (under no_grad: nothing here needs a detach)
        columns = [tau if tau.shape == (n, 1) else tau.expand(n, 1) for tau in (tau_t, tau_s)] + [entropy]
        if weights is not None:
            columns.append(weights.view(n, 1))
        table = torch.cat(columns, dim=1)
        std, mean = torch.std_mean(table, dim=0, correction=0)
        low, high = torch.aminmax(table[:, 0])
        packed = torch.cat([mean[:3], std[2:], low.view(1), high.view(1)])
        names = ["tau_teacher_mean", "tau_student_mean", "teacher_entropy_mean", "teacher_entropy_std"]
        names += [("weight_share_std" if weights_are_shares else "weight_std")] if weights is not None else []
        names += ["tau_teacher_min", "tau_teacher_max"]
        return names, packed

    def _chunked(self, s: Tensor, t: Tensor, labels: "Tensor | None", keep: "Tensor | None", n: int,
                 progress: "Progress | None") -> LossOutput:
        """The loss of ``forward`` evaluated ``chunk_size`` rows at a time (see ``thermokd.chunked``)."""
        from .chunked import Batch, ChunkedObjective, temperatures_by_chunk

        index = None if keep is None else keep.nonzero().squeeze(1)
        if labels is not None and index is not None:
            labels = labels[index]
        self._check_labels(labels, s.shape[-1])
        if labels is None and self.ce_weight and self.kd_weight == 0:
            raise ThermoKDError("a cross-entropy-only loss needs labels")
        batch = Batch(s, t.detach(), index, labels, n, self.chunk_size, progress)
        stats: dict[str, Tensor] = {}
        kd_coef = 0.0
        tau_t = tau_s = factor = weights = None
        if self.kd_weight:
            if self.family == "dkd" and labels is None:
                raise ThermoKDError("family 'dkd' needs labels: it splits the target class from the others")
            temps, tau_t, tau_s, weights = temperatures_by_chunk(self, batch)
            factor = self.row_factor(temps, tau_t, tau_s, weights)
            stats.update(temps.stats)
            kd_coef = self.kd_weight * self._warmup(progress)
        else:
            tau_t = tau_s = s.new_ones((), dtype=torch.float32)
        out: dict = {}
        total = ChunkedObjective.apply(s, tau_t, tau_s, factor, self, batch, kd_coef, out)
        terms: dict[str, Tensor] = {}
        if labels is not None:
            terms["ce"] = out["ce"]
        packed: tuple[list[str], Tensor] = ([], s.new_zeros(0, dtype=torch.float32))
        if self.kd_weight:
            terms["kd"] = out["kd"]
            if self.family == "dkd":
                terms["tckd"], terms["nckd"] = out["tckd"], out["nckd"]
            packed = self.pack_row_stats(tau_t, tau_s, out["entropy"], weights)
        stats["loss"] = total
        stats.update(terms)
        return LossOutput(total, terms, self._to_floats(stats, packed, n), progress)

    def _warmup(self, progress: "Progress | None") -> float:
        """DKD's ramp ``min(e/warmup, 1)`` with the 1-based epoch e; 1 for the KD family."""
        if self.family != "dkd" or self.dkd_warmup == 0:
            return 1.0
        p = require_progress(progress, f"DKD's {self.dkd_warmup}-epoch warm-up (dkd_warmup=0 turns it off)")
        return min((p.epoch + 1) / self.dkd_warmup, 1.0)

    @staticmethod
    def _to_floats(stats: dict[str, Tensor], packed: tuple[list[str], Tensor], num_rows: int) -> dict[str, float]:
        keys = list(stats) + packed[0]
        with torch.no_grad():  # one device sync for all statistics
            values = torch.cat([torch.stack([stats[k].detach().float() for k in stats]), packed[1]]).tolist()
        out = dict(zip(keys, values))
        if "weight_share_std" in out:
            out["weight_std"] = out.pop("weight_share_std") * num_rows
        if "tau_teacher_mean" in out and "weight_std" not in out:
            out["weight_std"] = 0.0
        out["rows"] = float(num_rows)
        return out

    @torch.no_grad()
    def prepare(self, teacher_logits: Tensor) -> None:
        """Optional, before training: let the strategy see the teacher's logits on the training set (CIST with
        ``ratio="auto"`` calibrates ρ on all of them rather than on the first batch)."""
        self.temperature.prepare(teacher_logits)

    def observe(self, output: LossOutput) -> None:
        """Call after the optimiser step: stateful strategies (DTS) and weightings update from this batch's output."""
        self.temperature.observe(output)
        if self.weighting is not None:
            self.weighting.observe(output)

    def extra_repr(self) -> str:
        return (f"family={self.family}, divergence={self.divergence}, ce_weight={self.ce_weight:g}, "
                f"kd_weight={self.kd_weight:g}, scale={self.scale}"
                + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else ""))
