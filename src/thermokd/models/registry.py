"""Every model by name: ``build_model(name, num_classes, in_channels, input_size, **model_args)`` for images and
feature vectors, ``build_model(name, num_classes, vocab_size=V, pad_id=P, max_len=L, **model_args)`` for text."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ThermoKDError, choice_error
from ..registry import Registry, check_keywords
from .resnet import resnet
from .small import MLP, SmallCNN
from .text import EmbeddingBagClassifier, TextTransformer
from .wrn import WideResNet

_RESNETS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
            "resnet110": 110, "resnet8x4": 8, "resnet32x4": 32}
TEXT_MODELS = ("embbag", "text-transformer", "minilm", "minilm-tfidf")  # they read token ids [B, L]
_WRN = re.compile(r"wrn_(\d+)_(\d+)")


@dataclass(frozen=True)
class Shape:
    """What the data decides about a model: the name it was asked by and the sizes of its inputs and outputs."""

    name: str
    num_classes: int
    in_channels: int
    input_size: int
    vocab_size: "int | None"
    pad_id: int
    max_len: int


@dataclass(frozen=True)
class ModelEntry:
    """``constructor(**fixed(shape), **model_args)``; ``constructor`` is a loader so that optional dependencies
    (the pretrained encoder's ``transformers``) are imported only when that model is built."""

    load: Callable[[], Callable[..., nn.Module]]
    fixed: Callable[[Shape], dict[str, Any]]
    kind: str = "image"  # "image" (image tensors), "any" (images or feature vectors), "text" (token ids)


def _image(s: Shape) -> dict[str, Any]:
    return {"num_classes": s.num_classes, "in_channels": s.in_channels}


def _text(s: Shape, max_len: bool = True) -> dict[str, Any]:
    return {"vocab_size": s.vocab_size, "num_classes": s.num_classes, "pad_id": s.pad_id,
            **({"max_len": s.max_len} if max_len else {})}


def _wrn(s: Shape) -> dict[str, Any]:
    depth, widen = (int(g) for g in _WRN.fullmatch(s.name).groups())
    return {"depth": depth, "widen": widen, **_image(s)}


def _pretrained():
    from .pretrained import PretrainedTextClassifier
    return PretrainedTextClassifier


def _pretrained_tfidf():
    from .tfidf import TfidfPretrainedClassifier
    return TfidfPretrainedClassifier


_WRN_ENTRY = ModelEntry(lambda: WideResNet, _wrn)
# model names are exact (``wrn_16_2``, ``MLP`` is not ``mlp``): they name files and configs as written
MODELS: "Registry[ModelEntry]" = Registry("model", {
    "mlp": ModelEntry(lambda: MLP, lambda s: {"in_features": s.in_channels * s.input_size * s.input_size,
                                              "num_classes": s.num_classes}, kind="any"),
    "cnn": ModelEntry(lambda: SmallCNN, lambda s: {**_image(s), "input_size": s.input_size}),
    **{name: ModelEntry(lambda: resnet, lambda s: {"depth": _RESNETS[s.name], **_image(s),
                                                   "x4": s.name.endswith("x4")}) for name in _RESNETS},
    **{name: _WRN_ENTRY for name in ("wrn_16_2", "wrn_40_1", "wrn_40_2")},
    "embbag": ModelEntry(lambda: EmbeddingBagClassifier, lambda s: _text(s, max_len=False), kind="text"),
    "text-transformer": ModelEntry(lambda: TextTransformer, _text, kind="text"),
    "minilm": ModelEntry(_pretrained, _text, kind="text"),
    "minilm-tfidf": ModelEntry(_pretrained_tfidf, _text, kind="text"),
}, exact=True)
MODEL_NAMES = MODELS.names()


def is_model_name(name: str) -> bool:
    """Whether ``build_model`` knows ``name`` (the listed names and any ``wrn_<depth>_<width>``)."""
    return name in MODELS or _WRN.fullmatch(name) is not None


def build_model(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, *,
                vocab_size: "int | None" = None, pad_id: int = 0, max_len: int = 512, **model_args: Any) -> nn.Module:
    """A model that maps ``[B, in_channels, input_size, input_size]`` images to logits ``[B, num_classes]``, or,
    when ``vocab_size`` is given, token ids ``[B, L <= max_len]`` padded with ``pad_id`` (text models only).

    ``input_size == 1`` means flat feature vectors ``[B, in_channels]`` (MLP only). Convolutional models pool
    globally, so they accept any image size; on 8×8 inputs their two stride-2 stages leave 2×2 maps.

    Bad ``model_args`` (a negative or non-numeric width) and a model too large for this machine's memory are a
    one-line :class:`ThermoKDError`, found before any memory is allocated."""
    args = (name, num_classes, in_channels, input_size, vocab_size, pad_id, max_len, model_args)
    if not name.startswith("minilm"):  # minilm* read weights from disk; the others can be sized without memory first
        with torch.device("meta"):
            model = _guarded(*args)
        _check_size(name, model)
    return _guarded(*args)


def _guarded(name: str, num_classes: int, in_channels: int, input_size: int, vocab_size: "int | None",
             pad_id: int, max_len: int, model_args: dict[str, Any]) -> nn.Module:
    try:
        return _build(name, num_classes, in_channels, input_size, vocab_size=vocab_size, pad_id=pad_id,
                      max_len=max_len, **model_args)
    except ThermoKDError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ThermoKDError(f"model {name!r}: bad model_args {model_args!r} ({first})") from None


def _check_size(name: str, model: nn.Module) -> None:
    """Refuse a model whose float32 parameters alone would take more than half of this machine's memory."""
    import os

    params = sum(p.numel() for p in model.parameters())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if 4 * params > memory / 2:
        raise ThermoKDError(f"model {name!r} has {params:,} parameters ({4 * params / 2**30:.1f} GiB in float32), "
                            f"more than half of this machine's {memory / 2**30:.0f} GiB; choose smaller model_args")


def _build(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, *,
           vocab_size: "int | None" = None, pad_id: int = 0, max_len: int = 512, **model_args: Any) -> nn.Module:
    if not is_model_name(name):
        raise choice_error("model", name, MODEL_NAMES + ["wrn_<depth>_<width>"])
    for field_name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                              ("input_size", input_size), ("max_len", max_len)):
        if int(value) < 1:
            raise ThermoKDError(f"model {name!r}: {field_name} must be >= 1, got {value}")
    entry = MODELS.get(name) if name in MODELS else _WRN_ENTRY
    if entry.kind == "text" or vocab_size is not None:
        _check_text(name, entry, vocab_size, pad_id)
    elif entry.kind == "image" and input_size == 1:
        raise ThermoKDError(f"model {name!r} needs image inputs; for feature vectors use 'mlp'")
    constructor = entry.load()
    fixed = entry.fixed(Shape(name, num_classes, in_channels, input_size, vocab_size, pad_id, max_len))
    check_keywords(f"model {name!r} (model_args)", constructor, model_args, reserved=fixed)
    try:
        return constructor(**fixed, **model_args)
    except ThermoKDError as exc:  # the constructor's own check, told which model it was
        raise ThermoKDError(str(exc) if str(exc).startswith(f"{name}:") else f"model {name!r}: {exc}") from None


def _check_text(name: str, entry: ModelEntry, vocab_size: "int | None", pad_id: int) -> None:
    if entry.kind != "text":
        raise ThermoKDError(f"model {name!r} reads images or feature vectors, not token ids; for text use one of: "
                            f"{', '.join(TEXT_MODELS)}")
    if vocab_size is None or int(vocab_size) < 1:
        raise ThermoKDError(f"model {name!r} reads token ids: use it with a text data set (20newsgroups, r8, r52, "
                            "trec, trec6, tab:PREFIX)")
    if not 0 <= int(pad_id) < int(vocab_size):
        raise ThermoKDError(f"model {name!r}: pad_id must be in [0, {vocab_size}), got {pad_id}")
