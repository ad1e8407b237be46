"""thermokd.integrations.hf.DistillationTrainer on tiny, randomly initialised transformers models (never downloaded):
gradient accumulation equals one big batch, resume restores the strategy state, masked tokens count nowhere,
statistics reach the Trainer's logs, and bad input gets a ThermoKDError."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (BertConfig, BertForSequenceClassification, BertForTokenClassification,  # noqa: E402
                          GPT2Config, GPT2LMHeadModel, TrainingArguments)

import thermokd as tk  # noqa: E402
from thermokd import ThermoKDError  # noqa: E402
from thermokd.integrations.hf import LOSS_STATE_NAME, DistillationTrainer, detect_task  # noqa: E402
from thermokd.temperature import CIST, CTKD, DTS, Fixed  # noqa: E402

VOCAB, CLASSES = 64, 5


# -- tiny models and data --------------------------------------------------------------------------------------------
def gpt2(seed: int, vocab: int = VOCAB, init: float = 0.02) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, initializer_range=init)
    return GPT2LMHeadModel(cfg)


def bert(seed: int, init: float = 0.02, head=BertForSequenceClassification, classes: int = CLASSES):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=classes, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=init)
    return head(cfg)


def lm_data(n: int, length: int = 12, seed: int = 1) -> list[dict]:
    """Sequences with a masked prompt (labels -100) of 0-4 tokens and 0-3 right-padded tokens (mask 0, -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        labels, mask = ids.clone(), torch.ones(length, dtype=torch.long)
        labels[:i % 5] = -100
        pad = (3 * i) % 4
        if pad:
            labels[-pad:], mask[-pad:] = -100, 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def cls_data(n: int, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.ones(8, dtype=torch.long)
        mask[8 - i % 3:] = 0
        out.append({"input_ids": torch.randint(1, 50, (8,), generator=g), "attention_mask": mask,
                    "labels": int(torch.randint(0, CLASSES, (1,), generator=g))})
    return out


def args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_strategy="no",
                logging_steps=1, learning_rate=1e-2)
    return TrainingArguments(**{**base, **kw})


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def train_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


# -- gradient accumulation -------------------------------------------------------------------------------------------
LOSSES = {
    "kd": lambda: tk.DistillationLoss(temperature=Fixed(2.0), ce_weight=0.5, kd_weight=0.5),
    "dts": lambda: tk.DistillationLoss(temperature=DTS()),
    "cist": lambda: tk.DistillationLoss(temperature=CIST(ratio=0.3)),  # fixed ρ and no per-batch weights: exact
}


def _run_lm(out, make_loss, batch: int, accum: int, steps: int = 2):
    student = gpt2(0)
    trainer = DistillationTrainer(model=student, teacher_model=gpt2(1, init=0.2), distillation_loss=make_loss(),
                                  args=args(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                                            max_steps=steps, optim="sgd", learning_rate=0.5, max_grad_norm=0.0),
                                  train_dataset=lm_data(8 * steps))
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_accumulation_matches_one_big_batch_for_tokens(tmp_path, name):
    """8 sequences at once vs 4 × 2 and 2 × 4 micro-batches whose valid-token counts differ: the same SGD steps."""
    data = lm_data(16)
    counts = [int(((d["labels"][1:] != -100) & (d["attention_mask"][1:] == 1)).sum()) for d in data]
    assert len(set(counts)) > 2  # uneven: averaging micro-batch means would weight tokens unequally
    big = _run_lm(tmp_path / "big", LOSSES[name], batch=8, accum=1)
    for batch, accum in ((4, 2), (2, 4)):
        small = _run_lm(tmp_path / f"{batch}x{accum}", LOSSES[name], batch=batch, accum=accum)
        assert_same_weights(params(big.model), params(small.model))
        torch.testing.assert_close([e["loss"] for e in train_logs(small)], [e["loss"] for e in train_logs(big)],
                                   rtol=1e-5, atol=1e-7)
        for k, v in big.distillation_loss.state_dict().items():  # DTS observed the whole batch, once per step
            torch.testing.assert_close(small.distillation_loss.state_dict()[k], v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params(big.model)["transformer.wte.weight"], params(gpt2(0))["transformer.wte.weight"])
    if name == "dts":
        assert float(big.distillation_loss.temperature.current) != DTS().t_init


@pytest.mark.parametrize("name", ["kd", "cist"])
def test_rows_weighted_by_zero_train_like_rows_gathered(tmp_path, name, monkeypatch):
    """sync_free_rows (the default on an accelerator for these losses): the step counts the valid tokens on the
    device; with gradient accumulation it takes the same SGD steps and logs the same loss as gathering the tokens."""
    calls = []
    original = tk.DistillationLoss._kept
    monkeypatch.setattr(tk.DistillationLoss, "_kept", lambda self, *a: calls.append(1) or original(self, *a))

    def kept():
        loss = LOSSES[name]()
        loss.sync_free_rows = True
        return loss

    gathered = _run_lm(tmp_path / "gathered", LOSSES[name], batch=8, accum=1)
    assert not calls  # the default on the CPU gathers the rows
    small = _run_lm(tmp_path / "kept", kept, batch=4, accum=2)
    assert len(calls) == 4  # 2 steps × 2 micro-batches
    assert_same_weights(params(gathered.model), params(small.model))
    torch.testing.assert_close([e["loss"] for e in train_logs(small)], [e["loss"] for e in train_logs(gathered)],
                               rtol=1e-5, atol=1e-7)
    assert train_logs(small)[-1]["tau_teacher_mean"] == pytest.approx(train_logs(gathered)[-1]["tau_teacher_mean"],
                                                                     rel=1e-5)


def test_accumulation_matches_one_big_batch_with_a_short_last_micro_batch(tmp_path):
    """Sequence classification, 6 samples: one batch of 6 vs micro-batches of 4 and 2 in one optimiser step."""
    runs = []
    for batch, accum in ((6, 1), (4, 2)):
        trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss="kd",
                                      args=args(tmp_path / str(batch), per_device_train_batch_size=batch,
                                                gradient_accumulation_steps=accum, num_train_epochs=1, optim="sgd",
                                                learning_rate=0.5, max_grad_norm=0.0),
                                      train_dataset=cls_data(6))
        trainer.train()
        assert trainer.state.global_step == 1
        runs.append(trainer)
    assert_same_weights(params(runs[0].model), params(runs[1].model))
    assert train_logs(runs[0])[0]["loss"] == pytest.approx(train_logs(runs[1])[0]["loss"], rel=1e-5)


