"""Chunked evaluation of :class:`~thermokd.DistillationLoss`: the same value and gradients, with full-vocabulary
float32 intermediates for at most ``chunk_size`` rows at a time.

For language-model logits ``[B, L, V]`` with a large ``V``, the plain loss holds several float32 copies of the
whole ``[B·L, V]`` block for the backward pass (τ-scaled logits, two log-softmaxes, the teacher's probabilities,
their products). Here the rows are visited twice, a chunk at a time:

1. temperatures (and the weighting's row-local part) per chunk; weights are then normalised over all rows;
2. a custom autograd function computes each chunk's loss *and its gradient* at once and keeps only the gradient
   with respect to the logits (in the logits' own dtype), so the backward pass is a multiplication.

Strategies whose τ carries a gradient (CTKD, logit standardisation) still get it: τ, the scale and the weights
enter the function as inputs, and their gradients are accumulated chunk by chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from .errors import ThermoKDError
from .progress import Progress
from .rows import Rows
from .temperature import Temperatures

if TYPE_CHECKING:
    from .loss import DistillationLoss


@dataclass
class Batch:
    """Flattened logits ``[M, C]`` (views of the caller's tensors, never copied), the valid rows' positions
    (None when every row is valid) and their labels."""

    student: Tensor
    teacher: Tensor
    index: "Tensor | None"
    labels: "Tensor | None"
    num_rows: int
    chunk_size: int
    progress: "Progress | None"

    def spans(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.num_rows, self.chunk_size):
            yield start, min(start + self.chunk_size, self.num_rows)

    def rows_of(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Valid rows ``start:stop`` of a flattened tensor, as float32."""
        part = x[start:stop] if self.index is None else x[self.index[start:stop]]
        return part.float()

    def labels_of(self, start: int, stop: int) -> "Tensor | None":
        return None if self.labels is None else self.labels[start:stop]


def _span(x: "Tensor | None", start: int, stop: int) -> "Tensor | None":
    """A per-row tensor's slice; a scalar (a global τ or scale) is shared by every chunk."""
    return x if x is None or x.dim() == 0 else x[start:stop]


def _join(parts: list["Tensor | None"]) -> "Tensor | None":
    if all(p is None for p in parts):
        return None
    if all(p.dim() == 0 for p in parts):
        return parts[0]  # a global value: the same in every chunk (and for CTKD the same graph)
    return torch.cat([p.expand(1) if p.dim() == 0 else p for p in parts])


def _store(buffer: Tensor, grad: Tensor, index: "Tensor | None", start: int, stop: int) -> None:
    """Write a chunk's gradient into the full ``[M, C]`` buffer (rows ``index[start:stop]`` when rows were
    filtered)."""
    if index is None:
        buffer[start:stop] = grad
    else:
        buffer.index_copy_(0, index[start:stop], grad.to(buffer.dtype))


def check_finite(student: Tensor, teacher: Tensor) -> None:
    """Raise if either logits tensor holds NaN or inf. A finite sum proves every entry finite; the full check runs
    only when it is not (or overflowed)."""
    if not bool(torch.isfinite(student.sum() + teacher.sum())):
        for who, x in (("student", student), ("teacher", teacher)):
            if not bool(torch.isfinite(x).all()):
                raise ThermoKDError(f"{who} logits contain NaN or inf")


def temperatures_by_chunk(loss: "DistillationLoss", batch: Batch
                          ) -> tuple[Temperatures, Tensor, Tensor, "Tensor | None"]:
    """Pass 1: the strategy and the weighting on each chunk; returns the joined temperatures (stats averaged over
    rows), τ^t and τ^s as scalars or ``[N, 1]``, and the weights ``[N]`` (None without a weighting)."""
    strategy = loss.temperature
    if strategy.needs_batch_preparation:
        with torch.no_grad():
            teacher = batch.rows_of(batch.teacher, 0, batch.num_rows)
            if loss.check_inputs:
                check_finite(teacher, teacher)
            strategy.prepare_batch(teacher)
    learn = strategy.learnable and torch.is_grad_enabled()
    taus_t, taus_s, scales, log_ws = [], [], [], []
    stats: dict[str, Tensor] = {}
    for start, stop in batch.spans():
        with torch.set_grad_enabled(learn):  # only a learnable τ needs the graph back to the logits
            student = batch.rows_of(batch.student if learn else batch.student.detach(), start, stop)
            teacher = batch.rows_of(batch.teacher, start, stop)
            if loss.check_inputs:  # before any strategy state (CIST's calibration) can see a NaN
                check_finite(student.detach(), teacher)
            rows = Rows(student, teacher, batch.labels_of(start, stop), batch.progress)
            temps = strategy(rows)
            tau_t, tau_s = loss.temperature_columns(temps, stop - start)
        taus_t.append(tau_t)
        taus_s.append(tau_s)
        scales.append(temps.scale)
        for key, value in temps.stats.items():  # strategies report means over rows: weight by chunk size
            stats[key] = stats.get(key, 0.0) + value.detach() * ((stop - start) / batch.num_rows)
        if loss.weighting is not None:
            with torch.no_grad():
                log_ws.append(loss.weighting.log_unnormalised(rows))
    weights = None
    if loss.weighting is not None:
        with torch.no_grad():
            weights = loss.weighting.finish(torch.cat(log_ws))
    joined = Temperatures(teacher=_join(taus_t), student=_join(taus_s), scale=_join(scales), stats=stats)
    return joined, _join(taus_t), _join(taus_s), weights


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_c a·b`` per row as a batched matrix product: no ``[n, C]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@torch.no_grad()
def kl_chunk(batch: Batch, student: Tensor, start: int, stop: int, tau_t: Tensor, tau_s: Tensor,
             factor: "Tensor | None", kd_coef: float, ce_weight: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward KL (plus CE) for rows ``start:stop`` with the gradient in closed form, ``∂/∂z^s = coef·f·(q − p)/τ^s``
    (``+ ce_weight·(σ(z^s) − onehot)/N``). Buffers are dropped as soon as they are used and reused in place: at
    most four ``[chunk, C]`` float32 buffers at once, against eight or so for autograd. Returns (gradient,
    Σ f·KL, Σ CE, teacher entropy ``[chunk, 1]``)."""
    n = batch.num_rows
    scaled = batch.rows_of(batch.teacher, start, stop).div_(tau_t) if batch.index is not None \
        else batch.rows_of(batch.teacher, start, stop) / tau_t  # a gathered copy may be divided in place
    log_p = torch.log_softmax(scaled, dim=-1)
    del scaled
    p = log_p.exp()
    entropy = -_row_dot(p, log_p)
    del log_p
    logits = batch.rows_of(student, start, stop)
    log_q = torch.log_softmax(logits / tau_s, dim=-1)
    kl = -entropy - _row_dot(p, log_q)
    grad = log_q.exp_().sub_(p)  # q − p, in log_q's buffer
    del p, log_q
    coef = kd_coef / n / tau_s
    if factor is not None:
        coef = coef * (factor.unsqueeze(-1) if factor.dim() else factor)
    grad.mul_(coef)
    ce = grad.new_zeros(())
    labels = batch.labels_of(start, stop)
    if labels is not None:
        log_softmax = torch.log_softmax(logits, dim=-1)
        del logits
        column = labels.unsqueeze(-1)
        ce = -log_softmax.gather(-1, column).sum()
        if ce_weight:
            soft = log_softmax.exp_().scatter_add_(-1, column, torch.full_like(column, -1.0, dtype=grad.dtype))
            grad.add_(soft, alpha=ce_weight / n)
    weighted = kl if factor is None else kl * factor
    return grad, weighted.sum(), ce, entropy.unsqueeze(-1)


class ChunkedObjective(torch.autograd.Function):
    """Pass 2: ``(kd_coef·Σ_i f_i·D_i + ce_weight·Σ_i CE_i) / N`` chunk by chunk, with the gradients computed in
    the same sweep. Side results (terms, entropies) are left in ``out``."""

    @staticmethod
    def forward(ctx, student: Tensor, tau_t: Tensor, tau_s: Tensor, factor: "Tensor | None",
                loss: "DistillationLoss", batch: Batch, kd_coef: float, out: dict) -> Tensor:
        need_t, need_s, need_f = ctx.needs_input_grad[1:4]
        grad_student = torch.zeros_like(student)
        grad_t = torch.zeros_like(tau_t) if need_t else None
        grad_s = torch.zeros_like(tau_s) if need_s else None
        grad_f = torch.zeros_like(factor) if need_f else None
        n = batch.num_rows
        sums = {"kd": 0.0, "ce": 0.0, "tckd": 0.0, "nckd": 0.0}
        entropies = []
        closed_form = (kd_coef and loss.family == "kd" and loss.divergence == "kl" and loss.check_inputs
                       and not loss.temperature.learnable and not (need_t or need_s or need_f))
        if closed_form:
            for start, stop in batch.spans():
                grad, kd, ce, entropy = kl_chunk(batch, student.detach(), start, stop, _span(tau_t, start, stop),
                                                 _span(tau_s, start, stop), _span(factor, start, stop), kd_coef,
                                                 loss.ce_weight)
                _store(grad_student, grad, batch.index, start, stop)
                sums["kd"] += kd
                sums["ce"] += ce
                entropies.append(entropy)
        with torch.enable_grad():
            for start, stop in ([] if closed_form else batch.spans()):
                s = batch.rows_of(student.detach(), start, stop).requires_grad_()
                t = batch.rows_of(batch.teacher, start, stop)
                if loss.check_inputs and not kd_coef:  # otherwise pass 1 has checked these rows
                    check_finite(s.detach(), t)
                labels = batch.labels_of(start, stop)
                leaves = [s]
                objective = s.new_zeros(())
                if kd_coef:
                    tt, ts = _span(tau_t, start, stop).detach(), _span(tau_s, start, stop).detach()
                    f = None if factor is None else _span(factor, start, stop).detach()
                    for leaf, need in ((tt, need_t), (ts, need_s), (f, need_f)):
                        if need:
                            leaf.requires_grad_()
                            leaves.append(leaf)
                    per_row, entropy, dkd = loss.per_row_divergence(s, t, labels, tt, ts)
                    weighted = per_row if f is None else per_row * f
                    objective = objective + kd_coef * weighted.sum()
                    sums["kd"] += weighted.detach().sum()
                    entropies.append(entropy)
                    if dkd is not None:
                        scale = (tt * ts).detach().reshape(-1) if loss.scale == "product" else 1.0
                        sums["tckd"] += (dkd[0].detach() * scale).sum()
                        sums["nckd"] += (dkd[1].detach() * scale).sum()
                if labels is not None:
                    ce = -torch.log_softmax(s, dim=-1).gather(-1, labels.unsqueeze(-1)).sum()
                    objective = objective + loss.ce_weight * ce
                    sums["ce"] += ce.detach()
                grads = torch.autograd.grad(objective / n, leaves, allow_unused=True)
                _store(grad_student, grads[0] if grads[0] is not None else torch.zeros_like(s), batch.index,
                       start, stop)
                rest = iter(grads[1:])
                for acc, need, full in ((grad_t, need_t, tau_t), (grad_s, need_s, tau_s), (grad_f, need_f, factor)):
                    if need:
                        g = next(rest)
                        if g is None:
                            continue
                        if full.dim() == 0:
                            acc += g
                        else:
                            acc[start:stop] += g
        ctx.saved = (grad_student, grad_t, grad_s, grad_f)
        out.update({k: v / n if torch.is_tensor(v) else torch.zeros((), device=student.device)
                    for k, v in sums.items()})
        out["entropy"] = torch.cat(entropies) if entropies else None
        total = (kd_coef * sums["kd"] + loss.ce_weight * sums["ce"]) / n
        return total if torch.is_tensor(total) else torch.zeros((), device=student.device)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.saved is None:
            raise ThermoKDError("a chunked DistillationLoss supports one backward pass per forward "
                                "(retain_graph=True with a second backward is not possible)")
        grad_student, grad_t, grad_s, grad_f = ctx.saved
        ctx.saved = None
        grad_student.mul_(grad_output.to(grad_student.dtype))  # in place: no second [M, C] buffer
        scaled = [None if g is None else g * grad_output for g in (grad_t, grad_s, grad_f)]
        return (grad_student, *scaled, None, None, None, None)
