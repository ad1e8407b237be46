"""The in-memory data every loader returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import ThermoKDError


@dataclass
class Split:
    """Inputs ``x`` (float32 ``[N, C, H, W]`` images or ``[N, D]`` features) and integer labels ``y`` ``[N]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class DataBundle:
    """A train/test pair, normalised with the training split's per-channel mean and std."""

    name: str
    train: Split
    test: Split
    num_classes: int
    default_augment: str = "none"
    class_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def make_bundle(name: str, x_train, y_train, x_test, y_test, *, default_augment: str = "none",
                class_names: "list[str] | None" = None, scale: "float | None" = None) -> DataBundle:
    """Validate arrays (``[N, D]`` features or ``[N, C, H, W]`` images), convert to tensors, normalise."""
    xs, ys = [], []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = torch.tensor(np.asarray(x), dtype=torch.float32)
        if scale is not None:
            x = x / scale
        y = torch.tensor(np.asarray(y)).reshape(-1)
        if x.shape[0] != y.shape[0]:
            raise ThermoKDError(f"{name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels")
        if y.numel() == 0:
            raise ThermoKDError(f"{name}: the {split} split is empty")
        if y.is_floating_point():
            if not torch.equal(y, y.round()):
                raise ThermoKDError(f"{name}: {split} labels must be integer class ids")
        xs.append(x)
        ys.append(y.long())
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise ThermoKDError(f"{name}: train inputs {tuple(xs[0].shape[1:])} and test inputs "
                            f"{tuple(xs[1].shape[1:])} differ in shape")
    low = min(int(y.min()) for y in ys)
    num_classes = max(int(y.max()) for y in ys) + 1
    if low < 0:
        raise ThermoKDError(f"{name}: labels must be >= 0, found {low}")
    if int(ys[1].max()) >= int(ys[0].max()) + 1:
        raise ThermoKDError(f"{name}: the test split has label {int(ys[1].max())}, never seen in training")
    dims = (0,) if xs[0].dim() == 2 else (0, 2, 3)
    mean = xs[0].mean(dim=dims, keepdim=True)
    std = xs[0].std(dim=dims, keepdim=True).clamp_min(1e-6)
    train, test = (Split(((x - mean) / std).contiguous(), y) for x, y in zip(xs, ys))
    return DataBundle(name=name, train=train, test=test, num_classes=num_classes, default_augment=default_augment,
                      class_names=list(class_names or []), mean=mean.flatten().tolist() if xs[0].dim() > 2 else [],
                      std=std.flatten().tolist() if xs[0].dim() > 2 else [])