# -- per-token loss --------------------------------------------------------------------------------------------------
def test_token_loss_counts_only_labelled_next_tokens(tmp_path, hand):
    """Position t is scored against token t+1; prompt (-100), padding and the last position get no gradient."""
    student, teacher = gpt2(0), gpt2(1, init=0.2)
    loss = tk.DistillationLoss(temperature=Fixed(2.0), ce_weight=0.3, kd_weight=0.7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, distillation_loss=loss, args=args(tmp_path))
    assert trainer.task == "causal-lm"
    batch = trainer.data_collator(lm_data(4))
    captured = {}

    def keep_logits(module, inputs, out):
        out.logits.retain_grad()
        captured["s"] = out.logits

    student.register_forward_hook(keep_logits)
    value = trainer.compute_loss(student, batch)
    value.backward()

    valid = (batch["labels"][:, 1:] != -100) & (batch["attention_mask"][:, 1:] == 1)
    with torch.no_grad():
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
    zs, y = captured["s"].detach()[:, :-1][valid], batch["labels"][:, 1:][valid]
    expected = 0.3 * hand.ce(zs, y).mean() + 0.7 * hand.kd(zs, zt, 2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)

    grad_rows = captured["s"].grad.abs().sum(-1)  # [B, L]
    counted = torch.cat([valid, torch.zeros(4, 1, dtype=torch.bool)], dim=1)
    assert bool((grad_rows[counted] > 0).all())
    assert bool((grad_rows[~counted] == 0).all()) and int((~counted).sum()) > 4


