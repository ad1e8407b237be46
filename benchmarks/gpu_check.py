"""GPU figures for thermokd's hot path (run by ``benchmarks/gpu_check.sh`` on a CUDA machine).

    python benchmarks/gpu_check.py step-rate [--device cuda] [--model resnet8x4] [--rounds 6] [--steps 50]
    python benchmarks/gpu_check.py fused-memory [--shape 8,512,768,50304] [--chunk N] [--method kd] [--domain lm]
        [--profile N]
    python benchmarks/gpu_check.py bf16

``step-rate``: training steps per second of a CIFAR-style ResNet student (batch 64, 32×32, 100 classes, teacher
logits given, SGD), the step's loss being thermokd's (``kd``, ``cist``) or a hand-written Hinton KD; rounds
interleaved, ratio of medians (target ≥ 0.97× for ``kd``). A loss that makes the host wait for the device every
step shows here. ``fused-memory``: peak CUDA memory (``max_memory_allocated`` above the inputs) and time of the
plain path (heads → logits → loss) against ``forward_hidden``, rounds interleaved (``--profile N``: and the N
kernels that take the most device time in one call of each). ``bf16``: every method's loss under bf16 autocast
against the same bf16 logits in float32, and the fused path under autocast.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

import thermokd as tk
from thermokd.fused import default_chunk
from thermokd.models import build_model

PROGRESS = tk.Progress(step=1, total_steps=100, epoch=1, total_epochs=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hinton_kd(student, teacher, labels, tau: float = 4.0):
    log_p, log_q = F.log_softmax(teacher / tau, -1), F.log_softmax(student / tau, -1)
    return 0.1 * F.cross_entropy(student, labels) + 0.9 * F.kl_div(log_q, log_p, reduction="batchmean",
                                                                     log_target=True) * tau * tau


def _quartiles(values: "list[float]") -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{q[0]:.3f}-{q[2]:.3f}"


def step_rate(args) -> None:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batches, args.batch, 3, 32, 32, generator=g).to(device)
    t = (torch.randn(args.batches, args.batch, 100, generator=g) * 4).to(device)
    y = torch.randint(0, 100, (args.batches, args.batch), generator=g).to(device)
    variants = {"hand-written": None, "kd": tk.build_loss("kd", ignore_index=None),
                "cist": tk.build_loss("cist", ignore_index=None)}
    models = {}
    for name in variants:
        torch.manual_seed(0)
        model = build_model(args.model, 100).to(device).to(memory_format=torch.channels_last)
        models[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))

    def run(name: str, steps: int) -> float:
        model, opt = models[name]
        loss_fn = variants[name]
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            b = i % args.batches
            logits = model(x[b])
            if loss_fn is None:
                loss = hinton_kd(logits, t[b], y[b])
                loss.backward()
            else:
                out = loss_fn(logits, t[b], y[b], progress=PROGRESS)
                out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loss_fn is not None:
                loss_fn.observe(out)
        _sync(device)
        return steps / (time.perf_counter() - start)

    for name in variants:
        run(name, 5)  # warm-up: cuDNN autotuning, allocator, CIST's calibration
    rates = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            rates[name].append(run(name, args.steps))
    base = statistics.median(rates["hand-written"])
    print(f"step-rate: {args.model}, batch {args.batch}, {args.rounds} interleaved rounds x {args.steps} steps on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    print(f"  hand-written KD: {base:.1f} steps/s")
    for name in ("kd", "cist"):
        ratios = [a / b for a, b in zip(rates[name], rates["hand-written"])]
        print(f"  thermokd {name:5s} {statistics.median(rates[name]):.1f} steps/s = "
              f"{statistics.median(rates[name]) / base:.3f}x [{_quartiles(ratios)}]"
              + ("   target >= 0.97x" if name == "kd" else ""))


def fused_memory(args) -> None:
    device = torch.device(args.device)
    b, length, hidden, vocab = (int(v) for v in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(b * length, hidden, generator=g).to(device).requires_grad_()
    h_t = torch.randn(b * length, hidden, generator=g).to(device)
    head_s, head_t = torch.nn.Linear(hidden, vocab).to(device), torch.nn.Linear(hidden, vocab).to(device)
    head_t.requires_grad_(False)
    labels = torch.randint(0, vocab, (b * length,), generator=g).to(device)
    loss_fn = tk.build_loss(args.method, domain=args.domain, ignore_index=None)

    def plain():
        with torch.no_grad():
            teacher = head_t(h_t)
        loss_fn(head_s(h_s), teacher, labels).loss.backward()

    def fused():
        loss_fn.forward_hidden(h_s, head_s, h_t, head_t, labels, chunk_size=args.chunk).loss.backward()

    def fresh() -> None:
        h_s.grad = None
        head_s.zero_grad(set_to_none=True)
        _sync(device)

    variants = {"plain": plain, "fused": fused}
    peaks = {}
    for name, fn in variants.items():
        fn()  # warm-up
        fresh()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - before
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):  # interleaved, the order alternating, so drift hits both alike
        for name in (("plain", "fused") if r % 2 == 0 else ("fused", "plain")):
            fresh()
            start = time.perf_counter()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    ratios = [f / p for f, p in zip(times["fused"], times["plain"])]
    t_p, t_f = statistics.median(times["plain"]), statistics.median(times["fused"])
    chunk = args.chunk or default_chunk(vocab, device)
    name = args.method + (" (LM preset)" if args.domain == "lm" else "")
    print(f"fused-memory: {name}, {b}x{length} tokens, hidden {hidden}, V={vocab}, chunk {chunk}"
          f"{'' if args.chunk else ' (the default)'}, float32, {args.rounds} interleaved rounds, "
          f"{torch.cuda.get_device_name(device)}")
    print(f"  plain {peaks['plain'] / 2**20:.0f} MiB {t_p * 1e3:.1f} ms; fused {peaks['fused'] / 2**20:.0f} MiB "
          f"{t_f * 1e3:.1f} ms; memory {peaks['fused'] / peaks['plain']:.3f}x (target <= 0.15), time "
          f"{t_f / t_p:.3f}x [{_quartiles(ratios)}] (target <= 1.1)")
    if args.profile:  # where the time goes: the kernels of one call of each, by device time
        from torch.profiler import ProfilerActivity, profile
        for name, fn in variants.items():
            fresh()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                _sync(device)
            print(f"  profile of one {name} call (top {args.profile} by device time):")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile))


def bf16(args) -> None:
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(64, 1000, generator=g) * 3).to(device=device, dtype=torch.bfloat16)
    t = (torch.randn(64, 1000, generator=g) * 4).to(device=device, dtype=torch.bfloat16)
    y = torch.randint(0, 1000, (64,), generator=g).to(device)
    worst = 0.0
    for method in tk.method_names():
        if method == "ctkd-instance":
            continue
        ref_fn, amp_fn = tk.build_loss(method), tk.build_loss(method)
        ref = float(ref_fn(s.float(), t.float(), y, progress=PROGRESS).loss.detach())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            got = float(amp_fn(s, t, y, progress=PROGRESS).loss.detach())
        worst = max(worst, abs(got - ref) / max(abs(ref), 1e-12))
    h = torch.randn(64, 32, generator=g).to(device)
    head_s, head_t = torch.nn.Linear(32, 1000).to(device), torch.nn.Linear(32, 1000).to(device)
    loss_fn = tk.build_loss("kd")
    ref = float(loss_fn.forward_hidden(h, head_s, h, head_t, y).loss.detach())
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = float(loss_fn.forward_hidden(h, head_s, h, head_t, y).loss.detach())
    print(f"bf16: every method under bf16 autocast vs float32 maths on the same bf16 logits: worst relative "
          f"difference {worst:.2e} (the loss keeps float32 inside autocast); fused path {abs(got - ref) / ref:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("step-rate", "fused-memory", "bf16"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="distinct batches kept on the device")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shape", default="8,512,768,50304", help="B,L,H,V for fused-memory")
    parser.add_argument("--chunk", type=int, default=None, help="fused-memory: rows per chunk (default: the "
                                                                   "library's default for the device and vocabulary)")
    parser.add_argument("--method", default="kd", help="fused-memory: the method whose loss is measured")
    parser.add_argument("--domain", choices=("default", "lm"), default="default",
                        help="fused-memory: the method's defaults or its language-model preset")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="fused-memory: also print the N kernels taking the most device time in one call of each")
    args = parser.parse_args()
    {"step-rate": step_rate, "fused-memory": fused_memory, "bf16": bf16}[args.what](args)


if __name__ == "__main__":
    main()
