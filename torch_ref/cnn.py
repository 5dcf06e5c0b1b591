"""PyTorch twin of the classic Flax MNIST CNN. Input [N, C, H, W]; output log-probs [N, classes]."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_configs import CNNConfig


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.features
        # padding=1 on a 3x3 stride-1 conv is exactly Flax's 'SAME' (symmetric 1/1).
        self.conv1 = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.dense1 = nn.Linear(config.flat_features, config.hidden)
        self.dense2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.relu(self.conv2(x)), 2)
        # Flattens [N, C, H, W] in C-H-W order; the Flax twin flattens [N, H, W, C] in H-W-C
        # order, so the port permutes dense1's input features (found by tracing this forward).
        x = torch.flatten(x, 1)
        x = torch.relu(self.dense1(x))
        return F.log_softmax(self.dense2(x), dim=-1)
