"""The CIST ablation's config and table script (benchmarks/cist_ablation/, docs/cist-ablation.md)."""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest

from thermokd.config import load_config, resolve_method
from thermokd.temperature import CIST
from thermokd.weighting import ConfidenceDifficulty

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "cist_ablation" / "fashion_mnist_mlp.yaml"
TEXT_CONFIG = ROOT / "benchmarks" / "cist_ablation" / "20newsgroups_hybrid.yaml"
OPTIONS = {"temperature": {"student", "gamma", "student_floor", "max_kind", "scale"},
           "weighting": set(inspect.signature(ConfidenceDifficulty).parameters) - {"momentum"}}


def _table_module():
    spec = importlib.util.spec_from_file_location("cist_table", ROOT / "benchmarks" / "cist_ablation" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config, labels", [(CONFIG, 16), (TEXT_CONFIG, 8)])
def test_every_cist_label_spells_out_its_settings(config, labels):
    """A label keeps its meaning when CIST's defaults change: each names every option it is compared on."""
    cfg = load_config(config).validate()
    cist_labels = [label for label in cfg.compare.methods if resolve_method(cfg, label).name == "cist"]
    assert len(cist_labels) == labels and {"ce", "kd"} <= set(cfg.compare.methods)
    for label in cist_labels:
        method = resolve_method(cfg, label)
        assert set(method.temperature) == OPTIONS["temperature"], label
        assert set(method.weighting) == OPTIONS["weighting"], label
        assert "tau0" not in method.temperature  # tau0 is the tuned knob, as τ is KD's
    assert cfg.compare.tune.trials == 12 and cfg.compare.seeds >= 3
    assert set(inspect.signature(CIST).parameters) >= OPTIONS["temperature"]


def _run(label: str, seed: int, val: float, test: float) -> dict:
    return {"method": label, "seed": seed, "best_val_acc": val, "best_acc": test}


def test_table_ranks_on_validation_and_pairs_per_seed(tmp_path):
    """The ranking reads validation only (test is shuffled against it), and the Δ columns are per-seed pairs."""
    table = _table_module()
    runs = []
    for seed in range(3):
        runs += [_run("ce", seed, 0.80, 0.90), _run("kd", seed, 0.82, 0.80 + 0.01 * seed),
                 _run("cist-ref", seed, 0.83, 0.81 + 0.01 * seed), _run("w-off", seed, 0.84 + 0.001 * seed, 0.70)]
    results = {"methods": ["ce", "kd", "cist-ref", "w-off"], "runs": runs,
               "tuning": {"kd": {"params": {"temperature.tau": 4.0}}}, "config": {"data": {"student_train_size": 9}}}
    folder = tmp_path / "x-2k"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    lines = table.selection_table({"2k": table._load(folder)})
    ranked = [line.split(" | ")[1] for line in lines[2:]]
    assert ranked == ["w-off", "cist-ref", "kd", "ce"]  # by validation, whatever test says
    assert "| 4.00 |" in lines[2 + ranked.index("kd")]
    assert "+1.10 [" in lines[2]  # w-off − cist-ref on validation: 1.0, 1.1, 1.2 pp
    test_lines = table.test_table(results)
    cist_row = next(line for line in test_lines if line.startswith("| cist-ref "))
    assert "+1.00 [+1.00, +1.00]" in cist_row  # cist-ref − kd on test: exactly 1 pp on every seed
