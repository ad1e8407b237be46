"""Data sets as in-memory tensors: ``load_data(spec)`` for every ``--data`` value, plus augmentation."""
from __future__ import annotations

from pathlib import Path

from ..errors import ThermoKDError
from .augment import AUGMENTATIONS, make_augment, random_crop, random_flip
from .bundle import DataBundle, Split, make_bundle
from .formats import cifar, digits, fashion_mnist, idx_folder, npz_file, read_idx

DATA_SPECS = ("digits", "fashion-mnist", "idx:DIR", "npz:FILE", "cifar10:DIR", "cifar100:DIR")
_PATH_LOADERS = {"idx": idx_folder, "npz": npz_file, "cifar10": lambda p: cifar(p, 10),
                 "cifar100": lambda p: cifar(p, 100)}


def load_data(spec: str, *, seed: int = 0, root: "str | Path | None" = None) -> DataBundle:
    """Load a data set by its ``--data`` spec; ``seed`` fixes the split where the data has none (digits);
    ``root`` is the folder that relative ``DIR``/``FILE`` paths are resolved against (default: the working
    directory)."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip().lower()
    if not sep:
        if kind == "digits":
            return digits(seed)
        if kind in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
            return fashion_mnist()
    elif kind in _PATH_LOADERS and path.strip():
        where = Path(path.strip()).expanduser()
        return _PATH_LOADERS[kind](Path(root) / where if root is not None else where)
    raise ThermoKDError(f"unknown --data {spec!r}; accepted: {', '.join(DATA_SPECS)} (text sets come later)")


__all__ = ["AUGMENTATIONS", "DATA_SPECS", "DataBundle", "Split", "cifar", "digits", "fashion_mnist", "idx_folder",
           "load_data", "make_augment", "make_bundle", "npz_file", "random_crop", "random_flip", "read_idx"]
