"""Text classification: .tab loaders, tokenisation caching, the text students, and the pretrained-encoder teacher
with its cached features. The default tests use the shipped files and a tiny BERT written to a temporary folder
(the real loading code, from_pretrained(dir) and all); the tests marked slow load the real MiniLM."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from thermokd import ThermoKDError, method_names
from thermokd.config import config_from_dict, load_config
from thermokd.data import TEXT_SETS, load_data, read_tab
from thermokd.data import text as text_data
from thermokd.data.shipped import minilm_dir, text_datasets_dir
from thermokd.models import build_model
from thermokd.models.pretrained import FeatureMemo, PretrainedTextClassifier

from engine_helpers import run_cli

TOPICS = {"pets": "cat dog fur paw bark purr", "space": "star moon orbit rocket comet", "food": "bread cheese soup"}
FILLER = "the a of on and is".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *" ".join(TOPICS.values()).split(), "##s"]


def write_tab(path, rows) -> None:
    path.write_text("Category\tText\nd\tstring\nclass\t\n" + "".join(f"{c}\t{t}\n" for c, t in rows),
                    encoding="utf-8")


def documents(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` documents of 3-12 words, each from its topic's words and common filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = sorted(TOPICS)[i % len(TOPICS)]
        words = TOPICS[topic].split() + FILLER
        rows.append((topic, " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT (hidden 32, 2 layers, random weights) and its WordPiece tokenizer in one folder, plus a
    ``tab:PREFIX`` data set of 60 training and 30 test documents."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "bert"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    write_tab(root / "toy-train.tab", documents(60, seed=1))
    write_tab(root / "toy-test.tab", documents(30, seed=2))
    return root


def tiny_config(tiny, **sections) -> dict:
    raw = {"data": {"name": f"tab:{tiny / 'toy'}", "max_len": 16, "tokenizer": str(tiny / "bert")},
           "teacher": {"model": "minilm", "model_args": {"path": str(tiny / "bert")}, "epochs": 3,
                       "batch_size": 16, "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
                       "schedule": {"name": "constant"}},
           "student": {"model": "embbag", "model_args": {"dim": 8}},
           "method": {"name": "kd"},
           "train": {"epochs": 1, "batch_size": 16, "log_every": 1, "progress_bar": False,
                     "optimizer": {"name": "adamw", "lr": 0.01}, "schedule": {"name": "constant"}}}
    for section, values in sections.items():
        raw[section].update(values)
    return raw


# ---------------------------------------------------------------------------------------------------- loaders

def test_shipped_corpora_have_the_documented_sizes():
    folder = text_datasets_dir()
    for stem, n_train, n_test, n_classes in (("20newsgroups", 11293, 7528, 20), ("reuters-r8", 5485, 2189, 8)):
        cat_tr, text_tr = read_tab(folder / f"{stem}-train.tab")
        cat_te, _ = read_tab(folder / f"{stem}-test.tab")
        assert (len(cat_tr), len(text_tr), len(cat_te)) == (n_train, n_train, n_test)
        assert len(set(cat_tr)) == n_classes and set(cat_te) <= set(cat_tr)
    assert set(TEXT_SETS) == {"20newsgroups", "r8", "r52"}


def test_real_tokenizer_on_real_documents():
    """The MiniLM WordPiece tokenizer as the loader uses it: [CLS] ... [SEP], truncation, right padding with 0."""
    tok = text_data.load_tokenizer(minilm_dir())
    _, texts = read_tab(text_datasets_dir() / "reuters-r8-test.tab")
    ids = text_data.tokenize(texts[:5] + ["short text"], tok, max_len=32)
    assert ids.dtype == torch.int64 and ids.shape == (6, 32) and len(tok) == 30522 and tok.pad_token_id == 0
    assert (ids[:, 0] == tok.cls_token_id).all()
    short = [tok.cls_token_id, *tok.convert_tokens_to_ids(["short", "text"]), tok.sep_token_id, 0]
    assert ids[-1].tolist()[:5] == short
    assert (ids[-1, 4:] == 0).all()


def test_tab_data_is_tokenised_once_and_cached(tiny, tmp_path, monkeypatch):
    """The reader alone: no validation split is carved (val_fraction=0), so the files' rows come back in order."""
    cache = tmp_path / "cache"
    bundle = load_data(f"tab:{tiny / 'toy'}", max_len=16, tokenizer=tiny / "bert", cache_dir=cache,
                       val_fraction=0.0)
    assert bundle.is_text and bundle.vocab_size == len(VOCAB) and bundle.pad_id == 0
    assert bundle.class_names == sorted(TOPICS) and bundle.num_classes == 3 and bundle.default_augment == "none"
    assert bundle.train.x.shape == (60, 16) and bundle.test.x.shape == (30, 16)
    assert bundle.train.x.dtype == torch.int64 and bundle.input_shape == (16,)
    first_category, first_text = documents(60, seed=1)[0]
    assert int(bundle.train.y[0]) == sorted(TOPICS).index(first_category)
    words = first_text.split()[:14]
    assert bundle.train.x[0, :len(words) + 2].tolist() == [2, *[VOCAB.index(w) for w in words], 3]
    assert len(list((cache / "text").glob("*.safetensors"))) == 1

    def no_tokenizer(*_):
        raise AssertionError("a cached data set must not be tokenised again")

    monkeypatch.setattr(text_data, "load_tokenizer", no_tokenizer)
    again = load_data(f"tab:{tiny / 'toy'}", max_len=16, tokenizer=tiny / "bert", cache_dir=cache,
                       val_fraction=0.0)
    assert torch.equal(again.train.x, bundle.train.x) and torch.equal(again.test.y, bundle.test.y)
    monkeypatch.undo()
    # another max_len is another cache entry; padding never exceeds it
    short = load_data(f"tab:{tiny / 'toy'}", max_len=6, tokenizer=tiny / "bert", cache_dir=cache,
                       val_fraction=0.0)
    assert short.train.x.shape == (60, 6) and (short.train.x[:, -1] != 0).any()
    assert len(list((cache / "text").glob("*.safetensors"))) == 2


