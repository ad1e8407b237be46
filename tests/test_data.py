"""The data loaders (digits, ``.npz``, IDX, CIFAR pickles, Fashion-MNIST), the ``--data`` specs and the
augmentations, on tiny inputs that the tests build themselves: layouts and dtypes, how ``.npz`` images find their
channel axis, what the normalisation records, ``root``, damaged files, and the augmentation's pad and devices."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from thermokd import ThermoKDError
from thermokd.data import (AUGMENTATIONS, DATA_SPECS, IMAGE_AUGMENTATIONS, formats, load_data, make_augment,
                           make_bundle, random_crop, random_flip, read_idx)
from thermokd.data.formats import IDX_FILES


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


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
    with pytest.raises(ThermoKDError,
                       match=r"unknown --data .*cifar100:DIR, 20newsgroups, r8, r52, trec, trec6, tab:PREFIX"):
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


# ---------------------------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_raw():
    from sklearn.datasets import load_digits
    return load_digits(return_X_y=True)


@pytest.fixture(scope="module")
def digits0():
    return load_data("digits", seed=0)


def test_digits_split_sizes_and_shapes(digits0):
    b = digits0
    assert (len(b.train), len(b.val), len(b.test)) == (1437 - 144, 144, 360)  # 10 % of training held out
    assert b.input_shape == (1, 8, 8)
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    assert b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    assert b.default_augment == "none"


def test_digits_split_is_stratified(digits0, digits_raw):
    _, y_all = digits_raw
    b = digits0
    n_test = len(b.test)
    overall = np.bincount(y_all, minlength=10)
    test_counts = np.bincount(b.test.y.numpy(), minlength=10)
    train_counts = np.bincount(torch.cat([b.train.y, b.val.y]).numpy(), minlength=10)
    np.testing.assert_array_equal(test_counts + train_counts, overall)
    expected = n_test * overall / overall.sum()
    assert np.abs(test_counts - expected).max() <= 1.0


def test_digits_split_is_seeded(digits0):
    same = load_data("digits", seed=0)
    torch.testing.assert_close(same.test.x, digits0.test.x, rtol=0, atol=0)
    assert torch.equal(same.test.y, digits0.test.y) and torch.equal(same.train.y, digits0.train.y)
    other = load_data("digits", seed=1)
    assert not torch.equal(other.test.x, digits0.test.x)


def test_digits_is_normalised_and_a_partition(digits0, digits_raw):
    b = digits0
    assert abs(float(b.train.x.mean())) < 1e-4
    assert float(b.train.x.std()) == pytest.approx(1.0, abs=1e-3)
    assert len(b.mean) == 1 and len(b.std) == 1
    # un-normalising gives pixel/16 in [0, 1], and train ∪ val ∪ test is exactly the original set of images
    x_raw, _ = digits_raw
    restored = torch.cat([b.train.x, b.val.x, b.test.x]) * b.std[0] + b.mean[0]
    assert float(restored.min()) > -1e-4 and float(restored.max()) < 1 + 1e-4
    mine = np.round(restored.reshape(len(restored), -1).numpy() * 16).astype(int)
    got = sorted(map(tuple, mine))
    want = sorted(map(tuple, x_raw.astype(int)))
    assert got == want


# ---------------------------------------------------------------------------------------------------------- npz

def _labels(n, classes, rng):
    y = np.arange(n) % classes
    rng.shuffle(y)
    return y


def _save_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _restore(bundle, split="train"):
    """Undo the normalisation (per channel for images, per feature for vectors)."""
    x = getattr(bundle, split).x
    view = (1, -1) if x.dim() == 2 else (1, -1, 1, 1)
    return x * torch.tensor(bundle.std).view(view) + torch.tensor(bundle.mean).view(view)


LAYOUTS = {
    "features": ((20, 6), lambda a: a),
    "grey": ((20, 5, 6), lambda a: a[:, None]),
    "nhwc": ((20, 5, 6, 3), lambda a: np.transpose(a, (0, 3, 1, 2))),
    "nchw": ((20, 3, 5, 6), lambda a: a),
}
DTYPES = ["uint8", "float32", "int64"]


def _raw(shape, dtype, rng):
    if dtype == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    if dtype == "int64":
        return rng.integers(-50, 1000, shape).astype(np.int64)
    return (rng.normal(3.0, 2.0, shape)).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_npz_layouts_and_dtypes(tmp_path, layout, dtype):
    rng = np.random.default_rng(0)
    shape, to_nchw = LAYOUTS[layout]
    x_tr, x_te = _raw(shape, dtype, rng), _raw((8,) + shape[1:], dtype, rng)
    y_tr, y_te = _labels(20, 4, rng), _labels(8, 4, rng)
    path = _save_npz(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    b = load_data(f"npz:{path}", val_fraction=0.0)
    expected_shape = to_nchw(x_tr).shape[1:]
    assert b.input_shape == expected_shape and b.test.x.shape == (8,) + expected_shape
    assert b.num_classes == 4
    assert torch.equal(b.train.y, torch.as_tensor(y_tr)) and torch.equal(b.test.y, torch.as_tensor(y_te))
    scale = 255.0 if dtype == "uint8" else 1.0
    want_tr = torch.as_tensor(to_nchw(x_tr).astype(np.float64) / scale)
    want_te = torch.as_tensor(to_nchw(x_te).astype(np.float64) / scale)
    if layout == "features":
        assert len(b.mean) == 6 and len(b.std) == 6
        # per-feature normalisation of the training split
        torch.testing.assert_close(b.train.x.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
        torch.testing.assert_close(b.train.x.std(0), torch.ones(6), atol=1e-4, rtol=0)
        mu, sd = want_tr.mean(0), want_tr.std(0)
        torch.testing.assert_close(b.test.x.double(), (want_te - mu) / sd, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(b.mean, dtype=torch.float64), mu, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(_restore(b, "test").double(), want_te,
                                   atol=1e-3 * max(1.0, float(want_te.abs().max())), rtol=1e-4)
    else:
        channels = expected_shape[0]
        assert len(b.mean) == channels and len(b.std) == channels
        # the per-channel mean is that of the scaled raw data: uint8 was scaled to [0, 1] first
        want_mean = want_tr.mean(dim=(0, 2, 3))
        torch.testing.assert_close(torch.tensor(b.mean, dtype=torch.float64), want_mean, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(_restore(b).double(), want_tr, atol=1e-3 * max(1.0, float(want_tr.abs().max())),
                                   rtol=1e-4)
        torch.testing.assert_close(_restore(b, "test").double(), want_te,
                                   atol=1e-3 * max(1.0, float(want_te.abs().max())), rtol=1e-4)
        per_channel_mean = b.train.x.mean(dim=(0, 2, 3))
        torch.testing.assert_close(per_channel_mean, torch.zeros(channels), atol=1e-4, rtol=0)
    if dtype == "uint8" and layout != "features":
        restored = _restore(b)
        assert float(restored.min()) >= -1e-4 and float(restored.max()) <= 1 + 1e-4


def test_npz_float_labels_that_are_integers_are_accepted(tmp_path):
    rng = np.random.default_rng(1)
    path = _save_npz(tmp_path / "d.npz", x_train=rng.normal(size=(6, 3)), y_train=np.array([0., 1, 2, 0, 1, 2]),
                     x_test=rng.normal(size=(3, 3)), y_test=np.array([2., 1, 0]))
    b = load_data(f"npz:{path}", val_fraction=0.0)
    assert b.train.y.dtype == torch.int64 and b.train.y.tolist() == [0, 1, 2, 0, 1, 2]


def _good_arrays(rng=None):
    rng = rng or np.random.default_rng(2)
    return dict(x_train=rng.normal(size=(6, 4)).astype(np.float32), y_train=np.array([0, 1, 2, 0, 1, 2]),
                x_test=rng.normal(size=(3, 4)).astype(np.float32), y_test=np.array([2, 1, 0]))


@pytest.mark.parametrize("change,pattern", [
    (dict(drop=["y_test"]), r"lacks y_test"),
    (dict(drop=["x_train", "y_train"]), r"lacks x_train, y_train"),
    (dict(y_train=np.array([0, 1, 2.5, 0, 1, 2])), r"train labels must be integer"),
    (dict(y_test=np.array([0.5, 1, 0])), r"test labels must be integer"),
    (dict(y_test=np.array([np.nan, 1, 0])), r"test labels must be integer"),
    (dict(y_train=np.array([0, 1, np.inf, 0, 1, 2])), r"train labels must be integer"),
    (dict(y_train=np.array([0, 1, 2, 0, 1])), r"train has 6 inputs but 5 labels"),
    (dict(x_test=np.zeros((4, 4), np.float32)), r"test has 4 inputs but 3 labels"),
    (dict(y_train=np.array([0, 1, -1, 0, 1, 2])), r"labels must be >= 0, found -1"),
    (dict(y_test=np.array([2, 3, 0])), r"label 3, never seen in training"),
    (dict(x_test=np.zeros((3, 5), np.float32)), r"differ in shape"),
    (dict(y_test=np.array([], dtype=np.int64), x_test=np.zeros((0, 4), np.float32)), r"test split is empty"),
    (dict(y_train=np.array(["a", "b", "c", "a", "b", "c"])), r"y_train must be numeric"),
    (dict(x_train=np.zeros((6, 2, 3, 4, 5), np.float32)), r"x_train must be \[N,D\]"),
])
def test_npz_errors_name_the_problem(tmp_path, change, pattern):
    arrays = _good_arrays()
    for key in change.pop("drop", []):
        del arrays[key]
    arrays.update(change)
    path = _save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ThermoKDError, match=pattern):
        load_data(f"npz:{path}", val_fraction=0.0)


def test_npz_missing_and_unreadable_file(tmp_path):
    with pytest.raises(ThermoKDError, match="not found.*nope.npz"):
        load_data(f"npz:{tmp_path / 'nope.npz'}", val_fraction=0.0)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(ThermoKDError, match="cannot read .*junk.npz"):
        load_data(f"npz:{junk}", val_fraction=0.0)


# ---------------------------------------------------------------------------------------------------------- IDX

def _idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format by hand: 0x0000, type 0x08 (unsigned byte), ndim, big-endian uint32 dims, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim  # 0x00000803 for [N,H,W] images, 0x00000801 for [N] labels
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def _write_idx_folder(folder, gz, n_train=12, n_test=5, size=(7, 6), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *size)).astype(np.uint8),
              "train-labels-idx1-ubyte": (np.arange(n_train) % classes).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *size)).astype(np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) % classes).astype(np.uint8)}
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / stem).write_bytes(data)
    return arrays


def test_idx_header_written_by_hand():
    data = _idx_bytes(np.zeros((2, 3, 4), np.uint8))
    assert data[:4] == bytes([0, 0, 8, 3]) and struct.unpack(">III", data[4:16]) == (2, 3, 4)
    assert _idx_bytes(np.zeros(5, np.uint8))[:8] == bytes([0, 0, 8, 1, 0, 0, 0, 5])


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_idx_folder_loads(tmp_path, gz):
    arrays = _write_idx_folder(tmp_path / "mnistish", gz)
    b = load_data(f"idx:{tmp_path / 'mnistish'}", val_fraction=0.0)
    assert b.input_shape == (1, 7, 6) and (len(b.train), len(b.test)) == (12, 5)
    assert b.num_classes == 3
    assert b.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert b.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    want = torch.as_tensor(arrays["t10k-images-idx3-ubyte"][:, None] / 255.0)
    torch.testing.assert_close(_restore(b, "test").double(), want, atol=1e-4, rtol=0)
    assert abs(float(b.train.x.mean())) < 1e-4


def test_idx_folder_missing_file_is_named(tmp_path):
    folder = tmp_path / "partial"
    _write_idx_folder(folder, gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ThermoKDError, match="missing t10k-labels-idx1-ubyte"):
        load_data(f"idx:{folder}", val_fraction=0.0)


def test_idx_folder_missing_folder_and_bad_file(tmp_path):
    with pytest.raises(ThermoKDError, match="IDX folder not found"):
        load_data(f"idx:{tmp_path / 'absent'}", val_fraction=0.0)
    folder = tmp_path / "corrupt"
    _write_idx_folder(folder, gz=False)
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ThermoKDError, match="not an IDX file"):
        load_data(f"idx:{folder}", val_fraction=0.0)
    _write_idx_folder(folder, gz=False)
    data = (folder / "train-labels-idx1-ubyte").read_bytes()
    (folder / "train-labels-idx1-ubyte").write_bytes(data[:-2])  # truncated body
    with pytest.raises(ThermoKDError, match="header says"):
        load_data(f"idx:{folder}", val_fraction=0.0)


# ---------------------------------------------------------------------------------------------------------- CIFAR

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_images(n, rng):
    return rng.integers(0, 256, (n, 3072)).astype(np.uint8)


def _write_cifar10(folder, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for i in range(1, 6):
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"data": _cifar_images(per_batch, rng),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]}
        batches.append(batch)
        _pickle(folder / f"data_batch_{i}", batch)
    batches[0][b"labels"][0] = 9  # the highest class occurs in training
    _pickle(folder / "data_batch_1", batches[0])
    test = {b"batch_label": b"testing batch 1 of 1", b"data": _cifar_images(n_test, rng),
            b"labels": [int(v) for v in rng.integers(0, 4, n_test)]}
    _pickle(folder / "test_batch", test)
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072,
                                      b"num_cases_per_batch": per_batch})
    return batches, test


def test_cifar10_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    batches, test = _write_cifar10(folder)
    b = load_data(f"cifar10:{folder}", val_fraction=0.0)
    assert b.train.x.shape == (15, 3, 32, 32) and b.test.x.shape == (4, 3, 32, 32)
    assert b.train.y.tolist() == [v for batch in batches for v in batch[b"labels"]]
    assert b.test.y.tolist() == test[b"labels"]
    assert b.class_names == CIFAR10_NAMES and b.num_classes == 10
    assert b.default_augment == "crop-flip" and len(b.mean) == 3
    want = torch.as_tensor(np.concatenate([batch[b"data"] for batch in batches]).reshape(-1, 3, 32, 32) / 255.0)
    torch.testing.assert_close(_restore(b).double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.train.x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


def test_cifar100_pickle_folder(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    train = {b"data": _cifar_images(10, rng), b"fine_labels": [int(v) for v in rng.integers(0, 100, 10)],
             b"coarse_labels": [int(v) for v in rng.integers(0, 20, 10)]}
    test = {b"data": _cifar_images(6, rng), b"fine_labels": [int(v) for v in rng.choice(train[b"fine_labels"], 6)],
            b"coarse_labels": [0] * 6}
    _pickle(folder / "train", train)
    _pickle(folder / "test", test)
    _pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                              b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    b = load_data(f"cifar100:{folder}", val_fraction=0.0)
    assert b.train.x.shape == (10, 3, 32, 32) and b.test.x.shape == (6, 3, 32, 32)
    assert b.train.y.tolist() == train[b"fine_labels"] and b.test.y.tolist() == test[b"fine_labels"]
    assert b.class_names == names
    assert b.num_classes == 100  # the class count of CIFAR-100, even when a small folder lacks some classes
    want = torch.as_tensor(test[b"data"].reshape(-1, 3, 32, 32) / 255.0)
    torch.testing.assert_close(_restore(b, "test").double(), want, atol=1e-4, rtol=0)


def test_cifar_label_out_of_range(tmp_path):
    folder = tmp_path / "c10"
    batches, _ = _write_cifar10(folder)
    batches[2][b"labels"][1] = 10
    _pickle(folder / "data_batch_3", batches[2])
    with pytest.raises(ThermoKDError, match="label 10 is out of range for 10 classes"):
        load_data(f"cifar10:{folder}", val_fraction=0.0)


def test_cifar_missing_pieces(tmp_path):
    with pytest.raises(ThermoKDError, match="CIFAR-10 folder not found"):
        load_data(f"cifar10:{tmp_path / 'absent'}", val_fraction=0.0)
    folder = tmp_path / "c10"
    _write_cifar10(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(ThermoKDError, match="missing data_batch_4"):
        load_data(f"cifar10:{folder}", val_fraction=0.0)
    with pytest.raises(ThermoKDError, match="missing train"):
        load_data(f"cifar100:{folder}", val_fraction=0.0)


# ------------------------------------------------------------------------------------------------ Fashion-MNIST

@pytest.mark.skipif(not formats.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads():
    b = load_data("fashion-mnist")
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10
    assert len(b.class_names) == 10 and b.class_names[0] == "T-shirt/top"
    assert b.default_augment == "crop-flip"
    assert torch.equal(torch.bincount(b.test.y), torch.full((10,), 1000))
    assert abs(float(b.train.x.mean())) < 1e-3


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "FASHION_MNIST_DIR", tmp_path / "no-such-dir")
    for spec in ("fashion-mnist", "fashion_mnist"):
        with pytest.raises(ThermoKDError) as err:
            load_data(spec)
        msg = str(err.value)
        assert "make data" in msg and "apt-get install -y dataset-fashion-mnist" in msg and "no-such-dir" in msg


# ---------------------------------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec", ["mnist", "cifar10", "npz:", "idx", "foo:bar", "digits:x", ""])
def test_unknown_data_spec_lists_accepted(spec):
    with pytest.raises(ThermoKDError, match="unknown --data") as err:
        load_data(spec)
    for accepted in DATA_SPECS:
        assert accepted in str(err.value)


# ------------------------------------------------------------------------------------------------- augmentation

def _images(n=16, shape=(1, 28, 28), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_crop_flip_is_reproducible_and_shape_preserving():
    x = _images()
    augment = make_augment("crop-flip", (1, 28, 28))
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_augment_chunks_consistently():
    x = _images(20, (3, 8, 8))
    out = make_augment("crop", (3, 8, 8), chunk=7)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape


@pytest.mark.parametrize("pad,shape", [(1, (1, 8, 8)), (3, (1, 28, 28)), (4, (3, 32, 32))])
def test_random_crop_is_a_window_of_the_padded_input(pad, shape):
    x = _images(6, shape, seed=pad)
    out = random_crop(x, pad, torch.Generator().manual_seed(11))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    h, w = shape[1:]
    offsets = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(matches) == 1, f"image {i} is not a unique window of the padded input"
        offsets.add(matches[0])
    assert len(offsets) > 1  # the offset differs between images


def test_random_crop_covers_every_offset():
    x = _images(400, (1, 4, 4), seed=3)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    seen = set()
    for i in range(len(x)):
        for dy in range(3):
            for dx in range(3):
                if torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 4]):
                    seen.add((dy, dx))
    assert seen == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_random_flip_flips_about_half():
    x = _images(2000, (2, 3, 5))
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each image is either kept or mirrored left-right, never both
    assert 0.45 < float(flipped.float().mean()) < 0.55


def test_none_and_feature_vectors_are_unchanged():
    x = _images(4, (1, 8, 8))
    assert make_augment("none", (1, 8, 8))(x, torch.Generator()) is x
    feats = torch.randn(5, 64)
    for name in IMAGE_AUGMENTATIONS:  # "mask" is for token ids, and Experiment refuses it for other data
        assert make_augment(name, (64,))(feats, torch.Generator().manual_seed(0)) is feats


@pytest.mark.parametrize("name", ["flip", "Crop", "random-crop", ""])
def test_unknown_augmentation_raises(name):
    with pytest.raises(ThermoKDError, match="unknown augmentation") as err:
        make_augment(name, (1, 8, 8))
    for accepted in AUGMENTATIONS:
        assert accepted in str(err.value)


def test_npz_constant_feature_stays_finite(tmp_path):
    arrays = _good_arrays()
    arrays["x_train"][:, 1] = 2.0  # a feature that never varies in training
    arrays["x_test"][:, 1] = 5.0
    b = load_data(f"npz:{_save_npz(tmp_path / 'c.npz', **arrays)}", val_fraction=0.0)
    assert torch.isfinite(b.train.x).all() and torch.isfinite(b.test.x).all()
    assert torch.equal(b.train.x[:, 1], torch.zeros(6))
