"""Readers for the supported formats: scikit-learn's digits, IDX folders, ``.npz`` files and CIFAR pickles."""
from __future__ import annotations

import gzip
import pickle
import tokenize
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import ThermoKDError, first_line
from .bundle import DataBundle, make_bundle

# what numpy raises on a damaged .npy/.npz: a header with a NUL byte fails Python's parser (SyntaxError), and then
# numpy's fallback header filter (tokenize.TokenError)
NUMPY_READ_ERRORS = (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile)

# where Debian's dataset-fashion-mnist package installs the four IDX .gz files
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def digits(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's 1,797 8×8 digits with a seeded, stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.reshape(-1, 1, 8, 8), y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return make_bundle("digits", x_tr, y_tr, x_te, y_te, num_classes=10, scale=16.0,
                       class_names=[str(i) for i in range(10)])


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped if its name ends in ``.gz``) as a numpy array of its declared type and shape, in the
    machine's byte order."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ThermoKDError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ThermoKDError(f"{path} is not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ThermoKDError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ThermoKDError(f"{path}: the IDX header is truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    itemsize = np.dtype(dtypes[data[2]]).itemsize
    if len(data) - 4 - 4 * ndim != itemsize * int(np.prod(shape)):
        raise ThermoKDError(f"{path}: header says {shape} but holds {(len(data) - 4 - 4 * ndim) // itemsize} values")
    values = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim).reshape(shape)
    return values.astype(values.dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / dotted, folder / f"{dotted}.gz"):
        if candidate.is_file():
            return candidate
    raise ThermoKDError(f"{folder}: missing {stem}[.gz] (an IDX folder holds {', '.join(IDX_FILES)})")


def idx_folder(folder: "str | Path", name: "str | None" = None, default_augment: str = "none",
               num_classes: "int | None" = None) -> DataBundle:
    """An MNIST-format folder of IDX files (gzipped or not): ``[N, H, W]`` images and ``[N]`` labels; uint8
    images are scaled to [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThermoKDError(f"IDX folder not found: {folder}")
    arrays = []
    for stem in IDX_FILES:
        path = _find(folder, stem)
        array = read_idx(path)
        want = 3 if "images" in stem else 1
        if array.ndim != want:
            raise ThermoKDError(f"{path}: expected {'[N, H, W] images' if want == 3 else '[N] labels'}, "
                                f"found shape {array.shape}")
        arrays.append(array)
    x_tr, y_tr, x_te, y_te = arrays
    return make_bundle(name or f"idx:{folder}", x_tr[:, None], y_tr, x_te[:, None], y_te, num_classes=num_classes,
                       scale=255.0 if x_tr.dtype == np.uint8 else None, default_augment=default_augment)


def fashion_mnist() -> DataBundle:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (60,000 / 10,000 28×28 grey images)."""
    if not FASHION_MNIST_DIR.is_dir():
        raise ThermoKDError(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): run `make data` or "
                            "`apt-get install -y dataset-fashion-mnist`, or point --data idx:DIR at an IDX folder")
    bundle = idx_folder(FASHION_MNIST_DIR, name="fashion-mnist", default_augment="crop-flip", num_classes=10)
    bundle.class_names = list(FASHION_MNIST_CLASSES)
    return bundle


def _channels_last(shape: tuple[int, ...], path: Path) -> bool:
    """Whether 4-D images ``[N, A, B, C]`` are ``[N, H, W, C]``: the channel axis is whichever of axes 1 and 3
    has size 1, 3 or 4; if both or neither do, the smaller one."""
    first, last = shape[1], shape[3]
    first_ok, last_ok = first in (1, 3, 4), last in (1, 3, 4)
    if first_ok != last_ok:
        return last_ok
    if first == last:
        if first_ok:
            return True  # e.g. [N, 3, 3, 3]: take the more common numpy layout
        raise ThermoKDError(f"{path}: cannot tell the channel axis of images shaped {shape}; store them as "
                            "[N,H,W,C] or [N,C,H,W] with 1, 3 or 4 channels")
    return last < first


