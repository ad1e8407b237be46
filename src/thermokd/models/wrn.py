"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016), pre-activation blocks, as in the KD literature."""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import ThermoKDError


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x).relu()
        out = self.conv2(self.drop(self.bn2(self.conv1(pre)).relu()))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """``depth = 6n + 4``; stage widths 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or widen < 1:
            raise ThermoKDError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...) and the width factor "
                                f">= 1; got depth {depth}, width {widen}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, 2 if stage > 0 and i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(self.blocks(self.stem(x))).relu()
        return self.fc(out.mean(dim=(2, 3)))