def test_bad_tab_files_are_named(tiny, tmp_path):
    bad = tmp_path / "bad"
    (tmp_path / "bad-train.tab").write_text("Label\tText\nd\tstring\nclass\t\nx\ty\n")
    write_tab(tmp_path / "bad-test.tab", [("pets", "cat")])
    with pytest.raises(ThermoKDError, match="'Category'"):
        load_data(f"tab:{bad}", tokenizer=tiny / "bert", cache_dir=tmp_path)
    write_tab(tmp_path / "bad-train.tab", [("pets", "cat"), ("food", "soup")])
    write_tab(tmp_path / "bad-test.tab", [("pets", "cat"), ("weather", "rain")])
    with pytest.raises(ThermoKDError, match="weather.*never occur in the training file"):
        load_data(f"tab:{bad}", tokenizer=tiny / "bert", cache_dir=tmp_path)
    (tmp_path / "bad-test.tab").write_text("Category\tText\nd\tstring\nclass\t\npets cat\n")
    with pytest.raises(ThermoKDError, match=r"bad-test.tab:4: expected 2 tab-separated fields"):
        load_data(f"tab:{bad}", tokenizer=tiny / "bert", cache_dir=tmp_path)
    with pytest.raises(ThermoKDError, match="file not found: .*nowhere-train.tab"):
        load_data(f"tab:{tmp_path / 'nowhere'}", tokenizer=tiny / "bert", cache_dir=tmp_path)
    with pytest.raises(ThermoKDError, match="max_len must be >= 2"):
        load_data(f"tab:{tiny / 'toy'}", max_len=1, tokenizer=tiny / "bert", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------- students

@pytest.mark.parametrize("name, args", [("embbag", {"dim": 16}), ("embbag", {"dim": 16, "hidden": 8}),
                                        ("text-transformer", {"dim": 16, "heads": 2, "ff": 32})])
def test_students_ignore_padding(name, args):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, vocab_size=50, pad_id=0, max_len=24, **args).eval()
    x = torch.randint(1, 50, (4, 10))
    x[1, 6:] = 0
    x[2, 3:] = 0
    out = model(x)
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    padded = torch.cat([x, torch.zeros(4, 14, dtype=torch.long)], 1)  # more padding on the right
    torch.testing.assert_close(model(padded), out, rtol=1e-5, atol=1e-6)
    for i in range(4):  # each document alone, with only its own tokens, gives the same logits as in the batch
        alone = x[i:i + 1, : int((x[i] != 0).sum())]
        torch.testing.assert_close(model(alone), out[i:i + 1], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(model(torch.zeros(2, 5, dtype=torch.long))).all()  # empty documents stay finite


def test_students_train_and_are_small():
    bag = build_model("embbag", num_classes=20, vocab_size=30522, pad_id=0, dim=64)
    transformer = build_model("text-transformer", num_classes=20, vocab_size=30522, pad_id=0, max_len=128)
    assert sum(p.numel() for p in bag.parameters()) < 2.0e6
    assert sum(p.numel() for p in transformer.parameters()) < 4.5e6  # MiniLM-L6 has 22.7M
    x = torch.randint(1, 30522, (3, 20))
    loss = transformer(x).logsumexp(-1).sum()
    loss.backward()
    assert transformer.tokens.weight.grad is not None and transformer.positions.weight.grad is not None
    with pytest.raises(ThermoKDError, match="exceed max_len=128"):
        transformer(torch.ones(1, 129, dtype=torch.long))


def test_models_and_data_kinds_must_match():
    with pytest.raises(ThermoKDError, match="'mlp' reads images or feature vectors.*embbag"):
        build_model("mlp", num_classes=3, vocab_size=10)
    with pytest.raises(ThermoKDError, match="'embbag' reads token ids.*20newsgroups"):
        build_model("embbag", num_classes=3)
    with pytest.raises(ThermoKDError, match="pad_id"):
        build_model("embbag", num_classes=3, vocab_size=10, pad_id=10)
    with pytest.raises(ThermoKDError, match="dim must be >= 1"):
        build_model("embbag", num_classes=3, vocab_size=10, dim=0)


# ---------------------------------------------------------------------------------------------------- teacher

def test_teacher_pools_like_sentence_transformers_and_checks_its_inputs(tiny):
    from transformers import AutoModel

    teacher = build_model("minilm", num_classes=3, vocab_size=len(VOCAB), pad_id=0, max_len=16,
                          path=str(tiny / "bert")).eval()
    reference = AutoModel.from_pretrained(str(tiny / "bert"), local_files_only=True).eval()
    x = torch.tensor([[2, 5, 11, 12, 3, 0, 0], [2, 13, 3, 0, 0, 0, 0]])
    with torch.no_grad():
        h = reference(input_ids=x, attention_mask=(x != 0).long()).last_hidden_state
        mask = (x != 0).unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        torch.testing.assert_close(teacher.encode(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(teacher.encode(torch.cat([x, torch.zeros(2, 9, dtype=torch.long)], 1)), expected,
                                   rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in teacher.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable) and teacher.frozen
    tuned = build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=16, path=str(tiny / "bert"),
                        finetune_layers=1)
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.encoder.layer.1.") for n in names)
    assert not any(n.startswith("encoder.encoder.layer.0.") or n.startswith("encoder.embeddings") for n in names)
    assert not tuned.frozen and tuned.memo is None
    tuned.train()
    assert tuned.encoder.encoder.layer[1].training and not tuned.encoder.encoder.layer[0].training
    with pytest.raises(ThermoKDError, match=f"{len(VOCAB) + 1} tokens but the encoder .* expects {len(VOCAB)}"):
        build_model("minilm", num_classes=3, vocab_size=len(VOCAB) + 1, max_len=16, path=str(tiny / "bert"))
    with pytest.raises(ThermoKDError, match="64 positions"):
        build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=65, path=str(tiny / "bert"))
    with pytest.raises(ThermoKDError, match=r"finetune_layers must be in \[0, 2\]"):
        build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=16, path=str(tiny / "bert"),
                    finetune_layers=3)
    with pytest.raises(ThermoKDError, match="never the hub"):
        build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=16,
                    path="sentence-transformers/all-MiniLM-L6-v2")


