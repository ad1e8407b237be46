"""The model's own next-token cross-entropy at τ = 1 (perplexity) and accuracy over windows: never the
distillation loss, which depends on the method's τ."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ThermoKDError
from .batches import IGNORE, Windows, next_token
from .models import lm_logits


@torch.no_grad()
def evaluate(model: nn.Module, windows: Windows, device: "torch.device | str", batch_size: int = 32
             ) -> dict[str, float]:
    """The model's next-token cross-entropy (nats), perplexity ``exp(CE)`` and accuracy (argmax = next token)
    over every scored position of ``windows``; ``tokens`` is their count."""
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows.select(torch.arange(start, min(start + batch_size, len(windows)))).to(device)
        logits, labels = next_token(lm_logits(model, batch.input_ids, batch.attention_mask), batch.labels)
        keep = labels != IGNORE
        logits, labels = logits[keep].float(), labels[keep]
        total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    model.train(was_training)
    if count == 0:
        raise ThermoKDError("the evaluation windows hold no scored token")
    ce = total / count
    return {"ce": ce, "ppl": math.exp(ce), "acc": correct / count, "tokens": float(count)}
