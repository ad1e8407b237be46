"""The one cache of trained teachers (image/text classifiers and language models alike).

An entry is a folder ``CACHE/<kind>/<key>``, the key a digest of everything that determines the teacher (its config,
the content of its data, the formats). It holds ``teacher.safetensors`` (the weights, with their checksum and key
in the metadata) and ``teacher.json`` (the key and what training reported). One process trains an entry while the
others wait on its lock; reading checks the key and the checksum, so a damaged or foreign entry is a one-line error
that says to delete it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .errors import ThermoKDError
from .files import KEY, FolderLock, load_tensors, read_json, save_tensors, write_json

WEIGHTS, INFO = "teacher.safetensors", "teacher.json"


def cache_key(spec: dict[str, Any]) -> str:
    """The key of a teacher: 16 hex digits of the SHA-256 of ``spec`` as canonical JSON (the form every recorded
    teacher key has, so existing entries and the runs that name them stay valid)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tied(model: nn.Module) -> dict[str, str]:
    """Names of parameters that share storage with an earlier one (GPT-2's output layer is its input embedding)
    → that earlier name: saved once, restored into both."""
    first: dict[tuple[int, int], str] = {}
    tied = {}
    for name, value in model.state_dict(keep_vars=False).items():
        if value.numel() == 0:
            continue
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        if ptr in first:
            tied[name] = first[ptr]
        else:
            first[ptr] = name
    return tied


def save_weights(model: nn.Module, path: Path, key: "str | None" = None) -> None:
    """Write ``model``'s weights atomically, tied ones once, with their checksum (and ``key``) in the metadata."""
    tied = _tied(model)
    save_tensors(path, {k: v for k, v in model.state_dict().items() if k not in tied}, key=key)


def load_weights(model: nn.Module, path: Path, key: "str | None" = None, remedy: "str | None" = None,
                 checksum: bool = True) -> None:
    """Load weights written by :func:`save_weights`, verified against their checksum (and ``key``, when the file
    records one), or, with ``checksum=False``, a safetensors file from elsewhere (a user's teacher checkpoint). A
    mismatch names the classifier's class counts or the first tensor that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise ThermoKDError(f"teacher checkpoint not found: {path}")
    remedy = remedy or (f"delete the cache entry {path.parent} and run again to retrain the teacher" if checksum
                        else "point teacher.checkpoint at a safetensors file of this model")
    stored, meta = load_tensors(path, remedy=remedy, checksum=checksum)
    if key is not None and meta.get(KEY, key) != key:  # entries from before keys were recorded carry none
        raise ThermoKDError(f"{path} was made for another input (key {meta.get(KEY)!r}, expected {key!r}); {remedy}")
    tied = _tied(model)
    full: dict[str, Tensor] = {**stored, **{k: stored[v] for k, v in tied.items() if v in stored}}
    expected = model.state_dict()
    head = [k for k, v in expected.items() if k.endswith("weight") and v.dim() == 2][-1:]
    if head and head[0] in full and full[head[0]].shape[0] != expected[head[0]].shape[0]:
        raise ThermoKDError(f"the teacher checkpoint {path} predicts {full[head[0]].shape[0]} classes but the "
                            f"data has {expected[head[0]].shape[0]}")
    for k, v in expected.items():
        if k not in full or full[k].shape != v.shape:
            found = tuple(full[k].shape) if k in full else "nothing"
            raise ThermoKDError(f"the teacher checkpoint {path} does not fit model {type(model).__name__}: "
                                f"{k} should be {tuple(v.shape)}, found {found}; {remedy}")
    unexpected = sorted(set(full) - set(expected))
    if unexpected:
        raise ThermoKDError(f"the teacher checkpoint {path} does not fit model {type(model).__name__}: it has "
                            f"{len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[0]}; {remedy}")
    model.load_state_dict(full)


class TeacherEntry:
    """The cache entry of one teacher: ``cache_dir/kind/cache_key(spec)``."""

    def __init__(self, root: Path, kind: str, spec: dict[str, Any]) -> None:
        self.key = cache_key(spec)
        self.folder = Path(root) / kind / self.key
        self.weights, self.info_path = self.folder / WEIGHTS, self.folder / INFO
        self.remedy = f"delete the cache entry {self.folder} and run again to retrain the teacher"

    def lock(self, echo=None) -> FolderLock:
        """Held while the entry is checked and, if absent, trained: a second process waits, then reads it."""
        return FolderLock(self.folder, "teacher cache entry", wait=True, echo=echo)

    def exists(self) -> bool:
        return self.weights.is_file() and self.info_path.is_file()

    def store(self, model: nn.Module, info: dict[str, Any]) -> None:
        save_weights(model, self.weights, self.key)
        write_json(self.info_path, {"key": self.key, **info})

    def info(self) -> dict[str, Any]:
        """``teacher.json``, checked to be this entry's."""
        stored = read_json(self.info_path, self.remedy)
        if not isinstance(stored, dict) or stored.get("key") != self.key:
            found = stored.get("key") if isinstance(stored, dict) else None
            raise ThermoKDError(f"{self.info_path} was made for another teacher (key {found!r}, expected "
                                f"{self.key!r}); {self.remedy}")
        return stored

    def load(self, model: nn.Module) -> dict[str, Any]:
        """Load the entry's weights into ``model`` (key and checksum checked); returns its ``teacher.json``."""
        info = self.info()
        load_weights(model, self.weights, self.key, self.remedy)
        return info