def test_token_classification_scores_each_labelled_token_in_place(tmp_path, hand):
    student, teacher = bert(0, head=BertForTokenClassification), bert(1, init=0.5, head=BertForTokenClassification)
    trainer = DistillationTrainer(model=student.eval(), teacher_model=teacher, args=args(tmp_path),
                                  distillation_loss=tk.DistillationLoss(temperature=Fixed(2.0), ce_weight=0.3,
                                                                        kd_weight=0.7))
    assert trainer.task == "token-classification"
    batch = trainer.data_collator(cls_data(4))
    batch["labels"] = torch.randint(0, CLASSES, batch["input_ids"].shape, generator=torch.Generator().manual_seed(5))
    batch["labels"][:, 0] = -100
    valid = (batch["labels"] != -100) & (batch["attention_mask"] == 1)  # padded tokens keep real labels here
    assert int((batch["labels"] != -100).sum()) > int(valid.sum())
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        zs, zt = student(**inputs).logits[valid], teacher(**inputs).logits[valid]
        value = trainer.compute_loss(student, batch)
    expected = 0.3 * hand.ce(zs, batch["labels"][valid]).mean() + 0.7 * hand.kd(zs, zt, 2.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def test_unlabelled_text_is_distilled_where_a_next_token_exists(tmp_path, hand):
    student, teacher = gpt2(0).eval(), gpt2(1, init=0.2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path),
                                  distillation_loss=tk.DistillationLoss(temperature=Fixed(2.0)))
    batch = trainer.data_collator([{k: d[k] for k in ("input_ids", "attention_mask")} for d in lm_data(4)])
    value = trainer.compute_loss(student, batch)
    valid = batch["attention_mask"][:, 1:] == 1
    with torch.no_grad():
        zs, zt = (m(**batch).logits[:, :-1][valid] for m in (student, teacher))
    torch.testing.assert_close(value.double(), 0.9 * hand.kd(zs, zt, 2.0), rtol=1e-5, atol=1e-6)


def test_padding_tokens_change_nothing(tmp_path):
    trainer = DistillationTrainer(model=gpt2(0).eval(), teacher_model=gpt2(1, init=0.2), distillation_loss="kd",
                                  args=args(tmp_path))
    batch = trainer.data_collator(lm_data(4))
    before = trainer.compute_loss(trainer.model, batch)
    padded = batch["attention_mask"] == 0
    assert bool(padded.any())
    batch["input_ids"] = torch.where(padded, (batch["input_ids"] + 7) % VOCAB, batch["input_ids"])
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(before.item(), rel=1e-6)


# -- resume ----------------------------------------------------------------------------------------------------------
RESUMABLE = {
    "dts": lambda: tk.DistillationLoss(temperature=DTS()),
    "ctkd": lambda: tk.DistillationLoss(temperature=CTKD()),
    "cist": lambda: tk.build_loss("cist"),  # ratio="auto" (calibrated once, then saved) and per-sample weights
}


def _run_cls(out, make_loss, resume=None):
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss=make_loss(),
                                  args=args(out, per_device_train_batch_size=4, num_train_epochs=3,
                                            save_strategy="steps", save_steps=5, logging_steps=2),
                                  train_dataset=cls_data(16))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("name", sorted(RESUMABLE))
def test_resume_restores_the_strategy_state(tmp_path, name):
    """12 steps straight vs a fresh trainer resumed from the mid-epoch checkpoint at step 5: same end state."""
    straight = _run_cls(tmp_path / "straight", RESUMABLE[name])
    checkpoint = tmp_path / "straight" / "checkpoint-5"
    assert (checkpoint / LOSS_STATE_NAME).is_file()
    resumed = _run_cls(tmp_path / "resumed", RESUMABLE[name], resume=str(checkpoint))
    assert straight.state.global_step == resumed.state.global_step == 12
    a, b = straight.distillation_loss.state_dict(), resumed.distillation_loss.state_dict()
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, equal_nan=False)
    assert_same_weights(params(straight.model), params(resumed.model))
    # the state really moved (so restoring it mattered)
    strategy = straight.distillation_loss.temperature
    fresh = RESUMABLE[name]().temperature
    if name == "cist":
        assert math.isfinite(float(strategy.ratio)) and math.isnan(float(fresh.ratio))
    else:
        key = "current" if name == "dts" else "theta"
        assert abs(float(getattr(strategy, key).detach()) - float(getattr(fresh, key).detach())) > 1e-3


def test_ctkd_theta_trains_with_the_student(tmp_path):
    loss = tk.DistillationLoss(temperature=CTKD())
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss=loss,
                                  args=args(tmp_path, per_device_train_batch_size=4, max_steps=2),
                                  train_dataset=cls_data(8))
    trainer.train()
    theta = loss.temperature.theta
    assert any(p is theta for group in trainer.optimizer.param_groups for p in group["params"])
    assert float(theta.detach()) != pytest.approx(loss.temperature.theta0)


