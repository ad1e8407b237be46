"""``thermokd report FOLDER``: tell what wrote a results folder (compare, sweep, lm or distill) and rebuild that
report from the folder's machine-readable results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ThermoKDError
from ..files import read_json, write_text

KINDS = {"sweep": "sweep.json", "compare": "results.json", "lm": "results.json", "distill": "result.json"}


def folder_kind(folder: Path) -> tuple[str, dict[str, Any]]:
    """What wrote ``folder`` and the results it holds; one line when it is none of the known kinds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ThermoKDError(f"report: {folder} is not a folder")
    for kind, name in KINDS.items():
        path = folder / name
        if not path.is_file():
            continue
        results = read_json(path, "re-run the command that wrote the folder")
        if not isinstance(results, dict):
            raise ThermoKDError(f"report: {path} is not a results mapping")
        if name == "results.json" and ("corpus" in results) != (kind == "lm"):
            continue
        return kind, results
    raise ThermoKDError(f"report: cannot tell what wrote {folder}: it holds no results.json (compare, lm), "
                        "sweep.json (sweep) or result.json (distill)")


def write_distill_report(result: dict[str, Any], out_dir: Path) -> Path:
    """``report.md`` of one student run: what ran, where its teacher came from, and its per-epoch accuracy."""
    teacher = result.get("teacher") or {}
    lines = [f"# thermokd distill: {result['method']} seed {result['seed']} on {result['data']}", "",
             f"- student: `{result['student']['model']}`, {result['epochs']} epochs, {result['steps']} steps",
             f"- best test accuracy {100 * result['best_acc']:.2f} % (epoch {result['best_epoch']}), "
             f"last {100 * result['last_acc']:.2f} %"]
    if teacher:
        lines.append(f"- teacher: `{teacher['model']}`, test accuracy {100 * teacher['test_acc']:.2f} %, "
                     f"cache key `{teacher['key']}` ({teacher.get('source', 'source not recorded')})")
    else:
        lines.append("- no teacher (the method does not distil)")
    lines += ["", "| epoch | test acc % | train loss | mean τ (teacher) |", "|---:|---:|---:|---:|"]
    for h in result.get("history", []):
        tau = h.get("tau_teacher_mean")
        loss = h.get("train_loss")
        lines.append(f"| {h['epoch']} | {100 * h['test_acc']:.2f} | {'' if loss is None else f'{loss:.4f}'} | "
                     f"{'' if tau is None else f'{tau:.3f}'} |")
    return write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")


def rebuild_report(folder: Path) -> Path:
    """Rebuild the report of whatever wrote ``folder``; returns its path."""
    kind, results = folder_kind(folder)
    try:
        if kind == "sweep":
            from .sweep import write_sweep_report
            return write_sweep_report(results, folder)
        if kind == "lm":
            from ..lm.report import write_report as write_lm_report
            return write_lm_report(results, folder)
        if kind == "distill":
            return write_distill_report(results, folder)
        from .report import write_report
        return write_report(results, folder)
    except ThermoKDError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ThermoKDError(f"report: the {kind} results in {folder} are incomplete or damaged "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); re-run the "
                            "command that wrote them") from None
