"""Token-level causal-LM distillation (thermokd.lm): the [B, L, V] loss against its flattened form, padding and
prompt masks, the causal shift, the shipped corpus, the tokenizer, sampling, and the `thermokd lm` command."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import thermokd as tk
from thermokd.cli import main
from thermokd.lm import (IGNORE, build_lm, encode_documents, evaluate, lm_logits, load_corpus, make_labels,
                         make_windows, next_token, sample, split_documents, train_tokenizer)
from thermokd.data.shipped import text_datasets_dir
from thermokd.lm.tokenizer import eos_id
from thermokd.methods import LM_PRESETS


B, L, V = 3, 7, 11
PROGRESS = tk.Progress(step=3, total_steps=10, epoch=1, total_epochs=4)


def lm_batch(seed: int = 0, b: int = B, l: int = L, v: int = V):
    """Student/teacher logits [b, l, v] with per-token scales, labels [b, l] with some -100 tokens."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(b, l, 1).uniform_(-1.0, 1.8, generator=g))
    teacher = torch.randn(b, l, v, generator=g) * scale + torch.randn(b, l, 1, generator=g)
    student = torch.randn(b, l, v, generator=g) * scale.flip(1)
    labels = torch.randint(0, v, (b, l), generator=g)
    labels[0, :2] = IGNORE
    labels[2, -3:] = IGNORE
    return student, teacher, labels


def loss_and_grad(method: str, student, teacher, labels, progress=PROGRESS):
    loss_fn = tk.build_loss(method)
    s = student.clone().requires_grad_(True)
    out = loss_fn(s, teacher, labels, progress=progress)
    out.loss.backward()
    return loss_fn, out, s.grad


# ------------------------------------------------------------------------------------------- the loss, per token


