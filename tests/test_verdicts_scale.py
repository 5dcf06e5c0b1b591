"""Tolerances scale with the tensor: a small tensor cannot hide a large error under an absolute
bound or an input-sized noise floor, and a large one is not failed for rounding in its near-zero
elements."""
from __future__ import annotations

import flax.linen as nn
import numpy as np
import torch

import parity
from parity.compare import compare
from parity.tolerances import FORWARD, GRAD, tolerance_for


class Scaled(torch.nn.Module):
    """A model whose output is legitimately small (a diffusion-style 1e-6 output scale)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * 1e-6


def _flax_scaled(factor: float):
    class FlaxScaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="fc")(x) * factor

    return FlaxScaled()


def test_small_output_fifty_percent_off_fails_and_the_correct_twin_passes():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    wrong = parity.check(Scaled(), _flax_scaled(1.5e-6), x, dtype="float32")
    assert not wrong.ok, str(wrong)
    assert not wrong.outputs[0].ok and not next(c for c in wrong.param_grads if c.name == "grad fc.weight").ok
    assert any("judged against a float64 run" in w for w in wrong.warnings)
    right = parity.check(Scaled(), _flax_scaled(1e-6), x, dtype="float32")
    assert right.ok, str(right)


def test_table_atol_is_relative_to_the_tensor_rms():
    tol = tolerance_for("float32", GRAD)
    rng = np.random.default_rng(0)
    small = rng.standard_normal(64) * 1e-6
    assert not compare("g", small * 1.5, small, tol).ok  # an absolute 1e-4 passed this
    # a per-call override keeps torch.testing's absolute atol
    assert compare("g", small * 1.5, small, tol.override(1e-4, 1e-4)).ok
    # a large tensor's near-zero element keeps rounding of its large ones (BERT-base embedding
    # gradients reach 1e1: an absolute 1e-4 failed the correct twin there)
    big = rng.standard_normal(64) * 10.0
    big[0] = 1e-3
    noisy = big + rng.standard_normal(64) * 1e-6 * 10.0
    noisy[0] = big[0] + 5e-4
    assert compare("g", noisy, big, tol).ok
    assert not compare("g", noisy * (1 + 1e-3), big, tol).ok  # a 1e-3 relative error still fails
    assert not compare("y", small * 1.5, small, tolerance_for("float32", FORWARD)).ok