def test_resume_without_loss_state_is_an_error(tmp_path):
    straight = _run_cls(tmp_path / "run", RESUMABLE["dts"])
    (tmp_path / "run" / "checkpoint-5" / LOSS_STATE_NAME).unlink()
    with pytest.raises(ThermoKDError, match=LOSS_STATE_NAME):
        straight.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))


# -- progress, observe, logging, evaluation --------------------------------------------------------------------------
def test_progress_and_observe_follow_optimiser_steps(tmp_path):
    """With 2 micro-batches per step, every micro-batch of step k sees step=k, and DTS observes once per step."""
    loss = tk.DistillationLoss(temperature=DTS())
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss=loss,
                                  args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                            num_train_epochs=3),
                                  train_dataset=cls_data(8), eval_dataset=cls_data(4, seed=3))
    seen, observed = [], []
    forward, observe = loss.forward, loss.observe
    loss.forward = lambda *a, **k: (seen.append(k["progress"]), forward(*a, **k))[1]
    loss.observe = lambda out: (observed.append(out.progress.step), observe(out))[1]
    trainer.train()
    assert [p.step for p in seen] == [s for s in range(6) for _ in range(2)]
    assert [p.epoch for p in seen] == [e for e in range(3) for _ in range(4)]
    assert {(p.total_steps, p.total_epochs) for p in seen} == {(6, 3)}
    assert observed == list(range(6))
    tau = float(loss.temperature.current)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and float(loss.temperature.current) == tau
    assert observed == list(range(6))  # evaluation never observes


def test_statistics_reach_the_trainer_logs(tmp_path):
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss="cist",
                                  args=args(tmp_path, per_device_train_batch_size=4, max_steps=4, logging_steps=2),
                                  train_dataset=cls_data(16))
    trainer.train()
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4]
    for entry in logs:
        for key in ("tau_teacher_mean", "tau_teacher_min", "tau_teacher_max", "tau_student_mean",
                    "teacher_entropy_mean", "teacher_entropy_std", "weight_std", "ce", "kd"):
            assert math.isfinite(entry[key]), key
        assert entry["tau_teacher_min"] <= entry["tau_teacher_mean"] <= entry["tau_teacher_max"]
        assert entry["weight_std"] > 0 and entry["teacher_entropy_mean"] > 0
        # the window means are those of the Trainer's own loss: 0.1·CE + 0.9·KD, averaged over the same steps
        assert entry["loss"] == pytest.approx(0.1 * entry["ce"] + 0.9 * entry["kd"], rel=1e-5)


def test_fixed_temperature_is_logged_exactly(tmp_path):
    trainer = DistillationTrainer(model=gpt2(0), teacher_model=gpt2(1), distillation_loss=tk.DistillationLoss(3.0),
                                  args=args(tmp_path, per_device_train_batch_size=4, max_steps=1),
                                  train_dataset=lm_data(4))
    trainer.train()
    entry = train_logs(trainer)[0]
    assert entry["tau_teacher_mean"] == entry["tau_student_mean"] == 3.0 and entry["weight_std"] == 0.0


# -- teacher logits from elsewhere, calibration ----------------------------------------------------------------------
def test_precomputed_teacher_logits_equal_the_online_teacher(tmp_path):
    teacher, data = bert(1, init=0.5), cls_data(8)
    with torch.no_grad():
        cached = [{**d, "teacher_logits": teacher(input_ids=d["input_ids"][None],
                                                  attention_mask=d["attention_mask"][None]).logits[0]} for d in data]
    runs = []
    for name, teacher_model, dataset in (("online", teacher, data), ("cached", None, cached)):
        trainer = DistillationTrainer(model=bert(0), teacher_model=teacher_model, distillation_loss="kd",
                                      args=args(tmp_path / name, per_device_train_batch_size=4, max_steps=2),
                                      train_dataset=dataset)
        trainer.train()
        runs.append(params(trainer.model))
    assert_same_weights(runs[0], runs[1], atol=1e-5)


