"""Small attention twins for training parity: softmax attention gives the key bias a gradient
that is zero in exact arithmetic (a per-query-row constant that softmax ignores)."""
from __future__ import annotations

import flax.linen as nn
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


# --- a running mean that is zero in exact arithmetic: BatchNorm after BatchNorm -------------------
class TorchDoubleNorm(torch.nn.Module):
    """[N, 6] -> Linear -> BatchNorm1d -> BatchNorm1d -> Linear -> [N, 3]. The first BatchNorm
    (train mode) centres every feature over the batch, so the second one's batch mean, and so its
    running_mean, is zero in exact arithmetic: rounding noise on both sides."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)
        self.bn1 = torch.nn.BatchNorm1d(8, affine=False)
        self.bn2 = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(self.bn2(self.bn1(self.fc(x))))


class FlaxDoubleNorm(nn.Module):
    bn2_momentum: float = 0.9  # Flax convention; 0.1 is the planted mistake (torch's number)

    @nn.compact
    def __call__(self, x, train: bool = False):
        from flax_impl.batchnorm import BatchNorm

        h = nn.Dense(8, name="fc")(x)
        h = BatchNorm(momentum=0.9, epsilon=1e-5, use_scale=False, use_bias=False, name="bn1")(h, not train)
        h = BatchNorm(momentum=self.bn2_momentum, epsilon=1e-5, name="bn2")(h, not train)
        return nn.Dense(CLASSES, name="head")(h)


def make_torch_double_norm() -> TorchDoubleNorm:
    torch.manual_seed(0)
    return TorchDoubleNorm()


def double_norm_batches(n_batches: int = 3, batch: int = 6, seed: int = 0):
    # Features 30 +- 10: the centred values cancel a large mean, so the noise is not tiny.
    rng = np.random.default_rng(seed)
    return [(30.0 + 10.0 * rng.standard_normal((batch, 6)), rng.integers(0, CLASSES, batch))
            for _ in range(n_batches)]
