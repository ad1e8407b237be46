"""Outputs of a teacher's frozen encoder, computed once per data split and cached on disk.

A teacher that has a frozen pretrained encoder (``PretrainedTextClassifier`` with ``finetune_layers=0``) gets
its encoder's output for every training and test document here, before its head is trained; afterwards its
``forward`` looks documents up instead of running the encoder. The cache file is named by a digest of the
encoder (weights and pooling) and of the exact inputs, so any change to either computes new features.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..data.cache import default_cache_dir
from ..errors import ThermoKDError
from ..files import FORMAT, cached_tensors, digest, save_tensors


def caches_features(model: nn.Module) -> bool:
    """Whether ``model`` has a frozen encoder whose outputs the engine should cache."""
    from ..models.pretrained import PretrainedTextClassifier

    return isinstance(model, PretrainedTextClassifier) and model.frozen


def features_key(model: nn.Module, x: Tensor) -> str:
    """What the features depend on: the encoder (weights and pooling), the exact inputs and the file layout."""
    return digest("features", FORMAT, model.fingerprint(), x)


def features_path(model: nn.Module, x: Tensor, cache_dir: "Path | None" = None) -> Path:
    return (cache_dir or default_cache_dir()) / "features" / f"{features_key(model, x)}.safetensors"


def cache_frozen_features(model: nn.Module, splits: dict[str, Tensor], accelerator, cache_dir: "Path | None" = None,
                          progress_bar: bool = True) -> dict[str, Path]:
    """Fill ``model.memo`` with the frozen encoder's outputs on each split (read from the cache, or computed by
    the main process and written there). Returns the cache file of each split; nothing for other models."""
    if not caches_features(model):
        return {}
    model.to(accelerator.device)
    paths = {}
    for name, x in splits.items():
        key = features_key(model, x)
        path = paths[name] = features_path(model, x, cache_dir)
        if accelerator.is_main_process and cached_tensors(path, key) is None:
            features = model.encode_all(x, progress_bar=progress_bar, description=f"teacher features ({name})")
            save_tensors(path, {"features": features}, {"split": name, "rows": str(x.shape[0])}, key=key)
        accelerator.wait_for_everyone()
        stored = cached_tensors(path, key)
        if stored is None:
            raise ThermoKDError(f"the main process did not write {path}")  # only with a broken shared disk
        model.memo.add(x, stored[0]["features"])
    fit = getattr(model, "fit_training_inputs", None)
    if fit is not None and "train" in splits:  # statistics a model keeps of its inputs (IDF) come from training only
        fit(splits["train"].to(accelerator.device))
    return paths
