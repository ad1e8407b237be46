"""Readers for the supported formats: scikit-learn's digits, IDX folders, ``.npz`` files and CIFAR pickles."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..errors import ThermoKDError
from .bundle import DataBundle, make_bundle

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def digits(seed: int = 0, test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's 1,797 8×8 digits with a seeded, stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x.reshape(-1, 1, 8, 8), y, test_size=test_fraction, stratify=y,
                                              random_state=seed)
    return make_bundle("digits", x_tr, y_tr, x_te, y_te, scale=16.0, class_names=[str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ThermoKDError(f"{path} is not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ThermoKDError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ThermoKDError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / stem.replace("-idx", ".idx"),
                      folder / f"{stem.replace('-idx', '.idx')}.gz"):
        if candidate.is_file():
            return candidate
    raise ThermoKDError(f"{folder}: missing {stem}[.gz] (an IDX folder holds train-images-idx3-ubyte, "
                        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte)")


def idx_folder(folder: "str | Path", name: "str | None" = None, default_augment: str = "none") -> DataBundle:
    """An MNIST-format folder of IDX files (gzipped or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThermoKDError(f"IDX folder not found: {folder}")
    arrays = [_read_idx(_find(folder, stem)) for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    x_tr, y_tr, x_te, y_te = arrays
    return make_bundle(name or f"idx:{folder}", x_tr[:, None], y_tr, x_te[:, None], y_te,
                       scale=255.0 if x_tr.dtype == np.uint8 else None, default_augment=default_augment)


def fashion_mnist() -> DataBundle:
    """Fashion-MNIST from the Debian package ``dataset-fashion-mnist``."""
    if not FASHION_MNIST_DIR.is_dir():
        raise ThermoKDError(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): run `make data` or "
                            "`apt-get install -y dataset-fashion-mnist`, or point --data idx:DIR at an IDX folder")
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    bundle = idx_folder(FASHION_MNIST_DIR, name="fashion-mnist", default_augment="crop-flip")
    bundle.class_names = classes
    return bundle


def _as_images(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """``[N, D]`` stays; ``[N, H, W]`` gains a channel; ``[N, H, W, C]`` becomes ``[N, C, H, W]``."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4) and x.shape[1] < x.shape[3]:
            return x
        if x.shape[3] in (1, 3, 4):
            return np.transpose(x, (0, 3, 1, 2))
        return x
    raise ThermoKDError(f"{path}: {key} must be [N,D], [N,H,W], [N,H,W,C] or [N,C,H,W]; got shape {x.shape}")


def npz_file(path: "str | Path") -> DataBundle:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test``; uint8 inputs are scaled to [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ThermoKDError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
            if missing:
                raise ThermoKDError(f"{path} lacks {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (ValueError, OSError) as exc:
        raise ThermoKDError(f"cannot read {path} as .npz: {exc}") from None
    for key in ("x_train", "x_test", "y_train", "y_test"):
        if not np.issubdtype(arrays[key].dtype, np.number):
            raise ThermoKDError(f"{path}: {key} must be numeric, got dtype {arrays[key].dtype}")
    x_tr, x_te = (_as_images(arrays[k], path, k) for k in ("x_train", "x_test"))
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else None
    return make_bundle(f"npz:{path}", x_tr, arrays["y_train"], x_te, arrays["y_test"], scale=scale)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise ThermoKDError(f"CIFAR folder is missing {path.name} ({path})")
    with open(path, "rb") as f:
        # the official CIFAR "python version" format is pickled: only point thermokd at files you trust
        return pickle.load(f, encoding="bytes")


def cifar(folder: "str | Path", classes: int) -> DataBundle:
    """The CIFAR-10 or CIFAR-100 "python version" folder (``cifar-10-batches-py`` / ``cifar-100-python``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThermoKDError(f"CIFAR-{classes} folder not found: {folder}")
    if classes == 10:
        parts = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
        test, label_key = _unpickle(folder / "test_batch"), b"labels"
        meta_file, names_key = folder / "batches.meta", b"label_names"
    else:
        parts, label_key = [_unpickle(folder / "train")], b"fine_labels"
        test, meta_file, names_key = _unpickle(folder / "test"), folder / "meta", b"fine_label_names"
    x_tr = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([np.asarray(p[label_key]) for p in parts])
    x_te, y_te = np.asarray(test[b"data"]).reshape(-1, 3, 32, 32), np.asarray(test[label_key])
    names = [n.decode() for n in _unpickle(meta_file)[names_key]] if meta_file.is_file() else []
    return make_bundle(f"cifar{classes}:{folder}", x_tr, y_tr, x_te, y_te, scale=255.0, default_augment="crop-flip",
                       class_names=names, num_classes=classes)
