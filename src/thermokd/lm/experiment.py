"""``thermokd lm``: a teacher LM trained on a corpus, distilled into a smaller student with each method and seed,
every run on the Hugging Face Trainer (:mod:`thermokd.lm.trainer`); validation and test perplexity and next-token
accuracy per run, written to ``results.json`` and ``report.md``. With a ``tune`` section, each tuned method first gets
an Optuna study on the validation documents (``OUT/tune/LABEL``, :mod:`thermokd.lm.tuning`) and then runs as
``LABEL-tuned`` at the chosen setting. Resumable: finished runs and studies are kept, an unfinished run continues
from its latest checkpoint, an unfinished study from its last finished trial; folders made by separate processes
(e.g. one method each) merge by copying their ``runs/*`` and ``tune/*`` into one folder and running ``--resume``
there."""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import MethodConfig
from ..engine.identity import loss_settings
from ..errors import ThermoKDError
from ..files import FolderLock, read_json, write_json
from ..loss import DistillationLoss
from .config import LMRunConfig, tuned_label
from .data import LMData, prepare_data, windows_key
from .evaluate import evaluate
from .models import build_lm, count_parameters, parse_size
from .onpolicy import OnPolicy
from .sample import sample
from .sources import LogitsFile, TopKFile, capture_topk_file, write_logits_file
from .teacher import obtain_teacher
from .trainer import RunSettings, check_device, train_run

SAMPLE_PROMPT = "Once upon a time"


def method_loss(cfg: LMRunConfig, label: str) -> DistillationLoss:
    """The loss for a method label at the LM presets (``build_loss(name, domain="lm")``) with the label's
    overrides (``kd@TAU``, a variant of ``cfg.variants``)."""
    return cfg.method(label).build("lm")


def resolve_device(cfg: LMRunConfig) -> tuple[str, str]:
    """``train.device`` and ``train.mixed_precision`` with ``auto`` resolved: bf16 where the GPU supports it."""
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device, "train.device")
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    return device, precision


def _settings(cfg: LMRunConfig, device: str, precision: str, seed: int, progress_bar: bool, teacher: bool = False
              ) -> RunSettings:
    """A student's run settings from ``train``; the teacher's take its own steps, batch, lr and seed from
    ``teacher`` (no accumulation) and everything else from ``train``."""
    t = cfg.train
    settings = RunSettings(**{**vars(t), "seed": seed, "mixed_precision": precision, "device": device,
                              "progress_bar": progress_bar})
    if teacher:
        settings = dataclasses.replace(settings, steps=cfg.teacher.steps, batch_size=cfg.teacher.batch_size,
                                       grad_accum=1, lr=cfg.teacher.lr, seed=cfg.teacher.seed)
    return dataclasses.replace(settings, eval_every=min(t.eval_every, settings.steps))


def _teacher_spec(cfg: LMRunConfig, data: LMData) -> dict[str, Any]:
    """What determines the teacher besides its optimisation: the training text's content, the tokenizer itself (its
    vocabulary and merges), the training windows' token ids, the model and its initialisation seed."""
    return {"train_text": data.train_key, "tokenizer": data.tokenizer_key, "windows": windows_key(data.train),
            "context": cfg.data.context, "prompt_tokens": cfg.data.prompt_tokens, "size": cfg.teacher.size,
            "dropout": cfg.teacher.dropout, "seed": cfg.teacher.seed}


