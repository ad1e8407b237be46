"""``thermokd lm``: a teacher LM trained on a shipped corpus, distilled into a smaller student with each method
and seed; validation perplexity and next-token accuracy per run, written to ``results.json`` and ``report.md``."""
from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ThermoKDError
from ..loss import DistillationLoss
from .batches import make_windows
from .corpus import fingerprint, load_corpus, split_documents
from .distill import TeacherLogits, TrainSettings, train_lm
from .models import build_lm, count_parameters, parse_size
from .sample import sample
from .teacher import obtain_teacher
from .tokenizer import encode_documents, eos_id, train_tokenizer, tokenizer_key

SAMPLE_PROMPT = "Once upon a time"


@dataclass
class LMConfig:
    """Everything one ``thermokd lm`` run depends on besides the methods and seeds. The defaults are the demo's
    (docs/lm.md): with 5 methods × 3 seeds it took 9.9 min on one thread of a busy 2-core machine."""

    corpus: str = "grimm-tales"
    vocab_size: int = 1024
    context: int = 128
    validation_fraction: float = 0.1
    split_seed: int = 0
    prompt_tokens: int = 0          # the first N tokens of every window are context only (labels -100)
    max_train_tokens: "int | None" = None  # keep only the first windows of the training split (quick runs)
    batch_size: int = 16
    teacher: str = "3x192"
    teacher_steps: int = 500
    teacher_lr: float = 3e-3
    teacher_dropout: float = 0.1
    teacher_seed: int = 0
    student: str = "2x64"
    steps: int = 400
    lr: float = 3e-3
    student_dropout: float = 0.0
    eval_every: int = 100
    device: str = "cpu"

    def check(self) -> None:
        parse_size(self.teacher), parse_size(self.student)
        for name in ("teacher_steps", "steps", "batch_size", "eval_every", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ThermoKDError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            raise ThermoKDError(f"max_train_tokens must be >= 1, got {self.max_train_tokens!r}")
        try:
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise ThermoKDError(f"device {self.device!r} is not usable here: {str(exc).splitlines()[0]}") from None


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names (``thermokd.method_names()``) or ``kd@TAU``, checked (as ``thermokd
    compare`` checks them, against a config with no variants)."""
    from ..config import RunConfig
    from ..experiments.compare import parse_methods as parse_labels

    return parse_labels(text, RunConfig())


def method_loss(label: str) -> DistillationLoss:
    """The loss for a method label: a method name at its defaults, or ``kd@TAU`` (fixed-τ KD)."""
    from ..config import RunConfig, resolve_method
    from ..methods import build_loss

    method = resolve_method(RunConfig(), label)
    return build_loss(method.name, temperature=method.temperature, weighting=method.weighting, **method.loss)


def _settings(cfg: LMConfig, steps: int, lr: float, seed: int) -> TrainSettings:
    return TrainSettings(steps=steps, batch_size=cfg.batch_size, lr=lr, eval_every=min(cfg.eval_every, steps),
                         seed=seed)


def run_lm_experiment(cfg: LMConfig, methods: list[str], seeds: list[int], out_dir: Path,
                      cache_dir: "Path | None" = None, progress_bar: bool = True,
                      echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the teacher, then one student per method × seed with the same window order per seed; write
    ``out_dir/results.json`` and ``out_dir/report.md``; return the results."""
    from ..engine.checkpoint import write_json_atomic
    from ..experiments.compare import machine_description
    from .report import write_report

    cfg.check()
    if not seeds:
        raise ThermoKDError("give at least one seed")
    for label in methods:
        method_loss(label)  # an unknown label fails now, not after the teacher has trained
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    train_docs, val_docs = split_documents(load_corpus(cfg.corpus), cfg.validation_fraction, cfg.split_seed)
    texts = [d.text for d in train_docs]
    tok = train_tokenizer(texts, cfg.vocab_size, cache_dir)
    vocab, end = tok.get_vocab_size(), eos_id(tok)
    train = make_windows(encode_documents(tok, texts), cfg.context, end, cfg.prompt_tokens)
    if cfg.max_train_tokens is not None:
        train = train.head(max(1, cfg.max_train_tokens // cfg.context))
    val = make_windows(encode_documents(tok, [d.text for d in val_docs]), cfg.context, end, cfg.prompt_tokens)
    echo(f"{cfg.corpus}: {len(train_docs)} training / {len(val_docs)} validation documents, vocabulary {vocab}, "
         f"{train.num_targets} / {val.num_targets} scored tokens in {len(train)} / {len(val)} windows of {cfg.context}")

    def progress(who: str) -> "Callable[[dict[str, Any]], None] | None":
        if not progress_bar:
            return None
        return lambda r: echo(f"  {who} step {r['step']}: val ppl {r['val_ppl']:.2f}, acc {r['val_acc']:.4f}")

    spec = {"train_text": fingerprint(train_docs), "tokenizer": tokenizer_key(texts, cfg.vocab_size),
            "context": cfg.context, "prompt_tokens": cfg.prompt_tokens, "windows": len(train), "size": cfg.teacher,
            "dropout": cfg.teacher_dropout, "seed": cfg.teacher_seed}
    build_teacher = lambda: build_lm(cfg.teacher, vocab, cfg.context, cfg.teacher_dropout, cfg.teacher_seed, end)  # noqa: E731
    teacher_started = time.perf_counter()
    teacher, info = obtain_teacher(spec, build_teacher, train, val,
                                   _settings(cfg, cfg.teacher_steps, cfg.teacher_lr, cfg.teacher_seed),
                                   cfg.device, cache_dir, on_eval=progress("teacher"))
    info.update(size=str(parse_size(cfg.teacher)), parameters=count_parameters(teacher),
                sample=sample(teacher, SAMPLE_PROMPT, tokenizer=tok, sampling_temperature=0.8, top_k=40,
                              stop_id=end))
    origin = "from the cache" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
    echo(f"teacher {info['size']} ({info['parameters']:,} parameters, {origin}): "
         f"val ppl {info['val_ppl']:.2f}, token accuracy {info['val_acc']:.4f}")
    teacher_logits = TeacherLogits(teacher, train, cfg.device)
    setup_seconds = time.perf_counter() - teacher_started  # training or loading, evaluation, logits

    runs = []
    student_parameters = 0
    for seed in seeds:
        for label in methods:
            loss_fn = method_loss(label)  # fresh state (DTS's T, CIST's ρ) for every run
            if loss_fn.kd_weight:
                loss_fn.prepare(teacher_logits.calibration_rows())
            student = build_lm(cfg.student, vocab, cfg.context, cfg.student_dropout, seed, end)
            student_parameters = count_parameters(student)
            result = train_lm(student, loss_fn, train, val, _settings(cfg, cfg.steps, cfg.lr, seed), cfg.device,
                              teacher_logits, on_eval=progress(f"{label} seed {seed}"))
            run = {"method": label, "seed": seed, **result}
            if seed == seeds[0]:
                run["sample"] = sample(student, SAMPLE_PROMPT, tokenizer=tok, sampling_temperature=0.8, top_k=40,
                                       stop_id=end)
            echo(f"  {label:16s} seed {seed}: val ppl {result['ppl']:.2f}, token accuracy {result['acc']:.4f} "
                 f"({result['seconds']:.0f} s)")
            runs.append(run)
    results = {"corpus": cfg.corpus, "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_description(), "config": dataclasses.asdict(cfg), "methods": methods,
               "seeds": seeds, "vocab_size": vocab,
               "data": {"train_documents": len(train_docs), "val_documents": len(val_docs),
                        "train_windows": len(train), "val_windows": len(val), "train_tokens": train.num_targets,
                        "val_tokens": val.num_targets},
               "teacher": {**info, "setup_seconds": setup_seconds,
                           "logits_precomputed": teacher_logits.precomputed},
               "student": {"size": str(parse_size(cfg.student)), "parameters": student_parameters},
               "runs": runs, "sample_prompt": SAMPLE_PROMPT, "wall_seconds": time.perf_counter() - started}
    write_json_atomic(out_dir / "results.json", results)
    write_report(results, out_dir)
    return results
