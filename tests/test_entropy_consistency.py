"""docs/methods.md, CIST and "Entropy-targeted τ": CIST makes the teacher's soft-label entropy more even across
samples than one fixed τ of the same mean entropy, and the entropy-targeted τ makes it (nearly) constant wherever
the target is reachable.

Measured on synthetic 100-class logits whose scale *and* shape vary per row (``thermokd.synthetic``) and on the
test logits of a small MLP trained on scikit-learn's digits. ``pytest -s`` prints the measured tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from thermokd.diagnostics import matched_fixed_tau
from thermokd.functional import soft_label_entropy
from thermokd.synthetic import synthetic_logits
from thermokd.temperature import CIST, EntropyTarget

torch.set_num_threads(min(2, torch.get_num_threads()))

RATIOS = (2.0, 3.0, 4.0, 5.0, 8.0)
# the expected column of docs/methods.md (CIST, entropy consistency): std(H) under fixed τ / under CIST
QUOTED = {2.0: "< 2x", 3.0: "~4x", 4.0: "~17x", 5.0: "~7x", 8.0: "< 2x"}
WIDE = {"tau_min": 1e-3, "tau_max": 1e3}  # so that clamping never decides a temperature
TARGETS = (0.2, 0.5, 0.8)  # EntropyTarget(target=h): H* = h·log C


@dataclass
class Comparison:
    rho: float
    auto: bool  # ρ calibrated by CIST(ratio="auto") rather than given
    entropy_mean: float
    std_cist: float
    tau_fixed: float
    std_fixed: float
    num_classes: int

    @property
    def label(self) -> str:
        return f"auto ({self.rho:.2f})" if self.auto else f"{self.rho:g}"

    @property
    def ratio(self) -> float:
        return self.std_fixed / self.std_cist


def compare_with_fixed(logits: torch.Tensor, strategy: CIST) -> Comparison:
    """Teacher soft-label entropy under CIST, and under the one fixed τ of the same mean entropy."""
    auto = math.isnan(float(strategy.ratio))
    tau = strategy.temperatures(logits, logits).teacher  # calibrates ρ first when it is "auto"
    assert (tau > WIDE["tau_min"]).all() and (tau < WIDE["tau_max"]).all(), "a bound decided some τ"
    entropy = soft_label_entropy(logits, tau)
    tau_fixed = matched_fixed_tau(logits, float(entropy.mean()))
    entropy_fixed = soft_label_entropy(logits, tau_fixed)
    assert float(entropy_fixed.mean()) == pytest.approx(float(entropy.mean()), abs=1e-3)  # matched
    return Comparison(float(strategy.ratio), auto, float(entropy.mean()), float(entropy.std(correction=0)), tau_fixed,
                      float(entropy_fixed.std(correction=0)), logits.shape[-1])


def entropy_target_spread(logits: torch.Tensor, strategy: EntropyTarget) -> tuple[float, float, float, int]:
    """(target H*, std of H, max |H − H*| over the rows that can reach H* inside the bounds, unreachable rows)."""
    target = strategy.target_for(logits.shape[-1])
    tau = strategy.temperatures(logits, logits).teacher
    entropy = soft_label_entropy(logits, tau)
    reachable = ((soft_label_entropy(logits, strategy.tau_min) <= target)
                 & (soft_label_entropy(logits, strategy.tau_max) >= target))
    # the others take the nearer bound (docs/methods.md, "Entropy-targeted τ")
    at_bound = torch.isclose(tau[~reachable], torch.tensor(strategy.tau_min)) | torch.isclose(
        tau[~reachable], torch.tensor(strategy.tau_max))
    assert at_bound.all()
    h = entropy[reachable]
    return target, float(h.std(correction=0)), float((h - target).abs().max()), int((~reachable).sum())


def print_tables(title: str, rows: list[Comparison], targets: list[tuple[float, float, float, int]],
                 quoted: "dict[float, str] | None" = None) -> None:
    log_c = math.log(rows[0].num_classes)
    print(f"\n{title}\n")
    print("| CIST ρ | mean H (nats) | H / log C | std H, CIST | matched fixed τ | std H, fixed | ratio |"
          + (" expected |" if quoted else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if quoted else ""))
    for r in rows:
        extra = f" {'' if r.auto else quoted.get(r.rho, '')} |" if quoted else ""
        print(f"| {r.label} | {r.entropy_mean:.3f} | {r.entropy_mean / log_c:.2f} | {r.std_cist:.3f} | "
              f"{r.tau_fixed:.2f} | {r.std_fixed:.3f} | {r.ratio:.1f}x |{extra}")
    print("\n| EntropyTarget H* (nats) | std H, reachable rows | max abs(H − H*) | rows out of reach |")
    print("|---|---|---|---|")
    for target, std, worst, unreachable in targets:
        print(f"| {target:.3f} | {std:.1e} | {worst:.1e} | {unreachable} |")


def measure(logits: torch.Tensor) -> tuple[list[Comparison], list[tuple[float, float, float, int]]]:
    rows = [compare_with_fixed(logits, CIST(ratio=rho, **WIDE)) for rho in RATIOS]
    # the default: ρ calibrated so that the median teacher τ is 4
    rows.append(compare_with_fixed(logits, CIST(tau0=4.0, ratio="auto", **WIDE)))
    targets = [entropy_target_spread(logits, EntropyTarget(target=h)) for h in TARGETS]
    targets.append(entropy_target_spread(logits, EntropyTarget(target_nats=1.0)))
    return rows, targets


# -- synthetic logits -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    logits = synthetic_logits(4000, 100, seed=0)
    rows, targets = measure(logits)
    print_tables("Synthetic 100-class logits (thermokd.synthetic.synthetic_logits(4000, 100, seed=0))",
                 rows, targets, QUOTED)
    return rows, targets


def test_synthetic_logits_are_reproducible_and_heterogeneous():
    a, b = synthetic_logits(500, 100, seed=3), synthetic_logits(500, 100, seed=3)
    assert a.shape == (500, 100) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, synthetic_logits(500, 100, seed=4))
    margin = a.amax(-1) - a.mean(-1)
    assert margin.max() / margin.min() > 5  # scales vary a lot from row to row
    # at one shared τ the soft labels are uneven: what CIST sets out to fix
    assert float(soft_label_entropy(a, 4.0).std()) > 0.5


def test_cist_evens_out_entropy_on_synthetic_logits(synthetic):
    rows, _ = synthetic
    ratio = {r.rho: r.ratio for r in rows if not r.auto}
    assert all(r.ratio > 1 for r in rows), [(r.label, r.ratio) for r in rows]
    # the regime docs/methods.md describes: the gain peaks at moderate ρ and fades at both ends, where the soft
    # labels are near-uniform (small ρ) or near one-hot (large ρ) whatever τ does
    peak = max(ratio[3.0], ratio[4.0], ratio[5.0])
    assert peak > ratio[2.0] and peak > ratio[8.0]
    # the quoted gains this generator reproduces (~4x at ρ=3, ~7x at ρ=5) and the large-gain regime at ρ=4
    # (quoted ~17x; this generator gives about 10x); the "< 2x" ends are *not* reproduced (about 5x and 3x)
    assert ratio[3.0] > 4
    assert ratio[4.0] > 4
    assert ratio[5.0] > 7


def test_entropy_target_makes_entropy_constant_on_synthetic_logits(synthetic):
    _, targets = synthetic
    for target, std, worst, _ in targets:
        assert std < 0.02, (target, std)
        assert worst < 0.01, (target, worst)


# -- a trained model's logits -------------------------------------------------------------------------------
def digits_test_logits(seed: int = 0, epochs: int = 40) -> tuple[torch.Tensor, float]:
    """Held-out logits of a small MLP trained on scikit-learn's digits (about a second on a CPU), and its accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.3, stratify=y, random_state=seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=order).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            optimiser.step()
    with torch.no_grad():
        logits = model(torch.tensor(x_te, dtype=torch.float32))
    return logits, float((logits.argmax(-1) == torch.tensor(y_te)).float().mean())


@pytest.fixture(scope="module")
def digits():
    logits, accuracy = digits_test_logits()
    assert accuracy > 0.9  # a real teacher, not noise
    rows, targets = measure(logits)
    print_tables(f"Digits MLP teacher, {len(logits)} held-out samples, 10 classes (test accuracy {accuracy:.3f})",
                 rows, targets)
    return rows, targets


def test_cist_evens_out_entropy_on_a_trained_teacher(digits):
    rows, _ = digits
    assert all(r.ratio > 1 for r in rows), [(r.label, r.ratio) for r in rows]


def test_entropy_target_makes_entropy_constant_on_a_trained_teacher(digits):
    _, targets = digits
    for target, std, worst, _ in targets:
        assert std < 0.02, (target, std)
        assert worst < 0.01, (target, worst)
