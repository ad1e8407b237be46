"""`make demo` until the training engine lands: what each temperature strategy does to a real teacher's soft labels.

Trains a small MLP teacher on scikit-learn's digits (seconds on a CPU), then, for every strategy, prints the
teacher temperatures and the soft-label entropy they give on the held-out digits.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import temperature as T
from .diagnostics import matched_fixed_tau, soft_label_report


def digits_teacher_logits(seed: int = 0, epochs: int = 60) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Test-set logits and labels of an MLP trained on digits, and its test accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        logits = model(torch.tensor(x_te, dtype=torch.float32))
    labels = torch.tensor(y_te)
    return logits, labels, float((logits.argmax(-1) == labels).float().mean())


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    logits, labels, acc = digits_teacher_logits()
    c = logits.shape[-1]
    print(f"teacher: MLP on digits, test accuracy {acc:.3f}, {len(labels)} test samples, {c} classes\n")
    strategies = {"fixed tau=4": T.Fixed(4.0), "cist": T.CIST(tau0=4.0), "dtkd": T.DTKD(),
                  "lskd": T.LogitStandardization(), "entropy-target": T.EntropyTarget(target=0.5),
                  "dts (start)": T.DTS(), "ctkd (start)": T.CTKD()}
    header = f"{'strategy':16s} {'tau mean':>9s} {'tau min':>8s} {'tau max':>8s} {'H mean':>7s} {'H std':>7s} {'flat>0.9':>9s}"
    print(header + "\n" + "-" * len(header))
    for name, strategy in strategies.items():
        r = soft_label_report(strategy, logits, labels=labels, name=name)
        print(f"{name:16s} {r.tau_teacher['mean']:9.3f} {r.tau_teacher['min']:8.3f} {r.tau_teacher['max']:8.3f} "
              f"{r.entropy['mean']:7.3f} {r.entropy['std']:7.3f} {r.over_flat:9.1%}")
    cist = soft_label_report(T.CIST(tau0=4.0), logits)
    tau = matched_fixed_tau(logits, cist.entropy["mean"])
    fixed = soft_label_report(T.Fixed(tau), logits)
    print(f"\nAt matched mean entropy ({cist.entropy['mean']:.3f} nats of log C = {math.log(c):.3f}): "
          f"std of teacher entropy {fixed.entropy['std']:.3f} with fixed tau={tau:.2f} vs "
          f"{cist.entropy['std']:.3f} with CIST ({fixed.entropy['std'] / max(cist.entropy['std'], 1e-12):.1f}x lower).")


if __name__ == "__main__":
    main()
