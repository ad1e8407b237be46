"""Peak memory and time of thermokd's large-vocabulary losses against the plain one.

    python benchmarks/lm_loss_memory.py --mode fused                    # 8x512 tokens, hidden 768, V=50304
    python benchmarks/lm_loss_memory.py --mode fused --shape 2,128,64,8000   # a quick check
    python benchmarks/lm_loss_memory.py --mode chunked                  # [8, 512, 32000] logits, chunk_size
    python benchmarks/lm_loss_memory.py --mode chunked --shape 2,128,8000
    python benchmarks/lm_loss_memory.py --mode fused --shape 2,256,128,8000 --rows on   # ignored rows weighted by 0

``fused``: the plain path builds both models' logits with their linear heads (``hidden @ Wᵀ + b``) and runs the
loss on them; the fused path (``DistillationLoss.forward_hidden``) gets the hidden states and the heads and never
builds more than a chunk of logits per model. Targets: peak ≤ 0.15× the plain path's, time ≤ 1.1×.
``chunked``: the plain loss on given logits against ``chunk_size``.

Memory: each variant runs forward + backward once in a fresh process; its peak is the process's resident-set
high-water mark (reset just before the step; Linux) minus the resident set at that moment (the inputs, the
heads and the interpreter are already there), i.e. what the step adds, gradient buffers included. Time: forward
+ backward, the variants interleaved in one process, median of ``--rounds``. Both are reported as new/plain
ratios, with the largest value and gradient differences.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from thermokd import Progress, build_loss

PROGRESS = Progress(step=1, total_steps=10, epoch=0, total_epochs=1)
DEFAULT_SHAPES = {"fused": "8,512,768,50304", "chunked": "8,512,32000"}


def make_inputs(mode: str, shape: tuple[int, ...], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, length, vocab = shape[0], shape[1], shape[-1]
    labels = torch.randint(0, vocab, (b, length), generator=g)
    labels[:, : length // 8] = -100  # a prompt that the loss must ignore
    if mode == "chunked":
        return {"student": torch.randn(b, length, vocab, generator=g).mul_(2).requires_grad_(),
                "teacher": torch.randn(b, length, vocab, generator=g).mul_(3), "labels": labels}
    hidden = shape[2]
    student_head, teacher_head = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        student_head.weight.normal_(0, 2 / hidden ** 0.5, generator=g)
        teacher_head.weight.normal_(0, 3 / hidden ** 0.5, generator=g)
    teacher_head.requires_grad_(False)
    return {"hidden": torch.randn(b, length, hidden, generator=g).requires_grad_(),
            "teacher_hidden": torch.randn(b, length, hidden, generator=g), "head": student_head,
            "teacher_head": teacher_head, "labels": labels}


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


SYNC_FREE_ROWS = {"default": None, "on": True, "off": False}


def loss_for(method: str, chunk: int, rows: str = "default"):
    loss = build_loss(method, chunk_size=chunk or None, sync_free_rows=SYNC_FREE_ROWS[rows])
    if method == "cist":
        # as after ``prepare`` on a training set; not part of the step
        loss.temperature.calibrate(torch.randn(64, 100, generator=torch.Generator().manual_seed(1)) * 3)
    return loss


def leaves(mode: str, inputs: dict) -> list[torch.Tensor]:
    return [inputs["student"]] if mode == "chunked" else [inputs["hidden"], inputs["head"].weight,
                                                           inputs["head"].bias]


def step(mode: str, variant: str, loss, inputs: dict):
    """One forward + backward; ``variant``: "plain", or "new" (chunked logits, or the fused heads)."""
    for x in leaves(mode, inputs):
        x.grad = None
    if mode == "chunked":
        out = loss(inputs["student"], inputs["teacher"], inputs["labels"], progress=PROGRESS)
    elif variant == "plain":
        with torch.no_grad():
            teacher = inputs["teacher_head"](inputs["teacher_hidden"])
        out = loss(inputs["head"](inputs["hidden"]), teacher, inputs["labels"], progress=PROGRESS)
    else:
        out = loss.forward_hidden(inputs["hidden"], inputs["head"], inputs["teacher_hidden"], inputs["teacher_head"],
                                  inputs["labels"], progress=PROGRESS)
    out.loss.backward()
    return out


def measure_memory(args) -> None:
    """Child process: the step's own peak (bytes) for one variant."""
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.mode, args.shape)
    chunk = args.chunk if args.variant == "new" else 0
    tiny_shape = (1, 4, 16) if args.mode == "chunked" else (1, 4, 8, 16)
    tiny = make_inputs(args.mode, tiny_shape, seed=1)
    for variant in ("plain", "new"):  # warm-up: libraries and thread pools, not the loss's memory
        step(args.mode, variant, loss_for(args.method, 2 if variant == "new" else 0, args.rows), tiny)
    loss = loss_for(args.method, chunk, args.rows)
    before = reset_peak()
    step(args.mode, args.variant, loss, inputs)
    peak = peak_bytes()
    print(json.dumps({"peak_added": peak - before}))


