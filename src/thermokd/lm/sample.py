"""Text generation from a causal LM. Its ``sampling_temperature`` only shapes generation: it is a different
setting from the distillation loss's τ, which this module never reads or changes (docs/methods.md, "Sampling
temperature is not the loss's τ")."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from .models import lm_logits

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@torch.no_grad()
def sample(model: nn.Module, prompt: "str | Sequence[int] | Tensor", *, tokenizer: "Tokenizer | None" = None,
           max_new_tokens: int = 60, sampling_temperature: float = 1.0, top_k: "int | None" = None,
           seed: int = 0, stop_id: "int | None" = None) -> "str | list[int]":
    """Continue ``prompt`` by up to ``max_new_tokens`` tokens drawn from ``softmax(logits / sampling_temperature)``
    (``sampling_temperature=0``: greedy), optionally among the ``top_k`` most likely tokens; stop after
    ``stop_id``. A string prompt needs ``tokenizer`` and gives back the prompt plus its continuation as text;
    token ids give back ids. Seeded: the same call gives the same text."""
    if not sampling_temperature >= 0:
        raise ThermoKDError(f"sampling_temperature must be >= 0 (0: greedy), got {sampling_temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ThermoKDError(f"top_k must be a positive integer or None, got {top_k!r}")
    as_text = isinstance(prompt, str)
    if as_text:
        if tokenizer is None:
            raise ThermoKDError("a text prompt needs tokenizer=...")
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    else:
        ids = [int(i) for i in (prompt.reshape(-1).tolist() if isinstance(prompt, Tensor) else prompt)]
    if not ids:
        raise ThermoKDError("the prompt is empty: give at least one token")
    device = next(model.parameters()).device
    window = getattr(getattr(model, "config", None), "n_positions", None) or len(ids) + max_new_tokens
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], device=device)  # the model sees at most its context length
        logits = lm_logits(model, context)[0, -1].float()
        if sampling_temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / sampling_temperature
            if top_k is not None and top_k < logits.numel():
                logits[logits < logits.topk(top_k).values[-1]] = float("-inf")
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        ids.append(token)
        if token == stop_id:
            break
    model.train(was_training)
    return tokenizer.decode(ids) if as_text else ids
