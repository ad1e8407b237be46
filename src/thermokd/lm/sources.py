"""Where the student's loss reads the teacher's logits from, per batch of training windows:

- ``online``: the teacher's forward pass (the trainer's own path; no file);
- :class:`LogitsFile`: full logits ``[N, L, V]`` of every training window, written once and memory-mapped
  (float32: bit-identical to online; float16: half the disk). For small vocabularies: the file grows with V;
- :class:`TopKFile`: per token the teacher's k largest log-probabilities and the log of the rest mass, written once
  (by :func:`capture_topk_file`, also ``thermokd lm --capture-topk FILE``), then used without the teacher.

Both files record the tokenizer and the windows they were written for, and refuse to serve other ones. A top-k file
serves the loss as dense logits ``τ_c · log p̃`` where p̃ keeps the k cached classes and spreads the rest mass
equally over the V − k others: ``softmax(τ_c·log p̃ / τ) ∝ p̃^(τ_c/τ)``, so every strategy's per-token τ
re-tempers it inside ``DistillationLoss``, exactly on the cached classes (``thermokd.lm.topk.retemper``'s rule).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from .batches import Windows
from .models import lm_logits
from .topk import TopK, capture_topk, load_topk, save_topk

LOGITS_FORMAT = "thermokd.lm-logits/1"
_REST_FLOOR = 60.0  # nats below the k-th cached log-prob: a rest mass that underflowed to 0 stays finite


def _check_identity(path: Path, meta: dict, tokenizer_key: str, windows_key: str) -> None:
    if meta.get("tokenizer") != tokenizer_key:
        raise ThermoKDError(f"{path} was written under another tokenizer ({meta.get('tokenizer')}, here "
                            f"{tokenizer_key}): capture it again with this corpus and vocabulary")
    if meta.get("windows") != windows_key:
        raise ThermoKDError(f"{path} holds other training windows ({meta.get('windows')}, here {windows_key}): "
                            "capture it again with this corpus, context and split")


@torch.no_grad()
def _teacher_batches(teacher: nn.Module, windows: Windows, device: "torch.device | str", batch_size: int):
    teacher = teacher.to(device).eval()
    for start in range(0, len(windows), batch_size):
        stop = min(start + batch_size, len(windows))
        batch = windows.select(torch.arange(start, stop)).to(device)
        yield start, stop, lm_logits(teacher, batch.input_ids, batch.attention_mask).float()


class LogitsFile:
    """Full teacher logits of the training windows in a ``.npy`` file, memory-mapped; a JSON sidecar names the
    tokenizer, the windows and the dtype."""

    def __init__(self, path: "str | os.PathLike", tokenizer_key: str, windows_key: str) -> None:
        self.path = Path(path)
        meta_path = self.path.with_suffix(self.path.suffix + ".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise ThermoKDError(f"teacher logits file {self.path} (and its .json) not found: write it with "
                                "write_logits_file or teacher.source: logits")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != LOGITS_FORMAT:
            raise ThermoKDError(f"{self.path} is not a thermokd logits file (format {LOGITS_FORMAT!r})")
        _check_identity(self.path, meta, tokenizer_key, windows_key)
        self.table = np.load(self.path, mmap_mode="r")  # read per batch; never loaded whole

    def logits(self, index: Tensor, device: "torch.device | str") -> Tensor:
        rows = np.asarray(self.table[index.cpu().numpy()])  # fancy indexing copies just these windows
        return torch.from_numpy(rows).to(device=device, dtype=torch.float32)


def write_logits_file(teacher: nn.Module, windows: Windows, path: "str | os.PathLike", tokenizer_key: str,
                      windows_key: str, dtype: str = "float32", device: "torch.device | str" = "cpu",
                      batch_size: int = 32) -> Path:
    """The teacher's full logits for every window, in ``path`` (``.npy``, written atomically) and ``path.json``."""
    if dtype not in ("float32", "float16"):
        raise ThermoKDError(f"logits dtype must be float32 or float16, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    table = None
    for start, stop, logits in _teacher_batches(teacher, windows, device, batch_size):
        if table is None:
            table = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                              shape=(len(windows), *logits.shape[1:]))
        table[start:stop] = logits.cpu().numpy().astype(dtype)
    table.flush()
    del table
    os.replace(tmp, path)
    meta = {"format": LOGITS_FORMAT, "tokenizer": tokenizer_key, "windows": windows_key, "dtype": dtype}
    meta_path = path.with_suffix(path.suffix + ".json")
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")  # per process: ranks may race here
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, meta_path)
    return path


def topk_dense_logits(topk: TopK) -> Tensor:
    """Logits ``[..., V]`` whose tempered softmax is the cache re-tempered (module docstring): ``τ_c·log p̃``."""
    log_p = topk.log_probs.float()
    missing = topk.vocab_size - topk.k
    if missing:
        fill = topk.rest_log_mass.float() - math.log(missing)
        fill = torch.maximum(fill, log_p[..., -1] - _REST_FLOOR)  # -inf (no rest mass) stays finite
    else:
        fill = log_p[..., -1]  # every class is cached: the fill is overwritten
    dense = fill.unsqueeze(-1).expand(*fill.shape, topk.vocab_size).clone()
    dense.scatter_(-1, topk.indices.long(), log_p)
    return topk.capture_tau * dense


class TopKFile:
    """A top-k cache of the training windows (``[N, L, k]``), served as dense logits per batch."""

    def __init__(self, path: "str | os.PathLike", tokenizer_key: str, windows_key: str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ThermoKDError(f"top-k file {self.path} not found: capture it with thermokd lm --capture-topk "
                                "or thermokd.lm.capture_topk_file")
        self.topk, meta = load_topk(self.path, with_metadata=True)
        _check_identity(self.path, meta, tokenizer_key, windows_key)
        if self.topk.indices.dim() != 3:
            raise ThermoKDError(f"{self.path}: expected per-window caches [N, L, k], got "
                                f"{tuple(self.topk.indices.shape)}")

    def logits(self, index: Tensor, device: "torch.device | str") -> Tensor:
        i = index.cpu()
        part = TopK(self.topk.indices[i], self.topk.log_probs[i], self.topk.rest_log_mass[i], self.topk.capture_tau,
                    self.topk.vocab_size)
        return topk_dense_logits(part.to(device))


def capture_topk_file(teacher: nn.Module, windows: Windows, path: "str | os.PathLike", k: int, tokenizer_key: str,
                      windows_key: str, capture_tau: float = 1.0, device: "torch.device | str" = "cpu",
                      batch_size: int = 32) -> Path:
    """Run the teacher once over ``windows`` and write its top-k cache to ``path`` (safetensors)."""
    parts = [capture_topk(logits.cpu(), k, capture_tau)
             for _, _, logits in _teacher_batches(teacher, windows, device, batch_size)]
    topk = TopK(torch.cat([p.indices for p in parts]), torch.cat([p.log_probs for p in parts]),
                torch.cat([p.rest_log_mass for p in parts]), capture_tau, parts[0].vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_topk(topk, path, extra={"tokenizer": tokenizer_key, "windows": windows_key})
    return path
