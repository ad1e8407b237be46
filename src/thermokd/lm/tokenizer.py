"""A small byte-level BPE tokenizer trained on the corpus itself (``tokenizers``), cached on disk.

Byte-level: every string round-trips exactly (no unknown token). Training is deterministic for a given text and
vocabulary size, and the cache key is a hash of both, so a cached tokenizer is the one training would give. The
entry records that key and a checksum, checked when it is read.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ThermoKDError
from ..files import digest, read_json, write_json

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS = "<|endoftext|>"  # ends every document; also the padding token (padded positions are never targets)
FORMAT = "bpe-bytelevel/2"  # part of the cache key: bump it when the training recipe or the entry changes


def tokenizer_key(texts: Iterable[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"{FORMAT}\x00{vocab_size}\x00".encode())
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _train(texts: list[str], vocab_size: int) -> "Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_tokenizer(texts: list[str], vocab_size: int = 1024, cache_dir: "Path | None" = None) -> "Tokenizer":
    """A byte-level BPE tokenizer with at most ``vocab_size`` tokens (257 of them are the 256 bytes and
    ``<|endoftext|>``), trained on ``texts`` or read from ``cache_dir/tokenizers/<key>.json`` (which records the key
    and a checksum of the tokenizer's definition, both checked)."""
    from ..data.cache import default_cache_dir

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ThermoKDError(f"vocab_size must be an integer >= 258 (256 bytes, <|endoftext|> and at least one "
                            f"merge), got {vocab_size!r}")
    if not any(texts):
        raise ThermoKDError("cannot train a tokenizer on no text")
    key = tokenizer_key(texts, vocab_size)
    path = (cache_dir or default_cache_dir()) / "tokenizers" / f"{key}.json"
    if path.is_file():
        return _read_cached(path, key)
    tok = _train(texts, vocab_size)
    text = tok.to_str()
    write_json(path, {"key": key, "checksum": digest(text), "tokenizer": text})  # atomic, with what it is for
    return tok


def _read_cached(path: Path, key: str) -> "Tokenizer":
    """A cached tokenizer, checked against the key it was trained for and the checksum of its definition."""
    from tokenizers import Tokenizer

    remedy = f"delete the cache entry {path} and run again to train it anew"
    entry = read_json(path, remedy)
    if not isinstance(entry, dict) or not isinstance(entry.get("tokenizer"), str):
        raise ThermoKDError(f"{path} is not a thermokd tokenizer cache entry; {remedy}")
    if entry.get("key") != key:
        raise ThermoKDError(f"{path} was made for another input (key {entry.get('key')!r}, expected {key!r}); "
                            f"{remedy}")
    if entry.get("checksum") != digest(entry["tokenizer"]):
        raise ThermoKDError(f"{path} is damaged (its content does not match its checksum); {remedy}")
    try:
        return Tokenizer.from_str(entry["tokenizer"])
    except Exception:  # noqa: BLE001 - the tokenizers library reports a bad definition as a bare Exception
        raise ThermoKDError(f"{path} is damaged (not a readable tokenizer); {remedy}") from None


def eos_id(tok: "Tokenizer") -> int:
    return int(tok.token_to_id(EOS))


def encode_documents(tok: "Tokenizer", texts: list[str]) -> list[list[int]]:
    """Token ids of each text followed by ``<|endoftext|>``."""
    end = eos_id(tok)
    return [enc.ids + [end] for enc in tok.encode_batch(texts, add_special_tokens=False)]


def vocabulary_key(tok: "Tokenizer") -> str:
    """A short hash of the tokenizer itself (vocabulary and merges): files of per-token teacher outputs record it,
    so that a file written under another tokenizer is refused rather than misread."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
