"""Forward+backward(+observe) time of DistillationLoss per method, as a ratio to a minimal hand-written Hinton KD.

    python benchmarks/loss_overhead.py [--rounds N] [--block N] [--large [--large-rounds N]] [--threads N]
                                       [--clock wall|cpu] [--device cpu|cuda]

The baseline is the shortest correct Hinton KD (``hinton_kd`` below: two log-softmaxes, ``kl_div`` and
``cross_entropy``, τ = 4, w_ce = 0.1, w_kd = 0.9), the loss thermokd's ``kd`` computes. Targets: thermokd's
fixed-τ ``kd`` ≤ 1.05×, ``cist`` (with its confidence × difficulty weights) ≤ 1.2×.

Shapes: [256, 100] (a CIFAR-100 batch) and, with --large, [8·512, 32000] (a language-model batch). Every variant
is timed over blocks of consecutive calls, in interleaved rounds (baseline, then each variant, repeated) in this
one process, and the ratio of medians is printed with the quartiles of the per-round ratios: drifts in machine
speed hit every variant alike, and the quartiles show how much one round's ratio moves.

``--clock cpu`` times each block by the process's CPU time instead of the wall clock: on a machine shared with
other jobs the wall clock also counts the time this process waited for a core (use it with one thread).
``--device cuda`` runs on the GPU, synchronising before and after each block (wall clock).
A method name ending in ``-no-ignore`` runs it with ``ignore_index=None``; one ending in ``-lm`` at its
language-model preset (e.g. ``cist-lm``: CIST without its weights, w ≡ 1); ``-masked-kept`` and ``-masked-gathered``
with every eighth row masked (as a prompt would be), those rows weighted by zero (``sync_free_rows=True``, the
default on accelerators) or the others gathered (the default on the CPU).

``cist-by-hand`` is not thermokd: it is thermokd's default CIST written out by hand as shortly as it goes
(``hand_cist``, autograd for the KL as in the Hinton baseline), so that thermokd's own overhead can be told from
what CIST's arithmetic costs (four more row reductions and a log-softmax than KD, and a few dozen small kernels
for the per-row τ and the weights). ``cist-by-hand-compiled`` is the same function through ``torch.compile``
(TorchInductor fuses its small kernels; it compiles during the warm-up, and on the CPU needs a C++ compiler): how
far fusing alone takes CIST's arithmetic. ``kd-node`` is thermokd's closed-form KD node (``ClosedFormKL``, what
its ``kd`` evaluates) called directly, without the module around it (its call, the input and label checks, the
statistics): what is left of ``kd``'s time once that Python is gone.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

import thermokd as tk

METHODS = ["kd", "kd-no-ignore", "cist", "dts", "ctkd", "lskd", "dtkd", "dkd", "entropy-target", "erkd"]
TARGETS = {"kd": 1.05, "cist": 1.2}
# a method name's suffix: build options. "-masked-...": every eighth row masked (a prompt), its rows weighted by zero
# (kept, sync_free_rows=True: no read of the count) or gathered (the CPU's default)
SUFFIXES = {"-no-ignore": {"ignore_index": None}, "-lm": {"domain": "lm"},
            "-masked-kept": {"sync_free_rows": True}, "-masked-gathered": {"sync_free_rows": False}}
PROGRESS = tk.Progress(step=0, total_steps=100, epoch=3, total_epochs=10)


def hinton_kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Minimal Hinton KD: ``0.1·CE + 0.9·τ²·KL(p_t ‖ p_s)`` at a fixed τ (what a hand-written loop would use)."""
    log_p = F.log_softmax(teacher / tau, dim=-1)
    log_q = F.log_softmax(student / tau, dim=-1)
    kd = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (tau * tau)
    return 0.1 * F.cross_entropy(student, labels) + 0.9 * kd


