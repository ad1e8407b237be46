"""Data sets as in-memory tensors: ``load_data(spec)`` for every ``--data`` value, plus augmentation."""
from __future__ import annotations

from pathlib import Path

from ..errors import ThermoKDError
from ..registry import Registry, normalise
from .augment import (AUGMENTATIONS, IMAGE_AUGMENTATIONS, TOKEN_AUGMENTATIONS, TokenMasking, make_augment,
                      random_crop, random_flip, random_mask)
from .bundle import DataBundle, Split, make_bundle
from .cache import default_cache_dir
from .formats import cifar, digits, fashion_mnist, idx_folder, npz_file, read_idx
from .split import DEFAULT_VAL_FRACTION, stratified_indices, student_subset, with_validation
from .questions import QUESTION_SETS, question_dataset
from .text import DEFAULT_MAX_LEN, TEXT_SETS, read_tab, tab_files, text_dataset

DATA_SPECS = ("digits", "fashion-mnist", "idx:DIR", "npz:FILE", "cifar10:DIR", "cifar100:DIR", *TEXT_SETS,
              *QUESTION_SETS, "tab:PREFIX")
# ``--data NAME``: each source takes (seed, the text options)
SOURCES: "Registry[DataBundle]" = Registry("data source", {
    "digits": lambda seed, text: digits(seed),
    "fashion-mnist": lambda seed, text: fashion_mnist(), "fashionmnist": lambda seed, text: fashion_mnist(),
    **{name: (lambda seed, text, name=name: text_dataset(name, **text)) for name in TEXT_SETS},
    **{name: (lambda seed, text, name=name: question_dataset(name, seed, **text)) for name in QUESTION_SETS}})
# ``--data KIND:PATH``: each source takes (the resolved path, the text options)
PATH_SOURCES: "Registry[DataBundle]" = Registry("data source", {
    "idx": lambda where, text: idx_folder(where), "npz": lambda where, text: npz_file(where),
    "cifar10": lambda where, text: cifar(where, 10), "cifar100": lambda where, text: cifar(where, 100),
    "tab": lambda where, text: tab_files(where, **text)})


def is_text_spec(spec: str) -> bool:
    """Whether a ``--data`` value names a text set (``20newsgroups``, ``r8``, ``r52``, ``trec``, ``trec6``,
    ``tab:PREFIX``)."""
    kind = normalise(spec)
    return kind in TEXT_SETS or kind in QUESTION_SETS or kind.startswith("tab:")


def load_data(spec: str, *, seed: int = 0, root: "str | Path | None" = None, max_len: int = DEFAULT_MAX_LEN,
              tokenizer: "str | Path | None" = None, cache_dir: "Path | None" = None,
              val_fraction: float = DEFAULT_VAL_FRACTION, val_seed: int = 0) -> DataBundle:
    """Load a data set by its ``--data`` spec, with a validation split: the data's own (an npz's ``x_val``/``y_val``,
    a ``PREFIX-val.tab``) or a stratified ``val_fraction`` of the training split drawn with ``val_seed``.
    ``seed`` fixes the train/test split where the data has none (digits);
    ``root`` is the folder that relative ``DIR``/``FILE``/``PREFIX`` paths are resolved against (default: the
    working directory). Text sets only: ``max_len`` (tokens per document), ``tokenizer`` (a local tokenizer
    folder; default: MiniLM's) and ``cache_dir`` (where the tokenised arrays are kept)."""
    return with_validation(_load(spec, seed, root, max_len, tokenizer, cache_dir), val_fraction, val_seed)


def _load(spec: str, seed: int, root, max_len: int, tokenizer, cache_dir) -> DataBundle:
    kind, sep, path = spec.partition(":")
    text = {"max_len": max_len, "tokenizer": tokenizer, "cache_dir": cache_dir}
    if not sep and kind in SOURCES:
        return SOURCES.get(kind)(seed, text)
    if sep and kind in PATH_SOURCES and path.strip():
        where = Path(path.strip()).expanduser()
        return PATH_SOURCES.get(kind)(Path(root) / where if root is not None else where, text)
    raise ThermoKDError(f"unknown --data {spec!r}; accepted: {', '.join(DATA_SPECS)}")


__all__ = ["AUGMENTATIONS", "cifar", "DATA_SPECS", "DataBundle", "default_cache_dir", "DEFAULT_MAX_LEN",
           "DEFAULT_VAL_FRACTION", "digits", "fashion_mnist", "idx_folder", "IMAGE_AUGMENTATIONS",
           "is_text_spec", "load_data", "make_augment", "make_bundle", "npz_file", "question_dataset",
           "QUESTION_SETS", "random_crop", "random_flip", "random_mask", "read_idx", "read_tab", "Split",
           "stratified_indices", "student_subset", "tab_files", "text_dataset", "TEXT_SETS",
           "TOKEN_AUGMENTATIONS", "TokenMasking", "with_validation"]
