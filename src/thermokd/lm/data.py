"""The corpus as the trainer sees it: a seeded three-way split by document (train / validation / test), the
tokenizer trained on the training part, windows of each part, and a dataset of windows for the HF Trainer.

Validation is carved from the training documents and is what settings are chosen on; test is held out and only
reported.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .batches import Windows, make_windows
from .corpus import Document, fingerprint, load_corpus, split_documents
from .tokenizer import encode_documents, eos_id, tokenizer_key, train_tokenizer, vocabulary_key

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .config import LMDataConfig

INDEX_KEY = "window_index"  # which training window a batch row is: how file-backed teacher sources find its logits


def split_three(docs: list[Document], validation_fraction: float, test_fraction: float, seed: int
                ) -> tuple[list[Document], list[Document], list[Document]]:
    """Test first (``test_fraction`` of all documents), then validation from the rest; all seeded, by document."""
    rest, test = split_documents(docs, test_fraction, seed)
    frac = min(0.99, validation_fraction / (1.0 - test_fraction))  # a fraction of all documents, not of the rest
    train, val = split_documents(rest, frac, seed + 1)
    return train, val, test


@dataclass
class LMData:
    """Windows of the three splits, the tokenizer and what identifies them."""

    tokenizer: "Tokenizer"
    train: Windows
    val: Windows
    test: Windows
    documents: dict[str, int]
    train_key: str    # the training text (what a teacher's cache key is built from)
    tokenizer_key: str

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @property
    def eos(self) -> int:
        return eos_id(self.tokenizer)


def windows_key(windows: Windows) -> str:
    """A short hash of the windows' token ids: files of per-window teacher outputs record it."""
    return hashlib.sha256(windows.input_ids.numpy().tobytes()).hexdigest()[:16]


def prepare_data(cfg: "LMDataConfig", cache_dir: "Path | None" = None) -> LMData:
    """Load, split, tokenise and window the corpus of ``cfg``."""
    train_docs, val_docs, test_docs = split_three(load_corpus(cfg.corpus), cfg.validation_fraction,
                                                  cfg.test_fraction, cfg.split_seed)
    texts = [d.text for d in train_docs]
    tok = train_tokenizer(texts, cfg.vocab_size, cache_dir)
    end = eos_id(tok)

    def windows(docs: list[Document]) -> Windows:
        return make_windows(encode_documents(tok, [d.text for d in docs]), cfg.context, end, cfg.prompt_tokens)

    train = windows(train_docs)
    if cfg.max_train_tokens is not None:
        train = train.head(max(1, cfg.max_train_tokens // cfg.context))
    return LMData(tok, train, windows(val_docs), windows(test_docs),
                  {"train": len(train_docs), "val": len(val_docs), "test": len(test_docs)},
                  fingerprint(train_docs) + tokenizer_key(texts, cfg.vocab_size), vocabulary_key(tok))


class WindowDataset(torch.utils.data.Dataset):
    """Windows as the Trainer's examples: ``input_ids``, ``attention_mask``, ``labels`` and the window's index."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        w = self.windows
        return {"input_ids": w.input_ids[i], "attention_mask": w.attention_mask[i], "labels": w.labels[i],
                INDEX_KEY: torch.tensor(i)}
