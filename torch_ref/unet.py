"""PyTorch reference UNet (valid/same padding, optional BatchNorm). Input [N, C, H, W]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_configs import UNetConfig


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop [N, C, H, W] to the centered window of ``size`` (floor offset, like the paper)."""
    h, w = size
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


class DoubleConv(nn.Module):
    """(conv3x3 -> [BN] -> relu) x 2."""

    def __init__(self, cin: int, cout: int, padding: str, batch_norm: bool):
        super().__init__()
        pad = 1 if padding == "same" else 0
        # With BatchNorm right after, a conv bias is redundant (BN's shift absorbs it).
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=pad, bias=not batch_norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=pad, bias=not batch_norm)
        self.batch_norm = batch_norm
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(cout)
            self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.batch_norm:
            x = self.bn1(x)
        x = torch.relu(x)
        x = self.conv2(x)
        if self.batch_norm:
            x = self.bn2(x)
        return torch.relu(x)


def up_conv(cin: int, cout: int, padding: str) -> nn.ConvTranspose2d:
    if padding == "same":
        # out = (in - 1) * 2 - 2 * 1 + 3 + 1 = 2 * in
        return nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    return nn.ConvTranspose2d(cin, cout, 2, stride=2)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch = config.channels
        cins = (config.in_channels, *ch[:-1])
        self.down = nn.ModuleList(
            DoubleConv(a, b, config.padding, config.batch_norm) for a, b in zip(cins, ch)
        )
        # up[i] goes from level -1-i to level -2-i (deepest first).
        rev = ch[::-1]
        self.up = nn.ModuleList(up_conv(a, b, config.padding) for a, b in zip(rev[:-1], rev[1:]))
        self.up_conv = nn.ModuleList(
            DoubleConv(2 * b, b, config.padding, config.batch_norm) for b in rev[1:]
        )
        self.head = nn.Conv2d(ch[0], config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for up, block, skip in zip(self.up, self.up_conv, reversed(skips)):
            x = up(x)
            # Skip first, then the up-sampled path: the Flax twin concatenates in the same order
            # on its last (channel) axis, so the next conv's input channels line up.
            x = block(torch.cat([center_crop(skip, x.shape[-2:]), x], dim=1))
        x = self.head(x)
        if self.config.retain_dim:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x
