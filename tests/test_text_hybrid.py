"""The hybrid text teacher (``minilm-tfidf``): its TF-IDF view against a float64 reference, an IDF that comes from
the training documents only, an encoder that reads only the first ``encode_len`` word pieces, and the shipped
config that uses it. Tiny BERT and tiny data (``test_text``'s fixtures)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from thermokd import ThermoKDError
from thermokd.config import config_from_dict, load_config
from thermokd.models import build_model
from thermokd.models.tfidf import TfidfFeatures, word_piece_counts

import test_text
from test_text import VOCAB, tiny_config

tiny = test_text.tiny  # the tiny BERT and .tab data, as a fixture of this module too


def reference_tfidf(train: list[list[int]], docs: list[list[int]], vocab: int, pad: int) -> np.ndarray:
    """scikit-learn's TfidfVectorizer(sublinear_tf=True, smooth_idf=True, norm='l2'), written out in float64."""
    n = len(train)
    df = np.zeros(vocab)
    for doc in train:
        for t in set(doc) - {pad}:
            df[t] += 1
    idf = np.log((1 + n) / (1 + df)) + 1
    out = np.zeros((len(docs), vocab))
    for i, doc in enumerate(docs):
        for t in set(doc) - {pad}:
            out[i, t] = (1 + math.log(doc.count(t))) * idf[t]
        norm = np.linalg.norm(out[i])
        out[i] /= norm if norm else 1.0
    return out


def test_tfidf_matches_the_float64_reference_and_ignores_padding():
    train = [[2, 5, 5, 5, 3, 0], [2, 6, 7, 3, 0, 0], [2, 5, 7, 7, 3, 0]]
    docs = [[2, 5, 5, 8, 3, 0], [0, 0, 0, 0, 0, 0], [6, 6, 6, 6, 6, 6]]
    tfidf = TfidfFeatures(vocab_size=9, pad_id=0)
    tfidf.fit(torch.tensor(train))
    got = tfidf(torch.tensor(docs)).double().numpy()
    np.testing.assert_allclose(got, reference_tfidf(train, docs, 9, 0), rtol=1e-6, atol=1e-7)
    assert word_piece_counts(torch.tensor([[4, 4, 0]]), 5, 0).tolist() == [[0, 0, 0, 0, 2]]
    padded = tfidf(torch.tensor([[2, 5, 5, 8, 3, 0, 0, 0, 0]]))
    torch.testing.assert_close(padded, tfidf(torch.tensor([docs[0]])))


def _hybrid(tiny, **args):
    return build_model("minilm-tfidf", num_classes=3, vocab_size=len(VOCAB), max_len=16, path=str(tiny / "bert"),
                       **args).eval()


def test_encoder_reads_only_the_first_encode_len_word_pieces(tiny):
    model = _hybrid(tiny, encode_len=4)
    a = torch.tensor([[2, 10, 11, 12, 13, 14, 3, 0]])
    b = torch.tensor([[2, 10, 11, 12, 20, 21, 22, 3]])  # the same first 4 word pieces
    with torch.no_grad():
        torch.testing.assert_close(model.encode(a), model.encode(b))
        whole = _hybrid(tiny)
        assert not torch.allclose(whole.encode(a), whole.encode(b))
        torch.nn.init.normal_(model.tfidf_head.weight)
        assert not torch.allclose(model(a), model(b))  # the TF-IDF view reads every word piece
    plain = build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=16, path=str(tiny / "bert"))
    assert model.fingerprint() != plain.fingerprint()  # features of another window are cached apart
    assert _hybrid(tiny).fingerprint() == plain.fingerprint()  # same encoder, same window: shared features
    with pytest.raises(ThermoKDError, match="encode_len"):
        _hybrid(tiny, encode_len=-1)
    with pytest.raises(ThermoKDError, match="tfidf_dropout"):
        _hybrid(tiny, tfidf_dropout=1.0)


def test_hybrid_teacher_learns_its_idf_from_training_documents_only(tiny, tmp_path):
    from thermokd.data import load_data
    from thermokd.engine.run import run_distill
    from thermokd.engine.teacher import load_weights

    raw = tiny_config(tiny, teacher={"model": "minilm-tfidf", "epochs": 2,
                                     "model_args": {"path": str(tiny / "bert"), "encode_len": 8}},
                      data={"student_train_size": 20})
    cfg = config_from_dict(raw)
    cache = tmp_path / "cache"
    result = run_distill(cfg, tmp_path / "kd", cache_dir=cache, progress_bar=False)
    assert 0.0 <= result["teacher"]["test_acc"] <= 1.0 and 0.0 <= result["best_acc"] <= 1.0
    teacher = _hybrid(tiny, encode_len=8)
    load_weights(teacher, Path(result["teacher"]["dir"]) / "teacher.safetensors")
    bundle = load_data(cfg.data.name, max_len=16, tokenizer=cfg.data.tokenizer, cache_dir=cache)
    expected = TfidfFeatures(len(VOCAB))
    expected.fit(bundle.train.x)  # every training document (not just the student's 20), no validation or test one
    torch.testing.assert_close(teacher.tfidf.idf, expected.idf)
    everything = TfidfFeatures(len(VOCAB))
    everything.fit(torch.cat([bundle.train.x, bundle.val.x, bundle.test.x]))
    assert not torch.allclose(teacher.tfidf.idf, everything.idf)


def test_the_hybrid_config_is_the_documented_set_up():
    from thermokd.cli import resolve_config

    cfg = load_config(resolve_config("20newsgroups_hybrid", None))
    assert cfg.teacher.model == "minilm-tfidf" and cfg.teacher.model_args["encode_len"] == 128
    assert cfg.data.max_len == 512 and cfg.data.student_train_size == 2000 and cfg.student.model == "embbag"
    assert cfg.compare.tune.trials == 12
    assert {"ce", "kd", "cist", "dts", "entropy-target", "lskd", "dtkd"} <= set(cfg.compare.methods)