def test_prepare_loss_calibrates_cist_on_the_training_set(tmp_path, hand):
    loss = tk.DistillationLoss(temperature=CIST(tau0=4.0))
    teacher, data = bert(1, init=0.5), cls_data(12)
    trainer = DistillationTrainer(model=bert(0), teacher_model=teacher, distillation_loss=loss,
                                  args=args(tmp_path, per_device_eval_batch_size=5), train_dataset=data)
    trainer.prepare_loss()
    batch = trainer.data_collator(data)
    with torch.no_grad():
        m = hand.centred_max(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert float(loss.temperature.ratio) == pytest.approx(float(m.median()) / 4.0, rel=1e-5)


# -- tasks and errors ------------------------------------------------------------------------------------------------
def test_task_detection():
    assert detect_task(gpt2(0)) == "causal-lm"
    assert detect_task(bert(0)) == "sequence-classification"
    assert detect_task(bert(0, head=BertForTokenClassification)) == "token-classification"
    with pytest.raises(ThermoKDError, match="pass task="):
        detect_task(torch.nn.Linear(3, 3))


def test_vocabulary_mismatch_names_both_sizes(tmp_path):
    with pytest.raises(ThermoKDError, match=r"vocabulary size is 80, the student's 64"):
        DistillationTrainer(model=gpt2(0), teacher_model=gpt2(1, vocab=80), distillation_loss="kd",
                            args=args(tmp_path))


def test_logit_shape_mismatch_names_both_shapes(tmp_path):
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, classes=7), distillation_loss="kd",
                                  args=args(tmp_path), teacher_logits_fn=lambda t, b: t(**b).logits)
    with pytest.raises(ThermoKDError, match=r"\(3, 7\) and student logits \(3, 5\)"):
        trainer.compute_loss(trainer.model, trainer.data_collator(cls_data(3)))


