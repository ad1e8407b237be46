"""The ``thermokd`` command. Each command prints a short summary and writes machine-readable results.

Bad input ends with one line on stderr naming the problem, no traceback, and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from .cli_tune import add_tune_arguments, tune_command
from .errors import ThermoKDError

BUNDLED = Path(__file__).parent / "configs"
PRESETS = {"digits": "digits.yaml", "fashion-mnist": "fashion_mnist.yaml", "20newsgroups": "20newsgroups.yaml",
           "r8": "r8.yaml", "r52": "r8.yaml", "trec": "trec.yaml", "trec6": "trec.yaml"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise ThermoKDError(f"{self.prog}: {message}")


def resolve_config(path: "str | None", data: "str | None") -> "Path | None":
    """``--config`` as a file, or the name of a bundled config (``digits``); else a preset for ``--data``."""
    if path:
        p = Path(path)
        if p.is_file() or p.suffix in (".yaml", ".yml") or os.sep in path:
            return p
        bundled = BUNDLED / f"{path.replace('-', '_')}.yaml"
        if bundled.is_file():
            return bundled
        names = sorted(f.stem for f in BUNDLED.glob("*.yaml"))
        raise ThermoKDError(f"config {path!r} is neither a file nor a bundled config ({', '.join(names)})")
    preset = PRESETS.get(data or "digits", "default.yaml")
    return BUNDLED / preset


def _out_folder(text: str) -> Path:
    """``--out``: a non-empty path (an empty one would write into the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, not be empty")
    return Path(text)


def load_run_config(args, extra_overrides: "list[str] | None" = None):
    from .config import load_config

    overrides = list(extra_overrides or [])
    if getattr(args, "data", None) is not None and not args.data.strip():
        raise ThermoKDError("--data is empty; give a data set such as digits or npz:FILE")
    if getattr(args, "data", None):
        overrides.insert(0, f"data.name={args.data}")
    if getattr(args, "epochs", None) is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if getattr(args, "teacher_epochs", None) is not None:
        overrides.append(f"teacher.epochs={args.teacher_epochs}")
    overrides += args.set or []
    # quote the data spec so YAML keeps paths such as "npz:/a/b.npz" as strings
    overrides = [f"data.name={json.dumps(o.split('=', 1)[1])}" if o.startswith("data.name=") else o for o in overrides]
    return load_config(resolve_config(getattr(args, "config", None), getattr(args, "data", None)), overrides)


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--config", help="YAML config file, or a bundled config name (digits, fashion_mnist, ...)")
    p.add_argument("--data", help="digits, fashion-mnist, idx:DIR, npz:FILE, cifar10:DIR, cifar100:DIR, "
                   "20newsgroups, r8, r52, trec, trec6, tab:PREFIX")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--cache", type=Path, help="teacher cache folder (default $THERMOKD_CACHE or ~/.cache/thermokd)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if out_required:
        p.add_argument("--out", type=_out_folder, required=True, help="output folder")


def _rerun_changed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rerun-changed", action="store_true", help="re-run runs in --out that were made with another "
                   "config (default: stop and name the differing fields)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="thermokd", description="Knowledge distillation with the temperature done right.")
    parser.add_argument("--version", action="version", version=f"thermokd {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("compare", help="train one student per method and seed with one teacher; report")
    _common(p)
    p.add_argument("--methods", help="comma-separated method names, kd@TAU or variants of the config's compare "
                   "section (default: the config's compare.methods, else ce,kd,cist,dts,ctkd,lskd,entropy-target)")
    p.add_argument("--seeds", type=int, help="number of seeds, 0..N-1 (default: the config's compare.seeds, 3)")
    p.add_argument("--epochs", type=int, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    _rerun_changed(p)
    p.add_argument("--tune", type=int, metavar="TRIALS", help="tune every method with this many trials on the "
                   "validation split first (overrides compare.tune.trials; 0: no tuning)")
    p.add_argument("--helper", action="store_true", help="share the work of the same compare running (or to run) "
                   "in another process on --out: tune and run from the other end, skip what that process is "
                   "doing, write no report (the main compare does); refused if its methods, seeds or --tune differ "
                   "from those of the compare running there")

    p = sub.add_parser("distill", help="train one student; --resume continues a killed run")
    _common(p)
    p.add_argument("--method", help="method name (overrides method.name)")
    p.add_argument("--seed", type=int, help="student seed (overrides train.seed)")
    p.add_argument("--epochs", type=int, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    _rerun_changed(p)

    p = sub.add_parser("tune", help="choose a method's temperature setting on the validation split (Optuna; "
                       "resumable)")
    _common(p)
    add_tune_arguments(p)

    p = sub.add_parser("train-teacher", help="train (or find in the cache) the teacher of a config")
    _common(p, out_required=False)
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")

    p = sub.add_parser("sweep", help="KD over a τ × optimiser × budget × seeds grid, plus adaptive methods")
    _common(p)
    p.add_argument("--taus", default="1,2,4,8,16", help="fixed-τ grid for KD (default %(default)s)")
    p.add_argument("--optimizers", default="sgd,adamw", help="sgd and/or adamw (default %(default)s)")
    p.add_argument("--budgets", default="5,20", help="training lengths in epochs (default %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--methods", default="cist,dts",
                   help="adaptive methods to compare with the best KD (default %(default)s)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    _rerun_changed(p)

    p = sub.add_parser("diagnose", help="soft-label entropy under each τ and strategy, and teacher calibration")
    _common(p)
    p.add_argument("--taus", default="1,2,4,8,16", help="fixed temperatures to show (default %(default)s)")
    p.add_argument("--methods", default="cist,entropy-target,lskd,dtkd",
                   help="adaptive strategies to show (default %(default)s)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="whose logits (default train)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")

    p = sub.add_parser("recommend", help="propose a τ (and CIST tau0) from the teacher's entropy; --verify checks it")
    _common(p)
    p.add_argument("--target", type=float, default=0.5, help="base mean normalised entropy (default 0.5)")
    p.add_argument("--verify", action="store_true", help="train short KD students over --grid to check the proposal")
    p.add_argument("--grid", default="1,2,4,8,16", help="τ grid to verify on (default %(default)s)")
    p.add_argument("--epochs", type=int, help="student epochs for --verify (default: the config's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds for --verify (default 1)")
    p.add_argument("--against-tune", type=int, default=0, metavar="TRIALS", help="with --verify: also tune KD's τ "
                   "on validation with this many trials and measure the proposal's regret against it")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    _rerun_changed(p)

    p = sub.add_parser("report", help="rebuild the report of a compare, sweep, lm or distill folder from its results")
    p.add_argument("folder", type=Path)

    p = sub.add_parser("lm", help="causal-LM distillation on a corpus (HF Trainer): a teacher, one student per "
                       "method and seed; perplexity and token accuracy; --resume continues a killed run")
    p.add_argument("--config", help="LM config file, or a bundled one (grimm, bench); fields: data, teacher, "
                   "student, train, on_policy, tune, methods, seeds, variants")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, e.g. "
                   "train.steps=200 (repeatable)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out, continue unfinished ones")
    p.add_argument("--capture-topk", type=Path, metavar="FILE", help="only write the teacher's top-k cache "
                   "(teacher.k, teacher.capture_tau) of the training windows to FILE, for teacher.source=topk")
    for flag, key, kind, text in LM_SHORTHANDS:
        p.add_argument(flag, type=kind, help=f"shorthand for --set {key}=VALUE ({text})")
    p.add_argument("--cache", type=Path,
                   help="teacher and tokenizer cache (default $THERMOKD_CACHE or ~/.cache/thermokd)")
    p.add_argument("--no-progress", action="store_true", help="no per-evaluation progress lines")
    p.add_argument("--out", type=_out_folder, help="output folder (required unless --capture-topk)")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("thermokd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _compare(args) -> None:
    from .experiments.compare import DEFAULT_METHODS, parse_methods, run_compare
    from .experiments.report import summarize

    cfg = load_run_config(args, [f"compare.tune.trials={args.tune}"] if args.tune is not None else [])
    methods = parse_methods(args.methods if args.methods is not None
                            else ",".join(cfg.compare.methods) or DEFAULT_METHODS, cfg)
    seeds = cfg.compare.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise ThermoKDError(f"--seeds must be >= 1, got {seeds}")
    results = run_compare(cfg, methods, list(range(seeds)), args.out, args.cache, not args.no_progress,
                          rerun_changed=args.rerun_changed, helper=args.helper)
    if args.helper:
        print(f"\nhelper: made {len(results['made'])} of {len(results['made']) + len(results['others'])} runs; "
              "the others were made, or are being made, by other processes. The main compare (the same command "
              f"without --helper) writes {args.out / 'results.json'} and {args.out / 'report.md'}, reusing them.")
        return
    summary = summarize(results["runs"])
    print(f"\n{'method':18s} {'test @ best val':>16s} {'test @ last':>16s}")
    for method, s in summary.items():
        print(f"{method:18s} {100 * s['best_mean']:7.2f} ± {100 * s['best_std']:5.2f} "
              f"{100 * s['last_mean']:7.2f} ± {100 * s['last_std']:5.2f}")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'report.md'}")


def _distill(args) -> None:
    from .engine.run import run_distill, teacher_line
    from .experiments.folders import write_distill_report

    extra = ([f"method.name={args.method}"] if args.method else []) + \
            ([f"train.seed={args.seed}"] if args.seed is not None else [])
    cfg = load_run_config(args, extra)
    if args.no_progress:
        cfg.train.progress_bar = False
    result = run_distill(cfg, args.out, resume=args.resume, cache_dir=args.cache, progress_bar=not args.no_progress,
                         rerun_changed=args.rerun_changed)
    if result.pop("reused", False):
        print(f"{args.out} holds this run finished already (same config, teacher and data): reused")
    elif result["teacher"]:
        print(teacher_line(result["teacher"]))
    write_distill_report(result, args.out)
    print(f"{result['method']} seed {result['seed']}: test accuracy {result['best_acc']:.4f} at the best validation "
          f"epoch {result['best_epoch']} (val {result['best_val_acc']:.4f}), {result['last_acc']:.4f} at the last; "
          f"wrote {args.out / 'result.json'}")


def _train_teacher(args) -> None:
    from .engine.run import teacher_line, train_teacher

    cfg = load_run_config(args)
    info = train_teacher(cfg, args.cache, progress_bar=not args.no_progress)
    print(f"{teacher_line(info)} on {cfg.data.name}; cached in {info['dir']}")


def _sweep(args) -> None:
    from .experiments.compare import parse_methods
    from .experiments.sweep import parse_floats, run_sweep

    taus = parse_floats(args.taus, "--taus")
    budgets = [int(b) for b in parse_floats(args.budgets, "--budgets")]
    optimizers = [o.strip().lower() for o in args.optimizers.split(",") if o.strip()]
    if args.seeds < 1:
        raise ThermoKDError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = load_run_config(args)
    methods = parse_methods(args.methods, cfg) if args.methods.strip() else []
    results = run_sweep(cfg, args.out, taus, optimizers, budgets, list(range(args.seeds)), methods, args.cache,
                        not args.no_progress, rerun_changed=args.rerun_changed)
    for group in results["groups"].values():
        print(f"{group['optimizer']}, {group['epochs']} epochs: best KD tau = {group['best_tau']:g}")
        for method, verdict in group["verdicts"].items():
            if not method.startswith("kd@"):
                print(f"  {method}: {verdict}")
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.md'}")


def _diagnose(args) -> None:
    from .experiments.diagnose import run_diagnose
    from .experiments.sweep import parse_floats

    cfg = load_run_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = run_diagnose(cfg, args.out, parse_floats(args.taus, "--taus"), methods, args.cache, args.split,
                           not args.no_progress)
    cal = results["teacher"]["calibration"]
    print(f"teacher: ECE {cal['ece']:.4f} at tau=1; the NLL-optimal tau is {cal['nll_optimal_tau']:.3g}")
    print(f"wrote {args.out / 'diagnose.json'} and {args.out / 'diagnose.md'}")


def _recommend(args) -> None:
    from .experiments.recommend import recommend, verify, write_recommendation
    from .experiments.sweep import parse_floats

    cfg = load_run_config(args)
    grid = parse_floats(args.grid, "--grid")
    proposal = recommend(cfg, args.cache, args.target, grid=grid, progress_bar=not args.no_progress)
    print(f"proposed tau = {proposal['tau']:g} (exact {proposal['tau_exact']:.3g}), "
          f"CIST tau0 = {proposal['cist_tau0']:g}; "
          f"target mean normalised entropy {proposal['target']:.2f}")
    if args.verify:
        if args.seeds < 1:
            raise ThermoKDError(f"--seeds must be >= 1, got {args.seeds}")
        result = verify(cfg, proposal, grid, args.epochs, list(range(args.seeds)), args.out, args.cache,
                        not args.no_progress, rerun_changed=args.rerun_changed, tune_trials=args.against_tune)
        v = result["verification"]
        print(f"grid's best tau = {v['best_tau']:g} ({100 * v['best_acc']:.2f} %), proposal "
              f"{100 * v['proposal_acc']:.2f} %: {v['verdict']}")
        if v.get("regret"):
            print(f"tuned tau = {v['tuned_tau']:g}; the proposal's regret against it: "
                  f"{100 * v['regret']['mean']:+.2f} pp over {v['regret']['n']} seeds")
    else:
        write_recommendation(proposal, args.out)
    print(f"wrote {args.out / 'recommend.json'} and {args.out / 'recommend.md'}")


def _report(args) -> None:
    from .experiments.folders import folder_kind, rebuild_report

    kind = folder_kind(args.folder)[0]
    print(f"{args.folder} was written by `thermokd {kind}`; wrote {rebuild_report(args.folder)}")


LM_SHORTHANDS = (("--corpus", "data.corpus", str, "grimm-tales, andersen, friends-transcripts, or a .tab/.txt file"),
                 ("--methods", "methods", str, "comma-separated method names, kd@TAU or variants"),
                 ("--seeds", "seeds", int, "seeds 0..N-1"), ("--steps", "train.steps", int, "student steps"),
                 ("--teacher-steps", "teacher.steps", int, "teacher steps"),
                 ("--teacher", "teacher.size", str, "LAYERSxWIDTH[xHEADS]"),
                 ("--student", "student.size", str, "LAYERSxWIDTH[xHEADS]"),
                 ("--vocab-size", "data.vocab_size", int, "byte-level BPE vocabulary"),
                 ("--context", "data.context", int, "window length in tokens"),
                 ("--batch-size", "train.batch_size", int, "global windows per step"),
                 ("--lr", "train.lr", float, "student learning rate"),
                 ("--eval-every", "train.eval_every", int, "validate every N steps"),
                 ("--prompt-tokens", "data.prompt_tokens", int, "first N tokens of every window are prompt"),
                 ("--max-train-tokens", "data.max_train_tokens", int, "keep only the first training windows"),
                 ("--device", "train.device", str, "torch device, or auto"))


def _lm(args) -> None:
    from .lm.config import load_lm_config
    from .lm.experiment import capture_teacher_topk, run_lm_experiment
    from .lm.report import summarize

    overrides = []
    for flag, key, _, _ in LM_SHORTHANDS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            text = json.dumps([m.strip() for m in value.split(",") if m.strip()]) if key == "methods" else \
                json.dumps(value)  # quoted: YAML keeps paths and sizes such as "2x64" as strings
            overrides.append(f"{key}={text}")
    cfg = load_lm_config(args.config, overrides + (args.set or []))
    if args.capture_topk is not None:
        path = capture_teacher_topk(cfg, args.capture_topk, args.cache)
        print(f"wrote the teacher's top-{cfg.teacher.k} cache of the training windows to {path}")
        return
    if args.out is None:
        raise ThermoKDError("thermokd lm: --out is required (unless --capture-topk)")
    results = run_lm_experiment(cfg, args.out, args.cache, args.resume, not args.no_progress)
    teacher = results["teacher"]
    print(f"\n{'model':20s} {'test perplexity':>16s} {'token accuracy %':>18s}")
    if "test_ppl" in teacher:
        print(f"{'teacher ' + teacher['size']:20s} {teacher['test_ppl']:16.2f} {100 * teacher['test_acc']:18.2f}")
    for method, s in summarize(results["runs"]).items():
        print(f"{method:20s} {s['ppl_mean']:8.2f} ± {s['ppl_std']:5.2f} {100 * s['acc_mean']:9.2f} ± "
              f"{100 * s['acc_std']:5.2f}")
    print(f"\n{results['wall_seconds'] / 60:.1f} min; wrote {args.out / 'results.json'} and {args.out / 'report.md'}")


COMMANDS = {"compare": _compare, "distill": _distill, "tune": tune_command, "train-teacher": _train_teacher,
            "sweep": _sweep,
            "diagnose": _diagnose, "recommend": _recommend, "report": _report, "lm": _lm}


def _close_process_group() -> None:
    """Under ``torchrun``/``accelerate launch``, shut the process group down before the interpreter does: a gloo group
    left to interpreter finalisation can abort the process after all work is done (a known PyTorch issue). Only on
    success: after a failure on one rank, a collective shutdown could wait for ranks that are gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"thermokd: warning: {' '.join(str(message).split())}\n"


def main(argv: "list[str] | None" = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.formatwarning = _one_line_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `thermokd`: the usage, not an error
            parser.print_help()
            return 0
        from .files import FolderLock

        # one writer per --out folder; a compare --helper shares it with the compare that holds it
        out = None if getattr(args, "helper", False) else getattr(args, "out", None)
        with FolderLock(out) if out is not None else contextlib.nullcontext():
            COMMANDS[args.command](args)
        _close_process_group()
    except ThermoKDError as exc:
        print(f"thermokd: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusal that no check above foresaw: still one line
        from .files import filesystem_error

        print(f"thermokd: error: {filesystem_error(exc, exc.filename or '?', 'use')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thermokd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
