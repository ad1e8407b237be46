"""Atomic, code-free checkpoints.

Layout under ``DIR/checkpoints/``: one folder per checkpoint holding ``weights.safetensors`` (model and loss
state, RNG state), ``optimizer.pt`` (tensors and plain values only, read with ``torch.load(weights_only=True)``)
and ``state.json``; ``latest.json`` names the newest complete one. A checkpoint is written into a temporary
folder, renamed into place, and only then made ``latest`` (by an atomic file replace), so a crash at any
moment leaves the previous checkpoint loadable. Loading never executes code from the files.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ThermoKDError

LATEST = "latest.json"


@dataclass
class Checkpoint:
    tensors: dict[str, Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    path: Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(root: Path, name: str, tensors: dict[str, Tensor], optimizer: dict[str, Any],
                    state: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint ``name`` under ``root`` atomically, make it the latest, keep the newest ``keep``."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".tmp-{name}"
    for stale in root.glob(".tmp-*"):  # left by a write that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_json_atomic(root / LATEST, {"name": name})
    previous = sorted(p for p in root.iterdir() if p.is_dir() and p.name != name and not p.name.startswith("."))
    for old in previous[: max(0, len(previous) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest(root: Path) -> "Checkpoint | None":
    """The latest complete checkpoint under ``root``, or None if there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["name"]
    return load_checkpoint(root / name)


def load_checkpoint(path: Path) -> Checkpoint:
    """Load one checkpoint folder; refuses anything that is not plain tensors and values."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "weights.safetensors"))
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError as exc:
        raise ThermoKDError(f"checkpoint {path} is incomplete: {exc.filename} is missing") from None
    except (pickle.UnpicklingError, RuntimeError, ValueError, json.JSONDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ThermoKDError(f"refusing to load checkpoint {path}: it is not plain tensors and values ({first})") from None
    return Checkpoint(tensors=tensors, optimizer=optimizer, state=state, path=path)