def _as_model_layout(x: np.ndarray, path: Path, key: str, channels_last: bool) -> np.ndarray:
    """``[N, D]`` stays; ``[N, H, W]`` gains a channel; ``[N, H, W, C]`` becomes ``[N, C, H, W]``."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        return np.transpose(x, (0, 3, 1, 2)) if channels_last else x
    raise ThermoKDError(f"{path}: {key} must be [N,D], [N,H,W], [N,H,W,C] or [N,C,H,W]; got shape {x.shape}")


def npz_file(path: "str | Path") -> DataBundle:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test`` (and optionally ``x_val, y_val``, used as the validation
    split); uint8 inputs are scaled to [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ThermoKDError(f"npz file not found: {path}")
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a .npy holds one array, not the four named ones
            raise ThermoKDError(f"{path} is a single .npy array, not an .npz archive; save x_train, y_train, x_test "
                                "and y_test together with numpy.savez")
        with loaded as f:
            arrays = {k: f[k] for k in (*keys, "x_val", "y_val") if k in f}
    except NUMPY_READ_ERRORS as exc:
        raise ThermoKDError(f"cannot read {path} as .npz: {first_line(exc)}") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ThermoKDError(f"{path} lacks {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise ThermoKDError(f"{path}: a validation split needs both x_val and y_val")
    for key in arrays:
        if not np.issubdtype(arrays[key].dtype, np.number):
            raise ThermoKDError(f"{path}: {key} must be numeric, got dtype {arrays[key].dtype}")
    # the layout is decided once, on x_train, so the two splits are never read differently
    channels_last = arrays["x_train"].ndim == 4 and _channels_last(arrays["x_train"].shape, path)
    x_tr, x_te, x_val = (_as_model_layout(arrays[k], path, k, channels_last) if k in arrays else None
                         for k in ("x_train", "x_test", "x_val"))
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else None
    return make_bundle(f"npz:{path}", x_tr, arrays["y_train"], x_te, arrays["y_test"], scale=scale, x_val=x_val,
                       y_val=arrays.get("y_val"))


def _unpickle(path: Path, keys: tuple[bytes, ...]) -> dict:
    if not path.is_file():
        raise ThermoKDError(f"CIFAR folder is missing {path.name} ({path})")
    with open(path, "rb") as f:
        # the official CIFAR "python version" format is pickled: only point thermokd at files you trust
        try:
            content = pickle.load(f, encoding="bytes")
        except Exception as exc:  # a damaged pickle can raise nearly any exception type
            raise ThermoKDError(f"cannot read {path} as a CIFAR pickle: {exc}") from None
    missing = [k.decode() for k in keys if not isinstance(content, dict) or k not in content]
    if missing:
        raise ThermoKDError(f"{path} is not a CIFAR file: it lacks {', '.join(missing)}")
    return content


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ThermoKDError(f"{path}: data must be [N, 3072] (3×32×32 images), got shape {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def cifar(folder: "str | Path", classes: int) -> DataBundle:
    """The CIFAR-10 or CIFAR-100 "python version" folder (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThermoKDError(f"CIFAR-{classes} folder not found: {folder}")
    if classes == 10:
        train_files, test_file = [f"data_batch_{i}" for i in range(1, 6)], "test_batch"
        label_key, meta_file, names_key = b"labels", folder / "batches.meta", b"label_names"
    else:
        train_files, test_file = ["train"], "test"
        label_key, meta_file, names_key = b"fine_labels", folder / "meta", b"fine_label_names"
    batches = [(folder / f, _unpickle(folder / f, (b"data", label_key))) for f in [*train_files, test_file]]
    x = [_cifar_images(batch, path) for path, batch in batches]
    y = [np.asarray(batch[label_key]) for _, batch in batches]
    names = [n.decode() for n in _unpickle(meta_file, (names_key,))[names_key]] if meta_file.is_file() else []
    return make_bundle(f"cifar{classes}:{folder}", np.concatenate(x[:-1]), np.concatenate(y[:-1]), x[-1], y[-1],
                       num_classes=classes, scale=255.0, default_augment="crop-flip", class_names=names)
