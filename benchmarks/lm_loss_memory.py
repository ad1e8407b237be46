"""Peak memory and time of the chunked distillation loss against the plain one, on LM-sized logits.

    python benchmarks/lm_loss_memory.py                       # [8, 512, 32000] float32, KD and CIST
    python benchmarks/lm_loss_memory.py --shape 2,128,8000    # a quicker check

Memory: each variant runs forward + backward once in a fresh process; its peak is the process's resident-set
high-water mark (reset just before the loss; Linux) minus the resident set at that moment (the logits, labels and the interpreter are already
there), i.e. what the loss itself adds, gradient buffer included. Time: forward + backward, the variants
interleaved in one process, median of ``--rounds``. Both are reported as chunked/plain ratios, with the largest
value and gradient differences.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from thermokd import Progress, build_loss


def make_inputs(shape: tuple[int, int, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, length, vocab = shape
    student = torch.randn(b, length, vocab, generator=g).mul_(2).requires_grad_()
    teacher = torch.randn(b, length, vocab, generator=g).mul_(3)
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[:, : length // 8] = -100  # a prompt that the loss must ignore
    return student, teacher, labels


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> int:
    """Reset the resident-set high-water mark (Linux ``clear_refs`` 5) and return the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def loss_for(method: str, chunk: int):
    loss = build_loss(method, chunk_size=chunk or None)
    if method == "cist":
        # as after ``prepare`` on a training set; not part of the step
        loss.temperature.calibrate(torch.randn(64, 100, generator=torch.Generator().manual_seed(1)) * 3)
    return loss


def step(loss, student, teacher, labels):
    student.grad = None
    out = loss(student, teacher, labels, progress=Progress(step=1, total_steps=10, epoch=0, total_epochs=1))
    out.loss.backward()
    return out


def measure_memory(args) -> None:
    """Child process: the loss's own peak (bytes) for one variant."""
    torch.set_num_threads(args.threads)
    student, teacher, labels = make_inputs(args.shape)
    loss = loss_for(args.method, args.chunk)
    tiny = make_inputs((1, 4, 16), seed=1)
    step(loss_for(args.method, 2), *tiny)  # warm-up: libraries and thread pools, not the loss's memory
    step(loss_for(args.method, 0), *tiny)
    before = reset_peak()
    step(loss, student, teacher, labels)
    peak = peak_bytes()
    print(json.dumps({"peak_added": peak - before, "inputs": 2 * student.numel() * student.element_size()}))


def child_memory(args, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", args.method, "--chunk", str(chunk),
           "--shape", ",".join(map(str, args.shape)), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_time_and_values(args) -> dict:
    torch.set_num_threads(args.threads)
    student, teacher, labels = make_inputs(args.shape)
    plain, chunked = loss_for(args.method, 0), loss_for(args.method, args.chunk)
    out_p = step(plain, student, teacher, labels)
    grad_p = student.grad.clone()
    out_c = step(chunked, student, teacher, labels)
    grad_c = student.grad.clone()
    diff = {"loss_abs": abs(out_p.loss.item() - out_c.loss.item()),
            "grad_max_abs": float((grad_p - grad_c).abs().max()), "grad_max": float(grad_p.abs().max())}
    del grad_p, grad_c
    times = {"plain": [], "chunked": []}
    for _ in range(args.rounds):
        for name, loss in (("plain", plain), ("chunked", chunked)):
            start = time.perf_counter()
            step(loss, student, teacher, labels)
            times[name].append(time.perf_counter() - start)
    return {"diff": diff, "median_s": {k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,512,32000", help="B,L,V (default %(default)s)")
    parser.add_argument("--methods", default="kd,cist", help="thermokd methods (default %(default)s)")
    parser.add_argument("--method", default="kd", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=512, help="rows per chunk (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = tuple(int(v) for v in args.shape.split(","))
    if args.child:
        measure_memory(args)
        return
    print(f"logits {list(args.shape)} float32, chunk {args.chunk} rows, {args.threads} threads, "
          f"torch {torch.__version__}, {args.rounds} rounds")
    print(f"{'method':8s} {'plain MiB':>10s} {'chunked MiB':>12s} {'memory ratio':>13s} {'time ratio':>11s} "
          f"{'plain s':>8s} {'|Δloss|':>9s} {'max|Δgrad|/max|grad|':>21s}")
    for method in args.methods.split(","):
        args.method = method
        mem_p, mem_c = child_memory(args, 0), child_memory(args, args.chunk)
        res = compare_time_and_values(args)
        t = res["median_s"]
        print(f"{method:8s} {mem_p['peak_added'] / 2**20:10.0f} {mem_c['peak_added'] / 2**20:12.0f} "
              f"{mem_c['peak_added'] / mem_p['peak_added']:13.3f} {t['chunked'] / t['plain']:11.3f} "
              f"{t['plain']:8.2f} {res['diff']['loss_abs']:9.2e} "
              f"{res['diff']['grad_max_abs'] / res['diff']['grad_max']:21.2e}")
    print(f"(the logits themselves, not counted above: {mem_p['inputs'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
