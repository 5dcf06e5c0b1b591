"""Flax ExplicitMLP (the Flax-basics example). Input and output: [N, F]."""
from __future__ import annotations

import flax.linen as nn
import jax

from model_configs import MLPConfig


class ExplicitMLP(nn.Module):
    config: MLPConfig

    def setup(self) -> None:
        # A list in setup is named layers_0, layers_1, ...: torch's "layers.0" by the port rule.
        self.layers = [nn.Dense(f) for f in self.config.features]

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != len(self.layers) - 1:
                x = nn.relu(x)
        return x
