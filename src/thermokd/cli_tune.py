"""The ``thermokd tune`` command's arguments and handler (kept apart from ``cli.py``, which wires it in)."""
from __future__ import annotations

import argparse
import copy

DEFAULT_TRIALS = 20


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help="method name or a variant of the config's compare section (default: the "
                   "config's method.name)")
    p.add_argument("--trials", type=int, help=f"tuning budget in trials (default: compare.tune.trials if set, "
                   f"else {DEFAULT_TRIALS})")
    p.add_argument("--epochs", type=int, help="student epochs per trial (the most a trial trains)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs")
    p.add_argument("--sampler", choices=["tpe", "grid", "random"], help="Optuna sampler (default tpe)")
    p.add_argument("--pruner", choices=["hyperband", "halving", "none"], help="pruning on per-epoch validation "
                   "accuracy (default hyperband)")
    p.add_argument("--grid-points", type=int, help="values per float knob for --sampler grid (default 5)")
    p.add_argument("--min-rounds", type=int, help="the first evaluation round (epoch) at which the pruner may stop "
                                                   "a trial (default 1)")
    p.add_argument("--kd-weight", action="store_true", help="also tune loss.kd_weight")
    p.add_argument("--space", action="append", metavar="KNOB=LOW:HIGH[:log]|A,B,C",
                   help="override or add a knob's range (repeatable), e.g. tau=2:8:log")
    p.add_argument("--hold", action="append", metavar="SECTION.ARGUMENT",
                   help="leave a knob out of the search (repeatable): the method keeps its own setting of it, "
                   "e.g. temperature.student")
    p.add_argument("--storage", help="Optuna RDB URL, e.g. postgresql://user@host/db (default: SQLite in --out)")
    p.add_argument("--study", help="study name (default: the method's label)")
    p.add_argument("--sampler-seed", type=int, help="the sampler's seed (default 0)")


def tune_options(args, base) -> "object":
    """The config's ``compare.tune`` section overridden by the command line."""
    from .spaces import parse_knob

    tune = copy.deepcopy(base)
    tune.trials = args.trials if args.trials is not None else (tune.trials or DEFAULT_TRIALS)
    for option, field in (("sampler", "sampler"), ("pruner", "pruner"), ("grid_points", "grid_points"),
                          ("min_rounds", "min_rounds"),
                          ("storage", "storage"), ("study", "study"), ("sampler_seed", "seed")):
        if getattr(args, option) is not None:
            setattr(tune, field, getattr(args, option))
    tune.kd_weight = tune.kd_weight or args.kd_weight
    for item in args.space or []:
        name, knob = parse_knob(item)
        tune.space[name] = knob
    tune.hold = list(dict.fromkeys([*tune.hold, *(args.hold or [])]))
    tune.validate(lambda field_name: "--" + field_name.replace("_", "-"), min_trials=1)
    return tune


def tune_command(args) -> None:
    from .cli import load_run_config
    from .experiments.tune import knob_text, markdown, run_tune, set_lines
    from .experiments.tune_metric import ACCURACY
    from .registry import normalise

    cfg = load_run_config(args)
    tune = tune_options(args, cfg.compare.tune)
    label = normalise(args.method or cfg.method.name)
    result = run_tune(cfg, label, args.out, tune, args.cache, not args.no_progress)
    if result.best_value is None:
        print(f"{label} has no knobs to tune; wrote {args.out / 'best.yaml'}")
        return
    s = result.summary
    print("\n" + "\n".join(line for line in markdown(s) if line.startswith("|")))  # the table of trials
    print(f"\n{label}: chose {knob_text(result.params)} (trial {s['best_trial']}, validation accuracy "
          f"{ACCURACY.text(result.best_value)}; {s['complete']} complete, "
          f"{s['pruned']} pruned, {s['failed']} failed of {s['budget']})")
    print("use it with: " + " ".join(f"--set {line}" for line in set_lines(result.method, result.params)))
    print(f"wrote {args.out / 'tune.json'}, {args.out / 'tune.md'}, {args.out / 'best.yaml'}, "
          f"{args.out / 'best_config.yaml'} and {args.out / 'tune_vs_knob.png'}")
