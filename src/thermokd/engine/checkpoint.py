"""Atomic, checksummed, code-free checkpoints.

Layout under ``DIR/checkpoints/``: one folder per checkpoint holding ``weights.safetensors`` (model and loss
state, RNG state), ``optimizer.pt`` (tensors and plain values only, read with ``torch.load(weights_only=True)``),
``state.json`` and ``manifest.json`` (the checksum of each of the three, and what the run was made of: its
config, teacher key and data digest); ``latest.json`` names the newest complete one. A checkpoint is written into
a temporary folder, renamed into place, and only then made ``latest`` (by an atomic file replace), so a crash at
any moment leaves the previous checkpoint loadable. Loading verifies every checksum before reading a file and
never executes code from the files.
"""
from __future__ import annotations

import io
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ThermoKDError
from ..files import (digest, ensure_dir, load_tensors, read_json, replace_folder, save_tensors, write_bytes,
                     write_json)

LATEST, MANIFEST = "latest.json", "manifest.json"
FILES = ("weights.safetensors", "optimizer.pt", "state.json")
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(root: Path, name: str, tensors: dict[str, Tensor], optimizer: dict[str, Any],
                    state: dict[str, Any], keep: int = 1, meta: "dict[str, Any] | None" = None) -> Path:
    """Write checkpoint ``name`` under ``root`` atomically, make it the latest, keep the newest ``keep``; ``meta``
    (what the run is made of) goes into the manifest."""
    ensure_dir(root, "checkpoint folder")
    final, tmp = root / name, root / f".tmp-{name}"
    for stale in root.glob(".tmp-*"):  # left by a write that crashed
        shutil.rmtree(stale, ignore_errors=True)
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    save_tensors(tmp / FILES[0], tensors)
    write_bytes(tmp / FILES[1], buffer.getvalue())
    write_json(tmp / FILES[2], state)
    write_json(tmp / MANIFEST, {"files": {f: digest((tmp / f).read_bytes()) for f in FILES}, "meta": meta or {}})
    replace_folder(tmp, final)
    write_json(root / LATEST, {"name": name})
    previous = sorted(p for p in root.iterdir() if p.is_dir() and p.name != name and not p.name.startswith("."))
    for old in previous[: max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_path(root: Path) -> "Path | None":
    """The folder ``latest.json`` names, which must be a checkpoint inside ``root``; None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    remedy = f"delete {root} to start the run afresh"
    record = read_json(pointer, remedy)
    name = record.get("name") if isinstance(record, dict) else None
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not (root / name).is_dir():
        raise ThermoKDError(f"{pointer} names {name!r}, which is not a checkpoint folder inside {root}; {remedy}")
    return root / name


def load_latest(root: Path) -> "Checkpoint | None":
    """The latest complete checkpoint under ``root``, or None if there is none."""
    path = latest_path(root)
    return None if path is None else load_checkpoint(path)


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest: the checksums of its files and the run's ``meta``."""
    remedy = (f"the checkpoint is damaged: delete {path.parent} to start the run afresh "
              "(or restore the folder from a backup)")
    manifest = read_json(path / MANIFEST, remedy)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ThermoKDError(f"{path / MANIFEST} is not a checkpoint manifest; {remedy}")
    return manifest


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder after checking every file against the manifest; refuses anything that is not
    plain tensors and values."""
    remedy = f"delete {path.parent} to start the run afresh (or restore the folder from a backup)"
    manifest = read_manifest(path)
    for name in FILES:
        file = path / name
        if not file.is_file():
            raise ThermoKDError(f"checkpoint {path} is incomplete: {file} is missing; {remedy}")
        if digest(file.read_bytes()) != manifest["files"].get(name):
            raise ThermoKDError(f"checkpoint file {file} is damaged (it does not match its checksum); {remedy}")
    tensors, _ = load_tensors(path / FILES[0], remedy=remedy)
    try:
        optimizer = torch.load(path / FILES[1], map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError):  # torch's own text suggests unsafe loading
        raise ThermoKDError(f"refusing to load checkpoint {path}: {FILES[1]} is not plain tensors and values "
                            f"(thermokd never executes code from a file); {remedy}") from None
    state = read_json(path / FILES[2], remedy)
    if not isinstance(state, dict):
        raise ThermoKDError(f"{path / FILES[2]} is not a checkpoint state; {remedy}")
    meta = manifest.get("meta") if isinstance(manifest.get("meta"), dict) else {}
    return Checkpoint(tensors=tensors, optimizer=optimizer, state=state, path=path, meta=meta)
