"""Every model by name: ``build_model(name, num_classes, in_channels, input_size, **model_args)`` for images and
feature vectors, ``build_model(name, num_classes, vocab_size=V, pad_id=P, max_len=L, **model_args)`` for text."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import ThermoKDError, choice_error
from .resnet import resnet
from .small import MLP, SmallCNN
from .wrn import WideResNet

_RESNETS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
            "resnet110": 110, "resnet8x4": 8, "resnet32x4": 32}
TEXT_MODELS = ("embbag", "text-transformer", "minilm", "minilm-tfidf")  # they read token ids [B, L]
MODEL_NAMES = sorted([*_RESNETS, "wrn_16_2", "wrn_40_1", "wrn_40_2", "mlp", "cnn", *TEXT_MODELS])
_WRN = re.compile(r"wrn_(\d+)_(\d+)")


def is_model_name(name: str) -> bool:
    """Whether ``build_model`` knows ``name`` (the listed names and any ``wrn_<depth>_<width>``)."""
    return name in MODEL_NAMES or _WRN.fullmatch(name) is not None


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
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels), ("input_size", input_size),
                         ("max_len", max_len)):
        if int(value) < 1:
            raise ThermoKDError(f"model {name!r}: {field} must be >= 1, got {value}")
    if name in TEXT_MODELS or vocab_size is not None:
        return _text_model(name, num_classes, vocab_size, pad_id, max_len, model_args)
    if name == "mlp":
        return MLP(in_channels * input_size * input_size, num_classes, **model_args)
    if input_size == 1:
        raise ThermoKDError(f"model {name!r} needs image inputs; for feature vectors use 'mlp'")
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, input_size, **model_args)
    if name in _RESNETS:
        return resnet(_RESNETS[name], num_classes, in_channels, x4=name.endswith("x4"), **model_args)
    depth, widen = (int(g) for g in _WRN.fullmatch(name).groups())
    try:
        return WideResNet(depth, widen, num_classes, in_channels, **model_args)
    except ThermoKDError as exc:
        raise ThermoKDError(f"model {name!r}: {exc}") from None


def _text_model(name: str, num_classes: int, vocab_size: "int | None", pad_id: int, max_len: int,
                model_args: dict[str, Any]) -> nn.Module:
    if name not in TEXT_MODELS:
        raise ThermoKDError(f"model {name!r} reads images or feature vectors, not token ids; for text use one of: "
                            f"{', '.join(TEXT_MODELS)}")
    if vocab_size is None or int(vocab_size) < 1:
        raise ThermoKDError(f"model {name!r} reads token ids: use it with a text data set (20newsgroups, r8, r52, "
                            "tab:PREFIX)")
    if not 0 <= int(pad_id) < int(vocab_size):
        raise ThermoKDError(f"model {name!r}: pad_id must be in [0, {vocab_size}), got {pad_id}")
    if name == "embbag":
        from .text import EmbeddingBagClassifier
        return EmbeddingBagClassifier(vocab_size, num_classes, pad_id, **model_args)
    if name == "text-transformer":
        from .text import TextTransformer
        return TextTransformer(vocab_size, num_classes, pad_id, max_len, **model_args)
    if name == "minilm-tfidf":
        from .tfidf import TfidfPretrainedClassifier
        return TfidfPretrainedClassifier(vocab_size, num_classes, pad_id, max_len, **model_args)
    from .pretrained import PretrainedTextClassifier
    return PretrainedTextClassifier(vocab_size, num_classes, pad_id, max_len, **model_args)
