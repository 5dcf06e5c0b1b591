"""Small attention twins for training parity: softmax attention gives the key bias a gradient
that is zero in exact arithmetic (a per-query-row constant that softmax ignores)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import torch

DIM, HEADS, TOKENS, CLASSES = 8, 2, 5, 3


class TorchAttentionClassifier(torch.nn.Module):
    """[N, T, D] -> nn.MultiheadAttention (packed in_proj q|k|v) -> mean over T -> Linear -> [N, C].

    Only the k third of in_proj_bias has a zero-in-theory gradient: the noise is inside one tensor.
    """

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.head = torch.nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


class FlaxAttentionClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(HEADS, name="attn")(x)
        return nn.Dense(CLASSES, name="head")(h.mean(axis=1))


class FlaxAttentionClassifierMirroredGrad(nn.Module):
    """FlaxAttentionClassifier with a backward-only bug on the attention branch (forward exact):
    the cotangent's deviations from its per-token mean come back sign-flipped
    (verdict_pairs.mirrored_cotangent)."""

    @nn.compact
    def __call__(self, x):
        from verdict_pairs import mirrored_cotangent

        h = mirrored_cotangent(nn.MultiHeadDotProductAttention(HEADS, name="attn")(x))
        return nn.Dense(CLASSES, name="head")(h.mean(axis=1))


def make_torch_attention_classifier() -> TorchAttentionClassifier:
    torch.manual_seed(0)
    return TorchAttentionClassifier()


def attention_batches(n_batches: int = 3, batch: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x [N, T, D] float, y [N] class labels) batches."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, TOKENS, DIM)), rng.integers(0, CLASSES, batch))
            for _ in range(n_batches)]


def attention_mse_batches(n_batches: int = 3, batch: int = 4, seed: int = 0):
    """(x [N, T, 8], target [N, T, 8]) batches for tests/verdict_pairs.py's single-head attention."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, TOKENS, 8)), rng.standard_normal((batch, TOKENS, 8)))
            for _ in range(n_batches)]
