"""thermokd's training loop against a minimal hand-written PyTorch loop, and cached vs online teacher logits.

    python benchmarks/trainer_overhead.py [--data fashion-mnist] [--samples 6400] [--rounds 3]

Same student (ResNet8), same data subset, same batch order, optimiser and KD loss (τ=4, 0.1·CE + 0.9·KD). Each
round times one epoch of every variant, in an order rotated from round to round, and the report gives ratios of
the medians:
- throughput of thermokd's Trainer (with its metric log, end-of-epoch evaluation and checkpoint) relative to the
  hand-written loop (which evaluates too, but logs and checkpoints nothing);
- a KD epoch with the teacher's logits cached vs the teacher (ResNet20) run online;
- a KD epoch with cached logits vs a plain cross-entropy epoch;
- a training step of each adaptive method in ``--methods`` (cached logits) vs one of fixed-τ KD: the cost of
  computing temperatures and weights inside a real step (model forward/backward included).
The teacher is randomly initialised: the timings do not depend on its weights.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import thermokd as tk
from thermokd.config import OptimizerConfig, ScheduleConfig
from thermokd.data import load_data
from thermokd.engine.run import make_accelerator
from thermokd.engine.trainer import EpochData, LoopConfig, Trainer, epoch_permutation, predict
from thermokd.models import build_model

BATCH, LR, SEED = 128, 0.05, 0


def student(shape) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model("resnet8", 10, shape[0], shape[-1]).to(memory_format=torch.channels_last)


def hand_written_epoch(x, y, cached, test_x, test_y) -> float:
    """The loop a user would write by hand: no logging, no checkpoint, one evaluation."""
    model = student(x.shape[1:])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    order = epoch_permutation(len(y), SEED, 0)
    start = time.perf_counter()
    model.train()
    for step in range(len(y) // BATCH):
        idx = order[step * BATCH:(step + 1) * BATCH]
        logits = model(x[idx])
        kd = F.kl_div(F.log_softmax(logits / 4, -1), F.log_softmax(cached[idx] / 4, -1), log_target=True,
                      reduction="batchmean") * 16
        loss = 0.1 * F.cross_entropy(logits, y[idx]) + 0.9 * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    (predict(model, test_x, torch.device("cpu")).argmax(-1) == test_y).float().mean()
    return time.perf_counter() - start


def thermokd_epoch(method: str, data: EpochData, teacher, accelerator, out: Path) -> float:
    loop = LoopConfig(epochs=1, batch_size=BATCH, seed=SEED, schedule=ScheduleConfig(name="constant"),
                      optimizer=OptimizerConfig(name="sgd", lr=LR, momentum=0.9, weight_decay=5e-4),
                      progress_bar=False)
    trainer = Trainer(student(data.test_x.shape[1:]), tk.build_loss(method), data, loop, accelerator,
                      out_dir=out, teacher=teacher)
    start = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - start
    accelerator.free_memory()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--samples", type=int, default=6400, help="training images per epoch (default 6400)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="cist,dts,entropy-target",
                        help="adaptive methods whose step time is compared with KD's (default %(default)s)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    torch.set_num_threads(args.threads)
    bundle = load_data(args.data)
    x, y = bundle.train.x[:args.samples].contiguous(), bundle.train.y[:args.samples]
    test_x, test_y = bundle.test.x[:1024], bundle.test.y[:1024]
    torch.manual_seed(1)
    teacher = build_model("resnet20", bundle.num_classes, x.shape[1], x.shape[-1]).eval()
    cached = predict(teacher, x, torch.device("cpu"), 512)
    accelerator = make_accelerator()
    cached_data = EpochData(train_y=y, test_x=test_x, test_y=test_y, inputs_for_epoch=lambda e: x,
                            teacher_logits_for_epoch=lambda e: cached)
    online_data = EpochData(train_y=y, test_x=test_x, test_y=test_y, inputs_for_epoch=lambda e: x)
    variants = {
        "hand-written KD (cached)": lambda out: hand_written_epoch(x, y, cached, test_x, test_y),
        "thermokd KD (cached)": lambda out: thermokd_epoch("kd", cached_data, None, accelerator, out),
        "thermokd KD (online teacher)": lambda out: thermokd_epoch("kd", online_data, teacher, accelerator, out),
        "thermokd CE": lambda out: thermokd_epoch("ce", online_data, None, accelerator, out),
    }
    for method in methods:
        variants[f"thermokd {method} (cached)"] = (
            lambda out, m=method: thermokd_epoch(m, cached_data, None, accelerator, out))
    times: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        names = list(variants)
        for r in range(args.rounds):
            for i in range(len(names)):  # rotate the order each round so no variant always runs first
                name = names[(r + i) % len(names)]
                times[name].append(variants[name](Path(tmp) / f"{r}-{i}"))
                print(f"round {r + 1}/{args.rounds} {name:30s} {times[name][-1]:6.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = len(y) // BATCH
    print(f"\n{args.data}: ResNet8 student, {steps} steps of {BATCH} per epoch, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    for k, v in med.items():
        print(f"  {k:30s} {v:6.2f} s/epoch  ({steps * BATCH / v:6.0f} img/s)")
    cached = med['thermokd KD (cached)']
    print(f"  thermokd / hand-written throughput      {med['hand-written KD (cached)'] / cached:.3f}x"
          "  (target >= 0.95x)")
    print(f"  cached / online teacher epoch time      {cached / med['thermokd KD (online teacher)']:.3f}x")
    print(f"  KD (cached) / CE epoch time             {med['thermokd KD (cached)'] / med['thermokd CE']:.3f}x"
          "  (target <= 1.15x)")
    for method in methods:
        ratio = med[f"thermokd {method} (cached)"] / med["thermokd KD (cached)"]
        target = "  (target <= 1.05x)" if method in ("cist", "dts") else ""
        print(f"  {method + ' / KD step time':39s} {ratio:.3f}x{target}")


if __name__ == "__main__":
    main()