def _teacher(cfg: LMRunConfig, data: LMData, device: str, precision: str, cache_dir: "Path | None",
             echo: Callable[[str], None], progress_bar: bool) -> tuple[Any, dict[str, Any]]:
    """The trained teacher (from the cache, or trained now on ``teacher.device``) on ``device``, and its info."""
    build = lambda: build_lm(cfg.teacher.size, data.vocab_size, cfg.data.context, cfg.teacher.dropout,  # noqa: E731
                             cfg.teacher.seed, data.eos)
    on_eval = (lambda r: echo(f"  teacher step {r['step']}: val ppl {r['val_ppl']:.2f}")) if progress_bar else None
    trained_on = device if cfg.teacher.device == "auto" else cfg.teacher.device
    trained_with = precision if cfg.teacher.mixed_precision == "auto" else cfg.teacher.mixed_precision
    teacher, info = obtain_teacher(_teacher_spec(cfg, data), build, data.train, data.val,
                                   _settings(cfg, trained_on, trained_with, 0, progress_bar, teacher=True), cache_dir,
                                   on_eval, echo, run_device=device)
    test = evaluate(teacher, data.test, device)
    info.update(size=str(parse_size(cfg.teacher.size)), parameters=count_parameters(teacher), test_ppl=test["ppl"],
                test_acc=test["acc"], sample=sample(teacher, SAMPLE_PROMPT, tokenizer=data.tokenizer,
                                                    sampling_temperature=0.8, top_k=40, stop_id=data.eos))
    origin = "from the cache" if info["cached"] else f"trained in {info['train_seconds']:.0f} s"
    echo(f"teacher {info['size']} ({info['parameters']:,} parameters, {origin}): val ppl {info['val_ppl']:.2f}, "
         f"test ppl {info['test_ppl']:.2f}, test token accuracy {info['test_acc']:.4f}")
    return teacher, info


def _default_file(cfg: LMRunConfig, data: LMData, teacher_dir: str, kind: str) -> Path:
    name = f"{windows_key(data.train)}-{data.tokenizer_key}"
    if kind == "topk":
        return Path(teacher_dir) / f"{name}-top{cfg.teacher.k}-tau{cfg.teacher.capture_tau:g}.safetensors"
    return Path(teacher_dir) / f"{name}-{cfg.teacher.logits_dtype}.npy"


def capture_teacher_topk(cfg: LMRunConfig, path: Path, cache_dir: "Path | None" = None,
                         echo: Callable[[str], None] = print) -> Path:
    """``thermokd lm --capture-topk FILE``: the teacher's top-k cache of the training windows, for distilling
    later (elsewhere) with ``teacher.source: topk`` and ``teacher.file: FILE``, without the teacher."""
    data = prepare_data(cfg.data, cache_dir)
    device, precision = resolve_device(cfg)
    teacher, _ = _teacher(cfg, data, device, precision, cache_dir, echo, False)
    return capture_topk_file(teacher, data.train, path, cfg.teacher.k, data.tokenizer_key, windows_key(data.train),
                             cfg.teacher.capture_tau, device)


