"""Seeded, batched augmentation in plain torch: random pad-and-crop and horizontal flip for images, random masking
of word pieces for token ids."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ThermoKDError, choice_error

AUGMENTATIONS = ("none", "crop", "crop-flip", "mask")
IMAGE_AUGMENTATIONS = ("none", "crop", "crop-flip")  # what applies to images (feature vectors ignore them)
TOKEN_AUGMENTATIONS = ("none", "mask")  # what applies to token ids


@dataclass(frozen=True)
class TokenMasking:
    """What ``mask`` needs of the tokenizer: the id that replaces a word piece, and the ids never replaced
    (padding, [CLS], [SEP], ...); ``rate`` is each other token's chance of being replaced."""

    rate: float
    mask_id: int
    special_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ThermoKDError(f"the masking rate must be in (0, 1), got {self.rate!r}")


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


def random_mask(x: Tensor, masking: TokenMasking, generator: torch.Generator) -> Tensor:
    """Token ids ``[N, L]`` with each ordinary token replaced by ``masking.mask_id`` with probability
    ``masking.rate``, independently (special tokens and padding stay)."""
    draw = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device) < masking.rate
    ordinary = ~torch.isin(x, torch.tensor(masking.special_ids, dtype=x.dtype, device=x.device))
    return torch.where(draw & ordinary, torch.full_like(x, masking.mask_id), x)


def make_augment(name: str, input_shape: tuple[int, ...], pad: "int | None" = None, chunk: int = 8192,
                 masking: "TokenMasking | None" = None) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``augment(x, generator) -> x'`` for ``none``, ``crop`` or ``crop-flip`` (images; ``pad`` defaults to a
    side // 8: 4 for 32×32, 3 for 28×28, 1 for 8×8; feature vectors are never augmented) or ``mask`` (token ids,
    with ``masking``)."""
    if name not in AUGMENTATIONS:
        raise choice_error("augmentation", name, AUGMENTATIONS)
    if pad is not None and pad < 1:
        raise ThermoKDError(f"augmentation pad must be >= 1, got {pad}")
    if name == "mask":
        if masking is None or len(input_shape) != 1:
            raise ThermoKDError("augmentation 'mask' replaces word pieces: it needs token ids and the tokenizer's "
                                "mask token")
        return lambda x, generator: random_mask(x, masking, generator)
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
