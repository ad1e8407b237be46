"""The interface every temperature strategy implements, and the name registry."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from ..registry import Registry
from ..rows import Rows

if TYPE_CHECKING:
    from ..loss import LossOutput


@dataclass
class Temperatures:
    """What a strategy returns for one batch of ``N`` valid rows.

    ``teacher`` / ``student``: a scalar tensor or ``[N, 1]``. ``scale``: the factor multiplying each row's
    divergence (scalar or ``[N]``); None means the default ``τ^t·τ^s``. ``stats``: extra scalar statistics the
    strategy wants logged (and, for DTS, read back in ``observe``).
    """

    teacher: Tensor
    student: Tensor
    scale: "Tensor | None" = None
    stats: dict[str, Tensor] = field(default_factory=dict)


class TemperatureStrategy(nn.Module):
    """Base class: ``forward(rows) -> Temperatures``. State lives in parameters/buffers (``state_dict``-able).

    ``learnable`` strategies (CTKD) let gradients reach their parameters through τ; for all others the loss
    detaches τ, so the student can never lower its loss by moving its own temperature.
    """

    name: ClassVar[str] = ""
    learnable: ClassVar[bool] = False
    #: τ of a row depends on that row (and the strategy's state) only, never on the other rows of the batch: a
    #: chunked or fused loss may then compute it chunk by chunk in the same visit as the loss
    row_local: ClassVar[bool] = False
    #: 0-d buffers the strategy reads as Python floats (CIST's ρ, a fixed τ), so that no step reads the device:
    #: the float is the value used, the buffer carries it in ``state_dict``. The float follows :meth:`set_float`
    #: (calibration), an assigned tensor and ``load_state_dict``, and nothing else: a write in place to the buffer
    #: (``fill_``) is not seen, because noticing one needs a device read per step or torch's private counters.
    host_floats: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in type(self).host_floats:  # a new tensor assigned to the buffer: read it once
            self._read_host_float(name)

    def host_float(self, name: str) -> float:
        """The buffer ``name`` (one of :attr:`host_floats`) as a Python float; no device read."""
        return self.__dict__["_host_floats"][name]

    def set_float(self, name: str, value: float) -> float:
        """Write ``value`` to the buffer ``name`` and its float (rounded to the buffer's dtype, as a checkpoint
        would hold it); returns that float. A fill kernel on the device, no wait for it."""
        buffer = self._buffers[name]
        exact = float(torch.tensor(float(value), dtype=buffer.dtype))  # a host tensor: the rounding without a sync
        buffer.fill_(exact)
        self.__dict__.setdefault("_host_floats", {})[name] = exact
        return exact

    def refresh_host_floats(self) -> None:
        """Read every host float from its buffer again (one device read each): after the buffers were written in
        place by someone else, e.g. a broadcast from another process."""
        for name in type(self).host_floats:
            self._read_host_float(name)

    def _read_host_float(self, name: str) -> None:
        buffer = self._buffers.get(name)
        if buffer is not None:  # the one device read: at construction, assignment or load, never per step
            self.__dict__.setdefault("_host_floats", {})[name] = float(buffer)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in type(self).host_floats:
            incoming, buffer = state_dict.get(prefix + name), self._buffers.get(name)
            if isinstance(incoming, Tensor) and buffer is not None and incoming.numel() == 1:
                # the value as loaded, read where it came from (a checkpoint's host tensor): no device read
                self.__dict__.setdefault("_host_floats", {})[name] = float(incoming.detach().to(buffer.dtype))
            else:
                self._read_host_float(name)

    def forward(self, rows: Rows) -> Temperatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, teacher_logits: Tensor) -> None:
        """Called once before training with the teacher's logits on the training set (``[..., C]``)."""

    @property
    def needs_batch_preparation(self) -> bool:
        """Whether a chunked loss must call :meth:`prepare_batch` before this batch (False for most)."""
        return False

    def prepare_batch(self, teacher: Tensor) -> None:
        """Called by a chunked loss with every valid teacher row ``[N, C]`` of the batch before it calls
        ``forward`` chunk by chunk, so that batch-level set-up (CIST's first-batch calibration) sees all rows."""

    def observe(self, output: "LossOutput") -> None:
        """Called after the optimiser step with the batch's output; stateful strategies update here."""

    def temperatures(self, student_logits: Tensor, teacher_logits: Tensor, labels: "Tensor | None" = None,
                     progress=None) -> Temperatures:
        """Convenience for inspection: temperatures of ``[N, C]`` logits without building a loss."""
        with torch.no_grad():
            return self(Rows(student_logits.float(), teacher_logits.float(), labels, progress))


# the largest τ whose square (the KD loss's τ² factor) is still finite in float32
TAU_LIMIT = math.sqrt(torch.finfo(torch.float32).max)


def check_positive(name: str, value: float) -> float:
    """A temperature-like value: a finite number > 0 whose square is finite in float32."""
    if not value > 0 or not math.isfinite(float(value)) or float(value) >= TAU_LIMIT:
        raise ThermoKDError(f"{name} must be > 0 and below {TAU_LIMIT:.3g} (so that its square is finite in "
                            f"float32), got {value!r}")
    return float(value)


def check_tau_shape(tau: object, rows: int, who: str = "τ") -> None:
    """A strategy's τ must be a tensor holding one value or one per row (scalar, ``[N]`` or ``[N, 1]``)."""
    if not isinstance(tau, Tensor):
        raise ThermoKDError(f"a temperature strategy returned {who} of type {type(tau).__name__}; expected a tensor")
    if tau.numel() == 1 and tau.dim() <= 2:
        return
    if tuple(tau.shape) not in ((rows,), (rows, 1)):
        raise ThermoKDError(f"a temperature strategy returned {who} of shape {tuple(tau.shape)} for {rows} rows; "
                            f"expected a scalar, [{rows}] or [{rows}, 1]")


def check_bounds(tau_min: float, tau_max: float) -> tuple[float, float]:
    check_positive("tau_min", tau_min)
    check_positive("tau_max", tau_max)
    if tau_min > tau_max:
        raise ThermoKDError(f"tau_min must be <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
    return float(tau_min), float(tau_max)


def scalar(value: float, like: Tensor) -> Tensor:
    """``value`` as a float32 0-d tensor on ``like``'s device, made by a fill kernel (``torch.tensor(value,
    device=...)`` copies from the host, which waits for the device on CUDA)."""
    return torch.full((), float(value), dtype=torch.float32, device=like.device)


STRATEGIES: "Registry[TemperatureStrategy]" = Registry("temperature strategy")
register = STRATEGIES.register  # class decorator: ``@register("cist")``
names = STRATEGIES.names


def build(name: str, **kwargs) -> TemperatureStrategy:
    """Build a strategy by its command-line name, e.g. ``build("cist", tau0=4.0)``."""
    return STRATEGIES.build(name, **kwargs)
