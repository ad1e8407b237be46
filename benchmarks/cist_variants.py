"""Cheap evidence for CIST's default: a handful of variants against KD and CE on scikit-learn's digits.

Selection happens on a VALIDATION split carved from the training part (stratified, 15 %); the test split is only
reported. Every distilling method gets the same tuning budget: its one temperature knob (KD's τ, CIST's tau0)
over the same grid, picked by mean validation accuracy over the seeds. Two set-ups: the student trains on the whole
training part (``full``), or on a stratified quarter of it while the teacher saw all of it (``quarter``, where
distillation matters more). Last-epoch accuracy, no epoch selection.

    OMP_NUM_THREADS=1 python benchmarks/cist_variants.py               # round 1: 12 variants, 3 seeds (~5 min)
    OMP_NUM_THREADS=1 python benchmarks/cist_variants.py --round 2 --seeds 5   # round 2: finalists (~5 min)

Times are on one thread of the shared 2-core machine this was written on. Prints one table per set-up; paired Δ
are per seed (same initialisation and data order for every method), mean ± half-width of a 95 % t-interval.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from sklearn.model_selection import train_test_split
from torch import nn

import thermokd as tk
from thermokd.data.formats import digits
from thermokd.models.small import MLP
from thermokd.temperature import CIST, Fixed
from thermokd.weighting import ConfidenceDifficulty

GRID = (1.0, 2.0, 4.0, 8.0)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

# label -> (CIST keyword arguments, ConfidenceDifficulty keyword arguments or None for w ≡ 1)
VARIANTS: dict[str, tuple[dict, "dict | None"]] = {
    "spec (ratio, w unbounded)": ({"student": "ratio"}, {}),
    "ratio, w=1": ({"student": "ratio"}, None),
    "teacher, w=1": ({"student": "teacher"}, None),
    "teacher, w unbounded": ({"student": "teacher"}, {}),
    "teacher, w R=4": ({"student": "teacher"}, {"max_ratio": 4.0}),
    "teacher, w λ=.5 R=4": ({"student": "teacher"}, {"mix": 0.5, "max_ratio": 4.0}),
    "teacher, w ce-difficulty R=4": ({"student": "teacher"}, {"difficulty": "ce", "max_ratio": 4.0}),
    "teacher, w running-mean": ({"student": "teacher"}, {"normalise": "running"}),
    "own-ratio, w=1": ({"student": "own-ratio"}, None),
    "own-ratio, w R=4": ({"student": "own-ratio"}, {"max_ratio": 4.0}),
    "interpolate γ=.5, w R=4": ({"student": "interpolate", "gamma": 0.5}, {"max_ratio": 4.0}),
    "ratio floor .5, w R=4": ({"student": "ratio", "student_floor": 0.5}, {"max_ratio": 4.0}),
    "interpolate γ=.5, w λ=.5 R=4": ({"student": "interpolate", "gamma": 0.5}, {"mix": 0.5, "max_ratio": 4.0}),
}
# round 1 screens the variants on 3 seeds; round 2 re-runs the four best by mean validation accuracy over both
# set-ups (and the combination of the two best ideas) on 5 seeds, again selecting on validation only
ROUNDS = {1: list(VARIANTS)[:-1],
          2: ["interpolate γ=.5, w R=4", "teacher, w λ=.5 R=4", "ratio floor .5, w R=4", "teacher, w=1",
              "interpolate γ=.5, w λ=.5 R=4"]}


def split(seed: int = 0):
    bundle = digits(seed=seed)
    x, y = bundle.train.x.float(), bundle.train.y.long()
    idx_tr, idx_val = train_test_split(torch.arange(len(y)).numpy(), test_size=0.15, stratify=y.numpy(),
                                       random_state=seed)
    idx_tr, idx_val = torch.as_tensor(idx_tr), torch.as_tensor(idx_val)
    # positions inside the training part of the quarter the student sees in the ``quarter`` set-up
    quarter, _ = train_test_split(torch.arange(len(idx_tr)).numpy(), train_size=0.25, stratify=y[idx_tr].numpy(),
                                  random_state=seed)
    return (x[idx_tr], y[idx_tr]), (x[idx_val], y[idx_val]), (bundle.test.x.float(), bundle.test.y.long()), \
        torch.as_tensor(quarter)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return 100.0 * acc


def train(model: nn.Module, x, y, loss_fn, teacher_logits, epochs: int, seed: int, lr: float, adamw: bool) -> None:
    opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4) if adamw else
           torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4))
    steps_per_epoch = math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(steps_per_epoch):
            b = order[i * 64:(i + 1) * 64]
            progress = tk.Progress(step=step, total_steps=epochs * steps_per_epoch, epoch=epoch, total_epochs=epochs)
            out = loss_fn(model(x[b]), None if teacher_logits is None else teacher_logits[b], y[b], progress=progress)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            sched.step()
            loss_fn.observe(out)
            step += 1


def student_run(method: str, knob: float, data, epochs: int, seed: int) -> tuple[float, float]:
    (x, y, t_logits), (x_val, y_val), (x_te, y_te) = data
    if method == "ce":
        loss_fn = tk.DistillationLoss(Fixed(1.0), ce_weight=1.0, kd_weight=0.0)
    elif method == "kd":
        loss_fn = tk.DistillationLoss(Fixed(knob))
    else:
        cist_kwargs, weight_kwargs = VARIANTS[method]
        weighting = None if weight_kwargs is None else ConfidenceDifficulty(**weight_kwargs)
        loss_fn = tk.DistillationLoss(CIST(tau0=knob, **cist_kwargs), weighting=weighting)
        loss_fn.prepare(t_logits)  # ρ from the whole training part's teacher logits, as the trainer does
    torch.manual_seed(seed)
    student = MLP(64, 10, hidden=(8,))
    train(student, x, y, loss_fn, t_logits, epochs, seed, lr=0.05, adamw=False)
    return accuracy(student, x_val, y_val), accuracy(student, x_te, y_te)


def interval(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.2f}"
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.2f} ± {half:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), default=1, help="which variants (see ROUNDS)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    (x, y), val, test, quarter = split(0)
    torch.manual_seed(0)
    teacher = MLP(64, 10, hidden=(256, 256))
    train(teacher, x, y, tk.DistillationLoss(Fixed(1.0), ce_weight=1.0, kd_weight=0.0), None, 30, 0, 3e-3, True)
    with torch.no_grad():
        teacher.eval()
        t_logits = teacher(x)
    print(f"teacher (trained on the training part, {len(y)} images): val {accuracy(teacher, *val):.2f} %, "
          f"test {accuracy(teacher, *test):.2f} %; validation {len(val[1])}, test {len(test[1])} images")
    seeds = list(range(args.seeds))
    setups = {"full": (x, y, t_logits), "quarter": (x[quarter], y[quarter], t_logits[quarter])}
    for setup, train_part in setups.items():
        data = (train_part, val, test)
        runs: dict[tuple[str, float], list[tuple[float, float]]] = {}
        methods = [("ce", (1.0,))] + [("kd", GRID)] + [(name, GRID) for name in ROUNDS[args.round]]
        for method, grid in methods:
            for knob in grid:
                runs[(method, knob)] = [student_run(method, knob, data, args.epochs, s) for s in seeds]
        chosen = {m: max(grid, key=lambda k, m=m: statistics.fmean(v for v, _ in runs[(m, k)])) for m, grid in methods}
        ce_test = [te for _, te in runs[("ce", 1.0)]]
        kd_test = [te for _, te in runs[("kd", chosen["kd"])]]
        print(f"\n## digits, student trains on {setup} ({len(train_part[1])} images), {args.seeds} seeds, "
              f"{args.epochs} epochs; knob picked on validation from {GRID}\n")
        print("| method | knob | val % | test % (mean ± std) | Δ test vs tuned KD | Δ test vs CE |")
        print("|---|---|---|---|---|---|")
        for method, _ in methods:
            k = chosen[method]
            vals, tests = zip(*runs[(method, k)])
            spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
            print(f"| {method} | {'-' if method == 'ce' else f'{k:g}'} | {statistics.fmean(vals):.2f} | "
                  f"{statistics.fmean(tests):.2f} ± {spread:.2f} | "
                  f"{interval([a - b for a, b in zip(tests, kd_test)])} | "
                  f"{interval([a - b for a, b in zip(tests, ce_test)])} |")
    print(f"\ncompute: {time.perf_counter() - started:.0f} s on one thread")
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/cist_variants.py --round {args.round} --seeds {args.seeds} "
          f"--epochs {args.epochs}")


if __name__ == "__main__":
    main()
