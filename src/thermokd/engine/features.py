"""Outputs of a teacher's frozen encoder, computed once per data split and cached on disk.

A teacher that has a frozen pretrained encoder (``PretrainedTextClassifier`` with ``finetune_layers=0``) gets
its encoder's output for every training and test document here, before its head is trained; afterwards its
``forward`` looks documents up instead of running the encoder. The cache file is named by a digest of the
encoder (weights and pooling) and of the exact inputs, so any change to either computes new features.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ..data.cache import default_cache_dir, digest, load_tensors, save_tensors


def caches_features(model: nn.Module) -> bool:
    """Whether ``model`` has a frozen encoder whose outputs the engine should cache."""
    from ..models.pretrained import PretrainedTextClassifier

    return isinstance(model, PretrainedTextClassifier) and model.frozen


def features_path(model: nn.Module, x: Tensor, cache_dir: "Path | None" = None) -> Path:
    return (cache_dir or default_cache_dir()) / "features" / f"{digest(model.fingerprint(), x)}.safetensors"


def cache_frozen_features(model: nn.Module, splits: dict[str, Tensor], accelerator, cache_dir: "Path | None" = None,
                          progress_bar: bool = True) -> dict[str, Path]:
    """Fill ``model.memo`` with the frozen encoder's outputs on each split (read from the cache, or computed by
    the main process and written there). Returns the cache file of each split; nothing for other models."""
    if not caches_features(model):
        return {}
    model.to(accelerator.device)
    paths = {}
    for name, x in splits.items():
        path = paths[name] = features_path(model, x, cache_dir)
        if accelerator.is_main_process and load_tensors(path) is None:
            features = model.encode_all(x, progress_bar=progress_bar, description=f"teacher features ({name})")
            save_tensors(path, {"features": features}, {"split": name, "rows": str(x.shape[0])})
        accelerator.wait_for_everyone()
        stored = load_tensors(path)
        if stored is None:
            raise RuntimeError(f"the main process did not write {path}")  # only with a broken shared disk
        model.memo.add(x, stored[0]["features"])
    return paths
