"""Flax MNIST CNN. Input [N, H, W, C]; output log-probs [N, classes]."""
from __future__ import annotations

import flax.linen as nn
import jax

from flax_impl.layers import log_softmax
from model_configs import CNNConfig


class CNN(nn.Module):
    config: CNNConfig

    def setup(self) -> None:
        c1, c2 = self.config.features
        # 'SAME' on a 3x3 stride-1 conv pads 1/1, exactly torch's padding=1.
        self.conv1 = nn.Conv(c1, (3, 3), padding="SAME")
        self.conv2 = nn.Conv(c2, (3, 3), padding="SAME")
        self.dense1 = nn.Dense(self.config.hidden)
        self.dense2 = nn.Dense(self.config.num_classes)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.avg_pool(nn.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(self.conv2(x)), (2, 2), strides=(2, 2))
        # Flattens [N, H, W, C] in H-W-C order with no transpose back to NCHW: the weight port
        # permutes dense1's input features instead, so this stays a free reshape.
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.dense1(x))
        return log_softmax(self.dense2(x))