@pytest.mark.parametrize("method", ["kd", "cist", "dts", "entropy-target", "erkd", "dtkd"])
def test_token_loss_equals_the_flattened_computation(method):
    student, teacher, labels = lm_batch(1)
    keep = labels.reshape(-1) != IGNORE
    fn3, out3, grad3 = loss_and_grad(method, student, teacher, labels)
    fn2, out2, grad2 = loss_and_grad(method, student.reshape(-1, V)[keep], teacher.reshape(-1, V)[keep],
                                     labels.reshape(-1)[keep])
    torch.testing.assert_close(out3.loss, out2.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad3.reshape(-1, V)[keep], grad2, rtol=1e-5, atol=1e-8)
    assert float(grad3.reshape(-1, V)[~keep].abs().max()) == 0.0  # ignored tokens get no gradient
    for key in ("tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "teacher_entropy_std", "ce", "kd"):
        assert out3.stats[key] == pytest.approx(out2.stats[key], rel=1e-6, abs=1e-7)
    assert out3.stats["rows"] == int(keep.sum())
    fn3.observe(out3)
    fn2.observe(out2)  # stateful strategies (DTS's T) move the same way
    torch.testing.assert_close(fn3.state_dict(), fn2.state_dict())


def test_cist_gives_every_token_its_own_temperature_and_weight(hand):
    """The [B, L, V] CIST loss as first reconstructed (ratio rule, unbounded weights) written by hand over the valid
    tokens."""
    student, teacher, labels = lm_batch(2)
    loss_fn = tk.build_loss("cist", temperature={"student": "ratio"}, weighting={"mix": 1.0, "max_ratio": None})
    out = loss_fn(student, teacher, labels)
    keep = labels.reshape(-1) != IGNORE
    zs, zt, y = student.reshape(-1, V)[keep].double(), teacher.reshape(-1, V)[keep].double(), labels.reshape(-1)[keep]
    m_t, m_s = hand.centred_max(zt), hand.centred_max(zs)
    rho = float(m_t.median()) / 4.0  # "auto": the median teacher τ of the first batch is tau0 = 4
    tau_t, tau_s = (m_t / rho).clamp(0.5, 20.0), (m_s / rho).clamp(0.5, 20.0)
    assert len(set(tau_t.reshape(-1).tolist())) == len(tau_t)  # one τ per token, not per sequence
    a = hand.log_softmax(zt).exp().gather(-1, y[:, None]).squeeze(-1)
    d = 1 - hand.log_softmax(zs).exp().gather(-1, y[:, None]).squeeze(-1)
    w = a * (d + 1e-3)
    w = w * len(w) / w.sum()
    expected = 0.1 * hand.ce(zs, y).mean() + 0.9 * hand.kd(zs, zt, tau_t, tau_s, w)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.stats["tau_teacher_min"] == pytest.approx(float(tau_t.min()), rel=1e-5)
    assert out.stats["tau_teacher_max"] == pytest.approx(float(tau_t.max()), rel=1e-5)
    assert out.stats["tau_teacher_max"] > 3 * out.stats["tau_teacher_min"]


@pytest.mark.parametrize("method", tk.method_names())
def test_padding_changes_neither_loss_nor_gradients(method):
    """Extra padded positions (labels -100) holding garbage logits (huge, inf, NaN) are invisible."""
    student, teacher, labels = lm_batch(3)
    _, out, grad = loss_and_grad(method, student, teacher, labels)
    pad = 4
    garbage = torch.full((B, pad, V), 1e4)
    garbage[:, 0, 0], garbage[:, 1, 1] = float("inf"), float("nan")
    padded_s = torch.cat([student, garbage], 1)
    padded_t = torch.cat([teacher, -garbage], 1)
    padded_y = torch.cat([labels, torch.full((B, pad), IGNORE)], 1)
    _, out_p, grad_p = loss_and_grad(method, padded_s, padded_t, padded_y)
    torch.testing.assert_close(out_p.loss, out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_p[:, :L], grad, rtol=1e-5, atol=1e-8)
    assert float(grad_p[:, L:].abs().max()) == 0.0
    assert out_p.stats["rows"] == out.stats["rows"]


def test_padding_through_a_real_model_changes_nothing():
    """A right-padded window gives the same logits at its real positions, and the same loss, as the unpadded one."""
    teacher = build_lm("1x32x2", 50, 16, dropout=0.0, seed=0).eval()
    student = build_lm("1x16x2", 50, 16, dropout=0.0, seed=1).eval()
    long, short = torch.randint(1, 50, (12,)), torch.randint(1, 50, (7,))
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, :7], mask[1, :7] = short, 1
    ids[1, 7:] = 3  # padding ids are arbitrary tokens; only the mask and the labels say they are padding
    labels = make_labels(ids, mask)
    loss_fn = tk.build_loss("kd")
    s, y = next_token(lm_logits(student, ids, mask), labels)
    t, _ = next_token(lm_logits(teacher, ids, mask), labels)
    batched = loss_fn(s, t, y).loss
    alone = lm_logits(student, short[None]), lm_logits(teacher, short[None])
    torch.testing.assert_close(s[1, :6], alone[0][0, :6], rtol=1e-5, atol=1e-5)
    rows_s = torch.cat([s[0], alone[0][0, :6]])
    rows_t = torch.cat([t[0], alone[1][0, :6]])
    rows_y = torch.cat([long[1:], short[1:]])
    torch.testing.assert_close(batched, loss_fn(rows_s, rows_t, rows_y).loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- labels and the shift


def test_make_labels_masks_padding_and_prompts():
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert make_labels(ids, mask).tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, -100, -100]]
    assert make_labels(ids, mask, 2).tolist() == [[-100, -100, 7, 8, 9], [-100, -100, 7, -100, -100]]
    assert make_labels(ids, mask, torch.tensor([1, 3])).tolist() == [[-100, 6, 7, 8, 9], [-100] * 5]
    with pytest.raises(tk.ThermoKDError, match="prompt lengths"):
        make_labels(ids, mask, -1)


def test_prompt_tokens_count_nowhere_in_the_loss():
    """Masking a prompt gives the loss over the response tokens alone, whatever the prompt's logits."""
    student, teacher, labels = lm_batch(4)
    prompt = torch.tensor([3, 1, 5])
    masked = make_labels(labels.clamp_min(0), torch.ones_like(labels), prompt)
    response = torch.arange(L)[None, :] >= prompt[:, None]
    for method in ("kd", "cist", "dts"):
        _, out, grad = loss_and_grad(method, student, teacher, masked)
        _, ref, ref_grad = loss_and_grad(method, student[response], teacher[response], labels.clamp_min(0)[response])
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad[response], ref_grad, rtol=1e-5, atol=1e-8)
        assert float(grad[~response].abs().max()) == 0.0


