"""Step bookkeeping shared by every training loop (the engine's and the Hugging Face Trainer's): a window of loss
statistics over micro-batches, steps and logging intervals, and the optimiser parameter group of a loss's
learnable parts.

A window is what ``DistillationLoss.observe`` sees once per optimiser step: like a ``LossOutput`` it has
``stats`` (the window's statistics, device tensors until read) and ``progress`` (of the step's micro-batches).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .progress import Progress
from .stats import LazyStats, host_floats


def _extreme_kind(key: str) -> "str | None":
    return "min" if key.endswith("_min") else "max" if key.endswith("_max") else None


class StatWindow:
    """Statistics of several micro-batches: ``*_min``/``*_max`` keys keep the true extremes, every other key the
    mean over the valid rows (``stats["rows"]``). Values stay device tensors (no sync per micro-batch) until read.
    """

    def __init__(self) -> None:
        self.rows = 0.0
        self.sums: dict[str, list] = {}  # key -> [Σ value·rows, Σ rows]
        self.extremes: dict[str, "Tensor | float"] = {}
        self.progress: "Progress | None" = None

    def add(self, stats: Mapping[str, Any], progress: "Progress | None" = None) -> None:
        """One micro-batch's ``LossOutput.stats`` (and its progress, which the window then reports)."""
        if progress is not None:
            self.progress = progress
        values = stats.device_values() if isinstance(stats, LazyStats) else stats
        rows = values.get("rows", 0.0)
        if isinstance(rows, Tensor):  # counted on the device (sync_free_rows): a batch of no rows weighs 0
            rows = rows.detach().float()
        else:  # a host float: known without reading the device
            rows = float(rows)
            if rows <= 0:  # nothing was measured on a batch without valid rows
                return
        self.rows = self.rows + rows
        for key, value in values.items():
            if key == "rows":
                continue
            value = value.detach() if isinstance(value, Tensor) else float(value)
            if _extreme_kind(key):
                self._extreme(key, value)
            else:
                acc = self.sums.setdefault(key, [0.0, 0.0])
                acc[0] = acc[0] + value * rows
                acc[1] = acc[1] + rows

    def merge(self, other: "StatWindow") -> None:
        self.rows = self.rows + other.rows
        for key, (total, rows) in other.sums.items():
            acc = self.sums.setdefault(key, [0.0, 0.0])
            acc[0] = acc[0] + total
            acc[1] = acc[1] + rows
        for key, value in other.extremes.items():
            self._extreme(key, value)
        if other.progress is not None:
            self.progress = other.progress

    def _extreme(self, key: str, value: "Tensor | float") -> None:
        old = self.extremes.get(key)
        if old is None:
            self.extremes[key] = value
        elif isinstance(old, Tensor) or isinstance(value, Tensor):
            device = (value if isinstance(value, Tensor) else old).device
            pick = torch.minimum if _extreme_kind(key) == "min" else torch.maximum
            self.extremes[key] = pick(torch.as_tensor(old, device=device), torch.as_tensor(value, device=device))
        else:
            self.extremes[key] = min(old, value) if _extreme_kind(key) == "min" else max(old, value)

    @property
    def stats(self) -> LazyStats:
        """The window's statistics, without reading the device (DTS's ``observe`` uses them as tensors)."""
        out = {key: total / rows for key, (total, rows) in self.sums.items()}
        out.update(self.extremes)
        out["rows"] = self.rows
        return LazyStats.of(out)

    def means(self) -> dict[str, float]:
        """The statistics as floats: one transfer, for a log line."""
        return dict(self.stats)

    def on_host(self) -> "StatWindow":
        """A copy holding floats (one transfer), for gathering over processes or a checkpoint."""
        window = StatWindow()
        # row counts may be device tensors too (sync_free_rows): everything comes over in one transfer
        host = host_floats({"rows": self.rows} | {f"total:{k}": total for k, (total, _) in self.sums.items()}
                           | {f"rows:{k}": rows for k, (_, rows) in self.sums.items()}
                           | {f"extreme:{k}": v for k, v in self.extremes.items()})
        window.rows, window.progress = host["rows"], self.progress
        window.sums = {k: [host[f"total:{k}"], host[f"rows:{k}"]] for k in self.sums}
        window.extremes = {k: host[f"extreme:{k}"] for k in self.extremes}
        return window

    def state(self) -> dict[str, Any]:
        """JSON-able floats (one transfer): what a checkpoint keeps of an unfinished window."""
        host = self.on_host()
        return {"rows": host.rows, "sums": host.sums, "extremes": host.extremes}

    @classmethod
    def from_state(cls, state: "Mapping[str, Any] | None") -> "StatWindow":
        window = cls()
        if state:
            window.rows = float(state["rows"])
            window.sums = {k: [float(total), float(rows)] for k, (total, rows) in state["sums"].items()}
            window.extremes = {k: float(v) for k, v in state["extremes"].items()}
        return window

    def gathered(self, accelerator) -> "StatWindow":
        """Every process's window merged (through the host: processes may hold different keys, e.g. one whose
        micro-batches had no valid rows); itself on one process."""
        if accelerator.num_processes == 1:
            return self
        from accelerate.utils import gather_object

        merged = StatWindow()
        for part in gather_object([self.on_host()]):
            merged.merge(part)
        merged.progress = self.progress
        return merged

    def reduced(self, accelerator) -> "StatWindow":
        """Every process's window combined on the device, without reading a value back (every process must hold
        the same keys: a loop whose batches always have valid rows); itself on one process."""
        if accelerator.num_processes == 1:
            return self
        import torch.distributed as dist

        device = accelerator.device
        sums, lows, highs = sorted(self.sums), *(
            sorted(k for k in self.extremes if _extreme_kind(k) == kind) for kind in ("min", "max"))

        def packed(keys, pick):
            return torch.stack([torch.as_tensor(pick(k), dtype=torch.float64, device=device) for k in keys]) \
                if keys else torch.zeros(0, dtype=torch.float64, device=device)

        totals = packed(sums, lambda k: self.sums[k][0])
        low, high = packed(lows, self.extremes.__getitem__), packed(highs, self.extremes.__getitem__)
        for tensor, op in ((totals, dist.ReduceOp.SUM), (low, dist.ReduceOp.MIN), (high, dist.ReduceOp.MAX)):
            dist.all_reduce(tensor, op=op)
        world = accelerator.num_processes  # every process counts the same rows here: the counts stay on the host
        out = StatWindow()
        out.rows = self.rows * world
        out.sums = {k: [t, self.sums[k][1] * world] for k, t in zip(sums, totals.unbind())}
        out.extremes = dict(zip(lows, low.unbind())) | dict(zip(highs, high.unbind()))
        out.progress = self.progress
        return out


def loss_parameter_group(loss: nn.Module, weight_decay: float) -> "dict[str, Any] | None":
    """The optimiser parameter group of a loss's learnable parts (CTKD's θ), or None when it has none.

    Policy, the same in every loop: θ trains with the student's optimiser, learning rate and schedule, and with the
    student's weight decay, as CTKD's reference code does (its temperature module sits in the student's SGD)."""
    params = [p for p in loss.parameters() if p.requires_grad]
    return {"params": params, "weight_decay": weight_decay} if params else None
