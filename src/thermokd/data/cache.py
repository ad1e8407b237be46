"""Where thermokd keeps what it derives once (teachers, tokenised text, encoder features), and how it names it."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def default_cache_dir() -> Path:
    """``$THERMOKD_CACHE``, else ``~/.cache/thermokd``."""
    return Path(os.environ.get("THERMOKD_CACHE", Path.home() / ".cache" / "thermokd"))


def digest(*parts: "bytes | str | Tensor | dict[str, Any]", size: int = 16) -> str:
    """A short hex digest of byte strings, strings, tensors (their values and shape) and JSON-able mappings."""
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        if isinstance(part, Tensor):
            part = part.detach().cpu().contiguous()
            h.update(f"{part.dtype}{tuple(part.shape)}".encode())
            part = part.reshape(-1).view(torch.uint8).numpy().tobytes()  # raw bytes, any dtype (bf16 too)
        elif isinstance(part, dict):
            part = json.dumps(part, sort_keys=True, default=str).encode()
        elif isinstance(part, str):
            part = part.encode()
        h.update(len(part).to_bytes(8, "little"))  # length prefix: ("ab", "c") and ("a", "bc") differ
        h.update(part)
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: "dict[str, str] | None" = None) -> None:
    """Write safetensors atomically (temporary file, then rename), creating the folder."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> "tuple[dict[str, Tensor], dict[str, str]] | None":
    """Tensors and metadata of a safetensors file, or None when it is absent or unreadable (then recomputed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception:  # a damaged cache file is a cache miss, not an error
        return None