def test_feature_memo_finds_rows_whatever_their_padding():
    memo = FeatureMemo(pad_id=0)
    x = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0], [5, 6, 7, 0]])
    memo.add(x, torch.arange(6.0).view(3, 2))
    found, features = memo.lookup(torch.tensor([[7, 0], [9, 0], [5, 6]]))
    assert found.tolist() == [True, False, True]
    assert features[0].tolist() == [2.0, 3.0] and features[2].tolist() == [0.0, 1.0]


def _count_encoder_calls(monkeypatch) -> list[int]:
    calls = []
    original = PretrainedTextClassifier.encode

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    monkeypatch.setattr(PretrainedTextClassifier, "encode", counting)
    return calls


def test_frozen_teacher_encodes_each_document_once(tiny, tmp_path, monkeypatch):
    """The real path: from_pretrained(dir), pooled features cached on disk, the head trained on them, and the
    teacher logits that students distil from taken from head(features), never from a new encoder pass."""
    from safetensors.torch import load_file

    from thermokd.engine.run import run_distill, train_teacher
    from thermokd.engine.teacher import load_weights

    cache = tmp_path / "cache"
    cfg = config_from_dict(tiny_config(tiny))
    calls = _count_encoder_calls(monkeypatch)
    info = train_teacher(cfg, cache, progress_bar=False)
    assert sum(calls) == 60 + 30  # every training, validation and test document once, then only the head
    assert 0.0 <= info["test_acc"] <= 1.0 and info["train_seconds"] > 0
    assert len(list((cache / "features").glob("*.safetensors"))) == 3  # train, validation, test
    calls.clear()
    result = run_distill(cfg, tmp_path / "kd", cache_dir=cache, progress_bar=False)
    assert calls == [] and result["final"]["tau_teacher_mean"] == pytest.approx(4.0)
    # the cached teacher logits are exactly what the whole teacher computes from the token ids
    tdir = Path(result["teacher"]["dir"])
    (logits_file,) = tdir.glob("logits-*.safetensors")
    cached = load_file(str(logits_file))["view0"]
    monkeypatch.undo()
    teacher = build_model("minilm", num_classes=3, vocab_size=len(VOCAB), max_len=16, path=str(tiny / "bert"))
    load_weights(teacher, tdir / "teacher.safetensors")
    bundle = load_data(cfg.data.name, max_len=16, tokenizer=cfg.data.tokenizer, cache_dir=cache)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(bundle.train.x), cached, rtol=1e-4, atol=1e-5)