def hand_cist(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, rho: float) -> torch.Tensor:
    """thermokd's default CIST written out by hand, as short as it goes (a reference, not thermokd): per-row τ^t
    from the centred max over ρ, τ^s = τ^t·(m^s/m^t)^0.5, both clipped to [0.5, 20]; weights a·(d + 0.001)
    floored at 1/4 of the batch's largest, mean 1, blended half with uniform; each row's KL scaled by τ^t·τ^s."""
    with torch.no_grad():
        s = student.detach()
        m_t = teacher.amax(-1, keepdim=True) - teacher.mean(-1, keepdim=True)
        m_s = s.amax(-1, keepdim=True) - s.mean(-1, keepdim=True)
        tau_t = (m_t / rho).clamp(0.5, 20.0)
        tau_s = (tau_t * (m_s.clamp_min(1e-6) / m_t.clamp_min(1e-6)) ** 0.5).clamp(0.5, 20.0)
        column = labels.unsqueeze(-1)
        log_a = F.log_softmax(teacher, dim=-1).gather(-1, column)
        log_d = torch.log(1e-3 - torch.expm1(F.log_softmax(s, dim=-1).gather(-1, column)))
        log_w = (log_a + log_d).squeeze(-1)
        log_w = torch.maximum(log_w, log_w.max() - math.log(4.0))
        shares = 0.5 * torch.softmax(log_w, dim=0) + 0.5 / len(log_w)  # w_i / N
        factor = shares * (tau_t * tau_s).squeeze(-1)
    log_p = F.log_softmax(teacher / tau_t, dim=-1)
    log_q = F.log_softmax(student / tau_s, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    return 0.1 * F.cross_entropy(student, labels) + 0.9 * (kl * factor).sum()


def cist_ratio(teacher: torch.Tensor, tau0: float = 4.0) -> float:
    """ρ as thermokd's CIST calibrates it on its first batch: the median centred max over ``tau0``."""
    return float((teacher.amax(-1) - teacher.mean(-1)).median()) / tau0


def thermokd_step(method: str, device: torch.device) -> Callable:
    """One training step's loss work with thermokd: forward, and ``observe`` after the backward."""
    name, options = method, {}
    for suffix, extra in SUFFIXES.items():
        if method.endswith(suffix):
            name, options = method[: -len(suffix)], extra
    loss_fn = tk.build_loss(name, **options).to(device)
    masked = "-masked-" in method

    def step(student, teacher, labels):
        mask = torch.arange(student.shape[0], device=student.device) % 8 != 0 if masked else None
        out = loss_fn(student, teacher, labels, mask=mask, progress=PROGRESS)
        out.loss.backward()
        loss_fn.observe(out)  # the statistics are not read: a step that nobody logs

    return step


def baseline_step(student, teacher, labels):
    hinton_kd(student, teacher, labels).backward()


def hand_cist_step(teacher: torch.Tensor) -> Callable:
    rho = cist_ratio(teacher)

    def step(student, teacher, labels):
        hand_cist(student, teacher, labels, rho).backward()

    return step


def compiled_hand_cist_step(teacher: torch.Tensor) -> Callable:
    rho = cist_ratio(teacher)
    compiled = torch.compile(hand_cist, dynamic=False)  # TorchInductor: on the CPU it needs a C++ compiler

    def step(student, teacher, labels):
        compiled(student, teacher, labels, rho).backward()

    return step


def kd_node(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """The loss of ``hinton_kd`` through thermokd's closed-form node alone (no module, checks or statistics)."""
    from thermokd.closed_form import ClosedFormKL

    s32 = student.detach().float()
    return ClosedFormKL.apply(student, s32, teacher.float(), torch.log_softmax(s32, dim=-1), labels, tau, tau,
                              tau * tau / student.shape[0], 0.9, 0.1, -(2**62))[0]


def kd_node_step(teacher: torch.Tensor) -> Callable:
    def step(student, teacher, labels):
        kd_node(student, teacher, labels).backward()

    return step


# not thermokd: the same maths by hand, to tell thermokd's overhead from the method's own arithmetic (and kd-node:
# thermokd's own node without the Python around it)
REFERENCES = {"cist-by-hand": hand_cist_step, "cist-by-hand-compiled": compiled_hand_cist_step,
              "kd-node": kd_node_step}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_time(step: Callable, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
               calls: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call, averaged over a block of ``calls`` consecutive calls (the device's queue drained before
    and after)."""
    inputs = [student.detach().clone().requires_grad_(True) for _ in range(calls)]
    _sync(student.device)
    start = clock()
    for s in inputs:
        step(s, teacher, labels)
    _sync(student.device)
    return (clock() - start) / calls


def measure(shape: tuple[int, int], rounds: int, block: int, methods: list[str],
            device: "torch.device | str" = "cpu", clock: Callable[[], float] = time.perf_counter
            ) -> dict[str, object]:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    n, c = shape
    teacher = (torch.randn(n, c, generator=gen) * (1 + 4 * torch.rand(n, 1, generator=gen))).to(device)
    student = (torch.randn(n, c, generator=gen) * 2).to(device)
    labels = torch.randint(0, c, (n,), generator=gen).to(device)
    steps = {"hinton": baseline_step} | {m: REFERENCES[m](teacher) if m in REFERENCES else thermokd_step(m, device)
                                         for m in methods}
    times: dict[str, list[float]] = {m: [] for m in steps}
    for step in steps.values():  # warm-up: allocator, CIST's calibration, CUDA kernels' first launch
        block_time(step, student, teacher, labels, 2, clock)
    for _ in range(rounds):
        for m, step in steps.items():
            times[m].append(block_time(step, student, teacher, labels, block, clock))
    base = statistics.median(times["hinton"])
    result: dict[str, object] = {"hinton_seconds": base}
    for m in methods:
        ratios = [a / b for a, b in zip(times[m], times["hinton"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        result[m] = (statistics.median(times[m]) / base, q1, q3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds at [256, 100] (default 200)")
    parser.add_argument("--block", type=int, default=20, help="calls per timed block at [256, 100] (default 20)")
    parser.add_argument("--large", action="store_true", help="also time [8*512, 32000] (needs ~10 GB RAM)")
    parser.add_argument("--large-rounds", type=int, default=4, help="interleaved rounds of one call at the large "
                                                                    "shape (default 4)")
    parser.add_argument("--methods", default=",".join(METHODS + list(REFERENCES)),
                        help="thermokd methods and references (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall clock (default) or this process's CPU time (CPU only; a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--large-only", action="store_true", help="time [8*512, 32000] only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu measures the host's work only: use the wall clock with --device cuda")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {args.threads} threads")
    shapes = ([] if args.large_only else [(256, 100)]) + ([(8 * 512, 32000)] if args.large or args.large_only else [])
    for shape in shapes:
        large = shape[1] > 1000
        rounds, block = (args.large_rounds, 1) if large else (args.rounds, args.block)
        if device.type == "cuda" and large:
            # a GPU step at this shape takes milliseconds: time short blocks (each call's input is a 0.5 GB copy)
            block = min(args.block, 5)
        result = measure(shape, rounds, block, methods, device, clock)
        print(f"\nlogits {list(shape)}: hand-written Hinton KD forward+backward "
              f"{result['hinton_seconds'] * 1e3:.3f} ms "
              f"(median of {rounds} rounds x {block} calls, {where}, {args.clock} clock, torch {torch.__version__}); "
              "thermokd's time relative to it (ratio of medians; in brackets, the quartiles of the per-round ratios):")
        width = max(map(len, methods))
        for m in methods:
            ratio, q1, q3 = result[m]
            target = f"   target <= {TARGETS[m]:.2f}x: {'met' if ratio <= TARGETS[m] else 'MISSED'}" \
                if m in TARGETS else ""
            print(f"  {m:{width}s} {ratio:5.2f}x  [{q1:.2f}-{q3:.2f}]{target}")


if __name__ == "__main__":
    main()
