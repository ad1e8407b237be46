"""Forward+backward time of DistillationLoss per strategy, as a ratio to fixed-τ KD, measured in one process.

    python benchmarks/loss_overhead.py [--rounds N] [--block N] [--large [--large-rounds N]]

Shapes: [256, 100] (CIFAR-100-like batch) and, with --large, [8·512, 32000] (a language-model batch).
Each method is timed over blocks of consecutive calls, in interleaved rounds (KD, then each method, repeated),
and the ratio of medians is reported, so machine noise hits all methods alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import thermokd as tk

METHODS = ["kd", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"]


def block_time(loss_fn: tk.DistillationLoss, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
               progress: tk.Progress, steps: int) -> float:
    """Seconds per forward+backward(+observe), averaged over a block of ``steps`` consecutive calls."""
    inputs = [student.detach().clone().requires_grad_(True) for _ in range(steps)]
    start = time.perf_counter()
    for s in inputs:
        out = loss_fn(s, teacher, labels, progress=progress)
        out.loss.backward()
        loss_fn.observe(out)
    return (time.perf_counter() - start) / steps


def measure(shape: tuple[int, int], rounds: int, block: int, methods: list[str]
            ) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Per method: the ratio of its median block time to KD's (plus ``kd_seconds``), and the per-round quartiles."""
    gen = torch.Generator().manual_seed(0)
    n, c = shape
    teacher = torch.randn(n, c, generator=gen) * (1 + 4 * torch.rand(n, 1, generator=gen))
    student = torch.randn(n, c, generator=gen) * 2
    labels = torch.randint(0, c, (n,), generator=gen)
    progress = tk.Progress(step=0, total_steps=100, epoch=3, total_epochs=10)
    losses = {m: tk.build_loss(m) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:  # warm-up (allocator, CIST calibration)
        block_time(losses[m], student, teacher, labels, progress, 2)
    for _ in range(rounds):  # interleaved, so drifts in machine speed hit every method alike
        for m in methods:
            times[m].append(block_time(losses[m], student, teacher, labels, progress, block))
    base = statistics.median(times["kd"])
    return {m: statistics.median(times[m]) / base for m in methods} | {"kd_seconds": base}, {
        m: round_ratio_quartiles(times[m], times["kd"]) for m in methods}


def round_ratio_quartiles(method: list[float], kd: list[float]) -> tuple[float, float]:
    """First and third quartile of the per-round ratio method/KD: how much one round's ratio varies."""
    ratios = [a / b for a, b in zip(method, kd)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # a [256, 100] round of all methods takes ~0.1 s, and one round's ratio varies by ~±10 % on a shared machine:
    # 200 rounds put the medians' sampling error near 1 %, where 40 left it near 2 %
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds at [256, 100] (default 200)")
    parser.add_argument("--block", type=int, default=20, help="calls per timed block at [256, 100] (default 20)")
    parser.add_argument("--large", action="store_true", help="also time [8*512, 32000] (needs ~10 GB RAM)")
    parser.add_argument("--large-rounds", type=int, default=4,
                        help="interleaved rounds of one call at [8*512, 32000] (default 4, ~75 s each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(256, 100)] + ([(8 * 512, 32000)] if args.large else [])
    for shape in shapes:
        large = shape[1] > 1000
        rounds, block = (args.large_rounds, 1) if large else (args.rounds, args.block)
        ratios, spread = measure(shape, rounds, block, METHODS)
        print(f"\nlogits {list(shape)}: fixed KD forward+backward {ratios.pop('kd_seconds') * 1e3:.2f} ms "
              f"(median of {rounds} rounds x {block} calls, {args.threads} threads); time relative to fixed KD "
              "(ratio of medians; in brackets, the quartiles of the per-round ratios):")
        for m in METHODS:
            print(f"  {m:15s} {ratios[m]:5.2f}x  [{spread[m][0]:.2f}-{spread[m][1]:.2f}]")


if __name__ == "__main__":
    main()