def test_partly_fine_tuned_teacher_trains_through_the_encoder(tiny, tmp_path, monkeypatch):
    from pathlib import Path

    from safetensors.torch import load_file

    from thermokd.engine.run import run_distill

    cache = tmp_path / "cache"
    raw = tiny_config(tiny)
    raw["teacher"]["model_args"] = {"path": str(tiny / "bert"), "finetune_layers": 1}
    raw["teacher"]["epochs"] = 1
    calls = _count_encoder_calls(monkeypatch)
    result = run_distill(config_from_dict(raw), tmp_path / "kd", cache_dir=cache, progress_bar=False)
    assert not (cache / "features").exists()  # nothing frozen to cache: the encoder runs at every step
    assert sum(calls) >= 60 and 0.0 <= result["teacher"]["test_acc"] <= 1.0
    trained = load_file(str(Path(result["teacher"]["dir"]) / "teacher.safetensors"))
    original = load_file(str(tiny / "bert" / "model.safetensors"))
    name = "encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(trained[f"encoder.{name.format(0)}"], original[name.format(0)])
    assert not torch.equal(trained[f"encoder.{name.format(1)}"], original[name.format(1)])


def test_teacher_key_covers_tokenisation_and_data_content(tiny, tmp_path):
    from thermokd.engine.teacher import teacher_key

    cfg = config_from_dict(tiny_config(tiny))
    other = copy.deepcopy(cfg)
    other.data.max_len = 32
    assert teacher_key(other, "d") != teacher_key(cfg, "d")
    other = copy.deepcopy(cfg)
    other.data.tokenizer = str(tmp_path)
    assert teacher_key(other, "d") != teacher_key(cfg, "d")
    assert teacher_key(cfg, "d") != teacher_key(cfg, "e")  # same config and path, other data bytes
    digits = config_from_dict({"data": {"name": "digits"}})
    other = copy.deepcopy(digits)
    other.data.val_fraction = 0.2  # the teacher trains without the validation rows: another split, another teacher
    assert teacher_key(other, "d") != teacher_key(digits, "d")


