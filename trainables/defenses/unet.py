"""The image-to-image generator of BTI-DBF (defenses.md A2): a small UNet (base 32 filters, 4
levels). It outputs clamp(x + r(x), 0, 1), its last layer zero-initialised: it starts at the
identity that BTI-DBF's pre-training trains it towards (the pre-training still runs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, channels: int, width: int = 32, depth: int = 4, generator: torch.Generator | None = None):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList(_block(cin, cout) for cin, cout in zip([channels] + widths[:-1], widths))
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth - 1)))
        self.out = nn.Conv2d(widths[0], channels, 1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips, h = [], x
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2, ceil_mode=True))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], 1))
        return (x + self.out(h)).clamp(0.0, 1.0)