def child_memory(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--mode", args.mode, "--method", args.method, "--variant", variant,
           "--chunk", str(args.chunk), "--shape", ",".join(map(str, args.shape)), "--threads", str(args.threads),
           "--rows", args.rows]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_time_and_values(args) -> dict:
    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.mode, args.shape)
    losses = {"plain": loss_for(args.method, 0, args.rows), "new": loss_for(args.method, args.chunk, args.rows)}
    results = {}
    for variant, loss in losses.items():
        out = step(args.mode, variant, loss, inputs)
        results[variant] = (float(out.loss.detach()), [x.grad.clone() for x in leaves(args.mode, inputs)])
    (loss_p, grads_p), (loss_n, grads_n) = results["plain"], results["new"]
    diff = {"loss_rel": abs(loss_p - loss_n) / abs(loss_p),
            "grad_rel": max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(grads_p, grads_n))}
    del results, grads_p, grads_n
    times = {"plain": [], "new": []}
    for _ in range(args.rounds):
        for variant, loss in losses.items():
            start = time.perf_counter()
            step(args.mode, variant, loss, inputs)
            times[variant].append(time.perf_counter() - start)
    return {"diff": diff, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "quartiles": {k: statistics.quantiles(v, n=4) if len(v) > 1 else v * 3 for k, v in times.items()}}


def _ratio(new: int, plain: int) -> float:
    """new/plain; NaN when the plain step added no resident page (a tiny shape: below the page granularity)."""
    return new / plain if plain > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fused", "chunked"), default="fused")
    parser.add_argument("--shape", default=None, help="B,L,H,V (fused) or B,L,V (chunked); default: the LM sizes")
    parser.add_argument("--methods", default="kd,cist", help="thermokd methods (default %(default)s)")
    parser.add_argument("--method", default="kd", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--rows", choices=tuple(SYNC_FREE_ROWS), default="default",
                        help="the ignored prompt rows: 'on' weights them by zero (sync_free_rows=True), 'off' gathers "
                             "the others, 'default' as the device decides (gathered on the CPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shape = tuple(int(v) for v in (args.shape or DEFAULT_SHAPES[args.mode]).split(","))
    if len(args.shape) != (4 if args.mode == "fused" else 3):
        parser.error(f"--shape for --mode {args.mode} is {'B,L,H,V' if args.mode == 'fused' else 'B,L,V'}")
    if args.child:
        measure_memory(args)
        return
    what = "hidden states + heads" if args.mode == "fused" else "logits"
    print(f"{args.mode}: {what} {list(args.shape)} float32, chunk {args.chunk} rows, {args.threads} threads, "
          f"torch {torch.__version__}, {args.rounds} interleaved rounds, ignored rows: {args.rows}; "
          f"ratios are {args.mode}/plain")
    print(f"{'method':8s} {'plain MiB':>10s} {args.mode + ' MiB':>11s} {'memory ratio':>13s} {'time ratio':>11s} "
          f"{'plain s':>8s} {'new s':>7s} {'rel|Δloss|':>11s} {'max rel|Δgrad|':>15s}")
    for method in args.methods.split(","):
        args.method = method
        mem_p, mem_n = child_memory(args, "plain"), child_memory(args, "new")
        res = compare_time_and_values(args)
        t = res["median_s"]
        print(f"{method:8s} {mem_p['peak_added'] / 2**20:10.0f} {mem_n['peak_added'] / 2**20:11.0f} "
              f"{_ratio(mem_n['peak_added'], mem_p['peak_added']):13.3f} {t['new'] / t['plain']:11.3f} "
              f"{t['plain']:8.2f} {t['new']:7.2f} {res['diff']['loss_rel']:11.2e} {res['diff']['grad_rel']:15.2e}")
        q = res["quartiles"]
        print(f"{'':8s} time quartiles (s): plain [{q['plain'][0]:.2f}-{q['plain'][2]:.2f}], "
              f"new [{q['new'][0]:.2f}-{q['new'][2]:.2f}]")
    if args.mode == "fused":
        print("targets: memory ratio <= 0.15, time ratio <= 1.1")


if __name__ == "__main__":
    main()
