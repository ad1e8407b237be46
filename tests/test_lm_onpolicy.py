"""On-policy distillation batches: the student continues each prompt, prompts and padding are -100, generation
runs without gradient and is seeded, its sampling temperature never reaches the loss, and λ = 0 is plain
distillation."""
from __future__ import annotations


import pytest
import torch

import thermokd as tk
from thermokd.lm import IGNORE, OnPolicy, build_lm, generate, make_windows, on_policy_batch
from thermokd.lm.onpolicy import _next_token
from thermokd.lm.trainer import RunSettings, train_run
from thermokd.methods import LM_PRESETS


VOCAB, CONTEXT = 40, 24


def windows(n: int = 8):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, VOCAB, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return make_windows(docs, CONTEXT, pad_id=0)


def batch_of(w):
    return {"input_ids": w.input_ids, "attention_mask": w.attention_mask, "labels": w.labels}


def student(seed: int = 0, dropout: float = 0.0):
    return build_lm("1x16x2", VOCAB, CONTEXT, dropout=dropout, seed=seed)


def test_prompts_and_padding_are_ignored_and_only_generated_tokens_are_scored():
    w = windows()
    policy = OnPolicy(fraction=1.0, prompt_tokens=6, new_tokens=8, eos_id=0)
    out = on_policy_batch(student(), batch_of(w), policy, torch.Generator().manual_seed(1))
    assert out["input_ids"].shape == (len(w), 14)
    assert torch.equal(out["input_ids"][:, :6], w.input_ids[:, :6])  # the prompt is the window's start
    assert (out["labels"][:, :6] == IGNORE).all()
    scored = out["labels"] != IGNORE
    assert torch.equal(out["labels"][scored], out["input_ids"][scored])  # the student's own tokens are the targets
    assert not scored[out["attention_mask"] == 0].any()  # padding (after an end token) is never scored
    short = w.attention_mask[:, :6].sum(1) < 6  # a prompt cut short by padding: nothing of that row is scored
    assert short.any() and not scored[short].any() and scored[~short].any()
    # after a generated end-of-text token the row is padding
    for row in range(len(w)):
        gen = out["input_ids"][row, 6:].tolist()
        if 0 in gen:
            end = gen.index(0)
            assert out["attention_mask"][row, 6 + end + 1:].sum() == 0


def test_generation_is_seeded_gradient_free_and_restores_the_mode():
    w = windows()
    model = student(dropout=0.2).train()
    policy = OnPolicy(fraction=1.0, prompt_tokens=4, new_tokens=6, sampling_temperature=1.3, top_p=0.9)
    a = generate(model, w.input_ids[:, :4], w.attention_mask[:, :4], policy, torch.Generator().manual_seed(5))
    b = generate(model, w.input_ids[:, :4], w.attention_mask[:, :4], policy, torch.Generator().manual_seed(5))
    c = generate(model, w.input_ids[:, :4], w.attention_mask[:, :4], policy, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not a[0].requires_grad and all(p.grad is None for p in model.parameters())
    assert model.training


def test_sampling_settings_shape_generation_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=g)
    assert torch.equal(_next_token(logits, 0.0, 1.0, g), logits.argmax(-1))  # temperature 0: greedy
    assert torch.equal(_next_token(logits, 1.0, 1e-6, g), logits.argmax(-1))  # a tiny nucleus: the top token
    row = logits[:1].expand(2000, VOCAB)
    nucleus = _next_token(row, 1.0, 0.5, torch.Generator().manual_seed(1))
    p = torch.softmax(logits[0].double(), -1)
    sorted_p, order = p.sort(descending=True)
    allowed = set(order[(sorted_p.cumsum(0) - sorted_p) < 0.5].tolist())  # the smallest prefix holding 0.5
    assert set(nucleus.tolist()) == allowed and len(allowed) < VOCAB
    with pytest.raises(tk.ThermoKDError, match="sampling_temperature"):
        OnPolicy(fraction=0.5, sampling_temperature=-1.0)
    with pytest.raises(tk.ThermoKDError, match="fraction"):
        OnPolicy(fraction=1.5)


def _train(tmp_path, name, policy, sampling: float = 1.0, seed: int = 0):
    w = windows(16)
    model = student(seed)
    teacher = build_lm("1x32x2", VOCAB, CONTEXT, dropout=0.0, seed=7)
    on_policy = None if policy is None else OnPolicy(fraction=policy, prompt_tokens=6, new_tokens=8,
                                                     sampling_temperature=sampling, seed=seed)
    result = train_run(model, tk.build_loss("kd", domain="lm"), w, w,
                       RunSettings(steps=4, batch_size=4, eval_every=2, save_every=4, seed=seed), tmp_path / name,
                       teacher=teacher, on_policy=on_policy)
    return {k: v.detach().clone() for k, v in model.named_parameters()}, result


def test_lambda_zero_is_plain_distillation_and_on_policy_runs_repeat_exactly(tmp_path):
    plain, _ = _train(tmp_path, "plain", None)
    zero, _ = _train(tmp_path, "zero", 0.0)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    half_a, result = _train(tmp_path, "half-a", 0.5)
    half_b, _ = _train(tmp_path, "half-b", 0.5)
    assert all(torch.equal(half_a[k], half_b[k]) for k in half_a)
    assert any(not torch.equal(half_a[k], plain[k]) for k in plain)
    # the loss's τ is KD's preset whatever the sampling temperature: generation settings never reach it
    _, hot = _train(tmp_path, "hot", 1.0, sampling=2.5)
    preset = LM_PRESETS["kd"]["temperature"]["tau"]
    assert hot["final"]["tau_teacher_mean"] == result["final"]["tau_teacher_mean"] == pytest.approx(preset)


def test_the_trainer_scores_only_generated_tokens(tmp_path):
    """With λ = 1 every micro-batch is generated: the rows the loss counts are the generated tokens."""
    from thermokd.lm.trainer import LMTrainer

    seen = []
    original = LMTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        labels, mask = self.loss_targets(inputs)
        seen.append((inputs["labels"].clone(), int((labels != IGNORE).sum())))
        return original(self, model, inputs, *args, **kwargs)

    LMTrainer.compute_loss = spy
    try:
        _train(tmp_path, "all", 1.0)
    finally:
        LMTrainer.compute_loss = original
    assert len(seen) == 4
    for labels, counted in seen:
        assert labels.shape[1] == 14 and (labels[:, :6] == IGNORE).all()
        assert counted == int((labels[:, 1:] != IGNORE).sum()) > 0
