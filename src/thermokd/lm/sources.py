"""Where the student's loss reads the teacher's logits from, per batch of training windows:

- ``online``: the teacher's forward pass (the trainer's own path; no file);
- :class:`LogitsFile`: full logits ``[N, L, V]`` of every training window, written once and memory-mapped
  (float32: bit-identical to online; float16: half the disk). For small vocabularies: the file grows with V;
- :class:`TopKFile`: per token the teacher's k largest log-probabilities and the log of the rest mass, written once
  (by :func:`capture_topk_file`, also ``thermokd lm --capture-topk FILE``), then used without the teacher.

Both files record the tokenizer and the windows they were written for (a top-k file also its k and capture τ), the
key these make up and a checksum of their content; they refuse to serve other ones, and a damaged file is a
one-line error that says to delete it. A top-k file
serves the loss as dense logits ``τ_c · log p̃`` where p̃ keeps the k cached classes and spreads the rest mass
equally over the V − k others: ``softmax(τ_c·log p̃ / τ) ∝ p̃^(τ_c/τ)``, so every strategy's per-token τ
re-tempers it inside ``DistillationLoss``, exactly on the cached classes (``thermokd.lm.topk.retemper``'s rule).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..data.formats import NUMPY_READ_ERRORS
from ..errors import ThermoKDError, first_line
from ..files import KEY, atomic_write, digest, path_digest, read_json, write_json
from .batches import Windows
from .models import lm_logits
from .topk import FORMAT as TOPK_FORMAT
from .topk import TopK, capture_topk, load_topk, save_topk

LOGITS_FORMAT = "thermokd.lm-logits/2"  # /2: the sidecar records the key and the checksum
_REST_FLOOR = 60.0  # nats below the k-th cached log-prob: a rest mass that underflowed to 0 stays finite


def logits_key(tokenizer_key: str, windows_key: str, dtype: str) -> str:
    """What a logits file is made for: the tokenizer, the windows, the dtype and the file format."""
    return digest(LOGITS_FORMAT, tokenizer_key, windows_key, dtype, size=8)


def _remedy(path: Path) -> str:
    return f"delete {path} (and its .json, if any) and run again to write it anew"


def check_identity(path: Path, meta: dict, expected: dict[str, "str | None"]) -> None:
    """The fields a teacher file records (tokenizer, windows, k, capture τ) against those wanted (None: any)."""
    if meta.get("tokenizer") != expected["tokenizer"]:
        raise ThermoKDError(f"{path} was written under another tokenizer ({meta.get('tokenizer')}, here "
                            f"{expected['tokenizer']}): capture it again with this corpus and vocabulary")
    if meta.get("windows") != expected["windows"]:
        raise ThermoKDError(f"{path} holds other training windows ({meta.get('windows')}, here "
                            f"{expected['windows']}): capture it again with this corpus, context and split")
    for field in ("k", "capture_tau"):
        if expected.get(field) is not None and meta.get(field) != expected[field]:
            raise ThermoKDError(f"{path} was captured with {field}={meta.get(field)} but teacher.{field} is "
                                f"{expected[field]}: capture it again or set teacher.{field}")


@torch.no_grad()
def _teacher_batches(teacher: nn.Module, windows: Windows, device: "torch.device | str", batch_size: int):
    teacher = teacher.to(device).eval()
    for start in range(0, len(windows), batch_size):
        stop = min(start + batch_size, len(windows))
        batch = windows.select(torch.arange(start, stop)).to(device)
        yield start, stop, lm_logits(teacher, batch.input_ids, batch.attention_mask).float()


class LogitsFile:
    """Full teacher logits of the training windows in a ``.npy`` file, memory-mapped; a JSON sidecar records the
    tokenizer, the windows, the dtype, the key they make up and the checksum of the ``.npy`` bytes. Opening the
    file reads it once from start to end to verify that checksum (streaming, in 1 MiB blocks); batches are then
    read from the memory map."""

    def __init__(self, path: "str | os.PathLike", tokenizer_key: str, windows_key: str) -> None:
        self.path = Path(path)
        meta_path = self.path.with_suffix(self.path.suffix + ".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise ThermoKDError(f"teacher logits file {self.path} (and its .json) not found: write it with "
                                "write_logits_file or teacher.source: logits; " + _remedy(self.path))
        meta = read_json(meta_path, _remedy(self.path))
        if not isinstance(meta, dict) or meta.get("format") != LOGITS_FORMAT:
            raise ThermoKDError(f"{self.path} is not a thermokd logits file (format {LOGITS_FORMAT!r}); "
                                + _remedy(self.path))
        check_identity(self.path, meta, {"tokenizer": tokenizer_key, "windows": windows_key})
        dtype = meta.get("dtype")
        if meta.get("key") != logits_key(tokenizer_key, windows_key, str(dtype)):
            raise ThermoKDError(f"{self.path} was made for another input (key {meta.get('key')!r}); "
                                + _remedy(self.path))
        if path_digest(self.path) != meta.get("checksum"):
            raise ThermoKDError(f"{self.path} is damaged (its content does not match its checksum); "
                                + _remedy(self.path))
        try:
            self.table = np.load(self.path, mmap_mode="r")  # read per batch; never loaded whole
        except NUMPY_READ_ERRORS as exc:
            raise ThermoKDError(f"{self.path} is not a readable .npy file ({first_line(exc)}); "
                                + _remedy(self.path)) from None
        if self.table.ndim != 3 or str(self.table.dtype) != dtype:
            raise ThermoKDError(f"{self.path} holds {self.table.dtype} logits of shape {self.table.shape}, not "
                                f"{dtype} [windows, context, vocabulary]; " + _remedy(self.path))

    def logits(self, index: Tensor, device: "torch.device | str") -> Tensor:
        rows = np.asarray(self.table[index.cpu().numpy()])  # fancy indexing copies just these windows
        return torch.from_numpy(rows).to(device=device, dtype=torch.float32)


def write_logits_file(teacher: nn.Module, windows: Windows, path: "str | os.PathLike", tokenizer_key: str,
                      windows_key: str, dtype: str = "float32", device: "torch.device | str" = "cpu",
                      batch_size: int = 32) -> Path:
    """The teacher's full logits for every window, in ``path`` (``.npy``, written atomically) and ``path.json``
    (what it was made for and its checksum)."""
    if dtype not in ("float32", "float16"):
        raise ThermoKDError(f"logits dtype must be float32 or float16, got {dtype!r}")
    path = Path(path)

    def fill(tmp: Path) -> None:
        table = None
        for start, stop, logits in _teacher_batches(teacher, windows, device, batch_size):
            if table is None:
                table = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype,
                                                  shape=(len(windows), *logits.shape[1:]))
            table[start:stop] = logits.cpu().numpy().astype(dtype)
        table.flush()
        del table

    atomic_write(path, fill)
    write_json(path.with_suffix(path.suffix + ".json"),
               {"format": LOGITS_FORMAT, "tokenizer": tokenizer_key, "windows": windows_key, "dtype": dtype,
                "key": logits_key(tokenizer_key, windows_key, dtype), "checksum": path_digest(path)})
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
    """A top-k cache of the training windows (``[N, L, k]``), served as dense logits per batch. It is read whole
    into memory and verified against its checksum and against the tokenizer, windows (and, when given, ``k`` and
    ``capture_tau``) it was made for."""

    def __init__(self, path: "str | os.PathLike", tokenizer_key: str, windows_key: str, k: "int | None" = None,
                 capture_tau: "float | None" = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ThermoKDError(f"top-k file {self.path} not found: capture it with thermokd lm --capture-topk "
                                "or thermokd.lm.capture_topk_file")
        self.topk, meta = load_topk(self.path, with_metadata=True)
        check_identity(self.path, {**meta, "k": self.topk.k, "capture_tau": self.topk.capture_tau},
                       {"tokenizer": tokenizer_key, "windows": windows_key, "k": k,
                        "capture_tau": None if capture_tau is None else float(capture_tau)})
        if meta.get(KEY) != topk_key(tokenizer_key, windows_key, self.topk.k, self.topk.capture_tau,
                                     self.topk.vocab_size):
            raise ThermoKDError(f"{self.path} was made for another input (key {meta.get(KEY)!r}); "
                                + _remedy(self.path))
        if self.topk.indices.dim() != 3:
            raise ThermoKDError(f"{self.path}: expected per-window caches [N, L, k], got "
                                f"{tuple(self.topk.indices.shape)}")

    def logits(self, index: Tensor, device: "torch.device | str") -> Tensor:
        i = index.cpu()
        part = TopK(self.topk.indices[i], self.topk.log_probs[i], self.topk.rest_log_mass[i], self.topk.capture_tau,
                    self.topk.vocab_size)
        return topk_dense_logits(part.to(device))


def topk_key(tokenizer_key: str, windows_key: str, k: int, capture_tau: float, vocab_size: int) -> str:
    """What a top-k file of training windows is made for: tokenizer, windows, k, capture τ, V and the format."""
    return digest(TOPK_FORMAT, tokenizer_key, windows_key, str(int(k)), repr(float(capture_tau)), str(vocab_size),
                  size=8)


def capture_topk_file(teacher: nn.Module, windows: Windows, path: "str | os.PathLike", k: int, tokenizer_key: str,
                      windows_key: str, capture_tau: float = 1.0, device: "torch.device | str" = "cpu",
                      batch_size: int = 32) -> Path:
    """Run the teacher once over ``windows`` and write its top-k cache to ``path`` (safetensors, atomically, with
    its checksum and the key it was made for)."""
    parts = [capture_topk(logits.cpu(), k, capture_tau)
             for _, _, logits in _teacher_batches(teacher, windows, device, batch_size)]
    topk = TopK(torch.cat([p.indices for p in parts]), torch.cat([p.log_probs for p in parts]),
                torch.cat([p.rest_log_mass for p in parts]), capture_tau, parts[0].vocab_size)
    path = Path(path)
    save_topk(topk, path, extra={"tokenizer": tokenizer_key, "windows": windows_key},
              key=topk_key(tokenizer_key, windows_key, topk.k, topk.capture_tau, topk.vocab_size))
    return path