@pytest.mark.parametrize("kwargs, needle", [
    ({"task": "seq2seq"}, "unknown task 'seq2seq'; expected one of"),
    ({"distillation_loss": None}, "distillation_loss must be a thermokd.DistillationLoss or a method name"),
    ({"distillation_loss": "nope"}, "unknown method 'nope'"),
    ({"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func cannot be combined"),
    ({"teacher_model": "bert"}, "teacher_model must be a torch.nn.Module"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, needle):
    base = {"model": bert(0), "teacher_model": bert(1), "distillation_loss": "kd", "args": args(tmp_path)}
    with pytest.raises(ThermoKDError, match=needle):
        DistillationTrainer(**{**base, **kwargs})


def test_missing_teacher_and_foreign_optimizer_are_errors(tmp_path):
    trainer = DistillationTrainer(model=bert(0), distillation_loss="kd", args=args(tmp_path))
    with pytest.raises(ThermoKDError, match="no teacher"):
        trainer.compute_loss(trainer.model, trainer.data_collator(cls_data(2)))
    student = bert(0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ThermoKDError, match=r"\['temperature.theta'\]"):
        DistillationTrainer(model=student, teacher_model=bert(1), distillation_loss="ctkd", args=args(tmp_path),
                            optimizers=(optimizer, None))


def test_importing_thermokd_does_not_import_transformers():
    code = ("import sys, thermokd, thermokd.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- two processes (DDP on gloo) -------------------------------------------------------------------------------------
DDP_METHODS = {
    "dts": lambda: tk.DistillationLoss(temperature=DTS()),
    "ctkd": lambda: tk.DistillationLoss(temperature=CTKD()),
    "cist": lambda: tk.build_loss("cist"),
}
DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_hf_trainer import DDP_METHODS, _run_ddp_case
from thermokd.integrations.hf import DistillationTrainer

share, host_reads = DistillationTrainer._share_rank0_state, []
def counted(self):  # after the first step, sharing rank 0's state reads nothing back to the host
    first, real, calls = not self._host_floats_shared, {{}}, []
    for attr in ("cpu", "item", "tolist", "__float__"):
        real[attr] = getattr(torch.Tensor, attr)
        setattr(torch.Tensor, attr, lambda t, *a, _f=real[attr], _n=attr, **k: (calls.append(_n), _f(t, *a, **k))[1])
    try:
        share(self)
    finally:
        for attr, f in real.items():
            setattr(torch.Tensor, attr, f)
    if not first:
        host_reads.extend(calls)
DistillationTrainer._share_rank0_state = counted

for name in DDP_METHODS:
    trainer = _run_ddp_case(os.path.join({out!r}, name), name, batch=2, accum=2)
    temperature = trainer.distillation_loss.temperature
    torch.save({{"params": {{k: v.detach() for k, v in trainer.model.named_parameters()}},
                "loss": trainer.distillation_loss.state_dict(), "host_reads": list(host_reads),
                "host_floats": {{n: (temperature.host_float(n), float(getattr(temperature, n)))
                                for n in type(temperature).host_floats}}}},
               os.path.join({out!r}, f"{{name}}-rank{{trainer.args.process_index}}.pt"))
torch.distributed.destroy_process_group()  # gloo left to interpreter shutdown can abort after the work is done
"""


def _run_ddp_case(out, name: str, batch: int, accum: int):
    """3 SGD steps of 8 samples; CIST calibrates ρ on the whole training set first (``prepare_loss``)."""
    trainer = DistillationTrainer(model=bert(0), teacher_model=bert(1, init=0.5), distillation_loss=DDP_METHODS[name](),
                                  args=args(out, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                                            per_device_eval_batch_size=4, max_steps=3, optim="sgd", learning_rate=0.5,
                                            max_grad_norm=0.0),
                                  train_dataset=cls_data(24))
    if name == "cist":
        trainer.prepare_loss()
    trainer.train()
    return trainer


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """2 CPU processes × 2 micro-batches of 2 against one process with batches of 8: DTS's T and CTKD's θ (gradients
    averaged by hand) end equal on both ranks and equal to one process; CIST's ρ (calibrated on every process's rows,
    gathered) too, its host float included. Sharing rank 0's state after the first step reads nothing to the host.
    CIST's per-sample weights are normalised per micro-batch, so only its state is compared."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in DDP_METHODS:
        single = _run_ddp_case(tmp_path / f"single-{name}", name, batch=8, accum=1)
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for k, v in single.distillation_loss.state_dict().items():
            for rank in ranks:
                torch.testing.assert_close(rank["loss"][k], v, rtol=1e-5, atol=1e-6)
        for rank in ranks:
            assert rank["host_reads"] == []  # rank 0's state is broadcast in place, never copied to the host
            for host, buffer in rank["host_floats"].values():  # CIST's ρ: its float follows the broadcast buffer
                assert host == buffer
        if name != "cist":
            assert_same_weights(ranks[0]["params"], params(single.model))
            assert_same_weights(ranks[1]["params"], params(single.model))


@pytest.mark.parametrize("name", ["kd", "dts"])
def test_fused_head_trains_like_the_logits_path(tmp_path, name):
    """fused_head=True (hidden states + output heads, no [B, L, V] logits) takes the same SGD steps."""
    runs = {}
    for fused in (False, True):
        trainer = DistillationTrainer(model=gpt2(0), teacher_model=gpt2(1, init=0.2), distillation_loss=LOSSES[name](),
                                      fused_head=fused, args=args(tmp_path / str(fused), per_device_train_batch_size=4,
                                                                  max_steps=2, optim="sgd", learning_rate=0.5,
                                                                  max_grad_norm=0.0),
                                      train_dataset=lm_data(8))
        trainer.train()
        runs[fused] = trainer
    assert_same_weights(params(runs[False].model), params(runs[True].model), atol=1e-5)
    torch.testing.assert_close([e["loss"] for e in train_logs(runs[True])],
                               [e["loss"] for e in train_logs(runs[False])], rtol=1e-5, atol=1e-6)
    assert train_logs(runs[True])[-1]["tau_teacher_mean"] == pytest.approx(
        train_logs(runs[False])[-1]["tau_teacher_mean"], rel=1e-6)


def test_statistics_are_read_only_for_log_lines(tmp_path, monkeypatch):
    """Micro-batches and DTS's observe keep the statistics on the device; each log line reads its window once."""
    from thermokd.stats import LazyStats

    reads = []
    original = LazyStats._floats
    def counted(self):  # a transfer happens on the first read of a LazyStats only
        if self._values is None:
            reads.append(sorted(self._tensors))
        return original(self)

    monkeypatch.setattr(LazyStats, "_floats", counted)
    trainer = DistillationTrainer(model=gpt2(0), teacher_model=gpt2(1, init=0.2),
                                  distillation_loss=tk.DistillationLoss(temperature=DTS()),
                                  args=args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                            max_steps=4, logging_steps=2),
                                  train_dataset=lm_data(16))
    trainer.train()
    assert len(train_logs(trainer)) == 2 and len(reads) == 2, reads
    assert float(trainer.distillation_loss.temperature.current) != DTS().t_init  # observe ran, on tensors
