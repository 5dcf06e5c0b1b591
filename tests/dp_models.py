"""Tiny Conv + BatchNorm twins for the data-parallel tests (importable: DDP workers unpickle them)."""
from __future__ import annotations

import flax.linen as nn
import torch

from flax_impl.batchnorm import BatchNorm


class TorchConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class FlaxConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), padding=1, name="conv")(x)
        x = BatchNorm(momentum=0.9, epsilon=1e-5, name="bn")(x, use_running_average=not train)
        return nn.Conv(2, (1, 1), name="head")(nn.relu(x))