def _source(cfg: LMRunConfig, data: LMData, teacher: Any, teacher_dir: "str | None", device: str) -> Any:
    """The teacher source of ``cfg.teacher.source``; a missing file is written from the teacher first."""
    kind = cfg.teacher.source
    if kind == "online":
        return None
    path = Path(cfg.teacher.file) if cfg.teacher.file else _default_file(cfg, data, teacher_dir, kind)
    keys = (data.tokenizer_key, windows_key(data.train))
    # a file in the teacher's cache entry is written by one process; another that needs it waits, then reads it
    lock = FolderLock(path.parent, "teacher cache entry", wait=True) if not cfg.teacher.file else nullcontext()
    with lock:
        if not path.is_file():
            if teacher is None:
                raise ThermoKDError(f"teacher file {path} not found")
            if kind == "topk":
                capture_topk_file(teacher, data.train, path, cfg.teacher.k, *keys, cfg.teacher.capture_tau, device)
            else:
                write_logits_file(teacher, data.train, path, *keys, cfg.teacher.logits_dtype, device)
    if kind == "topk" and cfg.teacher.file:  # a given file brings its own k and capture τ
        return TopKFile(path, *keys)
    if kind == "topk":
        return TopKFile(path, *keys, k=cfg.teacher.k, capture_tau=cfg.teacher.capture_tau)
    return LogitsFile(path, *keys)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_lm_experiment(cfg: LMRunConfig, out_dir: Path, cache_dir: "Path | None" = None, resume: bool = False,
                      progress_bar: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or load) the teacher, then one student per method × seed with the same window order and
    initialisation per seed; write ``out_dir/results.json`` and ``out_dir/report.md``; return the results."""
    with FolderLock(Path(out_dir)):  # one writer per output folder
        check_resumable(cfg, Path(out_dir), resume)
        return _run_lm_experiment(cfg, Path(out_dir), cache_dir, resume, progress_bar, echo)


# the sections every run of a folder shares; methods, seeds and variants may grow between invocations, and so may
# tune's methods and trials, but not its search space (TUNE_FIELDS)
RUN_SECTIONS = ("data", "teacher", "student", "train", "on_policy")
TUNE_FIELDS = ("kd_weight", "space")
# fields added after folders were first recorded, at the default that does what those folders did: a folder that
# does not record one matches a request that leaves it at this default
LATER_FIELDS = {("teacher", "device"): "auto", ("teacher", "mixed_precision"): "auto"}


def check_resumable(cfg: LMRunConfig, out_dir: Path, resume: bool) -> None:
    """Before anything is written: a folder that holds runs is continued only with ``resume`` and only with the same
    data, teacher, student, training and on-policy settings (one line naming every changed field otherwise); its
    ``lm_config.json`` (:func:`record_settings`) records them."""
    from ..engine.identity import differences

    if not _is_main():
        return  # rank 0 checks (and writes lm_config.json, which the other ranks could otherwise see and refuse)
    path = out_dir / "lm_config.json"
    if path.is_file():
        if not resume:
            raise ThermoKDError(f"{out_dir} already holds an lm run; pass --resume to continue it or choose another "
                                "--out")
        recorded = read_json(path, f"delete {path}")
        if not isinstance(recorded, dict):
            raise ThermoKDError(f"{path} is damaged (not a mapping of settings); delete {path}")
        corpus = recorded.pop(CORPUS_DIGEST, None)  # absent in folders from before it was recorded: not compared
        requested = _run_settings(cfg)
        if "tune" not in recorded:  # a folder from before tune was recorded
            requested.pop("tune")
        for (section, name), default in LATER_FIELDS.items():
            if name not in recorded.get(section, {name: None}) and requested.get(section, {}).get(name) == default:
                requested[section].pop(name)
        changed = differences({"config": recorded, "data": corpus},
                              {"config": requested, "data": corpus and _corpus_digest(cfg)})
        if changed:
            raise ThermoKDError(f"--resume: {out_dir} was made with other settings ({'; '.join(changed)}); use the "
                                "same settings or another --out")


CORPUS_DIGEST = "corpus_digest"  # lm_config.json also records the corpus file's content, not only its path


def _run_settings(cfg: LMRunConfig) -> dict[str, Any]:
    settings = cfg.to_dict()
    return {**{k: v for k, v in settings.items() if k in RUN_SECTIONS},
            "tune": {k: settings["tune"][k] for k in TUNE_FIELDS}}


def _corpus_digest(cfg: LMRunConfig) -> str:
    from ..files import path_digest
    from .corpus import corpus_file

    return path_digest(corpus_file(cfg.data.corpus)[0])


def record_settings(cfg: LMRunConfig, out_dir: Path) -> None:
    """Write ``lm_config.json`` once the teacher and its file are ready, just before the first run: a command that
    stops earlier (a damaged cache entry, a foreign teacher file) leaves the folder as it was."""
    path = out_dir / "lm_config.json"
    if _is_main() and not path.is_file():
        write_json(path, {**_run_settings(cfg), CORPUS_DIGEST: _corpus_digest(cfg)})


@dataclasses.dataclass
class _Setup:
    """What every student run of an invocation shares: the data, the teacher (or its file) and the device."""

    cfg: LMRunConfig
    data: LMData
    device: str
    precision: str
    teacher: Any
    source: Any
    policy: "dict[str, Any] | None"
    progress_bar: bool
    echo: Callable[[str], None]

    def train(self, loss_fn: DistillationLoss, seed: int, run_dir: Path, resume: bool,
              on_eval: "Callable[[dict[str, Any]], None] | None") -> tuple[dict[str, Any], Any]:
        """One student of ``seed`` trained with ``loss_fn`` in ``run_dir``: its ``train_run`` result and model."""
        cfg, data = self.cfg, self.data
        student = build_lm(cfg.student.size, data.vocab_size, cfg.data.context, cfg.student.dropout, seed, data.eos)
        distils = bool(loss_fn.kd_weight)
        result = train_run(student, loss_fn, data.train, data.val,
                           _settings(cfg, self.device, self.precision, seed, self.progress_bar), run_dir,
                           teacher=self.teacher if distils and self.source is None else None,
                           teacher_source=self.source if distils else None,
                           on_policy=OnPolicy(seed=seed, **self.policy) if self.policy and distils else None,
                           resume=resume, on_eval=on_eval, echo=self.echo)
        return result, student

    def trial(self, method: Any, folder: Path, on_eval: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """A tuning trial (:data:`thermokd.experiments.tune.TrainFn`): seed 0 at ``method``'s setting, scored on
        the validation documents; its checkpoints are removed however it ends (finished, pruned, failed)."""
        loss_fn = method.build("lm")
        try:
            result, _ = self.train(loss_fn, 0, folder, False, on_eval)
        finally:
            for checkpoint in Path(folder).glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
        result.pop("trainer")
        if _is_main():
            write_json(Path(folder) / "result.json", {"setting": _setting(method), **result})
        return result


def _setting(method: Any) -> dict[str, Any]:
    """A method section as recorded in a run's ``result.json`` (JSON types, to compare with a recorded one)."""
    import json

    return json.loads(json.dumps(dataclasses.asdict(method)))


