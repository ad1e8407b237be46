"""Chunked evaluation of :class:`~thermokd.DistillationLoss`: the same value and gradients, with full-vocabulary
float32 intermediates for at most ``chunk_size`` rows at a time.

The rows come from a *source*: flattened logits (:class:`LogitRows`, the ``chunk_size`` option), or hidden states
and a linear head (:class:`LinearRows`, the fused path, which never builds the ``[N, V]`` logits at all). They
are visited twice, a chunk at a time:

1. temperatures (and the weighting's row-local part) per chunk; weights are then normalised over all rows
   (skipped when the strategy's τ is row-local and there is no weighting: then it is computed in pass 2);
2. :func:`sweep` computes each chunk's loss *and its gradient* at once (in closed form for forward KL, else by
   autograd on the chunk) and hands the gradient to the source, which keeps only what its inputs need (the
   logits' gradient, or the hidden states' and head's). :func:`attach` then ties the value to those gradients,
   so the backward pass is a multiplication.

Strategies whose τ carries a gradient (CTKD, logit standardisation) still get it: τ, the scale and the weights
enter as inputs, and their gradients are accumulated chunk by chunk.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .checks import check_finite
from .errors import ThermoKDError
from .objective import RowObjective, log_softmax
from .progress import Progress
from .rows import Rows, stand_in
from .temperature import Temperatures
from .temperature.base import check_tau_shape

if TYPE_CHECKING:
    from .temperature import TemperatureStrategy
    from .weighting import Weighting


def _pick(x: Tensor, index: "Tensor | None", start: int, stop: int) -> Tensor:
    return x[start:stop] if index is None else x[index[start:stop]]


class GradientSink(Protocol):
    def add(self, grad: Tensor, start: int, stop: int) -> None: ...
    def grads(self) -> tuple["Tensor | None", ...]: ...


class RowSource(Protocol):
    """Valid rows ``start:stop`` of one model's logits, as float32 ``[n, C]``."""

    def rows(self, start: int, stop: int) -> Tensor: ...


@dataclass(frozen=True)
class LogitRows:
    """Flattened logits ``[M, C]`` (a view of the caller's tensor) and the valid rows' positions (None: all)."""

    logits: Tensor
    index: "Tensor | None" = None

    def rows(self, start: int, stop: int) -> Tensor:
        return _pick(self.logits.detach(), self.index, start, stop).float()

    def rows_with_graph(self, start: int, stop: int) -> Tensor:
        return _pick(self.logits, self.index, start, stop).float()

    def inputs(self) -> tuple[Tensor, ...]:
        return (self.logits,)

    def sink(self) -> "GradientSink":
        return _LogitGradients(self)


class _LogitGradients:
    def __init__(self, source: LogitRows) -> None:
        self.source, self.buffer = source, torch.zeros_like(source.logits)

    def add(self, grad: Tensor, start: int, stop: int) -> None:
        if self.source.index is None:
            self.buffer[start:stop] = grad
        else:
            self.buffer.index_copy_(0, self.source.index[start:stop], grad.to(self.buffer.dtype))

    def grads(self) -> tuple[Tensor]:
        return (self.buffer,)


