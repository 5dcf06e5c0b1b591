"""A layer that returns a tensor it also uses itself: its recorded output cotangent is only what
its callers send back (HF Wav2Vec2's feature projection returns its LayerNorm output and projects
it; the per-layer rows blamed that correct layer)."""
from __future__ import annotations

import flax.linen as nn
import torch

import parity


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(6)
        self.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h), h  # h is returned and used here too


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        y, h = self.block(x)
        return self.head(y) + self.head(h) * 0.5


class FlaxBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
        return nn.Dense(6, name="fc")(h), h


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        y, h = FlaxBlock(name="block")(x)
        head = nn.Dense(3, name="head")
        return head(y) + head(h) * 0.5


def test_output_also_used_inside_the_layer_does_not_blame_a_correct_layer():
    torch.manual_seed(0)
    r = parity.check(Net(), FlaxNet(), torch.randn(4, 6), dtype="float64")
    assert r.ok and r.first_divergence is None, str(r)
    block = next(row for row in r.layers if row.torch_path == "block")
    assert block.grad_isolated is not None and block.grad_isolated.ok, str(r)