def test_every_method_distils_on_text(tiny, tmp_path):
    from thermokd.experiments.compare import run_compare

    cache = tmp_path / "cache"
    cfg = config_from_dict(tiny_config(tiny))
    results = run_compare(cfg, method_names(), [0], tmp_path / "all", cache, progress_bar=False, echo=lambda _: None)
    assert {r["method"] for r in results["runs"]} == set(method_names())
    for r in results["runs"]:
        assert 0.0 <= r["best_acc"] <= 1.0 and r["history"][0]["train_loss"] == r["history"][0]["train_loss"]


def test_text_configs_and_presets():
    from thermokd.cli import resolve_config

    for data in ("20newsgroups", "r8"):
        cfg = load_config(resolve_config(None, data))
        assert cfg.data.name == data and cfg.teacher.model == "minilm" and cfg.student.model == "embbag"
        assert cfg.compare.seeds == 3 and {"ce", "kd", "cist", "dts", "kd@1", "kd@8"} <= set(cfg.compare.methods)
    assert load_config(resolve_config("r8", None)).data.name == "r8"
    with pytest.raises(ThermoKDError, match="max_len"):
        load_config(resolve_config("r8", None), ["data.max_len=0"])


def test_compare_command_on_tiny_text(tiny, tmp_path):
    import yaml

    cache = tmp_path / "cache"
    config = tmp_path / "text.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tiny)))
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--config", config, "--methods", "ce,kd,cist", "--seeds", "1", "--out", out,
                    "--no-progress", cache=cache)
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["ce", "kd", "cist"] and "teacher minilm" in proc.stdout
    assert results["runs"][2]["final"]["tau_teacher_mean"] > 0 and (out / "report.md").is_file()
    assert len(list((cache / "features").glob("*.safetensors"))) == 3  # train, validation, test


def test_text_takes_only_token_augmentations(tiny, tmp_path):
    from thermokd.engine.run import Experiment

    cfg = config_from_dict(tiny_config(tiny, data={"augment": "crop"}))
    with pytest.raises(ThermoKDError, match="data.augment='crop' does not apply to token ids; use one of: "
                                            "default, none, mask"):
        Experiment(cfg, tmp_path)
    with pytest.raises(ThermoKDError, match="data.augment='mask' does not apply to images or feature vectors; "
                                            "use one of: default, none, crop, crop-flip"):
        Experiment(config_from_dict({"data": {"name": "digits", "augment": "mask"}}), tmp_path)
    with pytest.raises(ThermoKDError, match=r"data.mask_rate must be in \(0, 1\), got 1.0"):
        config_from_dict(tiny_config(tiny, data={"augment": "mask", "mask_rate": 1.0})).validate()


