"""``thermokd compare``: one teacher, one student per method × seed, the same data order per seed across methods."""
from __future__ import annotations

import copy
import datetime
import platform
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..engine.run import run_distill, setup
from ..engine.trainer import save_json
from ..errors import ThermoKDError
from ..methods import method_names


def machine_description() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU"))


def parse_methods(text: str) -> list[str]:
    methods = [m.strip().lower().replace("_", "-") for m in text.split(",") if m.strip()]
    if not methods:
        raise ThermoKDError("--methods is empty; give a comma-separated list such as ce,kd,cist")
    for m in methods:
        if m not in method_names():
            raise ThermoKDError(f"unknown method {m!r} in --methods; allowed: {', '.join(method_names())}")
    return methods


def run_compare(cfg: RunConfig, methods: list[str], seeds: list[int], out_dir: Path,
                cache_dir: "Path | None" = None, progress_bar: bool = True, echo=print) -> dict[str, Any]:
    """Run every method × seed into ``out_dir/runs/`` (finished runs are reused, killed ones resumed) and write
    ``results.json``, ``report.md`` and the plots."""
    from .report import write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    accelerator, experiment, teacher = setup(cfg, cache_dir, progress_bar, echo)
    runs = []
    for seed in seeds:
        for method in methods:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.method.name, run_cfg.train.seed = method, seed
            if method != cfg.method.name:  # overrides in the config belong to its own method only
                run_cfg.method.temperature, run_cfg.method.weighting, run_cfg.method.loss = {}, {}, {}
            result = run_distill(run_cfg, out_dir / "runs" / f"{method}-seed{seed}", resume=True,
                                 cache_dir=cache_dir, accelerator=accelerator, experiment=experiment,
                                 teacher=teacher, progress_bar=progress_bar)
            echo(f"  {method:15s} seed {seed}: best {result['best_acc']:.4f}  last {result['last_acc']:.4f}")
            runs.append(result)
    info = {k: v for k, v in teacher[1].items() if k not in ("test_logits", "dir")}
    results = {"data": cfg.data.name, "created": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine_description(), "teacher": info, "student": {"model": cfg.student.model},
               "epochs": cfg.train.epochs, "seeds": seeds, "methods": methods, "config": cfg.to_dict(),
               "runs": runs}
    save_json(out_dir / "results.json", results)
    write_report(results, out_dir)
    return results
