"""Batches for training parity: synthetic ones for the registry pairs, sklearn digits for the demo."""
from __future__ import annotations

import numpy as np
import torch

from parity.registry import ModelPair


def default_loss(pair: ModelPair) -> str:
    """The loss the registry entry declares for its output (logits, log-probabilities, ...)."""
    return pair.loss


def synthetic_batches(pair: ModelPair, config, torch_module: torch.nn.Module, *, batch: int = 4,
                      n_batches: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n_batches (x, labels): x float64 in torch layout from the pair's input maker, labels int64
    shaped like the torch output without its class axis ([N] or [N, H_out, W_out])."""
    rng = np.random.default_rng(seed)
    out = []
    with torch.no_grad():
        probe = torch_module.eval()(torch.as_tensor(pair.example_input(config, batch=batch, seed=seed),
                                                    dtype=next(torch_module.parameters()).dtype))
    shape = (probe.shape[0], *probe.shape[2:])
    for i in range(n_batches):
        x = pair.example_input(config, batch=batch, seed=seed + 1000 + i)
        out.append((x, rng.integers(0, probe.shape[1], size=shape)))
    return out


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """sklearn's bundled 8x8 digits (no network): (x_train, y_train, x_test, y_test).

    x: float64 [N, 1, 8, 8] (torch layout) scaled to [0, 1] (raw pixels are 0..16); y: int64 [N].
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float64)[:, None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def epoch_batches(x: np.ndarray, y: np.ndarray, *, batch: int, steps: int, seed: int = 0):
    """``steps`` batches drawn epoch by epoch from one seeded permutation stream (no remainder)."""
    rng = np.random.default_rng(seed)
    out, per_epoch = [], len(y) // batch
    while len(out) < steps:
        perm = rng.permutation(len(y))
        for j in range(per_epoch):
            idx = perm[j * batch:(j + 1) * batch]
            out.append((x[idx], y[idx]))
            if len(out) == steps:
                break
    return out


__all__ = ["default_loss", "epoch_batches", "load_digits_split", "synthetic_batches"]
