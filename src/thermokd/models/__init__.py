"""Models in plain torch (no torchvision): CIFAR-style ResNets and WRNs, an MLP and a small CNN.

``build_model(name, num_classes, in_channels, input_size, **model_args)``; every model returns logits
``[B, num_classes]`` and accepts any input size (global average pooling).
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from ..errors import ThermoKDError, choice_error
from .resnet import CifarResNet, resnet
from .small import MLP, SmallCNN
from .wrn import WideResNet

_RESNETS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56,
            "resnet110": 110}
MODEL_NAMES = sorted([*_RESNETS, "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_1", "wrn_40_2", "mlp", "cnn"])


def build_model(name: str, num_classes: int, in_channels: int = 3, input_size: int = 32, **model_args: Any) -> nn.Module:
    """A model by name. ``input_size == 1`` means flat feature vectors of ``in_channels`` values (MLP only)."""
    if name == "mlp":
        return MLP(in_channels * input_size * input_size, num_classes, **model_args)
    if input_size == 1:
        raise ThermoKDError(f"model {name!r} needs image inputs; for feature vectors use 'mlp'")
    if name == "cnn":
        return SmallCNN(in_channels, num_classes, input_size, **model_args)
    if name in _RESNETS:
        return resnet(_RESNETS[name], num_classes, in_channels, **model_args)
    if name in ("resnet8x4", "resnet32x4"):
        return resnet(8 if name == "resnet8x4" else 32, num_classes, in_channels, x4=True, **model_args)
    match = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
    if match:
        depth, widen = int(match.group(1)), int(match.group(2))
        if (depth - 4) % 6:
            raise ThermoKDError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {name!r}")
        return WideResNet(depth, widen, num_classes, in_channels, **model_args)
    raise choice_error("model", name, MODEL_NAMES + ["wrn_<depth>_<width>"])


__all__ = ["CifarResNet", "MLP", "MODEL_NAMES", "SmallCNN", "WideResNet", "build_model", "resnet"]
