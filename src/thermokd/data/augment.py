"""Seeded, batched augmentation in plain torch: random pad-and-crop and horizontal flip."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ThermoKDError, choice_error

AUGMENTATIONS = ("none", "crop", "crop-flip")


def random_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Zero-pad ``[N, C, H, W]`` by ``pad`` and crop back at a random offset per image (one gather, no loop)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    # offsets are drawn on the generator's device, so the same seed gives the same crops wherever x lives
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=generator.device).to(x.device)
    rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    flat = (rows * (w + 2 * pad) + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)


def random_flip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image horizontally with probability ½."""
    flip = (torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def make_augment(name: str, input_shape: tuple[int, ...], pad: "int | None" = None,
                 chunk: int = 8192) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``augment(x, generator) -> x'`` for ``none``, ``crop`` or ``crop-flip``; ``pad`` defaults to a side // 8
    (4 for 32×32, 3 for 28×28, 1 for 8×8). Feature vectors are never augmented."""
    if name not in AUGMENTATIONS:
        raise choice_error("augmentation", name, AUGMENTATIONS)
    if pad is not None and pad < 1:
        raise ThermoKDError(f"augmentation pad must be >= 1, got {pad}")
    if name == "none" or len(input_shape) != 3:
        return lambda x, generator: x
    pad = pad or max(1, min(input_shape[1:]) // 8)

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        out = []
        for part in x.split(chunk):  # bounded memory for the padded copy
            part = random_crop(part, pad, generator)
            out.append(random_flip(part, generator) if name == "crop-flip" else part)
        return torch.cat(out)

    return augment