def test_make_windows_never_span_documents_and_pad_the_last():
    docs = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10]]
    w = make_windows(docs, context=4, pad_id=0)
    assert w.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 0, 0]]  # [10] alone holds no target
    assert w.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert w.labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, -100], [8, 9, -100, -100]]
    assert w.num_targets == 3 + 2 + 1
    prompted = make_windows(docs, context=4, pad_id=0, prompt_tokens=2)
    assert prompted.labels.tolist() == [[-100, -100, 3, 4], [-100, -100, 7, -100]]  # [8, 9]: prompt only
    with pytest.raises(tk.ThermoKDError, match="prompt_tokens"):
        make_windows(docs, context=4, pad_id=0, prompt_tokens=4)


def test_causal_shift_scores_each_position_against_the_next_token():
    """A hand-computed case: V = 3, one sequence [2, 0, 1]; logits at positions 0 and 1 predict 0 and 1."""
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[2, 0, 1]])
    s, y = next_token(logits, labels)
    assert s.shape == (1, 2, 3) and y.tolist() == [[0, 1]]
    lse0, lse1 = math.log(math.e + math.e ** 2 + 1), math.log(2 + math.e ** 3)
    expected = ((lse0 - 1.0) + (lse1 - 0.0)) / 2
    assert float(tk.build_loss("ce")(s, None, y).loss) == pytest.approx(expected, rel=1e-6)

    class Fixed(nn.Module):  # any module returning [B, L, V] logits is a causal LM here
        def forward(self, input_ids, attention_mask=None):
            return logits

    metrics = evaluate(Fixed(), make_windows([[2, 0, 1]], 3, 0), "cpu")
    assert metrics["ce"] == pytest.approx(expected, rel=1e-6) and metrics["ppl"] == pytest.approx(math.exp(expected))
    assert metrics["acc"] == 0.0 and metrics["tokens"] == 2  # argmaxes 1 and 2, targets 0 and 1
    with pytest.raises(tk.ThermoKDError, match="do not fit labels"):
        next_token(logits, labels[:, :2])


# ------------------------------------------------------------------------------------------- corpus and tokenizer


def test_corpus_loader_reads_the_shipped_files():
    grimm = load_corpus("grimm-tales")
    assert len(grimm) == 54 and sum(len(d.text) for d in grimm) > 390_000
    assert grimm[0].title == "A Tale About the Boy Who Went Forth to Learn What Fear Was"
    assert grimm[0].text.startswith("A certain father had two sons")
    assert len(load_corpus("andersen")) == 3
    friends = load_corpus("friends-transcripts")
    assert len(friends) > 200 and friends[0].title == "0101"
    assert friends[0].text.startswith("Monica: There's nothing to tell!")
    assert (text_datasets_dir() / "grimm-tales.tab").is_file()
    train, val = split_documents(grimm, 0.1, seed=0)
    assert (len(train), len(val)) == (49, 5) and split_documents(grimm, 0.1, seed=0) == (train, val)
    assert {d.title for d in train}.isdisjoint({d.title for d in val})
    assert split_documents(grimm, 0.1, seed=1)[1] != val
    with pytest.raises(tk.ThermoKDError, match="unknown corpus 'grim'.*grimm-tales"):
        load_corpus("grim")


def test_tokenizer_round_trips_and_is_cached(tmp_path):
    texts = [d.text for d in split_documents(load_corpus("grimm-tales"))[0]]
    tok = train_tokenizer(texts, 512, cache_dir=tmp_path / "a")
    assert tok.get_vocab_size() == 512
    for text in (texts[0][:2000], "Rapunzel, Rapunzel, let down your hair! ‘Ow’ — naïve 😀\tend\n"):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text and len(ids) < len(text.encode("utf-8"))
    again = train_tokenizer(texts, 512, cache_dir=tmp_path / "b")  # trained afresh: the same merges
    assert again.to_str() == tok.to_str()
    assert len(list((tmp_path / "a" / "tokenizers").glob("*.json"))) == 1
    assert train_tokenizer(texts, 512, cache_dir=tmp_path / "a").to_str() == tok.to_str()
    ids = encode_documents(tok, texts[:2])
    assert ids[0][-1] == ids[1][-1] == eos_id(tok)
    with pytest.raises(tk.ThermoKDError, match="vocab_size"):
        train_tokenizer(texts, 100, cache_dir=tmp_path)


