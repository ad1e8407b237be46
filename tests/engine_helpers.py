"""Shared helpers for the engine and CLI tests: tiny configs and a subprocess runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

TINY = {
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "model_args": {"hidden": [64]}, "epochs": 3, "batch_size": 64,
                "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0}, "schedule": {"name": "constant"}},
    "student": {"model": "mlp", "model_args": {"hidden": [16]}},
    "method": {"name": "kd"},
    "train": {"epochs": 2, "batch_size": 64, "log_every": 1, "progress_bar": False,
              "optimizer": {"name": "sgd", "lr": 0.05}, "schedule": {"name": "cosine"}},
}


def write_config(path: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


def env(cache: Path) -> dict:
    e = dict(os.environ, THERMOKD_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")  # offline: conftest.py
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def run_cli(*args, cache: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "thermokd.cli", *map(str, args)], env=env(cache),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"thermokd {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in records]
