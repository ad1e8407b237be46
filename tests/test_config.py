"""The shipped configs load, ``--set`` overrides apply with the right types, and bad fields name themselves."""
from __future__ import annotations

from pathlib import Path

import pytest

from thermokd.config import RunConfig, TrainConfig, load_config, resolve_method
from thermokd.errors import ConfigError, ThermoKDError
from thermokd.methods import method_names

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DIGITS = CONFIGS[0].parent / "digits.yaml"


def test_the_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "fashion_mnist.yaml", "cifar100_resnet32x4_resnet8x4.yaml",
            "cifar100_wrn40_2_wrn16_2.yaml", "cifar100_resnet56_resnet20.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name in method_names()
    assert cfg.train.batch_size % cfg.train.grad_accum == 0
    assert isinstance(cfg.train.optimizer.lr, float) and isinstance(cfg.train.optimizer.weight_decay, float)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("cifar100_")], ids=lambda p: p.stem)
def test_cifar100_configs_follow_the_standard_protocol(path):
    cfg = load_config(path)  # the CIFAR folder need not exist when the config is read
    assert cfg.data.name.startswith("cifar100:") and cfg.data.augment == "crop-flip"
    for section in (cfg.train, cfg.teacher):
        assert section.epochs == 240 and section.batch_size == 64
        assert (section.optimizer.name, section.optimizer.lr, section.optimizer.momentum,
                section.optimizer.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
        assert (section.schedule.name, section.schedule.milestones, section.schedule.gamma) == \
            ("step", [150, 180, 210], 0.1)
    assert cfg.teacher.model != cfg.student.model


def test_overrides_apply_with_the_right_types():
    cfg = load_config(DIGITS, ["train.epochs=3", "train.optimizer.lr=1e-3", "method.temperature={tau: 2}",
                               "teacher.optimizer.lr=1", "data.name=npz:/tmp/x.npz",
                               "train.schedule.milestones=[2, 4]"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.optimizer.lr == 1e-3 and type(cfg.train.optimizer.lr) is float
    assert cfg.method.temperature == {"tau": 2}
    assert cfg.teacher.optimizer.lr == 1.0 and type(cfg.teacher.optimizer.lr) is float  # int widened to float
    assert cfg.data.name == "npz:/tmp/x.npz"
    assert cfg.train.schedule.milestones == [2, 4]
    assert load_config(None).train.epochs == TrainConfig().epochs  # no file: the dataclass defaults


def _error(overrides, path=DIGITS) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert isinstance(info.value, ThermoKDError) and isinstance(info.value, ValueError)
    return str(info.value)


@pytest.mark.parametrize("overrides, fragments", [
    (["trian.epochs=3"], ["trian", "data", "method", "student", "teacher", "train"]),
    (["train.optimzer.lr=0.1"], ["train.optimzer", "optimizer", "schedule", "grad_accum"]),
    (["train.epochs=abc"], ["train.epochs", "int", "'abc'"]),
    (["train.epochs=2.5"], ["train.epochs", "int", "2.5"]),
    (["train.optimizer.name=rmsprop"], ["train.optimizer.name", "rmsprop", "'sgd'", "'adamw'"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "'no'", "'fp16'", "'bf16'"]),
    (["train.batch_size=64", "train.grad_accum=3"], ["train.batch_size=64", "train.grad_accum=3", "divisible"]),
    (["train.epochs=0"], ["train.epochs", "> 0"]),
    (["train.optimizer.lr=-1"], ["train.optimizer.lr", "> 0"]),
    (["student.model=resnet1000"], ["student.model", "resnet1000", "resnet8", "mlp"]),
    (["train.epochs"], ["--set", "key=value", "train.epochs"]),
    (["=3"], ["--set", "key=value"]),
])
def test_invalid_fields_name_themselves(overrides, fragments):
    message = _error(overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_unknown_method_lists_the_methods():
    message = _error(["method.name=cist2"])
    assert "method.name" in message and "cist2" in message
    assert all(name in message for name in method_names())


def test_method_names_are_normalised():
    assert load_config(DIGITS, ["method.name=Entropy_Target"]).method.name == "entropy-target"


def test_missing_and_malformed_files(tmp_path):
    assert "not found" in _error(None, tmp_path / "nope.yaml") and "nope.yaml" in _error(None, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert "bad.yaml" in _error(None, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "mapping" in _error(None, listy)
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    assert "train" in _error(None, section) and "mapping" in _error(None, section)


def test_method_options_are_checked_when_the_config_loads():
    msg = _error(["method.name=kd", "method.temperature={tau0: 2}"])
    assert "method" in msg and "tau0" in msg


def test_step_schedule_needs_milestones():
    assert "milestones" in _error(["train.schedule.name=step", "train.schedule.milestones=[]"])


def test_set_fills_an_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student:\ntrain:\n  epochs: 2\n")
    assert load_config(path, ["student.model=resnet8"]).student.model == "resnet8"


def test_compare_section_variants_and_kd_at_tau():
    cfg = load_config(DIGITS, ["compare.methods=[ce, kd@2, no-weights, Kd]",
                               "compare.variants={no-weights: {name: CIST, weighting: {alpha: 0, beta: 0}}}",
                               "compare.seeds=2", "method.temperature={tau: 3}"])
    assert cfg.compare.seeds == 2
    resolved = {label: resolve_method(cfg, label) for label in cfg.compare.methods}
    assert resolved["kd@2"].name == "kd" and resolved["kd@2"].temperature == {"tau": 2.0}
    assert resolved["no-weights"].name == "cist" and resolved["no-weights"].weighting == {"alpha": 0, "beta": 0}
    assert resolved["Kd"].temperature == {"tau": 3}  # the config's own method keeps its overrides
    assert resolve_method(cfg, "dts").temperature == {}  # any other method runs at its defaults
    resolved["no-weights"].weighting["alpha"] = 1  # a resolved section is a copy
    assert cfg.compare.variants["no-weights"].weighting["alpha"] == 0


@pytest.mark.parametrize("overrides, fragments", [
    (["compare.methods=[kd, magic]"], ["magic", "kd@TAU", "cist"]),
    (["compare.methods=[cist@2]"], ["cist@2", "kd@TAU"]),
    (["compare.methods=[kd@-1]"], ["kd@-1", "TAU > 0"]),
    (["compare.variants={cist: {name: kd}}"], ["compare.variants", "'cist'", "method name"]),
    (["compare.variants={x: {name: cist, weighting: {gamma: 1}}}"], ["compare.variants.x", "gamma"]),
    (["compare.variants={x: {nme: cist}}"], ["compare.variants.x.nme", "name"]),
    (["compare.seeds=0"], ["compare.seeds", "> 0"]),
])
def test_bad_compare_sections_name_themselves(overrides, fragments):
    message = _error(overrides)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_each_method_gets_its_own_study_and_a_shifted_sampler_seed():
    from thermokd.config import TuneConfig
    from thermokd.lm.config import LMTuneConfig

    base = TuneConfig(trials=3, seed=4)
    assert (base.for_method("kd").study, base.for_method("kd", 7).seed) == ("kd", 11)
    named = LMTuneConfig(study="grimm", seed=1).for_method("cist")
    assert isinstance(named, LMTuneConfig) and (named.study, named.seed) == ("grimm-cist", 1)
    assert base.study is None and base.seed == 4  # the config itself is left alone
