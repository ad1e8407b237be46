"""Models in plain torch (no torchvision): CIFAR-style ResNets and WRNs, an MLP and a small CNN; for text, an
embedding bag, a small transformer and pretrained-encoder teachers (``minilm``, ``minilm-tfidf``, on ``transformers``).

``build_model(name, num_classes, in_channels, input_size, **model_args)``; every model returns logits
``[B, num_classes]`` and accepts any input size (global average pooling). Text models take token ids:
``build_model(name, num_classes, vocab_size=V, pad_id=P, max_len=L, **model_args)``.
"""
from __future__ import annotations

from .registry import MODEL_NAMES, TEXT_MODELS, build_model, is_model_name
from .resnet import CifarResNet, resnet
from .small import MLP, SmallCNN
from .text import EmbeddingBagClassifier, TextTransformer
from .wrn import WideResNet

__all__ = ["CifarResNet", "EmbeddingBagClassifier", "MLP", "MODEL_NAMES", "SmallCNN", "TEXT_MODELS",
           "TextTransformer", "WideResNet", "build_model", "is_model_name", "resnet"]
