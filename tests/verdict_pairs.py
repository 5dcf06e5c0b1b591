"""Small model pairs for the verdict tests (noise floor, INVALID, warnings); factories for the CLI."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch


class TorchAttention(torch.nn.Module):
    """[N, T, 8] -> single-head softmax attention with q/k/v/out Linear layers -> [N, T, 8].

    The key bias k.bias has a gradient that is exactly zero in exact arithmetic: it adds
    q . b_k to every score of a query row, and softmax ignores a per-row constant.
    """

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.k, self.v, self.out = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.scale = dim ** -0.5

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) * self.scale
        return self.out(torch.softmax(scores, dim=-1) @ self.v(x))


class FlaxAttention(nn.Module):
    dim: int = 8
    flip_value_sign: bool = False  # a planted bug in the value branch (see random cotangent test)

    def setup(self) -> None:
        self.q, self.k, self.v, self.out = (nn.Dense(self.dim) for _ in range(4))

    def __call__(self, x):
        scores = self.q(x) @ jnp.swapaxes(self.k(x), -1, -2) * self.dim ** -0.5
        return self.out(nn.softmax(scores, axis=-1) @ self.v(x))


def attention_input(rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((2, 5, 8))


def make_torch_attention() -> TorchAttention:
    torch.manual_seed(0)
    return TorchAttention()
