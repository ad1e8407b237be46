"""Small text students over token ids ``[B, L]`` (right-padded with ``pad_id``): a bag of embeddings and a
2-layer transformer. Padding never changes an output: pads are excluded from every mean and from attention."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError


def trim_padding(x: Tensor, pad_id: int) -> Tensor:
    """Drop the trailing columns that hold only padding (at least one column stays)."""
    used = (x != pad_id).any(0).nonzero()
    return x[:, : int(used.max()) + 1 if used.numel() else 1]


def masked_mean(h: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``h [B, L, D]`` over the positions where ``keep [B, L]`` is True (zeros for an empty row)."""
    keep = keep.unsqueeze(-1).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp(min=1.0)


class EmbeddingBagClassifier(nn.Module):
    """fastText-style: the mean word-piece embedding of a document (pads excluded), an optional ReLU hidden
    layer, then a linear classifier."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int = 0, dim: int = 64, hidden: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if dim < 1 or hidden < 0 or not 0.0 <= dropout < 1.0:
            raise ThermoKDError(f"embbag: dim must be >= 1, hidden >= 0 and dropout in [0, 1), got dim={dim}, "
                                f"hidden={hidden}, dropout={dropout}")
        self.pad_id = int(pad_id)
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=self.pad_id)
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout else []
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        layers.append(nn.Linear(hidden or dim, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(trim_padding(x, self.pad_id)))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, a pre-norm ``nn.TransformerEncoder`` that never attends to pads,
    mean pooling over the real tokens and a linear classifier."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int = 0, max_len: int = 512, dim: int = 128,
                 layers: int = 2, heads: int = 4, ff: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if dim < 1 or layers < 1 or heads < 1 or dim % heads or ff < 1 or not 0.0 <= dropout < 1.0:
            raise ThermoKDError(f"text-transformer: dim, layers, heads, ff must be >= 1 with dim divisible by heads "
                                f"and dropout in [0, 1), got dim={dim}, layers={layers}, heads={heads}, ff={ff}, "
                                f"dropout={dropout}")
        self.pad_id, self.max_len = int(pad_id), int(max_len)
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=self.pad_id)
        self.positions = nn.Embedding(self.max_len, dim)
        block = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        # the nested-tensor fast path does not apply to pre-norm layers; saying so avoids a warning per model
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = trim_padding(x, self.pad_id)
        if x.shape[1] > self.max_len:
            raise ThermoKDError(f"text-transformer: documents of {x.shape[1]} tokens exceed max_len={self.max_len}")
        keep = x != self.pad_id
        # an empty document would mask every key (NaN attention): let it attend to its first position
        attend = keep.clone()
        attend[:, 0] |= ~keep.any(1)
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))
        h = self.encoder(self.drop(h), src_key_padding_mask=~attend)
        return self.fc(masked_mean(h, keep))
