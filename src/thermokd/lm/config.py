"""``thermokd lm`` configs: a YAML file of six sections validated into dataclasses, ``--set section.field=value``
overrides, and every error naming the field (the same machinery as :mod:`thermokd.config`).

A complete example ships as ``thermokd/configs/lm/grimm.yaml`` (``--config grimm``); every field has a default, so
an empty file is the demonstration's set-up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import (CompareConfig, MethodConfig, RunConfig, TuneConfig, apply_overrides, build_section,
                      resolve_method, validate_method)
from ..errors import ConfigError, ThermoKDError


@dataclass
class LMDataConfig:
    """The corpus and its split by document: ``test_fraction`` is held out and reported; ``validation_fraction``
    is carved from the rest and is what settings (presets, tuning) are chosen on."""

    corpus: str = "grimm-tales"
    vocab_size: int = 1024
    context: int = 128
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    prompt_tokens: int = 0          # the first N tokens of every window are context only (labels -100)
    max_train_tokens: "int | None" = None  # keep only the first training windows (quick runs)


@dataclass
class LMTeacherConfig:
    """The teacher: a GPT-2 of ``size`` trained here with cross-entropy (cached), and where the student's loss
    reads its logits from: ``online`` (a forward pass per batch), ``logits`` (a memory-mapped file of full
    logits, for small vocabularies) or ``topk`` (a file of k log-probabilities + the rest mass per token).
    ``file``: the logits/top-k file (default: in the cache, keyed by the teacher); with ``source: topk`` and a
    given file, the teacher is never built. ``device`` and ``mixed_precision``: where and how the teacher is
    *trained* (``auto``: as the students, ``train.device`` and ``train.mixed_precision``); both are part of its cache
    key, and a cached teacher is loaded onto the students' device whatever it was trained on (e.g. a teacher trained
    on a GPU in bf16, reused on a CPU with ``teacher.device: cuda``, ``teacher.mixed_precision: bf16``)."""

    size: str = "3x192"
    steps: int = 500
    lr: float = 3e-3
    dropout: float = 0.1
    seed: int = 0
    batch_size: int = 16
    source: Literal["online", "logits", "topk"] = "online"
    file: "str | None" = None
    k: int = 64
    capture_tau: float = 1.0
    logits_dtype: Literal["float16", "float32"] = "float32"
    device: str = "auto"
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"


@dataclass
class LMStudentConfig:
    size: str = "2x64"
    dropout: float = 0.0


@dataclass
class LMTrainConfig:
    """Student optimisation on the Hugging Face Trainer: AdamW (β 0.9, 0.95), linear warm-up over ``warmup`` of
    the steps, cosine decay to 10 % of ``lr``. ``batch_size`` is the global batch per optimiser step (split over
    processes and ``grad_accum``). ``mixed_precision: auto`` is bf16 on a GPU that supports it, else float32."""

    steps: int = 400
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation (GKD's λ): with probability ``fraction`` per micro-batch the student continues the
    first ``prompt_tokens`` of each window by ``new_tokens`` sampled tokens (``sampling_temperature``, ``top_p``:
    generation settings, never read by the loss) and the loss runs on those tokens only. 0: off."""

    fraction: float = 0.0
    prompt_tokens: int = 16
    new_tokens: int = 32
    sampling_temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class LMTuneConfig(TuneConfig):
    """``thermokd tune`` inside ``thermokd lm``: each label of ``methods`` (a method name at its LM preset, or a
    variant) gets a study of ``trials`` trials on the validation documents (seed 0, pruned per evaluation round),
    then runs for every seed as ``LABEL-tuned`` at the chosen setting. The other fields are ``compare.tune``'s."""

    trials: int = 8
    methods: list[str] = field(default_factory=list)


TUNED_SUFFIX = "-tuned"


