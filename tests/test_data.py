"""The data package beyond tests/test_models_data.py: how ``.npz`` images find their channel axis, what the
normalisation records, ``root``, damaged IDX and CIFAR files, and the augmentation's pad and devices."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from thermokd import ThermoKDError
from thermokd.data import load_data, make_augment, make_bundle, random_crop, random_flip, read_idx
from thermokd.data.formats import IDX_FILES


def _npz(path, x_train, x_test=None, y_train=None, y_test=None):
    n_tr = len(x_train)
    x_test = x_train[:3] if x_test is None else x_test
    y_train = np.arange(n_tr) % 2 if y_train is None else y_train
    y_test = np.arange(len(x_test)) % 2 if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


# ---------------------------------------------------------------------------------------------------------- npz layout

@pytest.mark.parametrize("shape,want", [
    ((6, 28, 28, 1), (1, 28, 28)),   # channel-last grey
    ((6, 1, 28, 28), (1, 28, 28)),   # channel-first grey
    ((6, 32, 32, 3), (3, 32, 32)),   # channel-last RGB
    ((6, 4, 9, 9), (4, 9, 9)),       # channel-first RGBA
    ((6, 3, 5, 3), (3, 3, 5)),       # both 3: channel-last
    ((6, 3, 8, 4), (3, 8, 4)),       # both allowed: the smaller axis
    ((6, 9, 9, 2), (2, 9, 9)),       # neither allowed: the smaller axis
    ((6, 2, 9, 9), (2, 9, 9)),
])
def test_npz_channel_axis(tmp_path, shape, want):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    b = load_data(_npz(tmp_path / "d.npz", x), val_fraction=0.0)
    assert b.input_shape == want and len(b.mean) == want[0]
    restored = b.train.x * torch.tensor(b.std).view(1, -1, 1, 1) + torch.tensor(b.mean).view(1, -1, 1, 1)
    expected = x if want == shape[1:] else np.transpose(x, (0, 3, 1, 2))
    torch.testing.assert_close(restored, torch.from_numpy(expected), rtol=1e-5, atol=1e-3)


def test_npz_ambiguous_channel_axis_is_refused(tmp_path):
    with pytest.raises(ThermoKDError, match=r"cannot tell the channel axis of images shaped \(6, 7, 9, 7\)"):
        load_data(_npz(tmp_path / "d.npz", np.zeros((6, 7, 9, 7), np.float32)))


def test_npz_test_split_follows_the_train_layout(tmp_path):
    # x_test alone looks channel-first ([N, 3, 4, 4]); read as channel-last like x_train it is [N, 4, 3, 4]
    spec = _npz(tmp_path / "d.npz", np.zeros((6, 8, 8, 3), np.float32), x_test=np.zeros((3, 3, 4, 4), np.float32))
    with pytest.raises(ThermoKDError, match=r"train inputs \(3, 8, 8\) and test inputs \(4, 3, 4\) differ"):
        load_data(spec)


# ------------------------------------------------------------------------------------------------------ labels, stats

def test_column_labels_are_accepted_and_matrices_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3))
    b = load_data(_npz(tmp_path / "a.npz", x, y_train=(np.arange(6) % 3)[:, None], y_test=np.array([[0], [1], [2]])),
                  val_fraction=0.0)
    assert b.train.y.shape == (6,) and b.num_classes == 3
    with pytest.raises(ThermoKDError, match=r"train labels must be a vector of class ids, got shape \(6, 3\)"):
        load_data(_npz(tmp_path / "b.npz", x, y_train=np.eye(3)[np.arange(6) % 3]), val_fraction=0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_and_labels_are_refused(tmp_path, bad):
    x = np.ones((6, 3))
    x[2, 1] = bad
    with pytest.raises(ThermoKDError, match="train inputs hold NaN or infinite values"):
        load_data(_npz(tmp_path / "a.npz", x, x_test=np.ones((3, 3))))
    with pytest.raises(ThermoKDError, match="test labels must be integer class ids"):
        load_data(_npz(tmp_path / "b.npz", np.ones((6, 3)), y_test=np.array([0.0, bad, 1.0])))


def test_explicit_class_count_bounds_the_labels():
    x = np.zeros((4, 2))
    b = make_bundle("t", x, [0, 1, 0, 1], x[:2], [1, 0], num_classes=5)
    assert b.num_classes == 5
    with pytest.raises(ThermoKDError, match="t: test label 5 is out of range for 5 classes"):
        make_bundle("t", x, [0, 1, 0, 1], x[:2], [5, 0], num_classes=5)


def test_feature_statistics_are_recorded_and_constant_features_stay_finite():
    rng = np.random.default_rng(0)
    x_tr, x_te = rng.normal(5.0, 3.0, (50, 4)), rng.normal(5.0, 3.0, (10, 4))
    x_tr[:, 2] = 7.0  # constant in training, varying in test
    b = make_bundle("f", x_tr, np.arange(50) % 2, x_te, np.arange(10) % 2)
    assert len(b.mean) == len(b.std) == 4 and b.std[2] == 1.0
    raw = b.test.x * torch.tensor(b.std) + torch.tensor(b.mean)
    torch.testing.assert_close(raw.double(), torch.from_numpy(x_te), rtol=1e-5, atol=1e-4)
    assert torch.isfinite(b.test.x).all() and float(b.test.x[:, 2].abs().max()) < 20


# ---------------------------------------------------------------------------------------------------------- specs

def test_relative_paths_resolve_against_root(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _npz(tmp_path / "sub" / "d.npz", np.zeros((6, 2)))
    assert len(load_data("npz:sub/d.npz", val_fraction=0.0, root=tmp_path).train) == 6
    absolute = f"npz:{tmp_path / 'sub' / 'd.npz'}"
    assert len(load_data(absolute, val_fraction=0.0, root="/elsewhere").train) == 6  # an absolute path wins
    monkeypatch.chdir(tmp_path / "sub")
    assert len(load_data("npz:d.npz", val_fraction=0.0).train) == 6
    with pytest.raises(ThermoKDError, match="npz file not found: .*other/d.npz"):
        load_data("npz:d.npz", val_fraction=0.0, root=tmp_path / "other")


@pytest.mark.parametrize("spec", ["npz:", "npz:  ", "text:20ng", "/data/x.npz"])
def test_unknown_spec_lists_every_accepted_value(spec):
    with pytest.raises(ThermoKDError, match=r"unknown --data .*cifar100:DIR, 20newsgroups, r8, r52, tab:PREFIX"):
        load_data(spec)


# ---------------------------------------------------------------------------------------------------------- IDX

def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()


def _idx_folder(folder, images=None, labels=None, image_type=0x08):
    folder.mkdir(exist_ok=True)
    images = np.arange(5 * 4 * 4, dtype=np.uint8).reshape(5, 4, 4) if images is None else images
    labels = np.array([0, 1, 2, 1, 0], np.uint8) if labels is None else labels
    for stem, array, code in zip(IDX_FILES, (images, labels, images, labels), (image_type, 0x08) * 2):
        (folder / stem).write_bytes(_idx(array, code))
    return folder


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_idx_wider_element_types_are_read_in_native_order_and_not_rescaled(tmp_path):
    ints = np.arange(4 * 3 * 2, dtype=np.int32).reshape(4, 3, 2) * 1000
    got = read_idx(_write(tmp_path / "i", _idx(ints, 0x0C)))
    assert np.array_equal(got, ints) and got.dtype.isnative
    floats = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(read_idx(_write(tmp_path / "f", _idx(floats, 0x0D))), floats)
    folder = _idx_folder(tmp_path / "ints", images=np.arange(5 * 4 * 4, dtype=np.int16).reshape(5, 4, 4),
                         image_type=0x0B)
    b = load_data(f"idx:{folder}", val_fraction=0.0)
    assert b.mean[0] == pytest.approx(np.arange(80).mean(), rel=1e-6)  # only uint8 pixels are divided by 255


def test_idx_dotted_names_as_some_mirrors_ship_them(tmp_path):
    folder = _idx_folder(tmp_path / "m")
    for stem in IDX_FILES:
        (folder / stem).rename(folder / stem.replace("-idx", ".idx"))
    assert load_data(f"idx:{folder}", val_fraction=0.0).input_shape == (1, 4, 4)


def test_idx_wrong_dimensions_are_named(tmp_path):
    folder = _idx_folder(tmp_path / "m", images=np.zeros((5, 16), np.uint8))
    with pytest.raises(ThermoKDError, match=r"train-images-idx3-ubyte: expected \[N, H, W\] images, found shape"):
        load_data(f"idx:{folder}", val_fraction=0.0)
    folder = _idx_folder(tmp_path / "n", labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(ThermoKDError, match=r"train-labels-idx1-ubyte: expected \[N\] labels"):
        load_data(f"idx:{folder}", val_fraction=0.0)


def test_idx_damaged_files(tmp_path):
    with pytest.raises(ThermoKDError, match="cannot read .*bad.gz"):
        read_idx(_write(tmp_path / "bad.gz", b"\x1f\x8b\x08 not really gzip"))
    with pytest.raises(ThermoKDError, match="cannot read .*cut.gz"):
        read_idx(_write(tmp_path / "cut.gz", gzip.compress(_idx(np.zeros((3, 2, 2), np.uint8)))[:-12]))
    with pytest.raises(ThermoKDError, match="header is truncated"):
        read_idx(_write(tmp_path / "short", bytes([0, 0, 8, 3, 0, 0])))
    with pytest.raises(ThermoKDError, match="unknown IDX element type 0x07"):
        read_idx(_write(tmp_path / "type", bytes([0, 0, 7, 1, 0, 0, 0, 0])))


# ---------------------------------------------------------------------------------------------------------- CIFAR

def _cifar100(folder, train=None, test=None, meta=True):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    good = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), b"fine_labels": [0, 99, 5, 5]}
    for name, content in (("train", train or good), ("test", test or good)):
        (folder / name).write_bytes(pickle.dumps(content))
    if meta:
        (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return folder


def test_cifar_without_meta_has_no_class_names(tmp_path):
    b = load_data(f"cifar100:{_cifar100(tmp_path / 'c', meta=False)}", val_fraction=0.0)
    assert b.class_names == [] and b.num_classes == 100 and b.input_shape == (3, 32, 32)


@pytest.mark.parametrize("train,pattern", [
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"train is not a CIFAR file: it lacks fine_labels"),
    ([1, 2, 3], r"train is not a CIFAR file: it lacks data, fine_labels"),
    ({b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]}, r"data must be \[N, 3072\]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"train label 100 is out of range for 100"),
])
def test_cifar_bad_contents_are_named(tmp_path, train, pattern):
    with pytest.raises(ThermoKDError, match=pattern):
        load_data(f"cifar100:{_cifar100(tmp_path / 'c', train=train)}", val_fraction=0.0)


def test_cifar_damaged_pickle(tmp_path):
    folder = _cifar100(tmp_path / "c")
    (folder / "test").write_bytes(b"\x80\x04 damaged")
    with pytest.raises(ThermoKDError, match="cannot read .*test as a CIFAR pickle"):
        load_data(f"cifar100:{folder}", val_fraction=0.0)


# ------------------------------------------------------------------------------------------------------ augmentation

def test_pad_is_configurable_and_validated():
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = make_augment("crop", (1, 8, 8), pad=4)(x, torch.Generator().manual_seed(1))
    # a shift of up to 4 on an 8×8 image blanks out up to half of it: some rows must be all zero
    assert bool((out == 0).all(dim=-1).any())
    with pytest.raises(ThermoKDError, match="pad must be >= 1, got 0"):
        make_augment("crop", (1, 8, 8), pad=0)


def test_default_pad_scales_with_the_image():
    x = torch.ones(256, 1, 32, 32)
    out = make_augment("crop", (1, 32, 32))(x, torch.Generator().manual_seed(0))
    blank_rows = (out == 0).all(dim=-1).sum(dim=(1, 2))
    assert int(blank_rows.max()) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_on_the_gpu_matches_the_cpu():
    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu = random_flip(random_crop(x, 4, torch.Generator().manual_seed(7)), torch.Generator().manual_seed(8))
    gpu = random_flip(random_crop(x.cuda(), 4, torch.Generator().manual_seed(7)), torch.Generator().manual_seed(8))
    assert torch.equal(gpu.cpu(), cpu)
