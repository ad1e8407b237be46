"""Adapters that plug thermokd's ``DistillationLoss`` into other training frameworks.

``thermokd.integrations.hf.DistillationTrainer``: a ``transformers.Trainer`` subclass (see docs/hf.md).
The adapters import their framework when first used, so ``import thermokd.integrations`` stays light.
"""
from __future__ import annotations

from typing import Any

__all__ = ["DistillationTrainer"]


def __getattr__(name: str) -> Any:
    if name == "DistillationTrainer":
        from .hf import DistillationTrainer  # imports transformers: only when asked for

        return DistillationTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
