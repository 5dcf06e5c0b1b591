"""PyTorch twin of the Flax-basics ExplicitMLP. Input and output: [N, F]."""
from __future__ import annotations

import torch
from torch import nn

from model_configs import MLPConfig


class ExplicitMLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        widths = (config.in_features, *config.features)
        # ModuleList "layers.0" maps to the Flax setup list "layers_0".
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != len(self.layers) - 1:
                x = torch.relu(x)
        return x
