"""Small GPT-2-style causal LMs built from a ``transformers`` config with random weights (nothing downloaded).

Any causal LM works with the rest of ``thermokd.lm``: a module whose ``forward(input_ids, attention_mask=...)``
returns logits ``[B, L, V]``, or an output object with ``.logits`` (every ``transformers`` causal LM).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError

_SIZE = re.compile(r"(\d+)x(\d+)(?:x(\d+))?")


@dataclass(frozen=True)
class LMSize:
    """Depth, width and attention heads of a GPT-2-style model."""

    n_layer: int
    n_embd: int
    n_head: int

    def __str__(self) -> str:
        return f"{self.n_layer}x{self.n_embd}x{self.n_head}"


def parse_size(text: str) -> LMSize:
    """``"LAYERSxWIDTH"`` (heads of width 32) or ``"LAYERSxWIDTHxHEADS"``, e.g. ``4x256`` or ``2x64x2``."""
    match = _SIZE.fullmatch(str(text).strip().lower())
    if not match:
        raise ThermoKDError(f"model size {text!r} is not LAYERSxWIDTH or LAYERSxWIDTHxHEADS (e.g. 4x256, 2x64x2)")
    layers, width = int(match[1]), int(match[2])
    heads = int(match[3]) if match[3] else max(1, width // 32)
    if layers < 1 or width < 1 or heads < 1 or width % heads:
        raise ThermoKDError(f"model size {text!r}: layers, width and heads must be >= 1 and the width divisible "
                            f"by the heads ({width} % {heads} = {width % heads})")
    return LMSize(layers, width, heads)


def build_lm(size: "LMSize | str", vocab_size: int, context: int, dropout: float = 0.1, seed: int = 0,
             eos_id: "int | None" = None) -> nn.Module:
    """A ``transformers.GPT2LMHeadModel`` of this size with seeded random weights (tied input/output embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    size = parse_size(size) if isinstance(size, str) else size
    if not 0.0 <= dropout < 1.0:
        raise ThermoKDError(f"dropout must be in [0, 1), got {dropout!r}")
    config = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=size.n_embd, n_layer=size.n_layer,
                        n_head=size.n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's global RNG
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lm_logits(model: nn.Module, input_ids: Tensor, attention_mask: "Tensor | None" = None) -> Tensor:
    """``[B, L, V]`` logits of any causal LM: a ``transformers`` model (``.logits``) or a module returning them."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ThermoKDError(f"the model must return logits [B, L, V] for input_ids {tuple(input_ids.shape)}; "
                            f"got {shape}")
    return logits