@dataclass
class LMRunConfig:
    data: LMDataConfig = field(default_factory=LMDataConfig)
    teacher: LMTeacherConfig = field(default_factory=LMTeacherConfig)
    student: LMStudentConfig = field(default_factory=LMStudentConfig)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    methods: list[str] = field(default_factory=lambda: ["ce", "kd", "cist", "dts", "entropy-target"])
    seeds: int = 3
    variants: dict[str, MethodConfig] = field(default_factory=dict)
    tune: LMTuneConfig = field(default_factory=LMTuneConfig)

    def validate(self) -> "LMRunConfig":
        from .models import parse_size

        for where, size in (("teacher.size", self.teacher.size), ("student.size", self.student.size)):
            try:
                parse_size(size)
            except Exception as exc:  # noqa: BLE001 - a ThermoKDError naming the size
                raise ConfigError(f"{where}: {exc}") from None
        for where, value in (("data.vocab_size", self.data.vocab_size), ("data.context", self.data.context),
                             ("teacher.steps", self.teacher.steps), ("teacher.batch_size", self.teacher.batch_size),
                             ("teacher.k", self.teacher.k), ("train.steps", self.train.steps),
                             ("train.batch_size", self.train.batch_size), ("train.grad_accum", self.train.grad_accum),
                             ("train.eval_every", self.train.eval_every), ("train.save_every", self.train.save_every),
                             ("seeds", self.seeds), ("on_policy.new_tokens", self.on_policy.new_tokens),
                             ("on_policy.prompt_tokens", self.on_policy.prompt_tokens),
                             ("teacher.lr", self.teacher.lr), ("train.lr", self.train.lr),
                             ("teacher.capture_tau", self.teacher.capture_tau)):
            if isinstance(value, bool) or not value > 0:
                raise ConfigError(f"{where} must be > 0, got {value!r}")
        if self.data.max_train_tokens is not None and self.data.max_train_tokens < 1:
            raise ConfigError(f"data.max_train_tokens must be >= 1, got {self.data.max_train_tokens!r}")
        fractions = (self.data.validation_fraction, self.data.test_fraction)
        if not all(0 < f < 1 for f in fractions) or sum(fractions) >= 1:
            raise ConfigError(f"data.validation_fraction and data.test_fraction must be in (0, 1) with a sum < 1, "
                              f"got {fractions[0]!r} and {fractions[1]!r}")
        if not 0 <= self.on_policy.fraction <= 1:
            raise ConfigError(f"on_policy.fraction must be in [0, 1], got {self.on_policy.fraction!r}")
        if not self.on_policy.sampling_temperature >= 0 or not 0 < self.on_policy.top_p <= 1:
            raise ConfigError(f"on_policy: sampling_temperature must be >= 0 and top_p in (0, 1], got "
                              f"{self.on_policy.sampling_temperature!r} and {self.on_policy.top_p!r}")
        if self.on_policy.fraction and self.teacher.source != "online":
            raise ConfigError(f"on_policy.fraction={self.on_policy.fraction} needs teacher.source: online (the teacher "
                              f"scores the student's own tokens; a {self.teacher.source} file cannot)")
        if self.train.batch_size % self.train.grad_accum:
            raise ConfigError(f"train.batch_size={self.train.batch_size} must be divisible by "
                              f"train.grad_accum={self.train.grad_accum}")
        if not 0 <= self.train.warmup < 1:
            raise ConfigError(f"train.warmup must be in [0, 1) (a fraction of the steps), got {self.train.warmup!r}")
        for label, variant in self.variants.items():
            validate_method(variant, f"variants.{label}")
        if not self.methods and not self.tune.methods:  # tuned labels alone are a run too (LABEL-tuned only)
            raise ConfigError("methods: give at least one method (or a tune.methods label)")
        for label in self.methods:
            self.method(label)  # a ConfigError naming the label
        self._validate_tune()
        return self

    def _validate_tune(self) -> None:
        from ..experiments.tune import build_space
        from ..registry import normalise

        tune = self.tune
        tune.methods = list(dict.fromkeys(normalise(label) for label in tune.methods))
        if not tune.methods:
            return
        tune.validate(lambda field_name: f"tune.{field_name}", min_trials=1)
        for label in tune.methods:
            if label.startswith("kd@"):
                raise ConfigError(f"tune.methods: {label} is KD at a fixed τ; tune kd instead")
            if tuned_label(label) in {normalise(v) for v in self.variants}:
                raise ConfigError(f"tune.methods: {label} would be run as {tuned_label(label)}, which is already a "
                                  "variant; rename that variant")
            try:
                method = self.method(label)
            except ConfigError as exc:
                raise ConfigError(f"tune.methods: {exc}") from None
            try:
                space = build_space(method, tune, domain="lm")
            except ThermoKDError as exc:
                raise ConfigError(f"tune (for {label}): {exc}") from None
            if not space:
                raise ConfigError(f"tune.methods: {label} has nothing to tune (no temperature knobs)")

    def run_labels(self) -> list[str]:
        """Every label that runs for each seed: ``methods``, each followed by its tuned label when it is tuned, then
        the tuned labels of tuned methods that ``methods`` does not list."""
        from ..registry import normalise

        labels = []
        for label in self.methods:
            labels.append(label)
            if normalise(label) in self.tune.methods:
                labels.append(tuned_label(normalise(label)))
        listed = {normalise(label) for label in self.methods}
        return labels + [tuned_label(m) for m in self.tune.methods if m not in listed]

    def method(self, label: str) -> MethodConfig:
        """The ``method`` section a label stands for: a variant, ``kd@TAU`` or a method name (LM presets apply)."""
        return resolve_method(RunConfig(compare=CompareConfig(variants=self.variants)), label)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tuned_label(label: str) -> str:
    """The label of ``label`` run at its tuned setting."""
    return f"{label}{TUNED_SUFFIX}"


BUNDLED = Path(__file__).resolve().parent.parent / "configs" / "lm"


def resolve_lm_config(path: "str | None") -> "Path | None":
    """``--config`` as a file, or a bundled LM config name (``grimm``, ``bench``); None: the defaults."""
    if not path:
        return None
    p = Path(path)
    if p.is_file() or p.suffix in (".yaml", ".yml"):
        return p
    bundled = BUNDLED / f"{path.replace('-', '_')}.yaml"
    if bundled.is_file():
        return bundled
    raise ConfigError(f"config {path!r} is neither a file nor a bundled config "
                      f"({', '.join(sorted(f.stem for f in BUNDLED.glob('*.yaml')))})")


def load_lm_config(path: "str | Path | None" = None, overrides: "list[str] | None" = None) -> LMRunConfig:
    """Read an LM config (the defaults when ``path`` is None) and apply ``section.field=value`` overrides."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_lm_config(str(path))
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return build_section(LMRunConfig, apply_overrides(raw, overrides), "").validate()
