"""The one file layer: atomic writes, checksums recorded at write and verified at read, content digests, and the
lock that gives a folder one writer.

Every file thermokd writes goes through here: into ``.NAME.PID.tmp`` beside its target, flushed and fsynced, then
renamed over the target (and the folder fsynced), so a kill at any moment leaves the old file or the new one,
never half of either. Tensor files carry a checksum of their content in their safetensors metadata (and, for
caches, the key they were made for); reading checks both. A damaged file is a one-line :class:`ThermoKDError`
naming the file and what to do, and loading never executes code from a file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import FolderInUseError, ThermoKDError

FORMAT = "2"  # the layout of cached files; part of every cache key, so a new layout never reads an old file
CHECKSUM, KEY = "thermokd.checksum", "thermokd.key"
LOCK_NAME = ".thermokd.lock"


# -- digests ----------------------------------------------------------------------------------------------------
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


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """The checksum of a name → tensor mapping (names, dtypes, shapes and values)."""
    return digest(*[p for name in sorted(tensors) for p in (name, tensors[name])])


def path_digest(path: "str | Path") -> str:
    """The content digest of a file, or of every file under a folder (relative names and bytes): what a cache
    keyed by data must depend on, rather than the path string."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.blake2b(digest_size=16)
    try:
        for f in files:
            name = str(f.relative_to(path)) if path.is_dir() else ""
            h.update(len(name).to_bytes(8, "little") + name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    except OSError as exc:
        raise filesystem_error(exc, path, "read") from None
    return h.hexdigest()


# -- errors and folders -------------------------------------------------------------------------------------------
def filesystem_error(exc: OSError, path: "str | Path", action: str = "write") -> ThermoKDError:
    """One line for an OS error: the path, what failed and why."""
    reason = exc.strerror or type(exc).__name__
    where = exc.filename or path
    if exc.errno == errno.EEXIST or exc.errno == errno.ENOTDIR:
        reason += " (a file is in the way of a folder)"
    return ThermoKDError(f"cannot {action} {where}: {reason}")


def ensure_dir(path: "str | Path", what: str = "folder") -> Path:
    """Create ``path`` (and its parents) or say in one line why it cannot be a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ThermoKDError(f"the {what} {path} is a file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise filesystem_error(exc, path, f"create the {what}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ThermoKDError(f"cannot write into the {what} {path}: permission denied")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: "str | Path", write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, fsync it and rename it over ``path``."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise filesystem_error(exc, path) from None
    _fsync_dir(path.parent)
    return path


def replace_folder(tmp: "str | Path", final: "str | Path") -> Path:
    """Put the finished folder ``tmp`` in the place of ``final`` (a checkpoint written file by file beside it)."""
    tmp, final = Path(tmp), Path(final)
    shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError as exc:
        raise filesystem_error(exc, final) from None
    _fsync_dir(final.parent)
    return final


def write_bytes(path: "str | Path", data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: "str | Path", text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: "str | Path", data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=1))


def read_json(path: "str | Path", remedy: str = "delete it or restore it from a backup") -> Any:
    """A JSON file written by thermokd; a missing, unreadable or damaged one is a one-line error with ``remedy``."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ThermoKDError(f"{path} is missing; {remedy}") from None
    except OSError as exc:
        raise filesystem_error(exc, path, "read") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ThermoKDError(f"{path} is damaged (not valid JSON); {remedy}") from None


# -- tensors ------------------------------------------------------------------------------------------------------
def save_tensors(path: "str | Path", tensors: dict[str, Tensor], metadata: "dict[str, str] | None" = None,
                 key: "str | None" = None) -> Path:
    """Write safetensors atomically with their checksum (and the cache ``key`` they were made for) in the metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUM: tensors_digest(tensors)}
    if key is not None:
        meta[KEY] = key
    return write_bytes(path, save(tensors, metadata=meta))


def load_tensors(path: "str | Path", key: "str | None" = None, remedy: str = "delete it to recompute it",
                 checksum: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, verified against the checksum (and ``key``) it records.

    ``checksum=False`` reads files from elsewhere (a user's teacher checkpoint), which carry none."""
    from safetensors.torch import load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ThermoKDError(f"{path} is missing; {remedy}") from None
    except OSError as exc:
        raise filesystem_error(exc, path, "read") from None
    try:
        tensors = load(raw)
        meta = _safetensors_metadata(raw)
    except Exception:  # safetensors reports a damaged header with several exception types
        raise ThermoKDError(f"{path} is damaged (not a readable safetensors file); {remedy}") from None
    if checksum:
        if CHECKSUM not in meta:
            raise ThermoKDError(f"{path} carries no thermokd checksum (written elsewhere or by an older version); "
                                f"{remedy}")
        if tensors_digest(tensors) != meta[CHECKSUM]:
            raise ThermoKDError(f"{path} is damaged (its content does not match its checksum); {remedy}")
    if key is not None and meta.get(KEY) != key:
        raise ThermoKDError(f"{path} was made for another input (key {meta.get(KEY)!r}, expected {key!r}); {remedy}")
    return tensors, meta


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def cached_tensors(path: "str | Path", key: str) -> "tuple[dict[str, Tensor], dict[str, str]] | None":
    """A cache entry made for ``key``: None when absent (compute it), the tensors when valid; a damaged entry or
    one made for another key is a one-line error that says to delete it."""
    path = Path(path)
    if not path.is_file():
        return None
    return load_tensors(path, key=key, remedy=f"delete the cache entry {path} and run again to recompute it")


# -- one writer per folder ----------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # folder -> [fd, depth]: a process may re-enter a lock it holds


def _is_main_rank() -> bool:
    """Under torchrun/accelerate every rank runs the command; only rank 0 writes, so only it locks."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


class FolderLock:
    """An OS advisory lock (``fcntl.flock``) on ``FOLDER/.thermokd.lock`` held for the life of a run.

    A second writer gets a one-line error naming the holder, or with ``wait=True`` waits for it (a teacher being
    trained into the shared cache by another run). The OS drops the lock when the holder dies, even by kill -9."""

    def __init__(self, folder: "str | Path", what: str = "--out folder", wait: bool = False,
                 echo: "Callable[[str], None] | None" = None, plan: "dict[str, Any] | None" = None) -> None:
        self.folder, self.what, self.wait, self.echo, self.plan = Path(folder), what, wait, echo, plan
        self._name = ""

    def __enter__(self) -> "FolderLock":
        if not _is_main_rank():
            return self
        folder = ensure_dir(self.folder, self.what)
        self._name = str(folder.resolve())
        if self._name in _HELD:
            _HELD[self._name][1] += 1
            return self
        lock = folder / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise filesystem_error(exc, lock, "open the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock)
            if not self.wait:
                os.close(fd)
                raise FolderInUseError(f"{folder} is in use by another thermokd process ({holder}); wait for it to "
                                    f"finish or choose another {self.what}") from None
            if self.echo is not None:
                self.echo(f"waiting for {folder}, in use by {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        command = " ".join(["thermokd", *sys.argv[1:]]) if sys.argv else "thermokd"
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command[:200]}".encode()
                 + (b"" if self.plan is None else b"\n" + json.dumps(self.plan, sort_keys=True).encode()))
        _HELD[self._name] = [fd, 1]
        return self

    def __exit__(self, *exc_info: Any) -> None:
        held = _HELD.get(self._name)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._name]
            fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])


def in_use(folder: "str | Path") -> bool:
    """Whether another process holds ``folder``'s :class:`FolderLock` now (a probe: nothing is held after it)."""
    lock = Path(folder) / LOCK_NAME
    if str(Path(folder).resolve()) in _HELD or not lock.is_file():
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def holder_plan(folder: "str | Path") -> "dict[str, Any] | None":
    """The plan (``FolderLock(plan=...)``) of the process holding ``folder`` now, or None (not held, or held
    without one)."""
    if not in_use(folder):
        return None
    try:
        lines = (Path(folder) / LOCK_NAME).read_text(errors="replace").splitlines()
        plan = json.loads(lines[1]) if len(lines) > 1 else None
    except (OSError, ValueError):  # gone, or being rewritten this instant
        return None
    return plan if isinstance(plan, dict) else None


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "holder unknown"
