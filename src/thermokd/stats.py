"""Loss statistics that stay on the device until someone reads them.

Reading a tensor's value on the host (``.item()``, ``.tolist()``, ``float()``) makes the host wait for every
queued kernel on an accelerator. A training step that nobody logs should never do that, so a loss returns its
statistics as a :class:`LazyStats` mapping: device tensors (some computed only when first asked for), turned
into floats with one transfer the first time a value is read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

Pending = Callable[[], "dict[str, Tensor]"]


class LazyStats(Mapping):
    """A read-only ``{name: float}`` mapping over 0-d device tensors.

    ``tensors``: values already computed; ``pending``: a function that computes the rest (called at most once, on
    the first look at the keys or values); ``floats``: values known on the host (e.g. the row count)."""

    def __init__(self, tensors: "Mapping[str, Tensor] | None" = None, pending: "Pending | None" = None,
                 floats: "Mapping[str, float] | None" = None) -> None:
        self._tensors = dict(tensors or {})
        self._pending = pending
        self._host = dict(floats or {})
        self._values: "dict[str, float] | None" = None

    @classmethod
    def of(cls, values: Mapping) -> "LazyStats":
        """From a mapping of tensors and floats (e.g. sums kept by a trainer)."""
        return cls({k: v for k, v in values.items() if isinstance(v, Tensor)},
                   floats={k: float(v) for k, v in values.items() if not isinstance(v, Tensor)})

    def tensors(self) -> dict[str, Tensor]:
        """Every statistic as a 0-d tensor on the device (host floats as CPU tensors); never syncs."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with torch.no_grad():
                self._tensors.update(pending())
        return self._tensors

    def _floats(self) -> dict[str, float]:
        if self._values is None:
            tensors = self.tensors()
            values = []
            if tensors:
                with torch.no_grad():  # one transfer for every statistic
                    stacked = torch.stack([t.detach().float().reshape(()) for t in tensors.values()])
                    values = stacked.tolist()
            self._values = dict(zip(tensors, values)) | self._host
        return self._values

    def __getitem__(self, key: str) -> float:
        return self._floats()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.tensors()) + [k for k in self._host if k not in self._tensors])

    def __len__(self) -> int:
        return len(set(self.tensors()) | set(self._host))

    def __contains__(self, key: object) -> bool:
        return key in self._host or key in self._tensors or key in self.tensors()

    def device_values(self) -> "dict[str, Tensor | float]":
        """Every statistic without a sync: device tensors, and the host floats as floats."""
        return {**self._host, **self.tensors()}

    def get_tensor(self, key: str) -> Tensor:
        """One statistic as a tensor, without a sync (``KeyError`` when absent)."""
        if key in self._tensors:
            return self._tensors[key]
        if key in self._host and key not in self.tensors():
            return torch.tensor(self._host[key])
        return self.tensors()[key]

    def __repr__(self) -> str:
        return f"LazyStats({dict(self)!r})"


def device_count(stats: Mapping) -> "Tensor | None":
    """``stats["rows"]`` when it was counted on the device (a tensor: ``sync_free_rows``), else None (a host float,
    or absent); reads nothing."""
    value = stats._tensors.get("rows") if isinstance(stats, LazyStats) else stats.get("rows")
    return value if isinstance(value, Tensor) else None


def stat_tensor(stats: Mapping, key: str, device: "torch.device | None" = None) -> Tensor:
    """``stats[key]`` as a float32 tensor, without reading a device value: works for :class:`LazyStats` and for
    plain mappings of floats or tensors (e.g. a trainer's averaged window)."""
    value = stats.get_tensor(key) if isinstance(stats, LazyStats) else stats[key]
    return torch.as_tensor(value, dtype=torch.float32, device=device).detach()


def host_floats(values: Mapping) -> dict[str, float]:
    """A mapping of tensors and floats as plain floats, with one transfer (for logs and checkpoints)."""
    return dict(LazyStats.of(values))


def _table(tau_t: Tensor, tau_s: Tensor, entropy: Tensor, weights: "Tensor | None") -> Tensor:
    """``[N, 3 or 4]``: τ^t, τ^s, the teacher's entropy and the weights per row, detached, float32."""
    n = entropy.shape[0]
    columns = [tau.detach().float().reshape(-1, 1).expand(n, 1) for tau in (tau_t, tau_s)]
    columns.append(entropy.detach().reshape(n, 1))
    if weights is not None:
        columns.append(weights.detach().reshape(n, 1))
    return torch.cat(columns, dim=1)


def _named(mean: Tensor, std: Tensor, low: Tensor, high: Tensor, weights: "Tensor | None") -> dict[str, Tensor]:
    return {"tau_teacher_mean": mean[0], "tau_student_mean": mean[1], "teacher_entropy_mean": mean[2],
            "teacher_entropy_std": std[2], "weight_std": std[3] if weights is not None else std.new_zeros(()),
            "tau_teacher_min": low, "tau_teacher_max": high}


def row_statistics(tau_t: Tensor, tau_s: Tensor, entropy: Tensor, weights: "Tensor | None") -> dict[str, Tensor]:
    """Temperature, teacher-entropy and weight statistics over the valid rows, as device tensors: τ^t, τ^s
    scalars or ``[N, 1]``; ``entropy`` ``[N]``; ``weights`` ``[N]`` with mean 1 (None: all 1)."""
    table = _table(tau_t, tau_s, entropy, weights)
    std, mean = torch.std_mean(table, dim=0, correction=0)
    low, high = torch.aminmax(table[:, 0])
    return _named(mean, std, low, high, weights)


def masked_row_statistics(tau_t: Tensor, tau_s: Tensor, entropy: Tensor, keep: Tensor, count: Tensor,
                          weights: "Tensor | None" = None) -> dict[str, Tensor]:
    """:func:`row_statistics` over the rows of ``keep`` (``[N]`` bool; ``count`` of them, a tensor), with no read
    of the count: the other rows are weighted by zero. Over no rows: means 0, and τ's min and max +inf and −inf (a
    window that adds a batch of no rows keeps its extremes)."""
    table = _table(tau_t, tau_s, entropy, weights)
    share = keep.float().div(count.clamp_min(1.0)).unsqueeze(-1)
    mean = (table * share).sum(0)
    std = ((table - mean).square_() * share).sum(0).sqrt_()
    low = torch.where(keep, table[:, 0], torch.inf).amin()
    high = torch.where(keep, table[:, 0], -torch.inf).amax()
    return _named(mean, std, low, high, weights)
