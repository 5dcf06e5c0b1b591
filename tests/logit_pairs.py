"""A tiny language-model pair for the logit-metric tests: ids [N, T] -> logits [N, T, V].

The torch side returns a dataclass with ``.logits`` (as an HF ModelOutput does), the Flax side a
dict with ``"logits"``: parity pairs them by name. Two planted differences on the Flax side:
``roll_vocab`` (the vocabulary off by one: a wrong head, top-1 ~1/V) and ``shift`` (a constant
added to every logit: the same distribution, elementwise far off).
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

V, D, T = 16, 16, 6


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


class TorchLM(torch.nn.Module):
    def __init__(self, vocab: int = V, dim: int = D):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.hidden = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        h = torch.tanh(self.hidden(self.embed(ids)))
        return LMOutput(logits=self.head(h), hidden=h)


class FlaxLM(nn.Module):
    vocab: int = V
    dim: int = D
    roll_vocab: bool = False
    shift: float = 0.0

    def setup(self) -> None:
        self.embed = nn.Embed(self.vocab, self.dim)
        self.hidden = nn.Dense(self.dim)
        self.head = nn.Dense(self.vocab)

    def __call__(self, ids):
        h = jnp.tanh(self.hidden(self.embed(ids)))
        logits = self.head(h)
        if self.roll_vocab:
            logits = jnp.roll(logits, 1, axis=-1)
        return {"logits": logits + self.shift, "hidden": h}


def torch_lm(seed: int = 0) -> TorchLM:
    """Logits of size ~4 (the head scaled up): well-separated top classes, as a trained LM's."""
    torch.manual_seed(seed)
    m = TorchLM().eval()
    with torch.no_grad():
        m.head.weight.mul_(8.0)
    return m


def lm_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, T))