def test_sample_uses_its_own_temperature_and_is_seeded():
    model = build_lm("1x16x2", 30, 16, dropout=0.0, seed=0)
    first = sample(model, [1, 2, 3], max_new_tokens=5, sampling_temperature=1.5, seed=7)
    assert first[:3] == [1, 2, 3] and len(first) == 8
    assert sample(model, [1, 2, 3], max_new_tokens=5, sampling_temperature=1.5, seed=7) == first
    greedy = sample(model, torch.tensor([1, 2, 3]), max_new_tokens=20, sampling_temperature=0)  # past the context
    ids = [1, 2, 3]
    for _ in range(20):
        ids.append(int(lm_logits(model, torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert greedy == ids
    with pytest.raises(tk.ThermoKDError, match="tokenizer"):
        sample(model, "Once upon a time")


# ------------------------------------------------------------------------------------------- the command


TINY = ["--teacher", "1x32x2", "--student", "1x16x2", "--vocab-size", "300", "--context", "32", "--batch-size", "4",
        "--steps", "6", "--teacher-steps", "8", "--eval-every", "3", "--max-train-tokens", "1024", "--no-progress"]


def test_lm_command_writes_results_and_report(tmp_path, capsys):
    corpus = tmp_path / "tales.txt"
    tales = [d.text for d in load_corpus("grimm-tales")[:6]]
    corpus.write_text("\n\n".join(t[:3000] for t in tales), encoding="utf-8")
    args = ["lm", "--corpus", str(corpus), "--methods", "ce,kd,cist,dts,kd@2", "--seeds", "2",
            "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test perplexity" in printed and "kd@2" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["methods"] == ["ce", "kd", "cist", "dts", "kd@2"] and results["seeds"] == [0, 1]
    assert "torch" in results["machine"] and results["wall_seconds"] > 0
    teacher = results["teacher"]
    assert teacher["cached"] is False and 1.0 < teacher["val_ppl"] < 300 and 0.0 <= teacher["test_acc"] <= 1.0
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in results["methods"] for s in (0, 1))
    for r in runs:
        assert 1.0 < r["ppl"] < 300 and 0.0 <= r["acc"] <= 1.0 and r["best_val_ppl"] <= r["val_ppl"]
        assert [h["step"] for h in r["history"]] == [3, 6] and r["seconds"] > 0
        assert math.log(r["ppl"]) == pytest.approx(r["ce"])
        if r["method"] == "ce":
            assert "tau_teacher_mean" not in r["final"]
        else:
            assert r["final"]["tau_teacher_mean"] > 0 and r["final"]["tau_teacher_min"] <= r["final"]["tau_teacher_max"]
    kd2 = next(r for r in runs if r["method"] == "kd@2")
    assert kd2["final"]["tau_teacher_mean"] == pytest.approx(2.0)
    kd = next(r for r in runs if r["method"] == "kd")  # the LM preset, not image classification's τ = 4
    assert kd["final"]["tau_teacher_mean"] == pytest.approx(LM_PRESETS["kd"]["temperature"]["tau"])
    assert next(r for r in runs if r["method"] == "kd" and r["seed"] == 0)["sample"].startswith("Once upon a time")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| student: cist |" in report and "## Verdicts (against kd)" in report and "- **dts**:" in report
    assert f"| teacher 1x32x2 | {teacher['val_ppl']:.2f} |" in report
    # a second run (into another folder) finds the teacher in the cache and trains the students the same way
    second = [str(tmp_path / "out2") if a == str(tmp_path / "out") else a for a in args]
    assert main(second[:5] + ["--seeds", "1"] + second[7:]) == 0
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["teacher"]["cached"] is True and again["teacher"]["val_ppl"] == teacher["val_ppl"]
    assert [r["history"] for r in again["runs"]] == [r["history"] for r in runs if r["seed"] == 0]


@pytest.mark.parametrize("bad, message", [
    (["--methods", "kd,nope"], "unknown method 'nope'"),
    (["--methods", "cist@2"], "kd@TAU"),
    (["--corpus", "nonexistent"], "unknown corpus"),
    (["--seeds", "0"], "seeds must be > 0"),
    (["--set", "teacher.source=cache"], "teacher.source"),
    (["--set", "train.nope=1"], "unknown field train.nope"),
    (["--student", "2by64"], "model size"),
])
def test_lm_command_bad_input_is_one_line_and_exit_2(tmp_path, capsys, bad, message):
    assert main(["lm", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), *TINY, *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thermokd: error:") and message in err and "\n" not in err


def test_report_verdicts_claim_a_difference_only_beyond_the_noise():
    from thermokd.lm.report import best_fixed_kd, summarize, verdicts

    def runs(method, ppls, accs):
        return [{"method": method, "seed": i, "ppl": p, "acc": a, "val_ppl": p, "seconds": 1.0, "final": {}}
                for i, (p, a) in enumerate(zip(ppls, accs))]

    summary = summarize(runs("kd", [100, 102, 98], [0.10, 0.11, 0.12]) + runs("kd@1", [60, 61, 59], [0.17, 0.17, 0.17])
                        + runs("dts", [99, 104, 100], [0.20, 0.21, 0.22]) + runs("ce", [130], [0.05]))
    assert summary["kd"]["ppl_mean"] == 100 and summary["kd"]["ppl_std"] == pytest.approx(2.0)
    v = verdicts(summary, "kd")
    assert v["kd"] == "reference"
    assert v["kd@1"].startswith("perplexity better by 40.00 (> 1 std of both)")
    assert "perplexity within noise (+1.00, std 2.65)" in v["dts"] and "token accuracy better by 10.00 pp" in v["dts"]
    assert "single seed: no noise estimate" in v["ce"]
    assert best_fixed_kd(summary) == "kd@1" and best_fixed_kd({"kd": summary["kd"]}) is None


def test_report_paired_differences_are_per_seed_with_t_intervals():
    from scipy.stats import t

    from thermokd.lm.report import paired_lines

    runs = [{"method": m, "seed": i, "ppl": p, "acc": a} for m, ppls, accs in
            (("kd", [30.0, 31.0, 32.0], [0.30, 0.31, 0.32]), ("dts", [29.0, 30.5, 31.0], [0.30, 0.31, 0.32]),
             ("ce", [40.0, 41.0], [0.20, 0.21]))
            for i, (p, a) in enumerate(zip(ppls, accs))]
    lines = paired_lines(runs, ["kd", "dts", "ce"], ["kd"])
    dts = next(line for line in lines if line.startswith("| dts |"))
    diffs = [-1.0, -0.5, -1.0]  # dts − kd per seed: the seed's own luck cancels
    mean, sd = sum(diffs) / 3, (sum((d + 2.5 / 3) ** 2 for d in diffs) / 2) ** 0.5
    half = t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert f"**{mean:+.2f}** [{mean - half:+.2f}, {mean + half:+.2f}]" in dts  # resolved: the interval excludes 0
    assert "| +0.00 [+0.00, +0.00] |" in dts  # equal accuracies: Δ 0 with no spread, not bold
    ce = next(line for line in lines if line.startswith("| ce |"))
    assert "**+10.00** [+10.00, +10.00]" in ce  # two shared seeds (0, 1)
    assert paired_lines(runs[:1], ["kd"], ["kd"]) == []  # one seed: no intervals to give


def test_report_says_where_each_run_trained():
    from thermokd.lm.report import run_devices

    runs = [{"device": "cuda", "mixed_precision": "bf16"}] * 3 + [{"device": "cpu", "mixed_precision": "no"}]
    assert run_devices({"runs": runs}) == ("cuda (mixed precision: bf16) for 3 runs; cpu (mixed precision: no) "
                                           "for 1 run")
    older = {"runs": [{}, {}], "device": "cpu", "mixed_precision": "no"}  # runs from before they recorded it
    assert run_devices(older) == "cpu (mixed precision: no)"


def test_three_way_split_is_disjoint_seeded_and_carves_validation_from_training():
    from thermokd.lm.data import split_three

    grimm = load_corpus("grimm-tales")
    train, val, test = split_three(grimm, 0.1, 0.1, seed=0)
    assert (len(train), len(val), len(test)) == (44, 5, 5)
    titles = [{d.title for d in part} for part in (train, val, test)]
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])
    assert split_three(grimm, 0.1, 0.1, seed=0) == (train, val, test)  # stable
    assert split_three(grimm, 0.1, 0.1, seed=3)[1] != val
    # the held-out test documents do not depend on the validation fraction: changing it never moves test
    assert split_three(grimm, 0.2, 0.1, seed=0)[2] == test


def test_best_grid_tau_is_chosen_on_validation_never_on_test():
    from thermokd.lm.report import best_fixed_kd, summarize

    runs = [{"method": m, "seed": 0, "ppl": test, "acc": 0.1, "val_ppl": val, "seconds": 1.0, "final": {}}
            for m, val, test in (("kd", 60.0, 50.0), ("kd@2", 55.0, 70.0))]
    assert best_fixed_kd(summarize(runs)) == "kd@2"
    shuffled = [{**r, "ppl": t} for r, t in zip(runs, (70.0, 50.0))]  # test figures swapped: the choice stays
    assert best_fixed_kd(summarize(shuffled)) == "kd@2"