def _nothing_to_train(cfg: LMRunConfig, out_dir: Path) -> "dict[str, Any] | None":
    """The teacher's info as the finished runs recorded it when every study and every run of ``cfg`` is finished in
    ``out_dir`` at its current setting (nothing will train, so the teacher need not be loaded or trained), else
    None."""
    from .tuning import finished_study

    chosen = {}
    for label in cfg.tune.methods:
        summary = finished_study(out_dir / "tune" / label, cfg.tune.trials)
        if summary is None or "chosen_method" not in summary:
            return None
        chosen[tuned_label(label)] = summary["chosen_method"]
    expected = {}  # label -> (its setting, its loss as built), the same for every seed
    for label in cfg.run_labels():
        method = MethodConfig(**chosen[label]) if label in chosen else cfg.method(label)
        expected[label] = (_setting(method), loss_settings(method.build("lm")))
    info = None
    for seed in range(cfg.seeds):
        for label, (setting, built) in expected.items():
            done = _run_dir(out_dir, label, seed) / "result.json"
            if not done.is_file():
                return None
            run = read_json(done, f"delete {done} to run it again")
            if run.get("setting") != setting or not isinstance(run.get("teacher"), dict):
                return None
            if run.get("loss", built) != built:  # a preset or library default changed since it ran
                return None
            info = run["teacher"]
    return info


def _run_dir(out_dir: Path, label: str, seed: int) -> Path:
    return out_dir / "runs" / label.replace("@", "_at_") / f"seed{seed}"