@dataclass(frozen=True)
class LinearRows:
    """Hidden states ``[M, H]`` and a linear head (``weight`` ``[C, H]``, ``bias`` ``[C]`` or None): the logits
    ``hidden @ weightᵀ + bias`` are built a chunk at a time, never for all rows."""

    hidden: Tensor
    weight: Tensor
    bias: "Tensor | None" = None
    index: "Tensor | None" = None
    keep: "Tensor | None" = None  # [M] bool with index None: rows that count (the others may hold anything)
    fresh: ClassVar[bool] = True  # rows() returns a new block each call: a consumer may overwrite it

    def rows(self, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            return self.rows_with_graph(start, stop)

    def rows_with_graph(self, start: int, stop: int) -> Tensor:
        return F.linear(self.hidden_rows(start, stop), self.weight, self.bias).float()

    def hidden_rows(self, start: int, stop: int) -> Tensor:
        """The chunk's hidden states; zeros in the rows outside ``keep``: such a row gets a zero gradient, but its
        contribution to the head's (``gᵀ·h``) would still be NaN for a NaN ``h``."""
        h = _pick(self.hidden, self.index, start, stop)
        return h if self.keep is None else torch.where(self.keep[start:stop].unsqueeze(-1), h, 0.0)

    def inputs(self) -> tuple[Tensor, ...]:
        return (self.hidden, self.weight) + ((self.bias,) if self.bias is not None else ())

    def sink(self) -> "GradientSink":
        return _LinearGradients(self)


class _LinearGradients:
    """``∂/∂h = g·W``, ``∂/∂W = Σ gᵀ·h``, ``∂/∂b = Σ g`` from each chunk's logit gradient ``g``."""

    def __init__(self, source: LinearRows) -> None:
        self.source = source
        self.hidden = torch.zeros_like(source.hidden)
        self.weight = torch.zeros_like(source.weight, dtype=torch.float32)
        self.bias = None if source.bias is None else torch.zeros_like(source.bias, dtype=torch.float32)

    @torch.no_grad()
    def add(self, grad: Tensor, start: int, stop: int) -> None:
        src = self.source
        h = src.hidden_rows(start, stop).detach()
        g = grad.to(src.weight.dtype)  # the dtype the plain path's matmul backward would use
        part = g @ src.weight.detach()
        if src.index is None:
            self.hidden[start:stop] = part
        else:
            self.hidden.index_copy_(0, src.index[start:stop], part.to(self.hidden.dtype))
        self.weight.addmm_(g.t().float(), h.float())
        if self.bias is not None:
            self.bias.add_(grad.sum(0))

    def grads(self) -> tuple[Tensor, ...]:
        out = (self.hidden, self.weight.to(self.source.weight.dtype))
        return out + ((self.bias.to(self.source.bias.dtype),) if self.bias is not None else ())


@dataclass(frozen=True)
class TopKRows:
    """A teacher given as a top-k cache (``indices``/``log_probs`` ``[M, k]``, ``rest_log_mass`` ``[M]``,
    ``capture_tau``, ``vocab_size``): dense logits ``τ_c·log p`` on the cached classes and ``τ_c·(log R −
    log(V−k))`` on every other one (the missing classes taken as equally likely, as when re-tempering)."""

    indices: Tensor
    log_probs: Tensor
    rest_log_mass: Tensor
    capture_tau: float
    vocab_size: int
    index: "Tensor | None" = None
    fresh: ClassVar[bool] = True  # rows() builds a new dense block each call

    @torch.no_grad()
    def rows(self, start: int, stop: int) -> Tensor:
        missing = self.vocab_size - self.indices.shape[-1]
        rest = _pick(self.rest_log_mass, self.index, start, stop).float().unsqueeze(-1)
        # with k == V there is no rest; a finite floor keeps the rows finite (no class takes that value)
        fill = rest - math.log(missing) if missing else torch.zeros_like(rest)
        dense = fill.expand(-1, self.vocab_size).clone()
        dense.scatter_(-1, _pick(self.indices, self.index, start, stop),
                       _pick(self.log_probs, self.index, start, stop).float())
        return dense.mul_(self.capture_tau)


@dataclass(frozen=True)
class Plan:
    """What a chunked evaluation visits: both sources, the rows' labels ``[N]``, N, the chunk size.

    ``keep`` (``[N]`` bool) and ``count`` (a float tensor, how many are true): every row is visited, and those
    outside ``keep`` are weighted by zero (``DistillationLoss(sync_free_rows=...)``), so that nothing reads how many
    rows count. Their logits are replaced by a stand-in (a fixed ramp: finite, with a finite τ for every strategy),
    and their labels must be valid class ids (the caller puts 0 there)."""

    student: "LogitRows | LinearRows"
    teacher: RowSource
    labels: "Tensor | None"
    num_rows: int
    chunk_size: int
    progress: "Progress | None"
    keep: "Tensor | None" = None
    count: "Tensor | None" = None

    def spans(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.num_rows, self.chunk_size):
            yield start, min(start + self.chunk_size, self.num_rows)

    def labels_of(self, start: int, stop: int) -> "Tensor | None":
        return None if self.labels is None else self.labels[start:stop]

    @cached_property
    def divisor(self) -> "int | Tensor":
        """What sums over rows are divided by: N, or the count of rows that count (at least 1, a tensor)."""
        return self.num_rows if self.keep is None else self.count.clamp_min(1.0)

    def row_mask(self, start: int, stop: int) -> "Tensor | None":
        """1 for the rows of ``start:stop`` that count, 0 for the others (float32 ``[n]``); None: all count."""
        return None if self.keep is None else self.keep[start:stop].float()

    def stat_share(self, start: int, stop: int) -> float:
        """What a chunk's statistic (a mean over its rows, through ``Rows.mean``) is multiplied by to add up to the
        mean over all rows: the chunk's share of N; 1 with ``keep``, whose chunk shares are already global."""
        return (stop - start) / self.num_rows if self.keep is None else 1.0

    def _stand_in(self, x: Tensor, start: int, stop: int) -> Tensor:
        return x if self.keep is None else stand_in(x, self.keep[start:stop])

    def student_rows(self, start: int, stop: int) -> Tensor:
        return self._stand_in(self.student.rows(start, stop), start, stop)

    def student_rows_with_graph(self, start: int, stop: int) -> Tensor:
        return self._stand_in(self.student.rows_with_graph(start, stop), start, stop)

    def teacher_rows(self, start: int, stop: int) -> Tensor:
        return self._stand_in(self.teacher.rows(start, stop), start, stop)

    def chunk_rows(self, start: int, stop: int, check: bool) -> Rows:
        """The chunk as :class:`Rows` (no gradient), checked finite first if asked."""
        student, teacher = self.student_rows(start, stop), self.teacher_rows(start, stop)
        if check:  # before any strategy state (CIST's calibration) can see a NaN
            check_finite(student, teacher)
        shares = None if self.keep is None else self.row_mask(start, stop).div_(self.divisor)
        return Rows(student, teacher, self.labels_of(start, stop), self.progress, shares)


def _masked(per_row: Tensor, mask: "Tensor | None") -> Tensor:
    """Per-row values ``[n]`` times the chunk's row mask (1: the row counts, 0: it does not; None: all count)."""
    return per_row if mask is None else per_row * mask


def _join(parts: list["Tensor | None"]) -> "Tensor | None":
    if all(p is None for p in parts):
        return None
    if all(p.dim() == 0 for p in parts):
        return parts[0]  # a global value: the same in every chunk (and for CTKD the same graph)
    return torch.cat([p.expand(1) if p.dim() == 0 else p for p in parts])


def _span(x: "Tensor | None", start: int, stop: int) -> "Tensor | None":
    """A per-row tensor's slice; a scalar (a global τ or scale) is shared by every chunk."""
    return x if x is None or x.dim() == 0 else x[start:stop]


def tau_columns(strategy: "TemperatureStrategy", temps: Temperatures, rows: int) -> tuple[Tensor, Tensor]:
    """τ^t, τ^s as float32 scalars or ``[n, 1]``, detached unless the strategy is learnable; a τ that is neither one
    value nor one per row of the ``rows`` given is refused (a shape check: no device read)."""
    out = []
    for tau, who in ((temps.teacher, "τ^t"), (temps.student, "τ^s")):
        check_tau_shape(tau, rows, who)
        tau = tau.float()
        tau = tau if tau.dim() == 0 or (tau.dim() == 2 and tau.shape[1] == 1) else tau.reshape(-1, 1)
        out.append(tau if strategy.learnable or not tau.requires_grad else tau.detach())
    return out[0], out[1]


class ChunkTemperatures(NamedTuple):
    """Pass 1's result: τ^t, τ^s (scalars or ``[N, 1]``), the strategy's scale, the weights ``[N]``, and the
    strategy's statistics (means over rows)."""

    tau_t: Tensor
    tau_s: Tensor
    scale: "Tensor | None"
    weights: "Tensor | None"
    stats: dict[str, Tensor]


def temperatures_by_chunk(strategy: "TemperatureStrategy", weighting: "Weighting | None", plan: Plan,
                          check: bool) -> ChunkTemperatures:
    """Pass 1: the strategy and the weighting on each chunk, weights normalised over all rows."""
    if strategy.needs_batch_preparation:
        with torch.no_grad():
            teacher = torch.cat([plan.teacher_rows(a, b) for a, b in plan.spans()])
            if check:
                check_finite(teacher, teacher)
            strategy.prepare_batch(teacher)
    learn = strategy.learnable and torch.is_grad_enabled()
    taus_t, taus_s, scales, log_ws = [], [], [], []
    stats: dict[str, Tensor] = {}
    for start, stop in plan.spans():
        rows = plan.chunk_rows(start, stop, check)
        if learn:  # τ may depend on the student's logits: keep that graph, rebuilt in backward (checkpoint)
            def temps_of(*_inputs: Tensor, start=start, stop=stop, rows=rows) -> tuple:
                chunk = Rows(plan.student_rows_with_graph(start, stop), rows.teacher, rows.labels, plan.progress,
                             rows.shares)
                t = strategy(chunk)
                return tau_columns(strategy, t, stop - start) + (t.scale, t.stats)
            tau_t, tau_s, scale, chunk_stats = checkpoint(temps_of, *plan.student.inputs(), use_reentrant=False)
        else:
            with torch.no_grad():
                temps = strategy(rows)
            tau_t, tau_s = tau_columns(strategy, temps, stop - start)
            scale, chunk_stats = temps.scale, temps.stats
        taus_t.append(tau_t)
        taus_s.append(tau_s)
        scales.append(scale)
        for key, value in chunk_stats.items():  # strategies report means over rows: weight by chunk size
            stats[key] = stats.get(key, 0.0) + value.detach() * plan.stat_share(start, stop)
        if weighting is not None:
            with torch.no_grad():
                log_ws.append(weighting.log_unnormalised(rows))
    weights = None
    if weighting is not None:
        with torch.no_grad():
            weights = weighting.shares_of(torch.cat(log_ws), plan.keep, plan.count) * plan.divisor
    return ChunkTemperatures(_join(taus_t), _join(taus_s), _join(scales), weights, stats)


class SweepResult(NamedTuple):
    """Pass 2's result: the loss value and its terms (sums divided by N), the teacher's soft-label entropy per
    row ``[N]`` (None without distillation), the strategy's statistics when pass 2 computed τ, and the
    gradients of the loss with respect to the student source's inputs and to τ^t, τ^s, the factor."""

    total: Tensor
    kd: Tensor
    ce: Tensor
    tckd: "Tensor | None"
    nckd: "Tensor | None"
    entropy: "Tensor | None"
    tau_t: "Tensor | None"
    tau_s: "Tensor | None"
    stats: dict[str, Tensor]
    grads: tuple["Tensor | None", ...]


def sweep(objective: RowObjective, plan: Plan, kd_coef: float, ce_weight: float, check: bool,
          temps: "ChunkTemperatures | None", strategy: "TemperatureStrategy | None" = None) -> SweepResult:
    """Pass 2: ``(kd_coef·Σ_i f_i·D_i + ce_weight·Σ_i CE_i) / N`` chunk by chunk, with the gradients.

    ``temps``: pass 1's τ and factor (``factor`` = scale × weights), or None to let ``strategy`` compute τ on
    each chunk here (row-local, not learnable strategies without a weighting: one visit of the rows)."""
    n = plan.divisor
    tau_t = tau_s = factor = None
    if temps is not None:
        tau_t, tau_s = temps.tau_t, temps.tau_s
        factor = RowObjective.factor(objective.row_scale(tau_t, tau_s, temps.scale), temps.weights)
    grad_on = torch.is_grad_enabled()
    sink = plan.student.sink() if grad_on else None
    extras = [x for x in (tau_t, tau_s, factor)]
    needs = [grad_on and x is not None and x.requires_grad for x in extras]
    acc = [torch.zeros_like(x) if need else None for x, need in zip(extras, needs)]
    sums = {"kd": 0.0, "ce": 0.0, "tckd": 0.0, "nckd": 0.0}
    entropies, chunk_taus_t, chunk_taus_s = [], [], []
    stats: dict[str, Tensor] = {}
    closed_form = bool(kd_coef) and objective.closed_form and not any(needs)
    for start, stop in plan.spans():
        labels = plan.labels_of(start, stop)
        if temps is None and kd_coef:
            rows = plan.chunk_rows(start, stop, check)
            with torch.no_grad():
                chunk_temps = strategy(rows)
            tt, ts = tau_columns(strategy, chunk_temps, stop - start)
            f = objective.row_scale(tt, ts, chunk_temps.scale)
            chunk_taus_t.append(tt)
            chunk_taus_s.append(ts)
            for key, value in chunk_temps.stats.items():
                stats[key] = stats.get(key, 0.0) + value.detach() * plan.stat_share(start, stop)
            student, teacher = rows.student, rows.teacher
        else:
            tt, ts, f = _span(tau_t, start, stop), _span(tau_s, start, stop), _span(factor, start, stop)
            student, teacher = plan.student_rows(start, stop), plan.teacher_rows(start, stop)
            if check and (temps is None or not kd_coef):  # otherwise pass 1 has checked these rows
                check_finite(student, teacher)
        if closed_form:
            chunk = objective.kl_chunk(teacher, student, labels, tt, ts, f, kd_coef, ce_weight, n,
                                       fresh_teacher=getattr(plan.teacher, "fresh", False) or plan.keep is not None,
                                       row_mask=plan.row_mask(start, stop))
            if sink is not None:
                sink.add(chunk.grad, start, stop)
            sums["kd"] = sums["kd"] + chunk.kd_sum
            sums["ce"] = sums["ce"] + chunk.ce_sum
            entropies.append(chunk.entropy)
            # drop this chunk's [n, C] blocks now, not when the next chunk's are already built
            rows = student = teacher = chunk = None
            continue
        mask = plan.row_mask(start, stop)  # rows weighted by zero, or None
        with torch.enable_grad():
            s = student.requires_grad_(grad_on)
            leaves = [s]
            objective_sum = s.new_zeros(())
            if kd_coef:
                tt, ts = tt.detach(), ts.detach()
                f = None if f is None else f.detach()
                chunk_extras = [tt, ts, f]
                for i, need in enumerate(needs):
                    if need:
                        chunk_extras[i] = chunk_extras[i].requires_grad_()
                        leaves.append(chunk_extras[i])
                tt, ts, f = chunk_extras
                rd = objective.rows(s, teacher, labels, tt, ts)
                weighted = _masked(rd.per_row if f is None else rd.per_row * f, mask)
                objective_sum = objective_sum + kd_coef * weighted.sum()
                sums["kd"] = sums["kd"] + weighted.detach().sum()
                entropies.append(rd.entropy)
                if rd.dkd is not None:
                    scale = objective.dkd_scale(tt, ts)
                    sums["tckd"] = sums["tckd"] + _masked(rd.dkd[0].detach() * scale, mask).sum()
                    sums["nckd"] = sums["nckd"] + _masked(rd.dkd[1].detach() * scale, mask).sum()
            if labels is not None:
                ce = -_masked(log_softmax(s, objective.precise).gather(-1, labels.unsqueeze(-1)).squeeze(-1),
                              mask).sum()
                objective_sum = objective_sum + ce_weight * ce
                sums["ce"] = sums["ce"] + ce.detach()
            if not grad_on:
                continue
            grads = torch.autograd.grad(objective_sum / n, leaves, allow_unused=True)
        sink.add(grads[0] if grads[0] is not None else torch.zeros_like(s), start, stop)
        rest = iter(grads[1:])
        for i, need in enumerate(needs):
            if need:
                g = next(rest)
                if g is None:
                    continue
                if extras[i].dim() == 0:
                    acc[i] += g
                else:
                    acc[i][start:stop] += g
    zero = torch.zeros((), device=plan.student.inputs()[0].device)
    terms = {k: (v / n if torch.is_tensor(v) else zero) for k, v in sums.items()}
    total = kd_coef * terms["kd"] + ce_weight * terms["ce"]
    total = total if torch.is_tensor(total) else zero
    is_dkd = objective.family == "dkd" and bool(kd_coef)
    return SweepResult(total.detach(), terms["kd"], terms["ce"], terms["tckd"] if is_dkd else None,
                       terms["nckd"] if is_dkd else None, torch.cat(entropies) if entropies else None,
                       _join(chunk_taus_t) if chunk_taus_t else None, _join(chunk_taus_s) if chunk_taus_s else None,
                       stats, (sink.grads() if sink is not None else ()) + tuple(acc))


class _WithGradients(torch.autograd.Function):
    """Ties a value computed without autograd to gradients computed alongside it: backward only scales them."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: list, *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise ThermoKDError("a chunked DistillationLoss supports one backward pass per forward "
                                "(retain_graph=True with a second backward is not possible)")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g in grads:
            if g is None:
                out.append(None)
            elif g.numel() > 1 and g.dim() > 1:
                out.append(g.mul_(grad_output.to(g.dtype)))  # in place: no second [M, C] buffer
            else:
                out.append(g * grad_output.to(g.dtype))
        return (None, None, *out)


def attach(result: SweepResult, plan: Plan, extras: "tuple[Tensor | None, ...]") -> Tensor:
    """The loss value with a backward pass into the student source's inputs and the τ/factor inputs."""
    inputs, grads = [], []
    for x, g in zip(plan.student.inputs() + tuple(extras), result.grads):
        if x is not None and g is not None and x.requires_grad:
            inputs.append(x)
            grads.append(g)
    if not inputs:
        return result.total
    return _WithGradients.apply(result.total, grads, *inputs)
