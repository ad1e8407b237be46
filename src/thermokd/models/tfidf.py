"""A sublinear TF-IDF view of token ids, and the hybrid text teacher that adds it to a frozen pretrained encoder.

A frozen MiniLM mean-pools the first 128 word pieces of a document into one vector; a linear model on TF-IDF
counts sees every word piece of a longer window and remembers rare, topical ones. Their errors differ, so a head
on both may beat either (docs/text.md has what it measured). The IDF comes from the training documents only
(``fit_training_inputs``, called by the engine before the head trains) and is stored with the weights.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .pretrained import PretrainedTextClassifier

FIT_ROWS = 256  # documents per dense count block while counting document frequencies


def word_piece_counts(x: Tensor, vocab_size: int, pad_id: int) -> Tensor:
    """Dense ``[B, vocab_size]`` counts of each token id in each row of ``x [B, L]``, padding not counted."""
    counts = torch.zeros(x.shape[0], vocab_size, device=x.device)
    counts.scatter_add_(1, x, torch.ones_like(x, dtype=counts.dtype))
    counts[:, pad_id] = 0.0
    return counts


class TfidfFeatures(nn.Module):
    """``(1 + log tf) * idf`` per word piece, L2-normalised per document (scikit-learn's ``sublinear_tf`` with
    smoothed IDF: ``idf = log((1 + N) / (1 + df)) + 1``). Before ``fit`` every IDF is 1."""

    def __init__(self, vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        self.vocab_size, self.pad_id = int(vocab_size), int(pad_id)
        self.register_buffer("idf", torch.ones(self.vocab_size))

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Set the IDF from the documents ``x [N, L]`` (the training split)."""
        df = torch.zeros(self.vocab_size, device=self.idf.device)
        for i in range(0, x.shape[0], FIT_ROWS):
            df += word_piece_counts(x[i:i + FIT_ROWS].to(df.device), self.vocab_size, self.pad_id).gt(0).sum(0)
        self.idf.copy_(torch.log((1.0 + x.shape[0]) / (1.0 + df)) + 1.0)

    def forward(self, x: Tensor) -> Tensor:
        counts = word_piece_counts(x, self.vocab_size, self.pad_id)
        tf = torch.where(counts > 0, 1.0 + torch.log(counts.clamp(min=1.0)), counts)
        return nn.functional.normalize(tf * self.idf, dim=-1)


class TfidfPretrainedClassifier(PretrainedTextClassifier):
    """``minilm-tfidf``: the ``minilm`` teacher's logits plus a linear classifier on the TF-IDF of all
    ``max_len`` word pieces (the encoder reads only its first ``encode_len``). ``tfidf_dropout`` applies to the
    TF-IDF vector while training."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int = 0, max_len: int = 512,
                 tfidf_dropout: float = 0.0, **minilm_args) -> None:
        super().__init__(vocab_size, num_classes, pad_id, max_len, **minilm_args)
        if not 0.0 <= tfidf_dropout < 1.0:
            from ..errors import ThermoKDError
            raise ThermoKDError(f"minilm-tfidf: tfidf_dropout must be in [0, 1), got {tfidf_dropout}")
        self.tfidf = TfidfFeatures(vocab_size, pad_id)
        self.tfidf_drop = nn.Dropout(tfidf_dropout)
        self.tfidf_head = nn.Linear(vocab_size, num_classes)
        nn.init.zeros_(self.tfidf_head.weight)  # start from the encoder's view; the bag adds what it lacks
        nn.init.zeros_(self.tfidf_head.bias)

    def fit_training_inputs(self, x: Tensor) -> None:
        """The IDF of the training documents (never validation or test ones)."""
        self.tfidf.fit(x)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.tfidf_head(self.tfidf_drop(self.tfidf(x)))