def test_masking_replaces_ordinary_word_pieces_only():
    from thermokd.data.augment import TokenMasking, make_augment

    masking = TokenMasking(rate=0.3, mask_id=4, special_ids=(0, 2, 3))
    x = torch.randint(5, 40, (400, 20))
    x[:, 0], x[:, 15], x[:, 16:] = 2, 3, 0  # [CLS] words [SEP] padding
    augment = make_augment("mask", (20,), masking=masking)
    out = augment(x, torch.Generator().manual_seed(1))
    changed = out != x
    assert (out[changed] == 4).all() and not changed[:, 0].any() and not changed[:, 15:].any()
    assert changed[:, 1:15].float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1)))  # seeded
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(2)))
    with pytest.raises(ThermoKDError, match="needs token ids and the tokenizer's mask token"):
        make_augment("mask", (1, 8, 8), masking=masking)
    with pytest.raises(ThermoKDError, match=r"masking rate must be in \(0, 1\), got 0.0"):
        TokenMasking(rate=0.0, mask_id=4, special_ids=())


def test_masked_views_are_distilled_with_the_teachers_logits_on_each(tiny, tmp_path):
    """With ``augment: mask`` the students train on fixed masked views of the documents, and the teacher's logits
    are those of each view (computed once); the masking rate is part of the teacher's key."""
    from thermokd.engine.run import Experiment
    from thermokd.engine.teacher import teacher_key
    from thermokd.models.pretrained import PretrainedTextClassifier

    cfg = config_from_dict(tiny_config(tiny, data={"augment": "mask", "augment_views": 2, "mask_rate": 0.5}))
    plain = config_from_dict(tiny_config(tiny))
    assert teacher_key(cfg, "d") != teacher_key(plain, "d")
    other = copy.deepcopy(cfg)
    other.data.mask_rate = 0.25
    assert teacher_key(other, "d") != teacher_key(cfg, "d")
    experiment = Experiment(cfg, tmp_path)
    mask_id, raw = VOCAB.index("[MASK]"), experiment.bundle.train.x
    views = [experiment.augmented(1, v) for v in range(2)]
    assert all((v != raw).any() and (v[v != raw] == mask_id).all() for v in views) and not torch.equal(*views)
    teacher = PretrainedTextClassifier(len(VOCAB), 3, max_len=16, path=str(tiny / "bert"), finetune_layers=1).eval()
    data = experiment.cached_data(teacher, tmp_path, torch.device("cpu"), True)
    for epoch in range(2):
        with torch.no_grad():
            expected = teacher(data.inputs_for_epoch(epoch))
        assert torch.allclose(data.teacher_logits_for_epoch(epoch), expected, atol=1e-5)
    assert not torch.equal(data.inputs_for_epoch(0), data.inputs_for_epoch(1))


# ---------------------------------------------------------------------------------------------------- real MiniLM

@pytest.mark.slow
def test_real_minilm_embeds_like_sentence_transformers():
    tok = text_data.load_tokenizer(minilm_dir())
    teacher = build_model("minilm", num_classes=2, vocab_size=len(tok), pad_id=0, max_len=256).eval()
    assert sum(p.numel() for p in teacher.encoder.parameters()) == pytest.approx(22.7e6, rel=0.01)
    x = text_data.tokenize(["a cat sits on the mat", "the cat sat on a mat", "stock markets fell sharply"], tok, 32)
    with torch.no_grad():
        e = teacher.encode(x)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > 0.8 > 0.3 > float(e[0] @ e[2])


@pytest.mark.slow
def test_real_text_sets_load_with_the_minilm_tokenizer(tmp_path):
    for name, n_train, n_test, classes in (("20newsgroups", 11293, 7528, 20), ("r8", 5485, 2189, 8)):
        bundle = load_data(name, max_len=64, cache_dir=tmp_path)
        # the training file's documents, less the validation split carved from them (10 %, stratified)
        assert (len(bundle.train) + len(bundle.val), len(bundle.test), bundle.num_classes) == (n_train, n_test, classes)
        assert len(bundle.val) == pytest.approx(0.1 * n_train, abs=classes)
        assert bundle.vocab_size == 30522 and bundle.train.x.shape[1] == 64
