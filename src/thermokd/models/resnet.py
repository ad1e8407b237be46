"""CIFAR-style ResNets (He et al. 2016, as used across the KD literature: CRD, mdistiller), plain torch."""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import ThermoKDError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class CifarResNet(nn.Module):
    """``depth = 6n + 2``: a 3×3 stem and three stages of ``n`` basic blocks (strides 1, 2, 2), global average
    pooling and a linear classifier. ``widths``: stem width and the three stage widths."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3,
                 widths: tuple[int, int, int, int] = (16, 16, 32, 64)) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ThermoKDError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet(depth: int, num_classes: int, in_channels: int = 3, x4: bool = False) -> CifarResNet:
    """``resnet{depth}``; ``x4`` gives the 4× wider variants of CRD (resnet8x4, resnet32x4: 32/64/128/256)."""
    widths = (32, 64, 128, 256) if x4 else (16, 16, 32, 64)
    return CifarResNet(depth, num_classes, in_channels, widths)
