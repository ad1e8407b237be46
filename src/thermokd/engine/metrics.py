"""JSON-lines metrics (always) and TensorBoard scalars (when the package is installed)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricLogger:
    """Appends one JSON object per line to ``path``. ``truncate(offset)`` drops lines written after a
    checkpoint, so a resumed run's log matches an uninterrupted one."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(path.parent / "tensorboard"))
            except Exception:  # TensorBoard is optional; JSON lines are the record
                self._tb = None

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, offset: int) -> None:
        if self.enabled and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(offset)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            step = record.get("step", record.get("epoch", 0))
            kind = record.get("type", "step")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
