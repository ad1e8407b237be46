"""The in-memory data every loader returns."""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..errors import ThermoKDError

_ONE_THREAD = threading.Lock()  # held while standardisation() runs torch on one thread


@dataclass
class Split:
    """Inputs ``x`` (float32 ``[N, C, H, W]`` images or ``[N, D]`` features, or int64 ``[N, L]`` token ids) and
    integer labels ``y`` ``[N]``."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class DataBundle:
    """A train/test pair (and a validation split: see ``data.split.with_validation``), normalised with the
    training split's statistics: ``mean``/``std`` hold one value per
    channel for images and one per feature for feature vectors, so ``(raw - mean) / std`` reproduces ``x``.
    Text holds token ids instead: ``vocab_size`` (> 0 only for text) and ``pad_id`` tell the models about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    default_augment: str = "none"
    class_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    vocab_size: int = 0
    pad_id: int = 0
    val: "Split | None" = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` for images, ``(D,)`` for feature vectors, ``(L,)`` (padded length) for token ids."""
        return tuple(self.train.x.shape[1:])

    @property
    def is_text(self) -> bool:
        return self.vocab_size > 0


def _labels(name: str, split: str, y) -> Tensor:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ThermoKDError(f"{name}: {split} labels must be a vector of class ids, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise ThermoKDError(f"{name}: {split} labels must be integer class ids, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and np.equal(y, np.round(y)).all()):
        raise ThermoKDError(f"{name}: {split} labels must be integer class ids, found a non-integer value")
    return torch.from_numpy(y.astype(np.int64))


def check_label_range(name: str, y: Tensor, num_classes: int) -> None:
    """With the class count inferred as largest label + 1, every class must occur in training: a stray label
    (255 among 0..3, or 10**8) would otherwise silently make a problem of that many classes. One class is legal
    but learns nothing, so it warns."""
    present = torch.unique(y)
    if present.numel() < num_classes:
        missing = num_classes - present.numel()
        top = int(present[-1])
        below = int(present[-2]) if present.numel() > 1 else None
        raise ThermoKDError(f"{name}: training labels run up to {top} but {missing} class id(s) below it never occur "
                            f"(the next largest label is {below}); labels must be 0..K-1 for K classes, so relabel "
                            "the data or remove the outlier")
    if num_classes == 1:
        warnings.warn(f"{name}: the data has one class only, so every model scores 100 % and nothing is learned",
                      stacklevel=3)


def make_bundle(name: str, x_train, y_train, x_test, y_test, *, num_classes: "int | None" = None,
                default_augment: str = "none", class_names: "list[str] | None" = None,
                scale: "float | None" = None, x_val=None, y_val=None) -> DataBundle:
    """Validate arrays (``[N, D]`` features or ``[N, C, H, W]`` images), convert to float32 tensors divided by
    ``scale``, and normalise. ``num_classes`` defaults to the largest training label + 1. ``x_val``/``y_val``:
    a validation split given by the data's files (else one is carved from training later)."""
    xs, ys = [], []
    named = [("train", x_train, y_train), ("test", x_test, y_test)]
    if x_val is not None:
        named.append(("val", x_val, y_val))
    for split, x, y in named:
        if isinstance(x, Tensor):  # numpy's array protocol on a tensor warns (numpy 2's copy keyword): convert here
            x = x.detach().to(device="cpu", dtype=torch.float32, copy=True)
        else:
            x = torch.from_numpy(np.array(x, dtype=np.float32))  # one copy; numpy also fixes a foreign byte order
        if scale is not None:
            x = x / scale
        y = _labels(name, split, y)
        if x.shape[0] != y.shape[0]:
            raise ThermoKDError(f"{name}: {split} has {x.shape[0]} inputs but {y.shape[0]} labels")
        if y.numel() == 0:
            raise ThermoKDError(f"{name}: the {split} split is empty")
        if not torch.isfinite(x).all():
            raise ThermoKDError(f"{name}: {split} inputs hold NaN or infinite values")
        xs.append(x)
        ys.append(y)
    for (split, _, _), x in zip(named[1:], xs[1:]):
        if xs[0].shape[1:] != x.shape[1:]:
            raise ThermoKDError(f"{name}: train inputs {tuple(xs[0].shape[1:])} and {split} inputs "
                                f"{tuple(x.shape[1:])} differ in shape")
    low = min(int(y.min()) for y in ys)
    if low < 0:
        raise ThermoKDError(f"{name}: labels must be >= 0, found {low}")
    if num_classes is None:
        num_classes = int(ys[0].max()) + 1
        for (split, _, _), y in zip(named[1:], ys[1:]):
            if int(y.max()) >= num_classes:
                raise ThermoKDError(f"{name}: the {split} split has label {int(y.max())}, never seen in training")
        check_label_range(name, ys[0], num_classes)
    for (split, _, _), y in zip(named, ys):
        if int(y.max()) >= num_classes:
            raise ThermoKDError(f"{name}: {split} label {int(y.max())} is out of range for {num_classes} classes")
    mean, std = standardisation(xs[0])
    train, test, *val = (Split(((x - mean) / std).contiguous(), y) for x, y in zip(xs, ys))
    return DataBundle(name=name, train=train, test=test, num_classes=num_classes, default_augment=default_augment,
                      class_names=list(class_names or []), mean=mean.flatten().tolist(), std=std.flatten().tolist(),
                      val=val[0] if val else None)


def standardisation(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and std of ``x`` per feature (``[N, D]``) or per channel (``[N, C, H, W]``), kept as broadcastable
    dims; a constant (or single-example) channel gets std 1, so it is only centred and test values off that constant
    stay finite. Reduced on one thread: a multi-threaded float32 sum changes in its last bits with the thread count,
    and the standardised data's digest keys the teacher caches and run identities, which must not depend on it."""
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    with _ONE_THREAD:  # the thread count is the process's: two threads toggling it at once could leave it at 1
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
        finally:
            torch.set_num_threads(threads)
    return mean, torch.where(std > 1e-6, std, torch.ones_like(std))