def _run_lm_experiment(cfg: LMRunConfig, out_dir: Path, cache_dir: "Path | None", resume: bool, progress_bar: bool,
                       echo: Callable[[str], None]) -> dict[str, Any]:
    from ..experiments.compare import machine_description
    from .report import write_report
    from .tuning import tune_methods

    # an unknown label fails before any training
    losses = {label: method_loss(cfg, label) for label in [*cfg.methods, *cfg.tune.methods]}
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, precision = resolve_device(cfg)
    data = prepare_data(cfg.data, cache_dir)
    echo(f"{cfg.data.corpus}: {data.documents['train']} training / {data.documents['val']} validation / "
         f"{data.documents['test']} test documents, vocabulary {data.vocab_size}, {data.train.num_targets} / "
         f"{data.val.num_targets} / {data.test.num_targets} scored tokens; windows of {cfg.data.context}")
    needs_teacher = any(loss.kd_weight for loss in losses.values())
    file_only = cfg.teacher.source == "topk" and cfg.teacher.file and Path(cfg.teacher.file).is_file()
    teacher, info = None, {"source": cfg.teacher.source}
    recorded = _nothing_to_train(cfg, out_dir) if resume else None
    if recorded is not None:  # e.g. a folder merged from others: its runs say what the teacher was
        echo("every study and run is finished: the teacher is not needed (its figures are the runs' record)")
        info, needs_teacher = recorded, False
    elif needs_teacher and file_only:
        echo(f"teacher: top-k file {cfg.teacher.file} (the teacher model is not needed)")
        info.update(size=str(parse_size(cfg.teacher.size)), file=cfg.teacher.file)
    elif needs_teacher or cfg.teacher.source == "online":
        teacher, teacher_info = _teacher(cfg, data, device, precision, cache_dir, echo, progress_bar)
        info.update(teacher_info)
    source = _source(cfg, data, teacher, info.get("dir"), device) if needs_teacher else None
    policy = None
    if cfg.on_policy.fraction:
        policy = {**dataclasses.asdict(cfg.on_policy), "eos_id": data.eos}
    setup = _Setup(cfg, data, device, precision, teacher, source, policy, progress_bar, echo)

    record_settings(cfg, out_dir)
    chosen, tuning = tune_methods(cfg, out_dir, setup.trial, echo)
    cfg = dataclasses.replace(cfg, variants={**cfg.variants, **chosen})  # LABEL-tuned: LABEL at its chosen setting
    methods = cfg.run_labels()
    runs = []
    # counted here, not from a trained student: a resumed folder whose runs are all finished trains none
    student_parameters = count_parameters(build_lm(cfg.student.size, data.vocab_size, cfg.data.context,
                                                   cfg.student.dropout, 0, data.eos))
    for seed in range(cfg.seeds):
        for label in methods:
            run_dir = _run_dir(out_dir, label, seed)
            done = run_dir / "result.json"
            setting = _setting(cfg.method(label))
            loss_fn = method_loss(cfg, label)  # fresh state (DTS's T, CIST's ρ) for every run
            built = loss_settings(loss_fn)
            if resume and done.is_file():
                kept = read_json(done, f"delete {done} to run it again")
                # runs from before settings (or losses as built) were recorded are kept
                if kept.get("setting", setting) == setting and kept.get("loss", built) == built:
                    runs.append(kept)
                    echo(f"  {label:16s} seed {seed}: finished earlier (kept)")
                    continue
                if kept.get("setting", setting) == setting:
                    echo(f"  {label:16s} seed {seed}: its loss as built changed since it ran (a preset or a library "
                         "default); training it again")
            # a run started (or finished) at another setting, e.g. before a longer study chose another, starts over
            started_at = run_dir.parent / f"seed{seed}.setting.json"
            same = not started_at.is_file() or read_json(started_at, f"delete {started_at}") == setting
            if resume and not same:
                echo(f"  {label:16s} seed {seed}: its setting changed since it started; training it again")
            if _is_main():
                write_json(started_at, setting)
            on_eval = ((lambda r, who=f"{label} seed {seed}": echo(
                f"  {who} step {r['step']}: val ppl {r['val_ppl']:.2f}, acc {r['val_acc']:.4f}"))
                if progress_bar else None)
            result, student = setup.train(loss_fn, seed, run_dir, resume and same, on_eval)
            run_device = result.pop("trainer").args.device  # under torchrun, this process's own GPU
            test = evaluate(student, data.test, run_device)
            run = {"method": label, "seed": seed, "setting": setting, "loss": built, **result, "ppl": test["ppl"],
                   "acc": test["acc"], "ce": test["ce"], "teacher": info,
                   "device": torch.device(run_device).type, "mixed_precision": setup.precision}
            if seed == 0:
                run["sample"] = sample(student, SAMPLE_PROMPT, tokenizer=data.tokenizer, sampling_temperature=0.8,
                                       top_k=40, stop_id=data.eos)
            if _is_main():
                write_json(done, run)
                for checkpoint in run_dir.glob("checkpoint-*"):  # they served resumption; the result is written
                    shutil.rmtree(checkpoint, ignore_errors=True)
            echo(f"  {label:16s} seed {seed}: val ppl {run['val_ppl']:.2f}, test ppl {run['ppl']:.2f}, test token "
                 f"accuracy {run['acc']:.4f} ({run['seconds']:.0f} s)")
            runs.append(run)
    results = {"corpus": cfg.data.corpus, "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_description(), "config": cfg.to_dict(), "methods": methods,
               "seeds": list(range(cfg.seeds)), "vocab_size": data.vocab_size, "device": device,
               "mixed_precision": precision,
               "data": {"train_documents": data.documents["train"], "val_documents": data.documents["val"],
                        "test_documents": data.documents["test"], "train_windows": len(data.train),
                        "train_tokens": data.train.num_targets, "val_tokens": data.val.num_targets,
                        "test_tokens": data.test.num_targets},
               "teacher": info,
               "student": {"size": str(parse_size(cfg.student.size)), "parameters": student_parameters},
               "runs": runs, "tuning": tuning, "sample_prompt": SAMPLE_PROMPT,
               "wall_seconds": time.perf_counter() - started}
    if _is_main():
        write_json(out_dir / "results.json", results)
        write_report(results, out_dir)
    return results
