"""Seeded, stratified subsets of a training split: the validation split carved from it (so that epochs and
settings are chosen without looking at the test split) and the smaller training set a student may be given."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import ThermoKDError
from .bundle import DataBundle, Split, standardisation

DEFAULT_VAL_FRACTION = 0.1


def stratified_indices(labels: Tensor, size: "int | float", seed: int) -> Tensor:
    """Sorted indices of a seeded, stratified sample of ``labels``: ``size`` examples (an int) or that fraction
    of them (a float in (0, 1)). Each class contributes in proportion to its frequency (largest remainders fill
    the total), and a class with at least two examples keeps at least one outside the sample."""
    y = labels.cpu().numpy()
    n = y.shape[0]
    total = int(round(size * n)) if isinstance(size, float) else int(size)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * (total / n)
    take = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - take), kind="stable")[:total - int(take.sum())]:
        take[i] += 1
    take = np.minimum(take, np.maximum(counts - 1, 0))  # never empty a class from the remaining part
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return torch.from_numpy(np.sort(np.concatenate(chosen)).astype(np.int64))


def split_off(split: Split, index: Tensor) -> tuple[Split, Split]:
    """``split`` divided into (the rows not in ``index``, the rows in ``index``)."""
    keep = torch.ones(len(split), dtype=torch.bool)
    keep[index] = False
    return Split(split.x[keep], split.y[keep]), Split(split.x[index], split.y[index])


def with_validation(bundle: DataBundle, fraction: float = DEFAULT_VAL_FRACTION, seed: int = 0) -> DataBundle:
    """``bundle`` with a validation split: the one its files provide, else a seeded, stratified ``fraction`` of
    the training split (removed from training). ``fraction=0`` carves nothing (then a run has no validation split
    and keeps its last epoch)."""
    if bundle.val is not None or fraction == 0:
        return bundle
    if not 0.0 < fraction < 1.0:
        raise ThermoKDError(f"data.val_fraction must be in [0, 1), got {fraction!r}")
    index = stratified_indices(bundle.train.y, float(fraction), seed)
    if index.numel() == 0:
        raise ThermoKDError(f"{bundle.name}: data.val_fraction={fraction} of {len(bundle.train)} training examples "
                            "leaves an empty validation split; raise it")
    bundle.train, bundle.val = split_off(bundle.train, index)
    _restandardise(bundle)
    return bundle


def _restandardise(bundle: DataBundle) -> None:
    """Normalise again with the statistics of the remaining training split, as if the validation rows had never
    been training data (token ids are left alone)."""
    if bundle.is_text or not bundle.mean:
        return
    mean, std = standardisation(bundle.train.x)
    for split in (bundle.train, bundle.val, bundle.test):
        split.x = ((split.x - mean) / std).contiguous()
    old_mean, old_std = torch.tensor(bundle.mean), torch.tensor(bundle.std)
    bundle.mean = (old_mean + old_std * mean.flatten()).tolist()  # (raw - mean') / std' reproduces x
    bundle.std = (old_std * std.flatten()).tolist()


def student_subset(labels: Tensor, size: int, seed: int) -> "Tensor | None":
    """Indices of the ``size`` training examples a student sees (seeded, stratified), or None for all of them."""
    if size <= 0 or size >= labels.shape[0]:
        if size > labels.shape[0]:
            raise ThermoKDError(f"data.student_train_size={size} exceeds the {labels.shape[0]} training examples")
        return None
    return stratified_indices(labels, int(size), seed)
