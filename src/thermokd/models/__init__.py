"""Models in plain torch (no torchvision): CIFAR-style ResNets and WRNs, an MLP and a small CNN.

``build_model(name, num_classes, in_channels, input_size, **model_args)``; every model returns logits
``[B, num_classes]`` and accepts any input size (global average pooling).
"""
from __future__ import annotations

from .registry import MODEL_NAMES, build_model, is_model_name
from .resnet import CifarResNet, resnet
from .small import MLP, SmallCNN
from .wrn import WideResNet

__all__ = ["CifarResNet", "MLP", "MODEL_NAMES", "SmallCNN", "WideResNet", "build_model", "is_model_name", "resnet"]
