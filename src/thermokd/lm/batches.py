"""Fixed-length token windows with next-token labels: ``-100`` on padding and on an optional prompt prefix.

Labels are aligned with ``input_ids`` (as in Hugging Face causal LMs); :func:`next_token` applies the causal
shift, so position ``i``'s logits are scored against the token at ``i + 1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ThermoKDError

IGNORE = -100


@dataclass
class Windows:
    """``[N, L]`` token ids, attention mask (1 = real token) and labels (``IGNORE`` where not a target)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """How many positions are scored after the causal shift."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def select(self, index: Tensor) -> "Windows":
        return Windows(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def head(self, n: int) -> "Windows":
        return self.select(torch.arange(min(n, len(self))))

    def to(self, device) -> "Windows":
        return Windows(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def make_labels(input_ids: Tensor, attention_mask: Tensor, prompt_lengths: "int | Tensor" = 0) -> Tensor:
    """``input_ids`` with ``IGNORE`` on padding (``attention_mask == 0``) and on the first ``prompt_lengths``
    positions of each row (an int for all rows, or ``[N]``): a prompt is context, never a target."""
    if input_ids.shape != attention_mask.shape:
        raise ThermoKDError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                            "must have the same shape")
    prompt = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
    if bool((prompt < 0).any()):
        raise ThermoKDError(f"prompt lengths must be >= 0, got {prompt_lengths!r}")
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    keep = attention_mask.bool() & (positions >= prompt)
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE))


def next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The causal shift: logits at positions ``0..L-2`` against the labels at ``1..L-1``."""
    if logits.shape[:-1] != labels.shape:
        raise ThermoKDError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}: expected "
                            "logits [B, L, V] for labels [B, L]")
    return logits[:, :-1], labels[:, 1:]


def make_windows(documents: list[list[int]], context: int, pad_id: int, prompt_tokens: int = 0) -> Windows:
    """Cut each document's ids into windows of ``context`` tokens (a window never spans two documents); the last
    window of a document is right-padded. Pieces too short to hold a target after the shift are dropped."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ThermoKDError(f"context must be an integer >= 2, got {context!r}")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or not 0 <= prompt_tokens < context:
        raise ThermoKDError(f"prompt_tokens must be an integer in [0, context) = [0, {context}), "
                            f"got {prompt_tokens!r}")
    rows = [ids[i:i + context] for ids in documents for i in range(0, len(ids), context)]
    rows = [r for r in rows if len(r) > max(prompt_tokens, 1)]  # a target at index >= 1, past the prompt
    if not rows:
        raise ThermoKDError(f"no window of the documents holds a target (context {context}, "
                            f"prompt_tokens {prompt_tokens})")
    ids = torch.full((len(rows), context), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), context), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return Windows(ids, mask, make_labels(ids, mask, prompt_tokens))


def epoch_order(num: int, seed: int, epoch: int) -> Tensor:
    """The window order of one epoch: a pure function of (seed, epoch), the same for every method."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num, generator=g)
