"""The fused linear-layer loss's inputs: linear heads and the teacher as a source of rows.

``DistillationLoss.forward_hidden`` takes hidden states and output heads instead of logits; the rows of logits
are then built a chunk at a time by :class:`~thermokd.chunked.LinearRows` (or, for a top-k teacher cache,
:class:`~thermokd.chunked.TopKRows`) inside the chunked sweep.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .chunked import LinearRows, RowSource, TopKRows
from .errors import ThermoKDError

HeadLike = "nn.Linear | tuple[Tensor, Tensor | None] | Tensor"

CPU_CHUNK = 256  # rows per chunk on the CPU: larger ones measured no faster there
# on an accelerator a chunk's kernels are short and their launches dominate at 256 rows: chunks are sized so that one
# float32 [chunk, V] intermediate takes about this much memory (a chunk keeps a handful of them alive)
DEVICE_CHUNK_BYTES = 128 * 2**20


def default_chunk(vocab: int, device: torch.device) -> int:
    """The fused loss's rows per chunk when none is given: ``CPU_CHUNK`` on the CPU; elsewhere the power of two
    (256 to 4096) whose ``[chunk, vocab]`` float32 block is closest below ``DEVICE_CHUNK_BYTES``."""
    if device.type == "cpu":
        return CPU_CHUNK
    rows = DEVICE_CHUNK_BYTES // (4 * max(vocab, 1))
    return int(min(4096, max(256, 1 << max(rows, 1).bit_length() - 1)))


def head_parts(head, name: str) -> tuple[Tensor, "Tensor | None"]:
    """A linear head as (weight ``[V, H]``, bias ``[V]`` or None): an ``nn.Linear``, a pair or a weight."""
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, Tensor):
        weight, bias = head, None
    elif isinstance(head, (tuple, list)) and len(head) == 2:
        weight, bias = head
    else:
        raise ThermoKDError(f"{name} must be an nn.Linear, a (weight, bias) pair or a weight tensor, got {type(head)}")
    if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
        raise ThermoKDError(f"{name}: weight must be [V, H] and bias [V], got {tuple(weight.shape)} and "
                            f"{None if bias is None else tuple(bias.shape)}")
    return weight, bias


class _NoTeacher:
    """The teacher of a cross-entropy-only loss: never read, zeros if it is."""

    def __init__(self, vocab: int, device: torch.device) -> None:
        self.vocab, self.device = vocab, device

    def rows(self, start: int, stop: int) -> Tensor:
        return torch.zeros(stop - start, self.vocab, device=self.device)


def teacher_source(lead: torch.Size, vocab: int, hidden: "Tensor | None", head: "HeadLike | None", topk,
                   index: "Tensor | None", device: torch.device, distils: bool,
                   keep: "Tensor | None" = None) -> RowSource:
    """The teacher as a row source: hidden states and a head, a top-k cache, or (no distillation) none.
    ``keep``: every row is read, and those outside it may hold anything (a cached class id out of range too)."""
    if topk is not None:
        if hidden is not None or head is not None:
            raise ThermoKDError("give the teacher as teacher_hidden + teacher_head or as teacher_topk, not both")
        if tuple(topk.indices.shape[:-1]) != tuple(lead) or int(topk.vocab_size) != vocab:
            raise ThermoKDError(f"teacher_topk covers {tuple(topk.indices.shape[:-1])} rows of a "
                                f"{topk.vocab_size}-class vocabulary; the student has {tuple(lead)} rows of {vocab}")
        k = topk.indices.shape[-1]
        indices = topk.indices.reshape(-1, k)
        if keep is not None:  # distinct, in-range ids in the rows that count nowhere: the scatter then cannot fail
            indices = torch.where(keep.unsqueeze(-1), indices, torch.arange(k, device=indices.device))
        return TopKRows(indices, topk.log_probs.detach().reshape(-1, k),
                        topk.rest_log_mass.detach().reshape(-1), float(topk.capture_tau), vocab, index)
    if hidden is None or head is None:
        if distils:
            raise ThermoKDError("no teacher: pass teacher_hidden and teacher_head, or teacher_topk "
                                "(this loss distils: kd_weight > 0)")
        return _NoTeacher(vocab, device)
    weight, bias = head_parts(head, "teacher_head")
    if tuple(hidden.shape[:-1]) != tuple(lead) or hidden.shape[-1] != weight.shape[1] or weight.shape[0] != vocab:
        raise ThermoKDError(f"teacher_hidden {tuple(hidden.shape)} with a [{weight.shape[0]}, {weight.shape[1]}] "
                            f"head does not match the student's {tuple(lead)} rows of {vocab} classes")
    return LinearRows(hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                      None if bias is None else bias.detach(), index)
