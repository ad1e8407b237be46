"""What a run is made of (its config, its teacher's key, the digest of its data), and the check that a run which is
reused or resumed was made of the same things as the run that is asked for."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from ..config import RunConfig
from ..errors import ThermoKDError
from ..files import FORMAT, digest, read_json
from ..loss import DistillationLoss

# fields that change how a run is shown or saved, not what it computes
_COSMETIC = {"train.progress_bar", "train.eval_batch_size", "train.checkpoint_every"}
# what a run folder holds; cleared before a changed run is re-run
RUN_FILES = ("checkpoints", "result.json", "metrics.jsonl", "config.json", "student.safetensors", "report.md",
             "tensorboard")


def data_digest(bundle: Any) -> str:
    """A digest of a data set's content: every split's inputs and labels (whatever splits the bundle has) and the
    class/vocabulary counts; the path it was read from plays no part."""
    parts: list[Any] = [FORMAT]
    for f in dataclasses.fields(bundle):
        value = getattr(bundle, f.name)
        if hasattr(value, "x") and isinstance(value.x, Tensor):
            parts += [f.name, value.x, value.y]
        elif f.name in ("num_classes", "vocab_size", "pad_id"):
            parts.append(f"{f.name}={value}")
    return digest(*parts)


def method_loss(cfg: RunConfig) -> DistillationLoss:
    """The run's loss, from its ``method`` section. Class labels are never ignored, so the loss is built with
    ``ignore_index=None`` unless the section's ``loss`` options name one: looking for ignored labels would make
    the host wait for the device at every step on a GPU (it needs to know how many rows remain)."""
    return cfg.method.build(ignore_index=None)


def loss_settings(loss: DistillationLoss) -> str:
    """Every setting of a loss as built, the library's defaults included (its repr on one line): a config that
    leaves a knob at its default names the same run only while that default stays the same."""
    return " ".join(repr(loss).split())


def run_identity(cfg: RunConfig, teacher_key: "str | None", data: "str | None",
                 loss: "DistillationLoss | None" = None) -> dict[str, Any]:
    """The recorded identity of a student run: its config (without the ``compare`` section, and without the
    teacher section when it does not distil), its teacher's key, its data digest and the settings of its loss as
    built (``loss``; by default built from the config)."""
    config = cfg.to_dict()
    config.pop("compare", None)
    if teacher_key is None:
        config.pop("teacher", None)
    return {"config": config, "teacher_key": teacher_key, "data": data,
            "loss": loss_settings(loss if loss is not None else method_loss(cfg))}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for every field in which two identities differ (cosmetic fields aside)."""
    old_config, new_config = dict(recorded.get("config") or {}), dict(requested.get("config") or {})
    if "teacher" not in new_config:  # a run that does not distil does not depend on the teacher
        old_config.pop("teacher", None)
    old, new = _flatten(old_config), _flatten(new_config)
    skip = set(_COSMETIC)
    if recorded.get("data") is not None or requested.get("data") is None:
        skip.add("data.name")  # the data's content digest decides, not the path it was read from
    # a field added to the config after the run was made, asked for at its default, is what the run did
    skip |= {k for k, v in _flatten(RunConfig().to_dict()).items() if k not in old and new.get(k, v) == v}
    lines = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
             for k in sorted(set(old) | set(new)) if k not in skip and old.get(k) != new.get(k)]
    if "?" not in (recorded.get("teacher_key"), requested.get("teacher_key")) \
            and recorded.get("teacher_key") != requested.get("teacher_key"):
        lines.append(f"teacher key: {recorded.get('teacher_key')} -> {requested.get('teacher_key')}")
    if None not in (recorded.get("data"), requested.get("data")) and recorded.get("data") != requested.get("data"):
        lines.append(f"data content: digest {recorded.get('data')} -> {requested.get('data')}")
    if requested.get("loss") is not None and recorded.get("loss") != requested.get("loss") and not lines:
        # the config is the same, so a default of the library changed (or the run predates this record)
        lines.append(f"the loss as built (defaults included): {recorded.get('loss') or '(not recorded)'} -> "
                     f"{requested['loss']}")
    return lines


def recorded_identity(out_dir: Path) -> "dict[str, Any] | None":
    """The identity a run folder records: in ``result.json`` when finished, else in its latest checkpoint, else
    (a run from before identities were recorded) its ``config.json``; None for a folder with no run, or one that
    stopped before its first checkpoint."""
    from .checkpoint import latest_path, read_manifest

    remedy = f"delete {out_dir} or choose another --out"
    result = out_dir / "result.json"
    teacher_key = "?"
    if result.is_file():
        record = read_json(result, remedy)
        if isinstance(record, dict) and isinstance(record.get("identity"), dict):
            return record["identity"]
        if isinstance(record, dict) and isinstance(record.get("teacher"), dict):
            teacher_key = record["teacher"].get("key", "?")  # a run from before identities: its teacher's old key
    else:
        latest = latest_path(out_dir / "checkpoints")
        if latest is None:
            return None  # stopped before its first checkpoint: a config.json alone holds nothing to continue
        meta = read_manifest(latest).get("meta")
        if isinstance(meta, dict) and "config" in meta:
            return meta
    if (out_dir / "config.json").is_file():
        config = read_json(out_dir / "config.json", remedy)
        if isinstance(config, dict):
            config.pop("compare", None)
            return {"config": config, "teacher_key": teacher_key, "data": None}
    return None


def check_same_run(out_dir: Path, requested: dict[str, Any], rerun_changed: bool = False,
                   what: str = "continue") -> bool:
    """Whether ``out_dir`` may be continued (or reused) as the run ``requested`` describes. A run made of something
    else is refused in one line naming the differing fields, or, with ``rerun_changed``, cleared (True: start it
    afresh)."""
    recorded = recorded_identity(out_dir)
    if recorded is None:
        return False
    diff = differences(recorded, requested)
    if not diff:
        return False
    if rerun_changed:
        for name in RUN_FILES:
            target = out_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        return True
    raise ThermoKDError(f"cannot {what} {out_dir}: it holds a run made with a different config ({'; '.join(diff)}); "
                        "pass --rerun-changed to run it again with the new settings, or choose another --out")


def check_configs(configs: dict[Any, RunConfig], folders: dict[Any, Path]) -> None:
    """Before a command that reuses many runs starts anything: refuse, in one line, when any existing run folder
    was made with another config than the one now asked for (teacher and data are checked per run later)."""
    changed = []
    for k, cfg in configs.items():
        recorded = recorded_identity(folders[k])
        loss = method_loss(cfg)  # built once: whether it distils, and its settings
        requested = run_identity(cfg, "?" if loss.kd_weight > 0 else None, None, loss)
        if recorded is not None:
            diff = differences(recorded, requested)
            if diff:
                changed.append((folders[k], diff))
    if changed:
        first, diff = changed[0]
        others = f" and {len(changed) - 1} other run(s)" if len(changed) > 1 else ""
        raise ThermoKDError(f"cannot reuse {first}{others}: made with a different config ({'; '.join(diff)}); pass "
                            "--rerun-changed to run them again with the new settings, or choose another --out")
