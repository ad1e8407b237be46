"""The validation split: carved from training (seeded, stratified, disjoint), or taken as the data's files give it;
and the smaller training set a student may be given."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thermokd import ThermoKDError
from thermokd.config import config_from_dict
from thermokd.data import load_data, stratified_indices, student_subset


def _rows(split) -> set[tuple]:
    return {tuple(np.round(r, 5)) for r in split.x.flatten(1).numpy()}


def test_digits_validation_is_disjoint_stratified_and_a_tenth():
    b = load_data("digits")
    assert len(b.val) == 144 and len(b.train) == 1437 - 144
    assert not (_rows(b.val) & _rows(b.test)) and not (_rows(b.val) & _rows(b.train))
    train_share = np.bincount(b.train.y.numpy(), minlength=10) / len(b.train)
    val_counts = np.bincount(b.val.y.numpy(), minlength=10)
    assert np.abs(val_counts - train_share * len(b.val)).max() <= 1.5  # each class in proportion
    # normalised with the remaining training rows' statistics, as a file-given validation split would be
    assert abs(float(b.train.x.mean())) < 1e-4 and float(b.train.x.std()) == pytest.approx(1.0, abs=1e-3)


def test_split_is_seeded_and_stable():
    a, b = load_data("digits"), load_data("digits")
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    other = load_data("digits", val_seed=1)
    assert not torch.equal(other.val.y, a.val.y) and torch.equal(other.test.y, a.test.y)  # test untouched
    wider = load_data("digits", val_fraction=0.25)
    assert len(wider.val) == round(0.25 * 1437) and torch.equal(wider.test.y, a.test.y)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=6), fraction=st.floats(0.05, 0.9),
       seed=st.integers(0, 2**31 - 1))
def test_stratified_indices_properties(counts, fraction, seed):
    y = torch.tensor(np.repeat(np.arange(len(counts)), counts))
    index = stratified_indices(y, fraction, seed)
    assert torch.equal(index, stratified_indices(y, fraction, seed))  # seeded
    assert len(set(index.tolist())) == len(index) and torch.equal(index, index.sort().values)
    taken = np.bincount(y[index].numpy(), minlength=len(counts))
    for c, n in enumerate(counts):
        assert taken[c] <= max(n - 1, 0)  # every class keeps a training example
        assert abs(taken[c] - fraction * n) < 1 + 1e-9 or taken[c] == n - 1


def _npz(path, rng, with_val: bool):
    arrays = {"x_train": rng.random((40, 5)), "y_train": np.arange(40) % 4, "x_test": rng.random((12, 5)),
              "y_test": np.arange(12) % 4}
    if with_val:
        arrays |= {"x_val": rng.random((8, 5)), "y_val": np.arange(8) % 4}
    np.savez(path, **arrays)
    return arrays


def test_npz_validation_split_is_used_as_given(tmp_path):
    arrays = _npz(tmp_path / "v.npz", np.random.default_rng(0), with_val=True)
    b = load_data(f"npz:{tmp_path / 'v.npz'}")
    assert (len(b.train), len(b.val), len(b.test)) == (40, 8, 12)
    assert torch.equal(b.val.y, torch.as_tensor(arrays["y_val"]))
    raw = b.val.x * torch.tensor(b.std) + torch.tensor(b.mean)
    torch.testing.assert_close(raw, torch.as_tensor(arrays["x_val"], dtype=torch.float32), atol=1e-5, rtol=0)
    np.savez(tmp_path / "half.npz", **{k: v for k, v in arrays.items() if k != "y_val"})
    with pytest.raises(ThermoKDError, match="x_val and y_val"):
        load_data(f"npz:{tmp_path / 'half.npz'}")


def test_tab_validation_file_is_used_as_given(tmp_path):
    from test_text import documents, write_tab

    write_tab(tmp_path / "toy-train.tab", documents(30, seed=1))
    write_tab(tmp_path / "toy-test.tab", documents(9, seed=2))
    carved = load_data(f"tab:{tmp_path / 'toy'}", max_len=8, cache_dir=tmp_path / "c")
    assert (len(carved.train), len(carved.val)) == (27, 3)
    write_tab(tmp_path / "toy-val.tab", documents(6, seed=3))
    given_ = load_data(f"tab:{tmp_path / 'toy'}", max_len=8, cache_dir=tmp_path / "c")
    assert (len(given_.train), len(given_.val), len(given_.test)) == (30, 6, 9)


def test_bad_fraction_and_subset_sizes_are_named():
    with pytest.raises(ThermoKDError, match="val_fraction"):
        config_from_dict({"data": {"val_fraction": 1.0}})
    with pytest.raises(ThermoKDError, match="student_train_size"):
        config_from_dict({"data": {"student_train_size": -1}})
    with pytest.raises(ThermoKDError, match="exceeds"):
        student_subset(torch.arange(10) % 2, 11, 0)
    assert student_subset(torch.arange(10) % 2, 0, 0) is None and student_subset(torch.arange(10) % 2, 10, 0) is None


def test_student_trains_on_its_subset_and_the_teacher_on_all(tmp_path):
    from thermokd.engine.run import Experiment

    cfg = config_from_dict({"data": {"name": "digits", "student_train_size": 200}})
    exp = Experiment(cfg, tmp_path)
    student, teacher = exp.fresh_data(0), exp.fresh_data(0, student=False)
    assert student.num_train == 200 and teacher.num_train == len(exp.bundle.train)
    counts = np.bincount(student.train_y.numpy(), minlength=10)
    assert counts.min() >= 18 and counts.max() <= 22  # stratified: about 20 of each digit
    assert torch.equal(student.inputs_for_epoch(0), exp.bundle.train.x[exp.student_index])
    assert torch.equal(student.val_x, teacher.val_x)  # both are judged on the same validation split


def test_standardised_data_and_its_digest_do_not_depend_on_the_thread_count():
    from thermokd.data.bundle import make_bundle
    from thermokd.data.split import with_validation
    from thermokd.engine.identity import data_digest

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(20000, 1, 8, 8, generator=g) * 255).round() / 255  # pixels; enough for a split reduction
    y = torch.arange(20000) % 10

    def digest_with(threads: int) -> str:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            bundle = with_validation(make_bundle("t", x, y, x[:100], y[:100]), 0.1, 0)
            assert torch.get_num_threads() == threads  # the one-thread reduction gave the caller's count back
        finally:
            torch.set_num_threads(before)
        return data_digest(bundle)

    # the digest keys the teacher cache and run identities: a run resumed with another thread count is the same run
    assert digest_with(1) == digest_with(2) == digest_with(3)


def test_standardising_in_several_threads_at_once_gives_the_thread_count_back(monkeypatch):
    """The one-thread reduction sets the process's thread count: threads that standardise at once must not leave
    it at 1 (one reads the 1 another has set, and restores it last). The count is faked here, with a pause after
    each change, so that the threads interleave at the worst moment every time."""
    import threading
    import time

    from thermokd.data.bundle import standardisation

    count = [2]

    def set_threads(n: int) -> None:
        count[0] = n
        time.sleep(0.002)  # another thread runs here

    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    x = torch.randn(50, 4)
    workers = [threading.Thread(target=lambda: [standardisation(x) for _ in range(10)]) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert count[0] == 2


def test_a_bundle_from_torch_tensors_equals_one_from_numpy_arrays_without_warnings():
    """make_bundle takes tensors as it takes arrays (same values, same digest), without numpy's deprecation warning
    about the array protocol's copy keyword."""
    import warnings

    from thermokd.data.bundle import make_bundle
    from thermokd.engine.identity import data_digest

    g = torch.Generator().manual_seed(1)
    x = torch.rand(60, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_tensors = make_bundle("t", x, y, x[:9], y[:9])
    from_arrays = make_bundle("t", x.numpy(), y.numpy(), x[:9].numpy(), y[:9].numpy())
    assert torch.equal(from_tensors.train.x, from_arrays.train.x) and torch.equal(from_tensors.test.x,
                                                                                  from_arrays.test.x)
    assert data_digest(from_tensors) == data_digest(from_arrays)
