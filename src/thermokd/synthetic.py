"""Synthetic teacher logits whose *scale* and *shape* vary from row to row, for entropy diagnostics and benchmarks.

A single global τ gives soft labels of uneven entropy because rows differ in logit scale (docs/methods.md, CIST);
CIST's ratio rule removes the scale, not the shape. These logits vary both, so they show what each rule
equalises and what it cannot.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ThermoKDError

TAILS = ("gaussian", "laplace", "gumbel")


def synthetic_logits(n: int, num_classes: int = 100, seed: int = 0) -> Tensor:
    """``[n, num_classes]`` float32 logits of a plausible but heterogeneous teacher, reproducible from ``seed``.

    Each row is built in units of its top-class margin, then scaled and shifted:

    - **top class** at 1, **k competing classes** (k uniform in 1..5, so 0..4 competitors) at heights uniform in
      [0.5, 0.95]: from a confident single answer to a near-tie among several plausible classes;
    - **background** classes around 0 with a spread uniform in [0.05, 0.3] and a **tail shape** drawn per row from
      Gaussian (light tail), Laplace (heavy, symmetric) or Gumbel (right-skewed: a few stray classes stand out);
    - **scale**: the row is multiplied by a log-uniform factor in [3, 30], so the top class stands 3 to 30 logits
      above the background (a tenfold spread of confidence scales within one set of logits);
    - a random per-row **offset** (uniform in [-10, 10]), which softmax ignores, and a random class order.
    """
    if n < 1 or num_classes < 2:
        raise ThermoKDError(f"need n >= 1 and num_classes >= 2, got n={n}, num_classes={num_classes}")
    g = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    # background: a standard draw of the row's tail family, times the row's spread
    std_normal = torch.randn(n, num_classes, generator=g)
    u = uniform(1e-6, 1.0 - 1e-6, n, num_classes)
    laplace = torch.where(u < 0.5, torch.log(2 * u), -torch.log(2 * (1 - u))) / 2 ** 0.5  # unit variance
    gumbel = -torch.log(-torch.log(u))
    gumbel = (gumbel - 0.5772) / (math.pi / 6 ** 0.5)  # zero mean, unit variance
    family = torch.randint(len(TAILS), (n, 1), generator=g)
    background = torch.where(family == 0, std_normal, torch.where(family == 1, laplace, gumbel))
    z = background * uniform(0.05, 0.3, n, 1)

    # the top class and its competitors occupy the first columns before the shuffle
    k = torch.randint(1, 6, (n, 1), generator=g).clamp(max=num_classes)
    heights = uniform(0.5, 0.95, n, num_classes)
    heights[:, 0] = 1.0
    column = torch.arange(num_classes).expand(n, -1)
    z = torch.where(column < k, heights, z)

    scale = torch.exp(uniform(math.log(3.0), math.log(30.0), n, 1))
    z = z * scale + uniform(-10.0, 10.0, n, 1)
    order = torch.argsort(torch.rand(n, num_classes, generator=g), dim=-1)
    return torch.gather(z, -1, order).float()


__all__ = ["synthetic_logits"]
